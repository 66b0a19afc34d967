"README.md is what the offline README command (`bnet-readme`) renders from nbs/index.ipynb."
import json, shutil
from pathlib import Path
from bnet_fastai.docs import readme_md

root = Path(__file__).resolve().parents[1]

def test_readme_matches_index():
    assert (root/'README.md').read_text() == readme_md(root), \
        "README.md and nbs/index.ipynb disagree: edit the notebook, then run `bnet-readme`"

def test_readme_follows_index(tmp_path):
    "An edit to the notebook changes the rendering, and nbdev's directives apply (`#| hide` cells stay out)."
    (tmp_path/'nbs').mkdir()
    shutil.copy(root/'pyproject.toml', tmp_path)
    nb = json.loads((root/'nbs'/'index.ipynb').read_text())
    hidden = next(c for c in nb['cells'] if ''.join(c['source']).startswith('#| hide'))
    hidden['source'] = ''.join(hidden['source']) + '\n_only_in_a_hidden_cell = 1'
    md = next(c for c in nb['cells'] if c['cell_type'] == 'markdown' and '## Install' in ''.join(c['source']))
    md['source'] = ''.join(md['source']).replace('## Install', '## Install\n\nA sentence only this copy has.')
    (tmp_path/'nbs'/'index.ipynb').write_text(json.dumps(nb))
    txt = readme_md(tmp_path)
    assert 'A sentence only this copy has.' in txt and txt != (root/'README.md').read_text()
    assert '_only_in_a_hidden_cell' not in txt
