"""Build the docs site from the notebooks without Quarto, and write README.md from `nbs/index.ipynb`.

A developer tool, not part of the installed package; it needs the `dev` extra (`pip install -e ".[dev]"`):

    python docs/build.py            # run the notebooks, build the site into docs/_site/ (open docs/_site/index.html)
    python docs/build.py readme     # write README.md from nbs/index.ipynb, as `nbdev-readme` would without Quarto

The site build is also the notebooks' test: it runs exactly the cells `nbdev-test` runs (skipping `#| eval: false`,
the test flags of `tst_flags` and `skip_exec` notebooks), in each notebook's folder with `IN_TEST` set and the project
root first on `sys.path`, and fails naming every notebook with a cell error. Outputs are cached in docs/_build/exec/,
keyed on the notebook, the package sources and every installed distribution's version, so a rebuild reruns only
notebooks whose inputs changed.

nbdev's `FilterDefaults` processors do the nbdev part of each page (frontmatter, hidden and exported cells, `show_doc`,
links to backticked names); `to_myst` turns what they leave for Quarto into what myst-nb renders, and Sphinx builds the
site with the settings in docs/conf.py.
"""
from __future__ import annotations
import argparse, hashlib, importlib.metadata, io, os, re, shutil, sys, time, warnings
from contextlib import redirect_stdout
from pathlib import Path

try:
    import yaml
    from execnb.shell import CaptureShell
    from fastcore.nbio import read_nb, write_nb, mk_cell
    from fastcore.parallel import parallel
    from fastcore.xtras import working_directory
    import nbdev
    from nbdev.config import get_config, nbpath2html
    from nbdev.processors import FilterDefaults
    from nbdev.quarto import nbdev_sidebar
    from nbdev.readme_filter import doc_link
    from nbdev.test import nb_test_cells
except ImportError as e:
    raise ImportError(f"docs/build.py needs the dev extra ({e.name} is not installed): pip install -e \".[dev]\"") from e

ROOT = Path(__file__).resolve().parents[1]  # the checkout this script belongs to
IMAGES = ('.png', '.jpg', '.jpeg', '.gif', '.svg', '.webp')


# ## Pages

def _sidebar_entries(contents, section=None):
    "Flatten Quarto sidebar `contents` into `(section, path)` pairs."
    for o in contents:
        if isinstance(o, dict):
            if 'href' in o: yield o.get('section', section), o['href']
            yield from _sidebar_entries(o.get('contents', []), o.get('section', section))
        else: yield section, o

def doc_nbs(cfg=None) -> list:
    "`(section, notebook path)` for every page, in the order of the sidebar nbdev would give Quarto."
    cfg = cfg or get_config(ROOT)
    if cfg.custom_sidebar: sb = yaml.safe_load((cfg.nbs_path/'sidebar.yml').read_text())
    else:
        with working_directory(cfg.config_path), redirect_stdout(io.StringIO()) as f:
            nbdev_sidebar.__wrapped__(path=cfg.nbs_path, printit=True, force=True)
        sb = yaml.safe_load(f.getvalue())
    return [(s, cfg.nbs_path/p) for s, p in _sidebar_entries(sb['website']['sidebar']['contents']) if p.endswith('.ipynb')]

def page_name(nb_path, nbs_path) -> str:
    "The page's path without suffix, relative to the site root, as Quarto names it (`00_layers.ipynb` → `layers`)."
    return nbpath2html(Path(nb_path).relative_to(nbs_path)).with_suffix('').as_posix()


# ## Running the notebooks

def env_key() -> str:
    "Every installed distribution and its version: a notebook's outputs depend on them as much as on its own cells."
    # The project itself is left out (`exec_key` hashes its sources): its editable install's `*.egg-info` in the root is
    # seen only from the root, so counting it would make a copy of the project (the site test's) rerun every notebook.
    own = re.sub(r'[-_.]+', '-', get_config(ROOT).lib_name).lower()
    return '\n'.join(sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                              if re.sub(r'[-_.]+', '-', d.metadata['Name']).lower() != own}))

