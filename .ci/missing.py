"""Say what the make targets must install: exit 1 and list what is missing, or exit 0.

`python .ci/missing.py torch==2.14.1 ...` checks the requirements given; with none, the project's own
(pyproject.toml's dependencies and dev extras) and its commands."""
import importlib.metadata as md, shutil, sys
from pathlib import Path
try: import tomllib
except ImportError: from pip._vendor import tomli as tomllib  # Python 3.10
try: from packaging.requirements import Requirement
except ImportError: from pip._vendor.packaging.requirements import Requirement  # a fresh venv has only pip

root = Path(__file__).resolve().parents[1]

def installed_here(name):
    "Whether `name` is installed (editable or not) from this checkout, not from another clone."
    try: url = md.distribution(name).read_text('direct_url.json') or ''
    except md.PackageNotFoundError: return False
    return root.as_uri() in url

def missing(reqs, cmds=()):
    for r in map(Requirement, reqs):
        try: v = md.version(r.name)
        except md.PackageNotFoundError: yield f"{r.name} (not installed)"; continue
        if not r.specifier.contains(v, prereleases=True): yield f"{r.name} {v} (needs {r.specifier})"
    for c in cmds:
        if not shutil.which(c): yield f"the {c} command"

if __name__ == '__main__':
    if sys.argv[1:]: reqs, cmds = sys.argv[1:], ()
    else:
        proj = tomllib.loads((root/'pyproject.toml').read_text())['project']
        reqs, cmds = [proj['name'], *proj['dependencies'], *proj['optional-dependencies']['dev']], proj['scripts']
    miss = list(missing(reqs, cmds))
    if not sys.argv[1:] and not installed_here(proj['name']): miss.append(f"{proj['name']} from {root}")
    if miss: print("to install: " + ', '.join(miss))
    sys.exit(1 if miss else 0)
