"""The course website in a real browser.

Headless Chromium (Debian's `chromium` + `chromium-driver`, driven through Selenium) opens the
site built by `python docs/build.py` from a local http server, with every host name but
127.0.0.1 unresolvable, and checks that:
- every page loads without a console error and requests nothing from outside the site;
- every formula on every page is typeset by the site's own MathJax, without a MathJax error;
- every figure of the executed notebooks is on its page, loaded, and shown at its own aspect ratio (2 %);
- the navigation (sidebar, and the "next" links from the home page on) reaches every notebook
  of nbs/, in course order.
It saves screenshots of the home page and of one page per model family to
docs/_build/screenshots/.

The site is (re)built first when it is missing or older than a notebook, a library module or the
docs sources (`make docs` normally leaves it fresh; `DETR_EXPLAINED_DOCS_AS_BUILT=1` tests it as it is).
Without chromium the test skips, except
under CI (`CI=true`) or `DETR_EXPLAINED_REQUIRE_BROWSER=1`, where it fails.
"""
import functools, http.server, json, os, re, subprocess, sys, threading, time
from pathlib import Path

import pytest

from lab_server import chromium_driver

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT/'docs'
HTML, SRC = DOCS/'_build'/'html', DOCS/'_build'/'src'
SHOTS = DOCS/'_build'/'screenshots'
FAMILY_PAGES = {  # screenshots: the explorer page of each family (a missing one fails the test)
    'detr': '40_explore_detr',
    'deformable_detr': '41_explore_deformable',
    'dab_detr': '42_explore_dab',
}
IMAGE_MIMES = ('image/png', 'image/jpeg', 'image/svg+xml')


def course_notebooks() -> list[str]:
    "The notebooks the site shows, in its order (docs/build.py decides: the notebooks nbdev-test runs)."
    import importlib.util
    spec = importlib.util.spec_from_file_location('detr_explained_docs_build', DOCS/'build.py')
    build = importlib.util.module_from_spec(spec); spec.loader.exec_module(build)
    return [p.stem for p in build.course_notebooks()]

def _stale() -> bool:
    index = HTML/'index.html'
    if not index.exists(): return True
    built = index.stat().st_mtime
    sources = [*(ROOT/'nbs').glob('*.ipynb'), *(ROOT/'detr_explained').glob('*.py'), DOCS/'conf.py', DOCS/'build.py']
    return any(p.stat().st_mtime > built for p in sources)


@pytest.fixture(scope='module')
def site():
    "The built site, served on 127.0.0.1 by a thread of this process; yields its base URL."
    if _stale() and os.environ.get('DETR_EXPLAINED_DOCS_AS_BUILT') != '1':   # =1: test the site as it is
        subprocess.run([sys.executable, str(DOCS/'build.py')], check=True, cwd=ROOT, timeout=1500)
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_port}'
    server.shutdown(); server.server_close()

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    "Headless Chromium (tests/lab_server.py: the flags, nothing outside 127.0.0.1, console and network logs)."
    drv = chromium_driver(tmp_path_factory.mktemp('chromium-profile'), 1280, 900)
    drv.set_page_load_timeout(60); drv.set_script_timeout(60)
    yield drv
    drv.quit()


_WAIT_MATHJAX = """
const done = arguments[arguments.length - 1];
if (!document.querySelector('script[src*="mathjax"]')) { done('no-mathjax'); return; }
const t0 = Date.now();
(function poll() {   // the script loads asynchronously: wait for MathJax to start, then for its first typesetting
  if (window.MathJax && MathJax.startup && MathJax.startup.promise)
    MathJax.startup.promise.then(() => done('ok'), e => done('error: ' + e));
  else if (Date.now() - t0 > 30000) done('MathJax did not start in 30 s');
  else setTimeout(poll, 50);
})();
"""