def exec_key(nb_path, cfg=None, env:str|None=None) -> str:
    "Hash of what a notebook's outputs depend on: its own bytes, the package sources and the installed distributions."
    cfg = cfg or get_config(ROOT)
    h = hashlib.sha256(Path(nb_path).read_bytes())
    for f in sorted(cfg.lib_path.rglob('*.py')): h.update(f.relative_to(cfg.lib_path).as_posix().encode() + f.read_bytes())
    h.update((env if env is not None else env_key()).encode())
    return h.hexdigest()

_cell_keys = dict(code={'cell_type', 'id', 'metadata', 'source', 'outputs', 'execution_count'},
                  markdown={'cell_type', 'id', 'metadata', 'source', 'attachments'}, raw={'cell_type', 'id', 'metadata', 'source'})

def _clean_cell(cell):
    "Drop working attributes and non-standard metadata that nbformat's schema rejects."
    for k in [k for k in cell if k not in _cell_keys[cell['cell_type']]]: del cell[k]
    cell.get('metadata', {}).pop('execution', None)
    return cell

def execute_nb(nb_path, cfg=None):
    "Run the cells of `nb_path` that `nbdev-test` runs, as it runs them; returns the notebook with its outputs."
    cfg, nb_path = cfg or get_config(ROOT), Path(nb_path).absolute()
    flags = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags or [])
    run = {(c.get('id'), c.source) for c in nb_test_cells(nb_path, flags)}
    nb = read_nb(nb_path)
    # nbdev-test puts the project root first on sys.path (its `basepath`), so the notebooks import this checkout's package.
    if str(cfg.config_path) not in sys.path: sys.path.insert(0, str(cfg.config_path))
    k, prev = CaptureShell(nb_path, profile=bool(cfg.exec_profile)), os.environ.get('IN_TEST')
    os.environ['IN_TEST'] = '1'
    try:
        with working_directory(nb_path.parent):
            k.run_all(nb, exc_stop=True, preproc=lambda c: (c.get('id'), c.source) not in run, cell_timeout=cfg.cell_timeout or None)
    except Exception as e: raise RuntimeError(f"{nb_path.name} failed:\n{k.prettytb(fname=nb_path) or e}") from None
    finally:
        if prev is None: os.environ.pop('IN_TEST', None)
        else: os.environ['IN_TEST'] = prev
    for c in nb.cells: _clean_cell(c)
    return nb

def cached_exec(nb_path, cache_dir, cfg=None, env:str|None=None) -> Path:
    "Path of `nb_path` executed, rerunning it only when its `exec_key` changed (a failed run is never cached)."
    cfg = cfg or get_config(ROOT)
    key, dest = exec_key(nb_path, cfg, env), Path(cache_dir)/Path(nb_path).relative_to(cfg.nbs_path)
    if dest.exists() and read_nb(dest).metadata.get('bnet_docs', {}).get('key') == key: return dest
    nb = execute_nb(nb_path, cfg)
    nb.metadata['bnet_docs'] = {'key': key}
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dest)
    return dest


# ## From nbdev's processed notebook to a myst-nb page

_re_qopt = re.compile(r'^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')
_re_mdlink = re.compile(r'(\]\()([^)\s]+)(\))')
# Quarto cell options and the myst-nb tags that do the same
_opt_tags = {('echo', 'false'): 'remove-input', ('output', 'false'): 'remove-output', ('code-fold', 'show'): 'hide-input',
             ('code-fold', 'true'): 'hide-input'}

def quarto_opts(cell) -> dict:
    "Remove the leading `#| key: value` Quarto options from `cell`'s source and return them."
    lines, opts = cell.source.splitlines(), {}
    while lines and (m := _re_qopt.match(lines[0])):
        opts[m[1]] = m[2].strip('"\''); lines.pop(0)
    cell.source = '\n'.join(lines)
    return opts

