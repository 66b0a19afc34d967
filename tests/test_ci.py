"CI runs exactly the test command README gives."
import re
from pathlib import Path

root = Path(__file__).resolve().parents[1]

def readme_test_command():
    txt = (root/'README.md').read_text()
    section = txt.split('## Run the tests', 1)[1]
    return re.search(r"```(?:sh|bash)\n(.+?)\n```", section, re.S).group(1).strip()

def test_ci_runs_readme_test_command():
    cmd = readme_test_command()
    ci_lines = [l.strip() for l in (root/'.ci'/'run').read_text().splitlines()]
    assert cmd in ci_lines, f"README's test command {cmd!r} is not a line of .ci/run"
