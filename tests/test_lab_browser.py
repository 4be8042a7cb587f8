"""The three explorers as a person meets them: in a real JupyterLab, in headless Chromium.

For each explorer notebook (40, 41, 42): open it in JupyterLab (tests/lab_server.py: a server on
127.0.0.1 with the course kernel, Debian's chromium + chromedriver through Selenium), run all cells
from the Run menu, and check that
- every cell ran, and no cell printed an error or a traceback;
- the explorer's output is a live widget holding a rendered picture (an <img> that has loaded),
  800 px wide, shown at that size, within the notebook column; no output anywhere shows `<Figure size`;
- no control's description and no dropdown option is cut off;
- dragging a slider and picking a dropdown value in the browser changes the picture;
- the browser console has no error.
Screenshots of each explorer, after the interaction, go to docs/_build/screenshots/lab_explore_*.png
(and the whole window to lab_window_*.png).

The notebooks run with the default inline backend; tests/test_explorers.py checks the ipympl
canvas (clicks) without a browser. Without chromium or JupyterLab the test skips, except under CI
(`CI=true`) or `DETR_EXPLAINED_REQUIRE_BROWSER=1`, where it fails.
"""
import re, sys, time
from pathlib import Path

import pytest

from lab_server import chromium_driver, jupyter_lab

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT/'docs'/'_build'/'screenshots'
EXPLORERS = ['40_explore_detr', '41_explore_deformable', '42_explore_dab']
RUN_TIMEOUT = 600          # seconds for one notebook's cells (a busy 2-core machine)
PANEL = '.jp-NotebookPanel:not(.lm-mod-hidden)'   # the notebook in front


ALL_CELLS = {'@jupyterlab/notebook-extension:tracker': {'windowingMode': 'none'}}   # no virtual scrolling: every
                                                                                   # output is in the page

@pytest.fixture(scope='module')
def lab():
    with jupyter_lab(ROOT, env={'OMP_NUM_THREADS': '1'}, settings=ALL_CELLS) as server: yield server

@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    drv = chromium_driver(tmp_path_factory.mktemp('chromium-explorers'), width=1280, height=1400)
    yield drv
    drv.quit()


def _wait(drv, js: str, timeout: float, what: str, *args):
    "Poll a JavaScript expression until it is truthy; return its value."
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = drv.execute_script(js, *args)
        if v: return v
        time.sleep(0.5)
    raise AssertionError(f'{what}: not within {timeout:.0f} s')

def _console_errors(drv) -> list[str]:
    return [e['message'] for e in drv.get_log('browser') if e['level'] == 'SEVERE']

_CELLS = """
const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell')];
return cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '');
"""

def _kernel_idle(lab, path: str, timeout: float=180):
    "Wait until the notebook's kernel session exists and is idle (the server's own view)."
    t0 = time.time()
    while time.time() - t0 < timeout:
        states = [s['kernel']['execution_state'] for s in lab.api('sessions') if s['path'].endswith(path)]
        if states == ['idle']: return
        time.sleep(0.5)
    raise AssertionError(f'{path}: no idle kernel within {timeout} s')

def _run_all(drv):
    "Run all cells through the Run menu, as a person would; again if the click was lost (a page still settling)."
    from selenium.webdriver.common.by import By
    started = f"return (() => {{ {_CELLS} }})().some(t => /\\[(\\*|\\d+)\\]/.test(t))"
    for _ in range(3):
        menu = next(m for m in drv.find_elements(By.CSS_SELECTOR, '.lm-MenuBar-item') if m.text.strip() == 'Run')
        menu.click()
        _wait(drv, "return document.querySelector('.lm-Menu [data-command=\"runmenu:run-all\"]')", 30, 'the Run menu')
        drv.find_element(By.CSS_SELECTOR, '.lm-Menu [data-command="runmenu:run-all"]').click()
        t0 = time.time()
        while time.time() - t0 < 30:
            if drv.execute_script(started): return
            time.sleep(0.5)
    raise AssertionError('Run > Run All Cells started no cell')

_EXPLORER = """
// the explorer outputs: widget views holding an <img> (the inline picture)
const outs = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')];
return outs.filter(o => o.querySelector('.widget-vbox img')).map(o => {
  const img = o.querySelector('.widget-vbox img');
  const area = o.closest('.jp-OutputArea');
  return {src: img.src, loaded: img.complete && img.naturalWidth > 0, natural: img.naturalWidth,
          shown: img.getBoundingClientRect().width, column: area.getBoundingClientRect().width,
          sliders: o.querySelectorAll('.widget-slider').length,
          dropdowns: o.querySelectorAll('.widget-dropdown select').length};
});
"""