def local_links(md:str, pages:dict, doc_url:str, nb_dir:str='') -> str:
    """Point markdown links to hosted pages (`{doc_url}layers.html#bnet`) or to notebooks (`00_layers.ipynb`) at the
    local pages; `pages` maps page names to notebooks, `nb_dir` is the folder of the page holding `md`."""
    by_nb = {Path(p).name: n for n, p in pages.items()}
    def _sub(m):
        url, anchor = (m[2].split('#', 1) + [''])[:2]
        anchor = '#'+anchor if anchor else ''
        if doc_url and url.startswith(doc_url) and url.endswith('.html') and url[len(doc_url):-5] in pages:
            name = url[len(doc_url):-5]
        elif not re.match(r'^\w+:', url) and url.endswith('.ipynb') and Path(url).name in by_nb: name = by_nb[Path(url).name]
        else: return m[0]
        # Sphinx resolves links to source documents, checks them and writes relative links to the pages
        return f'{m[1]}{os.path.relpath(name, nb_dir or ".")}.ipynb{anchor}{m[3]}'
    return _re_mdlink.sub(_sub, md)

def _fm_cell(cell):
    "`(frontmatter, markdown title cell)` from nbdev's YAML frontmatter cell."
    fm = yaml.safe_load(cell.source.strip().strip('-')) or {}
    md = f"# {fm.get('title', '')}" + (f"\n\n> {fm['description']}" if fm.get('description') else '')
    return fm, mk_cell(md, 'markdown')

def _fix_output(o, asis, pages, cfg, nb_dir):
    "Drop `show_doc` cells' stderr, and localise links in markdown outputs."
    if asis and o.get('name') == 'stderr': return None
    md = o.get('data', {}).get('text/markdown')
    if md is not None:
        md = ''.join(md) if isinstance(md, list) else md
        # A rule inside an output isn't a section break for docutils: keep the line as HTML.
        if asis: md = re.sub(r'^---[ \t]*$', '<hr class="showdoc-rule">', md, flags=re.M)
        o['data']['text/markdown'] = local_links(md, pages, cfg.doc_url, nb_dir)
    return o

def to_myst(nb, pages:dict, cfg=None, nb_dir:str=''):
    "Turn a notebook processed by nbdev's `FilterDefaults` into one myst-nb renders like Quarto."
    cfg, cells = cfg or get_config(ROOT), []
    for cell in nb.cells:
        if cell.cell_type == 'raw' and cell.source.lstrip().startswith('---'):
            fm, cell = _fm_cell(cell)
            if fm.get('title') is None: continue
        if cell.cell_type == 'markdown': cell.source = local_links(cell.source, pages, cfg.doc_url, nb_dir)
        if cell.cell_type == 'code':
            opts = quarto_opts(cell)
            if opts.get('include') == 'false': continue
            tags = [t for kv, t in _opt_tags.items() if opts.get(kv[0]) == kv[1]]
            if tags: cell.metadata['tags'] = list(dict.fromkeys(cell.metadata.get('tags', []) + tags))
            cell.outputs = [o for o in (_fix_output(o, opts.get('output') == 'asis', pages, cfg, nb_dir)
                                        for o in cell.get('outputs', [])) if o is not None]
        cells.append(_clean_cell(cell))
    nb.cells = cells
    return nb

def _filter(nb, cfg, readme:bool=False):
    "nbdev's doc processors, run from the project root as `nbdev-docs` runs them."
    with working_directory(cfg.config_path), warnings.catch_warnings():
        # README's code blocks carry their imports so each runs as pasted; nbdev warns about such cells elsewhere
        if readme: warnings.filterwarnings('ignore', message='Found cells containing imports and other code')
        FilterDefaults()(nb)

def process_nb(executed, nb_path, pages:dict, cfg=None):
    "nbdev's doc processing of the executed copy of `nb_path`, turned into a myst-nb page."
    cfg = cfg or get_config(ROOT)
    nb = read_nb(executed)
    nb.path_ = str(nb_path)  # frontmatter and doc links are worked out from the source notebook
    _filter(nb, cfg, Path(nb_path).name == cfg.readme_nb)
    return to_myst(nb, pages, cfg, str(Path(page_name(nb_path, cfg.nbs_path)).parent))


# ## Building the site