_PAGE_FACTS = """
const main = document.querySelector('main') || document.body;
const maths = [...main.querySelectorAll('.math')];
const imgs = [...main.querySelectorAll('.cell_output img')];
return {
  title: document.title,
  maths: maths.length,
  typeset: maths.filter(e => e.querySelector('mjx-container')).length,
  untypeset: maths.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80)).slice(0, 5),
  math_errors: main.querySelectorAll('mjx-merror, [data-mjx-error]').length,
  output_imgs: imgs.length,
  broken_imgs: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
  squeezed: imgs.filter(i => i.naturalWidth > 0 && i.clientHeight > 0).map(i =>
      [i.src.split('/').pop(), i.naturalWidth / i.naturalHeight, i.clientWidth / i.clientHeight])
    .filter(([src, shape, shown]) => Math.abs(shown / shape - 1) > 0.02),
  all_imgs_ok: [...document.images].every(i => i.complete && (i.naturalWidth > 0 || i.src === '')),
  sidebar: [...document.querySelectorAll('.bd-sidebar-primary nav a.reference.internal')]
           .map(a => a.getAttribute('href')),
  next: (document.querySelector('a.right-next') || {}).href || null,
  h1: (main.querySelector('h1') || {}).textContent || null,
};
"""


def _wait_loaded(drv, url: str, timeout: float=60):
    "`drv.get` can return while the page is still loading: wait for the document to be complete."
    t0 = time.time()
    while drv.execute_script('return [document.readyState, location.href]') != ['complete', url]:
        if time.time() - t0 > timeout: raise TimeoutError(f'{url} did not finish loading in {timeout} s')
        time.sleep(0.05)

def _load(drv, url: str) -> dict:
    "Open `url`, wait for MathJax, and return the page facts plus its console errors and outside requests."
    drv.get('about:blank')
    drv.get_log('browser'); drv.get_log('performance')  # drop what earlier pages left
    drv.get(url)
    _wait_loaded(drv, url)
    mj = drv.execute_async_script(_WAIT_MATHJAX)
    time.sleep(0.2)  # let late console messages (failed fonts, images) arrive
    facts = drv.execute_script(_PAGE_FACTS)
    facts['mathjax'] = mj
    facts['console_errors'] = [e['message'] for e in drv.get_log('browser') if e['level'] == 'SEVERE']
    base = url.split('/')[0] + '//' + url.split('/')[2]
    outside = []
    for e in drv.get_log('performance'):
        msg = json.loads(e['message'])['message']
        if msg.get('method') == 'Network.requestWillBeSent':
            u = msg['params']['request']['url']
            if u.startswith(('http:', 'https:', 'ws:', 'wss:', 'ftp:', '//')) and not u.startswith(base):
                outside.append(u)
    facts['outside_requests'] = outside
    return facts

def _src_counts(name: str) -> tuple[int, int]:
    "(image outputs, markdown cells with maths) of a prepared notebook in docs/_build/src."
    nb = json.loads((SRC/f'{name}.ipynb').read_text())
    imgs = sum(any(m in o.get('data', {}) for m in IMAGE_MIMES) for c in nb['cells'] if c['cell_type'] == 'code'
               and 'remove-output' not in c.get('metadata', {}).get('tags', []) for o in c.get('outputs', []))
    maths = sum(_has_math(''.join(c['source']) if isinstance(c['source'], list) else c['source'])
                for c in nb['cells'] if c['cell_type'] == 'markdown')
    return imgs, maths

def _has_math(markdown: str) -> bool:
    "True if the markdown holds $...$ or $$...$$ outside code (`$HOME` in backticks is not maths)."
    text = re.sub(r'```.*?```', '', markdown, flags=re.S)
    text = re.sub(r'`[^`]*`', '', text)
    # as MyST's dollarmath: no space just inside the dollars
    return bool(re.search(r'\$\$.+?\$\$|\$[^\s$]([^$\n]*?[^\s$])?\$', text, flags=re.S))

def _page(name: str) -> str: return 'index.html' if name == course_notebooks()[0] else f'{name}.html'

def _missing_pages(names) -> list[str]:
    "Pages of the site that should be there and are not (the http server would answer them with a 404 page)."
    return [f'{n} ({_page(n)})' for n in names if not (HTML/_page(n)).is_file()]


