"The Quarto path (`nbdev-docs`) stays valid: its config files are current and its sidebar lists every page of the offline site."
import runpy, shutil, yaml
from pathlib import Path
from nbdev.config import get_config
from nbdev.quarto import refresh_quarto_yml
from fastcore.xtras import working_directory

root = Path(__file__).resolve().parents[1]
doc_nbs = runpy.run_path(str(root/'docs'/'build.py'))['doc_nbs']
nbs = root/'nbs'

def test_quarto_yml():
    q = yaml.safe_load((nbs/'_quarto.yml').read_text())
    assert q['project']['type'] == 'website'
    assert q['metadata-files'] == ['nbdev.yml', 'sidebar.yml']
    assert (nbs/q['format']['html']['css']).exists()

def test_nbdev_yml_current(tmp_path):
    "nbdev-docs regenerates nbdev.yml from pyproject.toml: the committed one must already be that."
    shutil.copy(root/'pyproject.toml', tmp_path)
    shutil.copytree(nbs, tmp_path/'nbs', ignore=shutil.ignore_patterns('*.ipynb', 'sidebar.yml'))
    with working_directory(tmp_path): refresh_quarto_yml()
    for f in ('nbdev.yml', '_quarto.yml'): assert (tmp_path/'nbs'/f).read_text() == (nbs/f).read_text(), f

def test_sidebar_lists_every_notebook():
    pages = [p for _,p in doc_nbs(get_config(root))]
    assert pages[0].name == 'index.ipynb'
    assert sorted(p.name for p in pages) == sorted(p.name for p in nbs.glob('*.ipynb') if p.name[0] not in '_.')
    assert all(p.exists() for p in pages)
