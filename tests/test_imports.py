"Every module imports on its own, and the package's modules import one another without a cycle."
import ast, json, os, subprocess, sys
from pathlib import Path
import pytest

root = Path(__file__).resolve().parents[1]
PKG = 'bnet_fastai'

def module_names(pkg_dir:Path, pkg:str=PKG) -> dict:
    "`{module name: file}` for every module of the package in `pkg_dir` (a package is named by its `__init__.py`)."
    res = {}
    for f in sorted(pkg_dir.rglob('*.py')):
        parts = f.relative_to(pkg_dir.parent).with_suffix('').parts
        res['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = f
    return res

def imports_of(name:str, path:Path, modules:dict, pkg:str=PKG) -> set:
    """The package's modules that module `name` imports anywhere in its code (top level, functions, classes), relative
    or absolute. `from P import x` counts as importing `P.x` where that is a module, else `P`. Importing a submodule
    also runs its parents' `__init__`, but that is not an edge: Python initialises a parent before its submodules."""
    is_pkg = path.name == '__init__.py'
    here = name.split('.') if is_pkg else name.split('.')[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import): targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = '.'.join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module
            targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names]
        else: continue
        found |= {t for t in targets if t == pkg or t.startswith(pkg + '.')}
    return {t if t in modules else t.rsplit('.', 1)[0] for t in found} - {name}

def import_graph(pkg_dir:Path, pkg:str=PKG) -> dict:
    mods = module_names(pkg_dir, pkg)
    return {n: imports_of(n, f, mods, pkg) for n, f in mods.items()}

def find_cycle(graph:dict) -> list:
    "One import cycle as `[a, b, ..., a]`, or `[]`."
    state, stack = {}, []
    def visit(n):
        state[n] = 'open'; stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 'open': return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)): return c
        state[n] = 'done'; stack.pop()
        return []
    for n in sorted(graph):
        if n not in state and (c := visit(n)): return c
    return []

def test_graph_reader(tmp_path):
    "The reader sees relative, absolute, `from . import` and function-level imports, and the cycle they make."
    p = tmp_path/PKG
    (p/'sub').mkdir(parents=True)
    files = {'__init__.py': 'from .a import f\n', 'a.py': 'import os\nfrom .sub.c import g\ndef f(): pass\n',
             'b.py': 'def h():\n    from bnet_fastai.a import f\n    import bnet_fastai.sub.c\n',
             'sub/__init__.py': '', 'sub/c.py': 'from .. import b\nfrom ..a import f as _f\ndef g(): pass\n'}
    for k, v in files.items(): (p/k).write_text(v)
    g = import_graph(p)
    assert g == {PKG: {f'{PKG}.a'}, f'{PKG}.a': {f'{PKG}.sub.c'}, f'{PKG}.b': {f'{PKG}.a', f'{PKG}.sub.c'},
                 f'{PKG}.sub': set(), f'{PKG}.sub.c': {f'{PKG}.a', f'{PKG}.b'}}
    assert find_cycle(g) == [f'{PKG}.a', f'{PKG}.sub.c', f'{PKG}.a']
    (p/'sub'/'c.py').write_text('import bnet_fastai\ndef g(): pass\n')  # the package's `__init__` imports `a` again
    assert find_cycle(import_graph(p)) == [f'{PKG}', f'{PKG}.a', f'{PKG}.sub.c', f'{PKG}']
    (p/'sub'/'c.py').write_text('import os\ndef g(): pass\n')
    assert find_cycle(import_graph(p)) == []

GRAPH = import_graph(root/PKG)

def test_no_import_cycle():
    assert (cycle := find_cycle(GRAPH)) == [], f"import cycle: {' -> '.join(cycle)}"

# One interpreter imports the third-party libraries underneath (torch, pandas, timm...: most of every import's time, and
# none of them patched by this package), then forks a child per module: each child starts with no module of the
# package, or of fastai, loaded, and imports just its module.
FORK_IMPORTS = r"""
import importlib, json, os, sys, traceback
for lib in ('torch', 'torchvision', 'numpy', 'pandas', 'matplotlib', 'PIL.Image', 'scipy', 'sklearn', 'fastcore.all', 'fastprogress', 'timm', 'pytorch_optimizer'):
    try: importlib.import_module(lib)
    except ImportError: pass
root, names, res = sys.argv[1], sys.argv[2:], {}
assert not [m for m in sys.modules if m.split('.')[0] in ('bnet_fastai', 'fastai')]
for name in names:
    r, w = os.pipe()
    if (pid := os.fork()) == 0:
        os.close(r)
        try:
            m = importlib.import_module(name)
            assert m.__file__.startswith(root), m.__file__
            err = ''
        except BaseException: err = traceback.format_exc()
        os.write(w, err.encode()); os._exit(0)
    os.close(w)
    with os.fdopen(r) as f: err = f.read()
    _, status = os.waitpid(pid, 0)
    res[name] = err or ('' if status == 0 else f'the child exited with status {status}')
print(json.dumps(res))
"""

@pytest.fixture(scope='module')
def imported_alone():
    "`{module: error text, '' if it imported}`, each module imported first in a fresh process."
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')])}
    p = subprocess.run([sys.executable, '-c', FORK_IMPORTS, str(root), *sorted(GRAPH)], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])

@pytest.mark.parametrize('name', sorted(GRAPH))
def test_module_imports_alone(name, imported_alone):
    "Each module imports first in a fresh process: no module relies on another having been imported before it."
    assert imported_alone[name] == '', f"import {name} failed:\n{imported_alone[name][-3000:]}"

def test_fresh_import_catches_a_reliance(tmp_path):
    "The check fails a module that works only after another one was imported."
    pkg = tmp_path/PKG
    pkg.mkdir()
    (pkg/'__init__.py').write_text('')
    (pkg/'a.py').write_text('import sys\nX = 1\n')
    (pkg/'b.py').write_text('import sys\nY = sys.modules["bnet_fastai.a"].X\n') # works only after `a`
    env = {**os.environ, 'PYTHONPATH': str(tmp_path)}
    p = subprocess.run([sys.executable, '-c', FORK_IMPORTS, str(tmp_path), f'{PKG}.a', f'{PKG}.b'], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res[f'{PKG}.a'] == '' and "KeyError: 'bnet_fastai.a'" in res[f'{PKG}.b']
