"""`make lab`: the course kernel, the notebooks that name it, and JupyterLab opening them without a
"Select Kernel" dialog.

The browser test opens notebooks in a real JupyterLab (tests/lab_server.py: server on 127.0.0.1, headless
Chromium) and saves a screenshot of each to docs/_build/screenshots/lab_<notebook>.png.
"""
import json, os, shutil, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import kernelspec  # noqa: E402  (tools/kernelspec.py)

SHOTS = ROOT/'docs'/'_build'/'screenshots'
OPENED = ['00_index', '09_detr', '40_explore_detr']   # the home notebook, a model, an explorer


def test_every_notebook_names_the_course_kernel():
    assert not kernelspec.missing(), (f'notebooks without the kernelspec {kernelspec.NAME!r} '
                                      f'(run: python tools/kernelspec.py notebooks): {kernelspec.missing()}')


def test_nbdev_clean_keeps_the_kernelspec(tmp_path):
    shutil.copy(ROOT/'pyproject.toml', tmp_path)
    (tmp_path/'nbs').mkdir()
    nb = tmp_path/'nbs'/'00_index.ipynb'
    shutil.copy(ROOT/'nbs'/'00_index.ipynb', nb)
    kernelspec.set_kernelspec(nb)
    r = subprocess.run([str(Path(sys.executable).parent/'nbdev-clean'), '--fname', str(nb)], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(nb.read_text())['metadata']['kernelspec'] == kernelspec.NOTEBOOK_KERNELSPEC
    assert kernelspec.set_kernelspec(nb) is False              # already in nbdev-clean's form: nothing to write


def _kernel_env(prefix: Path, env: dict) -> str:
    "Start the installed kernel with `env`, return its OMP_WAIT_POLICY."
    from jupyter_client.manager import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    ksm = KernelSpecManager(kernel_dirs=[str(prefix/'share'/'jupyter'/'kernels')])
    km = KernelManager(kernel_name=kernelspec.NAME, kernel_spec_manager=ksm)
    km.start_kernel(env=env)
    kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=120)
    out = []
    try:
        r = kc.execute_interactive("import os; print(os.environ.get('OMP_WAIT_POLICY'), end='')", timeout=60,
                                   output_hook=lambda m: out.append(m['content'].get('text', '')))
        assert r['content']['status'] == 'ok'
        return ''.join(out)
    finally:
        kc.stop_channels(); km.shutdown_kernel(now=True)

def test_kernel_waits_passively_unless_told_otherwise(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'kernelspec.py'), 'install', '--prefix', str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    spec = json.loads((tmp_path/'share'/'jupyter'/'kernels'/kernelspec.NAME/'kernel.json').read_text())
    assert spec['display_name'] == kernelspec.DISPLAY_NAME and spec['argv'][0] == sys.executable
    base = {k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}
    assert _kernel_env(tmp_path, base) == 'PASSIVE'
    assert _kernel_env(tmp_path, {**base, 'OMP_WAIT_POLICY': 'ACTIVE'}) == 'ACTIVE'


def test_make_lab_registers_the_kernel_and_opens_the_index():
    venv = Path(sys.executable).parent.parent
    r = subprocess.run(['make', '-n', '-B', '-o', f'{venv}/.installed', f'VENV={venv}', 'lab'], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'tools/kernelspec.py install' in r.stdout
    lab = next(l for l in r.stdout.replace('\\\n', ' ').splitlines() if 'jupyter lab' in l)
    assert '--ServerApp.ip=127.0.0.1' in lab and lab.rstrip().endswith('nbs/00_index.ipynb'), lab


_STATE = """return {
  dialogs: [...document.querySelectorAll('.jp-Dialog')].map(d => d.innerText.slice(0, 300)),
  panel: !!document.querySelector('.jp-NotebookPanel'),
  kernel: (document.querySelector('.jp-NotebookPanel .jp-Toolbar-kernelName') || {}).innerText || null,
};"""

@pytest.mark.parametrize('name', OPENED)
def test_lab_opens_a_notebook_on_the_course_kernel_without_a_dialog(lab_server, lab_browser, name):
    drv, path = lab_browser, f'nbs/{name}.ipynb'
    if not (ROOT/path).exists(): pytest.fail(f'{path} is missing')
    drv.get(lab_server.url(f'lab/tree/{path}'))
    t0, seen, idle_since = time.time(), [], None
    while time.time() - t0 < 150:
        st = drv.execute_script(_STATE)
        seen += [d for d in st['dialogs'] if d not in seen]
        if seen: break
        sessions = [s for s in lab_server.api('sessions') if s['path'] == path]
        if sessions and sessions[0]['kernel']['execution_state'] == 'idle' and st['kernel']:
            idle_since = idle_since or time.time()
            if time.time() - idle_since > 3: break          # and no dialog turned up in the next 3 s
        time.sleep(0.25)
    SHOTS.mkdir(parents=True, exist_ok=True)
    drv.save_screenshot(str(SHOTS/f'lab_{name}.png'))
    assert not seen, f'{path}: JupyterLab showed a dialog: {seen}'
    assert idle_since, f'{path}: no idle kernel after 150 s (sessions {lab_server.api("sessions")}, page {st})'
    assert sessions[0]['kernel']['name'] == kernelspec.NAME
    assert st['kernel'] == kernelspec.DISPLAY_NAME, st
    for s in lab_server.api('sessions'):                     # leave no kernel running for the next notebook
        drv.execute_script("fetch(arguments[0], {method: 'DELETE', headers: {Authorization: 'token ' + arguments[1]}})",
                           f'{lab_server.base}api/sessions/{s["id"]}', lab_server.token)