_CUT_OFF = """
// descriptions and dropdown options that do not fit their boxes
const root = arguments[0], bad = [];
for (const l of root.querySelectorAll('.widget-label'))
  if (l.scrollWidth > l.clientWidth + 1) bad.push('label ' + l.textContent);
const ctx = document.createElement('canvas').getContext('2d');
for (const s of root.querySelectorAll('select')) {
  const cs = getComputedStyle(s); ctx.font = cs.font;
  const room = s.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  for (const o of s.options) if (ctx.measureText(o.text).width > room + 1) bad.push('option ' + o.text);
}
return bad;
"""

def _img_src(drv, out):
    return drv.execute_script("return arguments[0].querySelector('.widget-vbox img').src", out)

def _wait_new_picture(drv, out, old: str, what: str):
    _wait(drv, "const i = arguments[0].querySelector('.widget-vbox img'); "
               "return i.src !== arguments[1] && i.complete && i.naturalWidth > 0",
          120, f'{what}: the picture did not change', out, old)


def _shot_on_failure(drv, name: str, check, *args):
    "Run `check(*args)`; if it fails, keep a screenshot of the window (docs/_build/screenshots/lab_failed_<name>.png)."
    try: check(*args)
    except Exception:
        SHOTS.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(SHOTS/f'lab_failed_{name}.png'))
        raise


@pytest.mark.parametrize('name', EXPLORERS)
def test_explorer_in_jupyterlab(lab, browser, name):
    _shot_on_failure(browser, name, _explorer_in_jupyterlab, lab, browser, name)

def _explorer_in_jupyterlab(lab, browser, name):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    drv = browser
    drv.get(lab.url(f'lab/tree/nbs/{name}.ipynb'))
    _wait(drv, "return document.querySelector('.jp-NotebookPanel .jp-Notebook .jp-CodeCell')", 180,
          'the notebook did not open')
    assert not drv.find_elements(By.CSS_SELECTOR, '.jp-Dialog'), 'a dialog (kernel selection?) covers the notebook'
    _kernel_idle(lab, f'{name}.ipynb')
    _run_all(drv)
    t0 = time.time()
    stderr = f'{PANEL} .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
    prompts = _wait(drv, f"const p = (() => {{ {_CELLS} }})(); "               # done, or stopped by an error
                         "return (p.length && p.every(t => /\\[\\d+\\]/.test(t))) || "
                         f"document.querySelector('{stderr}') ? p : null", RUN_TIMEOUT, f'{name}: not every cell ran')
    print(f'{name}: {len(prompts)} cells ran in {time.time() - t0:.0f} s')

    js = f"return [...document.querySelectorAll(`{stderr}`)].map(e => e.innerText.slice(0, 800))"
    errors = drv.execute_script(js)
    assert errors == [], f'{name}: cells wrote errors: {errors}'
    text = drv.execute_script(f"return document.querySelector('{PANEL} .jp-Notebook').innerText")
    assert '<Figure size' not in text, f'{name}: a figure shown as text'
    assert 'Error displaying widget' not in text and 'Loading widget' not in text, f'{name}: a widget did not render'

    explorers = _wait(drv, f"const e = (() => {{ {_EXPLORER} }})(); "
                           "return e.length && e.every(x => x.loaded) ? e : null", 120,
                      f'{name}: no explorer picture')
    for e in explorers:
        assert e['natural'] == 800 and e['shown'] == 800 <= e['column'], (name, e)   # fits the column, unscaled
        assert e['sliders'] >= 1 and e['dropdowns'] >= 2, (name, e)
    out = next(o for o in drv.find_elements(By.CSS_SELECTOR, f'{PANEL} .jp-OutputArea-output')
               if o.find_elements(By.CSS_SELECTOR, '.widget-vbox img'))
    drv.execute_script("arguments[0].scrollIntoView({block: 'start'})", out)
    assert drv.execute_script(_CUT_OFF, out) == [], f'{name}: cut off'

    before = _img_src(drv, out)                                           # drag the first slider to the left
    handle = out.find_element(By.CSS_SELECTOR, '.widget-slider .noUi-handle')
    ActionChains(drv).click_and_hold(handle).move_by_offset(-60, 0).release().perform()
    _wait_new_picture(drv, out, before, f'{name}: slider')
    before = _img_src(drv, out)                                           # pick another option of the last dropdown
    select = Select(out.find_elements(By.CSS_SELECTOR, '.widget-dropdown select')[-1])
    select.select_by_index(1 if select.first_selected_option.get_attribute('index') != '1' else 2)
    _wait_new_picture(drv, out, before, f'{name}: dropdown')

    SHOTS.mkdir(parents=True, exist_ok=True)
    drv.execute_script("arguments[0].scrollIntoView({block: 'start'})", out)
    time.sleep(0.5)
    out.screenshot(str(SHOTS/f'lab_explore_{name}.png'))
    drv.save_screenshot(str(SHOTS/f'lab_window_{name}.png'))
    assert _console_errors(drv) == [], f'{name}: browser console errors'
    log = lab.log_text()
    assert not re.search(r'Traceback|KernelRestarter|kernel .* died', log), f'{name}: server/kernel log:\n{log[-3000:]}'