def _toctree(pages, sections):
    "MyST toctree directives for every page but the index, grouped by sidebar section."
    res, groups = [], {}
    for n in pages:
        if n != 'index': groups.setdefault(sections.get(n), []).append(n)
    for sec, names in groups.items():
        cap = f':caption: {sec}\n' if sec else ''
        res.append('```{toctree}\n:hidden:\n:maxdepth: 1\n' + cap + '\n' + '\n'.join(names) + '\n```')
    return '\n\n'.join(res)

def _stage_one(o, root, cache_dir, src_dir, pages, sections, env):
    "Execute (or reuse) and process one notebook, writing its page: `(seconds, None)`, or `(seconds, error)` if it failed."
    name, nb_path = o
    start, cfg = time.time(), get_config(root)
    try: nb = process_nb(cached_exec(nb_path, cache_dir, cfg, env), nb_path, pages, cfg)
    except Exception as e: return time.time() - start, str(e)  # reported with every other failure once all have run
    if name == 'index': nb.cells.append(mk_cell(_toctree(pages, sections), 'markdown'))
    dest = Path(src_dir)/f'{name}.ipynb'
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dest)  # writes only when the text changed, so Sphinx rereads only changed pages
    return time.time() - start, None

def _stage_images(cfg, src_dir):
    "Copy image files under `nbs/` so that markdown image links resolve from the staged pages."
    for f in cfg.nbs_path.rglob('*'):
        rel = f.relative_to(cfg.nbs_path)
        if f.suffix.lower() not in IMAGES or any(p[0] in '._' for p in rel.parts): continue
        dest = Path(src_dir)/rel
        if not dest.exists() or dest.read_bytes() != f.read_bytes():
            dest.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, dest)

def _sphinx(src_dir, out_dir, doctrees, conf_dir, strict=False) -> int:
    from sphinx.cmd.build import build_main
    args = ['-b', 'html', '-q', '-c', str(conf_dir), '-d', str(doctrees), str(src_dir), str(out_dir)]
    return build_main((['-W', '--keep-going'] if strict else []) + args)

class NotebookError(RuntimeError):
    "One or more notebooks failed to run: the build stops before Sphinx, as `nbdev-test` would fail."

def build_docs(path=None, n_workers:int=2, strict:bool=False) -> Path:
    """Build the site of the project at `path` (default: this checkout) into `docs/_site/`, running `n_workers`
    notebooks at a time (0: one by one in this process); `strict` fails on Sphinx warnings. Returns the site's `index.html`."""
    cfg = get_config(path or ROOT)
    docs = cfg.config_path/'docs'
    if not (docs/'conf.py').exists(): raise FileNotFoundError(f"{docs/'conf.py'} not found: the site's Sphinx settings live there")
    build, out = docs/'_build', docs/'_site'
    src = build/'src'
    entries = doc_nbs(cfg)
    pages = {page_name(p, cfg.nbs_path): p for _, p in entries}
    if len(pages) != len(entries):
        dups = sorted(n for n in pages if sum(page_name(p, cfg.nbs_path) == n for _, p in entries) > 1)
        raise ValueError(f"notebooks map to the same page name(s) {dups}; rename one of each pair")
    sections = {page_name(p, cfg.nbs_path): s for s, p in entries}
    start = time.time()
    todo = sorted(pages.items(), key=lambda o: o[0] == 'index')  # index last: it is light, and its navigation needs every page
    res = parallel(_stage_one, todo, root=cfg.config_path, cache_dir=build/'exec', src_dir=src, pages=pages,
                   sections=sections, env=env_key(), n_workers=min(n_workers, len(todo)), progress=False)
    if failed := [(n, err) for (n, _), (_, err) in zip(todo, res) if err]:
        raise NotebookError(f"{len(failed)} notebook(s) failed: {', '.join(n for n, _ in failed)}\n\n" + '\n\n'.join(e for _, e in failed))
    for f in src.rglob('*.ipynb'):  # pages whose notebook is gone
        if f.relative_to(src).with_suffix('').as_posix() not in pages: f.unlink()
    _stage_images(cfg, src)
    print(f"Notebooks ready in {time.time()-start:.0f}s: " + ', '.join(f'{n} {s:.0f}s' for (n, _), (s, _) in zip(todo, res)))
    # Sphinx builds in docs/_build/ (myst-nb keeps its notebook copies beside the output folder); the finished site
    # then replaces docs/_site/, so a failed build leaves the last good site in place.
    if rc := _sphinx(src, build/'html', build/'doctrees', docs, strict): raise RuntimeError(f"Sphinx failed (exit {rc})")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(build/'html', out, ignore=shutil.ignore_patterns('.buildinfo', '.doctrees'))
    print(f"Site built in {time.time()-start:.0f}s: {out/'index.html'}")
    return out/'index.html'


