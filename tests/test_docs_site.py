"""The built docs site, as a reader sees it in headless Chromium.

Needs the site built (`python docs/build.py`) and Debian's `chromium` and `chromium-driver`; `make test` provides all three
(without apt the browser tests skip, unless BNET_REQUIRE_BROWSER=1, as in CI). The test installs nothing: it serves
docs/_site/ on 127.0.0.1 and drives the browser through chromedriver, with every other host unreachable."""
import http.server, importlib.util, inspect, json, os, re, shutil, subprocess, sys, threading, uuid
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urldefrag
from urllib.request import urlopen
import pytest
from fastcore.docments import docments
from nbdev.config import get_config
from fastcore.nbio import mk_cell
from bnet_fastai.layers import BNET

root = Path(__file__).resolve().parents[1]
# The site builder: a developer tool, not part of the package. Imported under a name, as fastcore's `parallel` needs.
_spec = importlib.util.spec_from_file_location('docs_build', root/'docs'/'build.py')
build = sys.modules.setdefault('docs_build', importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(build)
doc_nbs, page_name = build.doc_nbs, build.page_name
site_dir = root/'docs'/'_site'
artifacts = root/'test_artifacts'
chrome_flags = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                '--disable-component-update', '--disable-sync', '--no-first-run',
                # offline, as a reader without network: no host but the local server resolves
                '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1']

def _exe(name):
    p = shutil.which(name)
    if p: return p
    msg = f"`{name}` not found: install chromium and its driver (`apt-get install chromium chromium-driver`; `make test` does where apt exists)"
    if os.environ.get('BNET_REQUIRE_BROWSER') == '1': pytest.fail(msg)
    pytest.skip(msg)

@contextmanager
def serve(folder):
    "Serve `folder` on 127.0.0.1 (a free port) in a thread; `.log` lists `(path, status)` of every request."
    log = []
    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_request(self, code='-', size='-'): log.append((self.path, int(code)))
        def log_message(self, *args): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), partial(Handler, directory=str(folder)))
    th = threading.Thread(target=srv.serve_forever, daemon=True); th.start()
    srv.url, srv.log = f'http://127.0.0.1:{srv.server_address[1]}/', log
    try: yield srv
    finally: srv.shutdown(); srv.server_close()

@pytest.fixture(scope='module')
def site():
    if not (site_dir/'index.html').exists(): pytest.fail("docs/_site/ is not built: run `python docs/build.py` first (`make test` does)")
    with serve(site_dir) as srv: yield srv

@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = _exe('chromium')
    for f in chrome_flags + [f'--user-data-dir={tmp_path_factory.mktemp("chromium-profile")}', '--window-size=1280,1400']:
        opts.add_argument(f)
    drv = webdriver.Chrome(options=opts, service=Service(_exe('chromedriver')))
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()

def _wait(drv, js:str, what:str, limit:float=60):
    "Wait until the script `js` returns something truthy, or fail naming `what` (never go on silently)."
    from selenium.webdriver.support.ui import WebDriverWait
    from selenium.common.exceptions import TimeoutException
    try: return WebDriverWait(drv, limit, poll_frequency=0.05).until(lambda d: d.execute_script(js))
    except TimeoutException: pytest.fail(f"{what}: not within {limit:g} s at {drv.current_url}")

def _open(drv, url):
    drv.get(url)
    _wait(drv, "return document.readyState == 'complete'", 'page load')

def _pages():
    cfg = get_config(root)
    return [page_name(p, cfg.nbs_path) for _,p in doc_nbs(cfg)]

def test_index_page(site, browser):
    from selenium.webdriver.common.by import By
    from bnet_fastai.models.xresnet import xresnet50
    _open(browser, site.url + 'index.html')
    assert browser.find_element(By.TAG_NAME, 'h1').text.strip() == get_config(root).title
    nav = {urlsplit(a.get_attribute('href')).path.strip('/') for a in browser.find_elements(By.CSS_SELECTOR, '.sidebar-tree a')}
    assert nav == {f'{p}.html' for p in _pages() if p != 'index'}, 'the navigation lists every page'
    # The quick start's output is on the page: the number of BNET layers in xresnet50(norm='bnet').
    n = sum(isinstance(m, BNET) for m in xresnet50(n_out=10, norm='bnet').modules())
    outs = [e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, '.cell_output') if e.is_displayed()]
    assert str(n) in outs