def test_every_page_loads_typesets_and_shows_its_figures(site, browser):
    problems, summary = [], []
    missing = _missing_pages(course_notebooks())
    assert not missing, f'notebooks without a page on the site: {missing}'
    for name in course_notebooks():
        f = _load(browser, f'{site}/{_page(name)}')
        n_imgs, n_math_cells = _src_counts('index' if _page(name) == 'index.html' else name)
        summary.append(f'{name}: {f["output_imgs"]} figures, {f["typeset"]}/{f["maths"]} formulas typeset')
        if f['console_errors']: problems.append(f'{name}: console errors {f["console_errors"]}')
        if f['outside_requests']: problems.append(f'{name}: requests outside the site {f["outside_requests"]}')
        if f['maths'] and f['mathjax'] != 'ok':                    # pages without maths load no MathJax
            problems.append(f'{name}: MathJax {f["mathjax"]}')
        if f['typeset'] != f['maths']: problems.append(f'{name}: formulas left as TeX {f["untypeset"]}')
        if f['math_errors']: problems.append(f'{name}: {f["math_errors"]} MathJax errors')
        if n_math_cells and not f['maths']:
            problems.append(f'{name}: {n_math_cells} markdown cells with $ but no formula on the page')
        if f['output_imgs'] != n_imgs:
            problems.append(f'{name}: {f["output_imgs"]} figures on the page, {n_imgs} in the notebook')
        if f['broken_imgs'] or not f['all_imgs_ok']: problems.append(f'{name}: images not loaded {f["broken_imgs"]}')
        for src, shape, shown in f['squeezed']:
            problems.append(f'{name}: figure {src} of aspect {shape:.2f} shown at {shown:.2f}')
        if not f['h1']: problems.append(f'{name}: no title')
    print('\n'.join(summary))
    assert not problems, '\n'.join(problems)


def test_navigation_reaches_every_notebook_in_course_order(site, browser):
    names = course_notebooks()
    home = _load(browser, f'{site}/index.html')
    sidebar = [h.split('#')[0] for h in home['sidebar']]
    expected = [_page(n) for n in names[1:]]
    in_sidebar = [h for h in sidebar if h not in ('', 'index.html')]
    assert in_sidebar == expected, f'sidebar {sidebar} != course order {expected}'
    visited, url = [], home['next']
    while url and len(visited) <= len(names):  # follow "next" from the home page to the last notebook
        visited.append(url.rsplit('/', 1)[-1])
        browser.get(url); _wait_loaded(browser, url)
        url = browser.execute_script("return (document.querySelector('a.right-next') || {}).href || null;")
    assert visited == expected, f'"next" links visit {visited}, course order is {expected}'


def test_screenshots_of_home_and_each_family(site, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    names, saved = course_notebooks(), []
    absent = [f'{family}: {page}' for family, page in FAMILY_PAGES.items() if page not in names]
    assert not absent, f'explorer notebooks missing from nbs/: {absent}'
    missing = _missing_pages([names[0], *FAMILY_PAGES.values()])
    assert not missing, f'pages missing from the site: {missing}'
    for shot in ['home.png', *(f'{f}_{part}.png' for f in FAMILY_PAGES for part in ('top', 'figure'))]:
        (SHOTS/shot).unlink(missing_ok=True)                     # none of ours left over from an earlier run
    _load(browser, f'{site}/index.html')
    browser.save_screenshot(str(SHOTS/'home.png')); saved.append('home.png')
    no_figure = []
    for family, page in FAMILY_PAGES.items():
        f = _load(browser, f'{site}/{_page(page)}')
        assert f['h1'] and not f['console_errors'], f'{page}: {f}'
        browser.save_screenshot(str(SHOTS/f'{family}_top.png')); saved.append(f'{family}_top.png')
        if browser.execute_script("""const img = document.querySelector('main .cell_output img');
            if (!img) return false; img.scrollIntoView({block: 'center'}); return true;"""):
            time.sleep(0.2)
            browser.save_screenshot(str(SHOTS/f'{family}_figure.png')); saved.append(f'{family}_figure.png')
        else: no_figure.append(page)
    print('screenshots in', SHOTS, saved)
    assert not no_figure, f'explorer pages without a figure: {no_figure}'
    assert all((SHOTS/s).stat().st_size > 10_000 for s in saved)
