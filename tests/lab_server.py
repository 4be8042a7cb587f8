"""A real JupyterLab server and a headless Chromium for browser tests (shared by the tests that need them).

    from lab_server import jupyter_lab, chromium_driver
    with jupyter_lab(ROOT) as lab:                 # server on 127.0.0.1, a free port, a random token
        drv = chromium_driver(tmp_path/'profile')
        drv.get(lab.url('lab/tree/nbs/00_index.ipynb'))

or the pytest fixtures `lab_server` (session: the repository as root_dir) and `lab_browser`
(module), registered in tests/conftest.py.

The server runs this venv's `jupyter lab` with its own temporary config, data, runtime, settings
and workspace folders (so nothing from the user's ~/.jupyter, and no restored workspace, takes part),
AUTOSAVE OFF (it serves the repository, whose notebooks must not be written by a test; never
click save), no browser, no update or news checks, and the course kernel `detr-explained` installed by
tools/kernelspec.py into a temporary prefix on JUPYTER_PATH (the venv is not touched). Its log is
`lab.log_text()`. Chromium is Debian's `chromium` + `chromedriver` through Selenium, headless, every host
but 127.0.0.1 unresolvable. Without them a test skips, except under CI (`CI=true`) or
`DETR_EXPLAINED_REQUIRE_BROWSER=1`, where it fails.
"""
from __future__ import annotations
import contextlib, json, os, secrets, shutil, socket, subprocess, sys, tempfile, time, urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                  '--disable-component-update', '--no-first-run', '--disable-sync', '--disable-quic',
                  '--disable-dev-shm-usage', '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1']


# Settings of the test server: never write a notebook back (other people edit nbs/ while tests run),
# no news / update pop-ups over the page.
LAB_SETTINGS = {
    '@jupyterlab/docmanager-extension:plugin': {'autosave': False},
    '@jupyterlab/apputils-extension:notification': {'fetchNews': 'false', 'checkForUpdates': False},
}


def require_browser() -> bool:
    return os.environ.get('CI', '').lower() in ('1', 'true') or os.environ.get('DETR_EXPLAINED_REQUIRE_BROWSER') == '1'

def need_tool(*names) -> str:
    "Path of the first of `names` on PATH; else skip (fail under CI / DETR_EXPLAINED_REQUIRE_BROWSER=1)."
    for n in names:
        if (p := shutil.which(n)): return p
    msg = f'{"/".join(names)} not found (apt-get install -y chromium chromium-driver)'
    if require_browser(): pytest.fail(msg)
    pytest.skip(msg)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@dataclass
class Lab:
    base: str                 # http://127.0.0.1:PORT/
    token: str
    root: Path
    log: Path
    process: subprocess.Popen

    def url(self, path: str='lab') -> str:
        "URL of `path` under the server (e.g. 'lab/tree/nbs/00_index.ipynb'), with the token."
        sep = '&' if '?' in path else '?'
        return f'{self.base}{path.lstrip("/")}{sep}token={self.token}'

    def api(self, path: str):
        "GET /api/<path> as JSON."
        req = urllib.request.Request(f'{self.base}api/{path}', headers={'Authorization': f'token {self.token}'})
        with urllib.request.urlopen(req, timeout=30) as r: return json.loads(r.read())

    def log_text(self) -> str: return self.log.read_text(errors='replace')


@contextlib.contextmanager
def jupyter_lab(root: Path=ROOT, timeout: float=180, env: dict|None=None, settings: dict|None=None):
    """Start JupyterLab on 127.0.0.1 serving `root`; yields a `Lab`; stops the server (and its kernels) on exit.
    `env` is added to the server's (and so the kernels') environment; `settings` ({plugin id: {key: value}}) to
    `LAB_SETTINGS`, e.g. {'@jupyterlab/notebook-extension:tracker': {'windowingMode': 'none'}}."""
    if not (BIN/'jupyter-lab').exists():
        msg = f'{BIN}/jupyter-lab not found (pip install -e ".[dev]" installs JupyterLab)'
        if require_browser(): pytest.fail(msg)
        pytest.skip(msg)
    with tempfile.TemporaryDirectory(prefix='detr-lab-') as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT/'tools'/'kernelspec.py'), 'install', '--prefix', str(tmp/'kernel')],
                       check=True, capture_output=True, text=True)
        dirs = {k: tmp/k.lower() for k in ('JUPYTER_CONFIG_DIR', 'JUPYTER_DATA_DIR', 'JUPYTER_RUNTIME_DIR',
                                          'JUPYTERLAB_SETTINGS_DIR', 'JUPYTERLAB_WORKSPACES_DIR', 'IPYTHONDIR')}
        for d in dirs.values(): d.mkdir()
        for plugin, values in {**LAB_SETTINGS, **(settings or {})}.items():
            f = dirs['JUPYTERLAB_SETTINGS_DIR']/f'{plugin.replace(":", "/")}.jupyterlab-settings'
            f.parent.mkdir(parents=True, exist_ok=True); f.write_text(json.dumps(values))
        port, token = _free_port(), secrets.token_hex(16)
        full_env = {**os.environ, **{k: str(v) for k, v in dirs.items()},
                    'JUPYTER_PATH': str(tmp/'kernel'/'share'/'jupyter'), 'JUPYTER_PLATFORM_DIRS': '1', **(env or {})}
        full_env.pop('MPLBACKEND', None)   # kernels draw with the notebook's own backend (inline / ipympl)
        log = tmp/'lab.log'
        cmd = [str(BIN/'jupyter-lab'), '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
               '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}',
               '--LabApp.news_url=', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate',
               *(['--ServerApp.allow_root=True'] if os.geteuid() == 0 else [])]
        with open(log, 'w') as logf:
            proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=logf, stderr=subprocess.STDOUT)
        lab = Lab(f'http://127.0.0.1:{port}/', token, Path(root), log, proc)
        try:
            t0 = time.time()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f'jupyter lab exited ({proc.returncode}):\n{lab.log_text()[-3000:]}')
                with contextlib.suppress(OSError):
                    lab.api('status'); break
                if time.time() - t0 > timeout:
                    raise TimeoutError(f'jupyter lab not up in {timeout} s:\n{lab.log_text()[-3000:]}')
                time.sleep(0.3)
            yield lab
        finally:
            proc.terminate()
            try: proc.wait(20)
            except subprocess.TimeoutExpired: proc.kill(); proc.wait()


def chromium_driver(profile: Path, width: int=1400, height: int=1000, extra_flags=()):
    "Headless Chromium through Selenium (console and network logs on); quit it when done."
    chromium, driver_bin = need_tool('chromium', 'chromium-browser'), need_tool('chromedriver')
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    os.environ.setdefault('SE_AVOID_STATS', 'true')
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in [*CHROMIUM_FLAGS, f'--window-size={width},{height}', f'--user-data-dir={profile}', *extra_flags]:
        opts.add_argument(a)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL', 'performance': 'ALL'})
    drv = webdriver.Chrome(service=Service(driver_bin), options=opts)
    drv.set_page_load_timeout(120); drv.set_script_timeout(120)
    return drv


@pytest.fixture(scope='session')
def lab_server():
    "JupyterLab serving the repository (session-wide)."
    with jupyter_lab(ROOT) as lab: yield lab

@pytest.fixture(scope='module')
def lab_browser(tmp_path_factory):
    "A headless Chromium for the JupyterLab tests of one module."
    drv = chromium_driver(tmp_path_factory.mktemp('chromium-lab-profile'))
    yield drv
    drv.quit()