def test_math_renders_offline(site, browser):
    "The optimizers page's formula is typeset by MathJax served from the site itself, with no other host reachable."
    from selenium.webdriver.common.by import By
    _open(browser, site.url + 'optimizers.html')
    srcs = browser.execute_script("return Array.from(document.scripts).map(s => s.src).filter(s => s)")
    assert srcs and all(s.startswith(site.url) for s in srcs), f'scripts from elsewhere: {[s for s in srcs if not s.startswith(site.url)]}'
    _wait(browser, "return document.querySelectorAll('mjx-container').length", 'MathJax typesetting') # after the page has loaded
    math = browser.find_elements(By.CSS_SELECTOR, 'article mjx-container')
    assert math and all(m.is_displayed() and m.size['width'] > 0 for m in math), 'no typeset formula on the page'
    text = browser.find_element(By.TAG_NAME, 'article').text
    assert '\\(' not in text and '$$' not in text and '$f(x)' not in text, 'raw TeX is shown'
    assert not [(p, c) for p, c in site.log if c >= 400], 'MathJax asked the server for a file it does not have'

def test_footer_names_the_holder(site, browser):
    from selenium.webdriver.common.by import By
    _open(browser, site.url + 'index.html')
    footer = browser.find_element(By.TAG_NAME, 'footer').text
    assert f"Copyright © {get_config(root).title}" in footer.replace('\n', ' ')

def _shown_signature(txt):
    "`(name, default or None, comment)` per parameter line of show_doc's signature block."
    return re.findall(r'^\s+(\w+)(?::[^=#\n]+?)?(?:=([^#\n]+?))?,?\s*#\s*(.+?)\s*$', txt, re.M)

def test_bnet_api_page(site, browser):
    from selenium.webdriver.common.by import By
    _open(browser, site.url + 'layers.html')
    sig = next(e for e in browser.find_elements(By.CSS_SELECTOR, 'pre') if e.text.startswith('def BNET('))
    assert sig.is_displayed()
    assert browser.execute_script('return arguments[0].scrollWidth <= arguments[0].clientWidth', sig), \
        'the whole signature, descriptions included, is in view without scrolling'
    params = _shown_signature(sig.text)
    shown = 'BNET(' + ', '.join(n if d == '' else f'{n}={d}' for n,d,_ in params) + ')'
    # The page must agree with the class itself: its signature, and its docments as parameter descriptions.
    sig_params = inspect.signature(BNET).parameters.values()
    expected = 'BNET(' + ', '.join(p.name if p.default is p.empty else f'{p.name}={p.default!r}' for p in sig_params) + ')'
    assert shown.startswith('BNET(nf, ks=3, ndim=2, zero=False, ')
    assert shown == expected
    assert {n: c for n,_,c in params} == {k: v for k,v in docments(BNET).items() if k != 'return' and v}
    body = browser.find_element(By.TAG_NAME, 'body').text
    assert BNET.__doc__.replace('`', '') in body, 'the docstring is visible'
    heading = browser.find_element(By.ID, 'bnet')
    browser.execute_script('arguments[0].scrollIntoView()', heading)
    artifacts.mkdir(exist_ok=True)
    png = artifacts/'bnet_page.png'
    assert browser.save_screenshot(str(png))
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000

_links_js = """return [Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
                       Array.from(document.images).map(i => [i.currentSrc || i.src, i.complete && i.naturalWidth > 0])]"""

def test_crawl_links_and_images(site, browser):
    "Every page reachable from the index: internal links resolve, every image loads, no request gets an error."
    todo, seen, assets, bad_imgs, n_imgs = [site.url + 'index.html'], set(), set(), [], 0
    while todo:
        url = todo.pop()
        if url in seen: continue
        seen.add(url)
        _open(browser, url)
        links, imgs = browser.execute_script(_links_js)
        n_imgs += len(imgs)
        bad_imgs += [(url, src) for src,ok in imgs if not ok]
        for href in links:
            href = urldefrag(href)[0]
            if not href.startswith(site.url): continue
            if href.endswith('.html') or href.endswith('/'): todo.append(href)
            else: assets.add(href)
    for a in sorted(assets): urlopen(a).read()  # raises on 404
    errors = [(p, c) for p,c in site.log if c >= 400]
    assert not errors, f'requests that failed: {errors}'
    assert not bad_imgs, f'images that did not load: {bad_imgs}'
    visited = {urlsplit(u).path.strip('/') or 'index.html' for u in seen}
    print(f'crawled {len(seen)} pages, {len(assets)} other files, {n_imgs} images')
    assert {f'{p}.html' for p in _pages()} <= visited, 'every notebook page is reachable'