_IPYMPL_CELLS = ['%matplotlib widget',
                 'from detr_explained.explore_base import load_model, load_image\n'
                 'from detr_explained.explore_detr import DETRExplorer\n'
                 "ex = DETRExplorer(load_model(family='detr'), load_image(size=192, max_size=288))\nex"]

def test_explorer_takes_clicks_under_ipympl(browser, tmp_path):
    "With `%matplotlib widget` the figure is ipympl's canvas: a click on the encoder panel moves the pixel sliders."
    _shot_on_failure(browser, 'ipympl', _clicks_under_ipympl, browser, tmp_path)

def _clicks_under_ipympl(browser, tmp_path):
    import nbformat
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    sys.path.insert(0, str(ROOT/'tools'))
    import kernelspec
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in _IPYMPL_CELLS])
    nb.metadata['kernelspec'] = dict(kernelspec.NOTEBOOK_KERNELSPEC)
    nbformat.write(nb, tmp_path/'clicks.ipynb')
    drv = browser
    with jupyter_lab(tmp_path, env={'OMP_NUM_THREADS': '1'}, settings=ALL_CELLS) as lab:
        drv.get(lab.url('lab/tree/clicks.ipynb'))
        _wait(drv, "return document.querySelector('.jp-NotebookPanel .jp-CodeCell')", 180, 'the notebook did not open')
        _kernel_idle(lab, 'clicks.ipynb')
        _run_all(drv)
        find = f"return document.querySelector('{PANEL} .jupyter-matplotlib-canvas-div canvas:last-child')"
        canvas = _wait(drv, find, 300, 'no ipympl canvas')
        readouts = lambda: drv.execute_script(f"return [...document.querySelectorAll('{PANEL} .widget-readout')]"
                                              ".map(r => r.textContent.trim())")
        _wait(drv, f"return document.querySelectorAll('{PANEL} .widget-readout').length >= 4", 60, 'no sliders')
        before = readouts()                               # enc layer, row, column, dec layer
        assert before[1:3] == ['3', '4'], before          # the middle of the 6 x 9 feature map
        w, h = canvas.size['width'], canvas.size['height']
        column = drv.execute_script(f"return document.querySelector('{PANEL} .jp-OutputArea').clientWidth")
        assert w == 800 <= column, (canvas.size, column)  # the canvas fits the column
        image = f"document.querySelector(`{PANEL} .jupyter-matplotlib-canvas-div canvas`).toDataURL()"   # the figure
        _wait(drv, f'return {image}.length > 5000', 120, 'the canvas shows no figure')
        drawn = drv.execute_script(f'return {image}')
        # (40, 110) px: inside the encoder panel (0.04 in margin; 0.3 + 0.48 in above it), on feature cell (0, 0)
        ActionChains(drv).move_to_element_with_offset(canvas, 40 - w // 2, 110 - h // 2).click().perform()
        t0 = time.time()
        while readouts()[1:3] != ['0', '0'] and time.time() - t0 < 60: time.sleep(0.5)
        assert readouts()[1:3] == ['0', '0'], readouts()
        # the redrawn figure has the cyan cross on cell (0, 0): its centre, 16 image px in, is at canvas (23, 97)
        cross = ("const c = document.querySelector(`%s .jupyter-matplotlib-canvas-div canvas`); const r = c.width / "
                 "c.clientWidth; const [R, G, B] = c.getContext('2d').getImageData(23 * r, 97 * r, 1, 1).data; "
                 "return R < 90 && G > 180 && B > 180" % PANEL)
        _wait(drv, cross, 120, 'the canvas was not redrawn with the clicked pixel')
        assert drv.execute_script(f'return {image}') != drawn
        SHOTS.mkdir(parents=True, exist_ok=True)
        out = drv.find_element(By.CSS_SELECTOR, f'{PANEL} .jp-OutputArea-output .jupyter-matplotlib')
        drv.execute_script("arguments[0].scrollIntoView({block: 'start'})", out)
        out.screenshot(str(SHOTS/'lab_explore_ipympl.png'))
        assert _console_errors(drv) == [], 'browser console errors'
        assert 'Traceback' not in lab.log_text(), lab.log_text()[-3000:]
