"README.md is what `python docs/build.py readme` renders from nbs/index.ipynb, and its Python blocks run as pasted."
import json, os, re, runpy, shutil, subprocess, sys
from pathlib import Path
import pytest
from bnet_fastai.data import fake_imagenette

root = Path(__file__).resolve().parents[1]
readme_md = runpy.run_path(str(root/'docs'/'build.py'))['readme_md']  # a developer tool, not part of the package

def test_readme_matches_index():
    assert (root/'README.md').read_text() == readme_md(root), \
        "README.md and nbs/index.ipynb disagree: edit the notebook, then run `python docs/build.py readme`"

def test_readme_follows_index(tmp_path):
    "An edit to the notebook changes the rendering, and nbdev's directives apply (`#| hide` cells stay out)."
    (tmp_path/'nbs').mkdir()
    shutil.copy(root/'pyproject.toml', tmp_path)
    nb = json.loads((root/'nbs'/'index.ipynb').read_text())
    hidden = next(c for c in nb['cells'] if ''.join(c['source']).startswith('#| hide'))
    hidden['source'] = ''.join(hidden['source']) + '\n_only_in_a_hidden_cell = 1'
    md = next(c for c in nb['cells'] if c['cell_type'] == 'markdown' and '## Two commands' in ''.join(c['source']))
    md['source'] = ''.join(md['source']).replace('## Two commands', '## Two commands\n\nA sentence only this copy has.')
    (tmp_path/'nbs'/'index.ipynb').write_text(json.dumps(nb))
    txt = readme_md(tmp_path)
    assert 'A sentence only this copy has.' in txt and txt != (root/'README.md').read_text()
    assert '_only_in_a_hidden_cell' not in txt

def readme_python_blocks() -> list:
    return re.findall(r"^```python\n(.+?)^```", (root/'README.md').read_text(), re.S | re.M)

@pytest.fixture(scope='module')
def nette_home(tmp_path_factory):
    "Imagenette's layout under a FASTAI_HOME, where `untar_data` finds it without a download (64+ training images: one batch)."
    home = tmp_path_factory.mktemp('fastai_home')
    fake_imagenette(home/'data'/'imagenette2-160', n_train=7, n_val=2)
    return home

@pytest.mark.slow
@pytest.mark.parametrize('i', range(len(readme_python_blocks())))
def test_readme_block_runs_as_pasted(i, nette_home, tmp_path):
    "Each Python block of README.md, alone in a fresh interpreter, as a reader would paste it (Imagenette: the fake tree)."
    code = readme_python_blocks()[i]
    env = {**os.environ, 'FASTAI_HOME': str(nette_home), 'MPLBACKEND': 'Agg',
           'PYTHONPATH': os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')])}
    p = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, f"README block {i} failed:\n{code}\n{p.stderr[-3000:]}"

def test_readme_has_python_blocks():
    blocks = readme_python_blocks()
    assert len(blocks) >= 2 and all('import' in b for b in blocks), 'every shown block carries its imports'

def shown_commands() -> list:
    "Every `bnet-train` command line in a fenced block of README.md or of a page's markdown, as (file, command)."
    texts = {'README.md': (root/'README.md').read_text()}
    for nb in sorted((root/'nbs').glob('*.ipynb')):
        texts[nb.name] = '\n'.join(''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'markdown')
    return [(name, line.split(' #')[0].strip()) for name, t in texts.items() for block in re.findall(r"^```[^\n]*\n(.+?)^```", t, re.S | re.M)
            for line in block.splitlines() if line.strip().startswith('bnet-train ')]

def test_shown_commands_are_current():
    "Each `bnet-train` command the docs show parses, passes bnet-train's checks, and uses no deprecated option."
    import inspect, warnings
    from bnet_fastai.cli import train_parser
    from bnet_fastai.config import train_config
    cmds, parser, keys = shown_commands(), train_parser(), set(inspect.signature(train_config).parameters)
    assert len(cmds) >= 5 and {n for n, _ in cmds} >= {'README.md', '08e_cli.ipynb', '20_experiment.ipynb', '21_convergence.ipynb'}
    for name, cmd in cmds:
        args = vars(parser.parse_args(cmd.split()[1:]))
        with warnings.catch_warnings():
            warnings.simplefilter('error', DeprecationWarning)
            train_config(**{k: v for k, v in args.items() if k in keys})