def _experiment_pages():
    cfg = get_config(root)
    return [page_name(p, cfg.nbs_path) for _,p in doc_nbs(cfg) if 'experiment' in p.name]

def test_experiment_page(site, browser):
    "Each experiment page shows its results table and its curves image."
    from selenium.webdriver.common.by import By
    pages = _experiment_pages()
    if not pages: pytest.skip('no experiment notebook in nbs/')
    for p in pages:
        _open(browser, site.url + f'{p}.html')
        tables = [t for t in browser.find_elements(By.CSS_SELECTOR, 'article table') if t.is_displayed()]
        assert any(len(t.find_elements(By.TAG_NAME, 'tr')) >= 3 for t in tables), f'{p}: no results table'
        imgs = browser.execute_script(
            "return Array.from(document.querySelectorAll('article img')).map(i => i.complete && i.naturalWidth > 100)")
        assert any(imgs), f'{p}: no plot image shown'

def test_docstring_edit_changes_page(tmp_path, browser):
    "On a copy of the project: change BNET's docstring in its notebook, rebuild, and the page shows the new one."
    from selenium.webdriver.common.by import By
    for d in ('nbs', 'bnet_fastai'): shutil.copytree(root/d, tmp_path/d, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
    shutil.copytree(root/'docs', tmp_path/'docs', ignore=shutil.ignore_patterns('_site', 'src', 'doctrees'))  # keep the run cache
    shutil.copy(root/'pyproject.toml', tmp_path)
    old, new = BNET.__doc__, f'BNET with a docstring edited by the site test {uuid.uuid4().hex[:8]}.'
    nb_path = tmp_path/'nbs'/'00_layers.ipynb'
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb['cells'] if 'class BNET(' in ''.join(c['source']))
    cell['source'] = ''.join(cell['source']).replace(f'"{old}"', f'"{new}"')
    assert new in cell['source']
    nb_path.write_text(json.dumps(nb, indent=1))
    env = {**__import__('os').environ, 'PYTHONPATH': str(tmp_path)}
    res = subprocess.run([sys.executable, str(tmp_path/'docs'/'build.py')],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with serve(tmp_path/'docs'/'_site') as srv:
        _open(browser, srv.url + 'layers.html')
        body = browser.find_element(By.TAG_NAME, 'body').text
    assert new in body and old.replace('`', '') not in body


# The builder's pieces, without a browser.

def test_pages_keep_quartos_names():
    "Every notebook is a page, the index first, named as Quarto names it, so nbdev's links to the hosted docs map onto it."
    cfg = get_config(root)
    pages = doc_nbs(cfg)
    assert pages[0][1].name == 'index.ipynb'
    assert {p.name for _, p in pages} == {p.name for p in cfg.nbs_path.glob('*.ipynb') if not p.name.startswith('_')}
    assert page_name(cfg.nbs_path/'00_layers.ipynb', cfg.nbs_path) == 'layers'

def test_run_cache_key_ignores_where_it_runs(tmp_path):
    """The notebooks' run cache is keyed the same from any folder: an editable install's `bnet_fastai.egg-info`, which
    only a process started in the project root sees, must not make a copy of the project (the site test's) rerun them all."""
    key = f"import runpy; print(runpy.run_path({str(root/'docs'/'build.py')!r})['env_key']())"
    egg = tmp_path/'in_root'/'bnet_fastai.egg-info'; egg.mkdir(parents=True)
    (egg/'PKG-INFO').write_text('Metadata-Version: 2.1\nName: bnet_fastai\nVersion: 0.0.0.dev0\n')
    (tmp_path/'elsewhere').mkdir()
    keys = [subprocess.run([sys.executable, '-c', key], cwd=tmp_path/d, capture_output=True, text=True, timeout=300) for d in ('in_root', 'elsewhere')]
    assert all(k.returncode == 0 for k in keys), keys[0].stderr[-2000:]
    assert keys[0].stdout.count('==') > 10 and keys[0].stdout == keys[1].stdout

def test_quarto_options_and_links():
    c = mk_cell('#| echo: false\n#| output: asis\nshow_doc(BNET)')
    assert build.quarto_opts(c) == {'echo': 'false', 'output': 'asis'} and c.source == 'show_doc(BNET)'
    ll, pg = build.local_links, {'index': 'index.ipynb', 'layers': '00_layers.ipynb'}
    assert ll('A [`BNET`](https://x.io/p/layers.html#bnet) layer', pg, 'https://x.io/p/') == 'A [`BNET`](layers.ipynb#bnet) layer'
    assert ll('see [the layer](00_layers.ipynb)', pg, 'https://x.io/p/') == 'see [the layer](layers.ipynb)'
    other = '[fastai](https://docs.fast.ai/learner.html#learner)'
    assert ll(other, pg, 'https://x.io/p/') == other

def test_index_page_processed():
    "nbdev's processing of the README's notebook: the frontmatter becomes the title and no Quarto option is left."
    cfg = get_config(root)
    pg = {page_name(p, cfg.nbs_path): p for _, p in doc_nbs(cfg)}
    idx = build.process_nb(cfg.nbs_path/'index.ipynb', cfg.nbs_path/'index.ipynb', pg, cfg)
    assert idx.cells[0].source.splitlines()[0] == f'# {cfg.title}'
    assert not any(c.source.startswith('#|') for c in idx.cells)

def _project(tmp_path, cells:dict):
    "A project with one notebook per `name: [cell sources]`; its frontmatter is its first cell when that starts with '---'."
    shutil.copy(root/'pyproject.toml', tmp_path)
    (tmp_path/'nbs').mkdir()
    for name, srcs in cells.items():
        nb = dict(cells=[mk_cell(s, 'raw' if s.startswith('---') else 'code') for s in srcs], metadata={}, nbformat=4, nbformat_minor=5)
        (tmp_path/'nbs'/f'{name}.ipynb').write_text(json.dumps(nb))
    return get_config(tmp_path)

def test_notebooks_run_as_nbdev_test_runs_them(tmp_path):
    "The build runs what nbdev-test runs: `#| eval: false` and test-flag cells are skipped, and so is a `skip_exec` notebook."
    cfg = _project(tmp_path, dict(
        ok=['x = 1', '#| eval: false\nraise ValueError("eval: false ran")', f'#| {cfg_flag()}\nraise ValueError("flagged cell ran")',
            'import os\nassert x == 1 and os.environ["IN_TEST"] == "1"\nx'],
        skipped=['---\nskip_exec: true\n---', 'raise ValueError("skip_exec notebook ran")']))
    nb = build.execute_nb(tmp_path/'nbs'/'ok.ipynb', cfg)
    assert ''.join(nb.cells[-1].outputs[0]['data']['text/plain']) == '1'
    assert not nb.cells[1].get('outputs') and not nb.cells[2].get('outputs')
    build.execute_nb(tmp_path/'nbs'/'skipped.ipynb', cfg)

def cfg_flag():
    "A test flag the project skips (`tst_flags`), which is what nbdev-test skips too."
    flags = get_config(root).tst_flags
    return (flags.split() if isinstance(flags, str) else list(flags))[0]

def test_a_cell_error_fails_the_build(tmp_path):
    "A notebook whose cell raises fails the build, named with its traceback, before Sphinx runs and with no cached result."
    cfg = _project(tmp_path, dict(index=['1 + 1'], good=['2 + 2'], bad=['y = 0', '1 / y']))
    (tmp_path/'docs').mkdir(); shutil.copy(root/'docs'/'conf.py', tmp_path/'docs')
    with pytest.raises(build.NotebookError, match=r'1 notebook\(s\) failed: bad\n(.|\n)*ZeroDivisionError'):
        build.build_docs(tmp_path, n_workers=0)
    assert not (tmp_path/'docs'/'_build'/'exec'/'bad.ipynb').exists()
    assert (tmp_path/'docs'/'_build'/'exec'/'good.ipynb').exists() and not (tmp_path/'docs'/'_site').exists()