# ## README.md from index.ipynb

def _readme_output(o):
    "A saved output as README text: streams and plain text as code blocks, markdown as it is; images are left out."
    if o.get('output_type') == 'stream': return '```\n' + ''.join(o['text']).rstrip() + '\n```'
    d = o.get('data', {})
    for mime, fmt in (('text/markdown', '{}'), ('text/plain', '```\n{}\n```')):
        if mime in d: return fmt.format((''.join(d[mime]) if isinstance(d[mime], list) else d[mime]).rstrip())

def readme_md(path=None) -> str:
    """README.md's text, rendered from the `readme_nb` (`index.ipynb`) of the project at `path` as `nbdev-readme`
    renders it, without Quarto: nbdev's processing, markdown as it is, code as fenced Python, saved text outputs,
    and links to notebooks pointed at their hosted pages."""
    cfg = get_config(path or ROOT)
    nb = read_nb(cfg.nbs_path/cfg.readme_nb)
    _filter(nb, cfg, readme=True)
    parts = []
    for cell in nb.cells:
        if cell.cell_type == 'raw' and cell.source.lstrip().startswith('---'): cell = _fm_cell(cell)[1]
        if cell.cell_type == 'markdown':
            parts.append(_re_mdlink.sub(lambda m: m[1]+doc_link(m[2], cfg.doc_url)+m[3], cell.source.strip()))
        elif cell.cell_type == 'code':
            opts = quarto_opts(cell)
            if opts.get('include') == 'false': continue
            if opts.get('echo') != 'false' and cell.source.strip(): parts.append('```python\n' + cell.source.strip() + '\n```')
            if opts.get('output') != 'false': parts += [t for t in map(_readme_output, cell.get('outputs', [])) if t]
    return '\n\n'.join(p for p in parts if p) + '\n'

def write_readme(path=None) -> Path:
    "Write README.md of the project at `path` (default: this checkout) from its `index.ipynb`."
    cfg = get_config(path or ROOT)
    dest = cfg.config_path/'README.md'
    dest.write_text(readme_md(cfg.config_path))
    print(f"Wrote {dest} from {cfg.nbs_path/cfg.readme_nb}")
    return dest


# ## Command line

def main(argv=None):
    p = argparse.ArgumentParser(prog='python docs/build.py', description=__doc__.split('\n\n')[0])
    p.add_argument('what', nargs='?', choices=('site', 'readme'), default='site', help="what to build (default: site)")
    p.add_argument('--path', default=None, help="project root (default: the checkout holding this script)")
    p.add_argument('--n-workers', type=int, default=2, help="site: notebooks run in parallel (default: 2)")
    p.add_argument('--strict', action='store_true', help="site: fail on Sphinx warnings")
    a = p.parse_args(argv)
    if a.n_workers < 1: p.error(f"--n-workers must be at least 1, got {a.n_workers}")
    if a.what == 'readme': return write_readme(a.path)
    try: build_docs(a.path, n_workers=a.n_workers, strict=a.strict)
    except NotebookError as e: sys.exit(f"docs/build.py: {e}")

if __name__ == '__main__':
    # fastcore's `parallel` runs functions of `__main__` serially, and spawned workers cannot import `__main__`'s
    # functions by name: run them from this file imported as a module (its folder is first on `sys.path`).
    import build
    build.main()
