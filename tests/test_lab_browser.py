"""The three explorers as a person meets them: in a real JupyterLab, in headless Chromium.

For each explorer notebook (40, 41, 42): open it in JupyterLab (tests/lab_server.py: a server on
127.0.0.1 with the course kernel, Debian's chromium + chromedriver through Selenium), run all cells
from the Run menu, and check that
- every cell ran, and no cell printed an error or a traceback;
- the explorer's output is a live widget holding a rendered picture (an <img> that has loaded),
  880 px wide and no wider than the notebook column; no output anywhere shows `<Figure size`;
- no control's description and no dropdown option is cut off;
- dragging a slider and picking a dropdown value in the browser changes the picture;
- the browser console has no error.
Screenshots of each explorer, after the interaction, go to docs/_build/screenshots/lab_explore_*.png
(and the whole window to lab_window_*.png).

The notebooks run with the default inline backend; tests/test_explorers.py checks the ipympl
canvas (clicks) without a browser. Without chromium or JupyterLab the test skips, except under CI
(`CI=true`) or `DETR_EXPLAINED_REQUIRE_BROWSER=1`, where it fails.
"""
import re, time
from pathlib import Path

import pytest

import lab_server
from lab_server import chromium_driver, jupyter_lab

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT/'docs'/'_build'/'screenshots'
EXPLORERS = ['40_explore_detr', '41_explore_deformable', '42_explore_dab']
RUN_TIMEOUT = 600          # seconds for one notebook's cells (a busy 2-core machine)
PANEL = '.jp-NotebookPanel:not(.lm-mod-hidden)'   # the notebook in front


@pytest.fixture(scope='module')
def lab():
    # every cell in the page (no virtual scrolling), so outputs below the fold can be read
    settings = {**lab_server.LAB_SETTINGS, '@jupyterlab/notebook-extension:tracker': {'windowingMode': 'none'}}
    old, lab_server.LAB_SETTINGS = lab_server.LAB_SETTINGS, settings
    try:
        with jupyter_lab(ROOT, env={'OMP_NUM_THREADS': '1'}) as server: yield server
    finally: lab_server.LAB_SETTINGS = old

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

def _run_all(drv):
    "Run all cells through the Run menu, as a person would."
    from selenium.webdriver.common.by import By
    menu = next(m for m in drv.find_elements(By.CSS_SELECTOR, '.lm-MenuBar-item') if m.text.strip() == 'Run')
    menu.click()
    _wait(drv, "return document.querySelector('.lm-Menu [data-command=\"runmenu:run-all\"]')", 30, 'the Run menu')
    drv.find_element(By.CSS_SELECTOR, '.lm-Menu [data-command="runmenu:run-all"]').click()

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


@pytest.mark.parametrize('name', EXPLORERS)
def test_explorer_in_jupyterlab(lab, browser, name):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    drv = browser
    drv.get(lab.url(f'lab/tree/nbs/{name}.ipynb'))
    _wait(drv, "return document.querySelector('.jp-NotebookPanel .jp-Notebook .jp-CodeCell')", 180,
          'the notebook did not open')
    assert not drv.find_elements(By.CSS_SELECTOR, '.jp-Dialog'), 'a dialog (kernel selection?) covers the notebook'
    _wait(drv, "return document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) [data-status=\"idle\"]')", 180,
          'the kernel did not start')
    _run_all(drv)
    t0 = time.time()
    prompts = _wait(drv, f"const p = (() => {{ {_CELLS} }})(); "
                         "return p.length && p.every(t => /\\[\\d+\\]/.test(t)) ? p : null",
                    RUN_TIMEOUT, f'{name}: not every cell ran')
    print(f'{name}: {len(prompts)} cells ran in {time.time() - t0:.0f} s')

    errors = drv.execute_script(f"""return [...document.querySelectorAll(
        `{PANEL} .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]`)]
        .map(e => e.innerText.slice(0, 400))""")
    assert errors == [], f'{name}: cells wrote errors: {errors}'
    text = drv.execute_script(f"return document.querySelector('{PANEL} .jp-Notebook').innerText")
    assert '<Figure size' not in text, f'{name}: a figure shown as text'
    assert 'Error displaying widget' not in text and 'Loading widget' not in text, f'{name}: a widget did not render'

    explorers = _wait(drv, f"const e = (() => {{ {_EXPLORER} }})(); "
                           "return e.length && e.every(x => x.loaded) ? e : null", 120,
                      f'{name}: no explorer picture')
    for e in explorers:
        assert e['natural'] == 880 and e['shown'] <= e['column'] + 1, (name, e)     # fits the notebook column
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
