"CI runs exactly the test command README gives, and that command runs every notebook (in the docs build) and pytest."
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

def test_make_test_runs_every_test():
    """`make test` builds the site, which runs every notebook as nbdev-test does and fails on a cell error, then runs
    pytest (guarded against collecting nothing): each notebook runs once."""
    assert readme_test_command() == 'make test'
    mk = (root/'Makefile').read_text()
    recipe = re.search(r"^test:(.*)\n((?:\t.*\n)+)", mk, re.M)
    assert {'install', 'browser', 'sync', 'docs'} <= set(recipe[1].split())
    assert '$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder' in recipe[2] and '-eq 5' in recipe[2]
    assert 'nbdev-test' not in recipe[2]
    assert re.search(r"^docs:.*\n\t\$\(PYTHON\) docs/build.py$", mk, re.M)
