"""Build the course website from the executed notebooks: `python docs/build.py` -> docs/_build/html/.

    .venv/bin/python docs/build.py                 # execute (cached) + render
    .venv/bin/python docs/build.py --jobs 1        # one notebook at a time
    .venv/bin/python docs/build.py --allow-errors  # render notebooks even where a cell fails
    .venv/bin/python docs/build.py --reuse         # render the last executed notebooks again (docs work)
    .venv/bin/python docs/build.py --no-cache      # execute every notebook (make test)

Four steps, every one offline once the dev tools are installed:

1. MathJax 3 for the browser (staged once the notebooks have run, so that a failing notebook is
   reported first), from the npm registry package `mathjax` (pinned below), installed
   once into docs/_build/vendor/ (reused afterwards; `DETR_EXPLAINED_MATHJAX=/path/to/mathjax`
   points at an existing copy instead). Sphinx serves it from `_static/mathjax/`, so the site
   loads no script, font or style from outside.
2. Every `nbs/NN_*.ipynb` is executed the way `nbdev-test` runs it, with nbdev's own reader and
   skip rule (execnb's `CaptureShell`, cwd = nbs/, `IN_TEST=1`, cells flagged with `tst_flags`
   `notest`/`slow` skipped), several at once, each in its own process; each notebook's result
   is printed, with the traceback of every one that failed, and the build fails if any did.
   This is the notebook test of `make test` (the notebooks run once, here; `make nbtest` is
   plain nbdev-test). Results are cached in docs/_build/exec/ under a hash of the notebook, the
   library and this script, so `make docs` re-executes only what changed; `--no-cache` (as in
   `make test`) executes every notebook.
3. The executed notebooks are prepared for Sphinx in docs/_build/src/: nbdev directives become
   MyST-NB cell tags (`#| hide` drops a cell, `#| echo: false` hides its code...), widget views
   (which need a live kernel) are dropped, and the home page (00_index) gets the table of
   contents: every notebook, in course order, grouped by part.
4. `sphinx-build` (MyST-NB + sphinx-book-theme, config in docs/conf.py) renders
   docs/_build/src/ into docs/_build/html/.
"""
from __future__ import annotations
import argparse, functools, hashlib, json, os, re, shutil, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
NBS = ROOT/'nbs'
LIB = ROOT/'detr_explained'
BUILD = DOCS/'_build'
EXEC, SRC, HTML, VENDOR = BUILD/'exec', BUILD/'src', BUILD/'html', BUILD/'vendor'
MATHJAX_NPM = 'mathjax@3.2.2'

@functools.cache
def skip_flags() -> frozenset[str]:
    "`tst_flags` of pyproject's [tool.nbdev] (`notest slow`): cells nbdev-test leaves out, and so does the site."
    from nbdev.config import get_config
    return frozenset(get_config(ROOT).tst_flags.split())

# Parts of the course, by notebook number: (first, last, caption). Anything else goes under "More".
PARTS = [(0, 9, 'Foundations and DETR'), (10, 12, 'Deformable DETR'), (13, 18, 'DAB-DETR'),
         (19, 19, 'Official weights'), (20, 29, 'Training and evaluation'),
         (30, 39, 'Checkpoints and data'), (40, 49, 'Explorers')]


def number(name: str) -> int:
    "The course number a notebook's name starts with (`10a_ms_deform_attn_fast` -> 10); unnumbered ones go last."
    m = re.match(r'(\d+)', name)
    return int(m.group(1)) if m else 10**6

def course_notebooks() -> list[Path]:
    "The notebooks nbdev-test runs (nbs/*.ipynb but `_*`, `.*`), in course order: by number, then name (10_, 10a_)."
    return sorted((p for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.'))),
                  key=lambda p: (number(p.name), p.name))


# ---------------------------------------------------------------- nbdev directives
_DIRECTIVE = re.compile(r'^\s*#\s?\|\s*(.*?)\s*$')

def directives(source: str) -> tuple[dict[str, str], str]:
    "Leading `#| key value` / `#| key: value` lines of a code cell -> ({key: value}, source without them)."
    lines, found = source.splitlines(), {}
    i = 0
    while i < len(lines) and (m := _DIRECTIVE.match(lines[i])):
        body = m.group(1)
        key, _, value = body.partition(':') if re.match(r'^[\w-]+:', body) else body.partition(' ')
        found[key.strip().lower()] = value.strip()
        i += 1
    return found, '\n'.join(lines[i:]).lstrip('\n')

def is_false(v: str|None) -> bool: return v is not None and v.strip().lower() in ('false', 'no', '0')


# ---------------------------------------------------------------- step 1: MathJax
def mathjax_dir() -> Path:
    "A folder holding MathJax 3's `es5/tex-chtml.js`; installed from npm into docs/_build/vendor once."
    env = os.environ.get('DETR_EXPLAINED_MATHJAX')
    candidates = [Path(env)] if env else []
    candidates.append(VENDOR/'node_modules'/'mathjax')
    for c in candidates:
        if (c/'es5'/'tex-chtml.js').exists(): return c
    if env: sys.exit(f'DETR_EXPLAINED_MATHJAX={env} holds no es5/tex-chtml.js')
    npm = shutil.which('npm')
    if npm is None: sys.exit('npm not found: install Node.js/npm, or set DETR_EXPLAINED_MATHJAX to a MathJax 3 folder')
    VENDOR.mkdir(parents=True, exist_ok=True)
    print(f'installing {MATHJAX_NPM} into {VENDOR} (once)', flush=True)
    subprocess.run([npm, 'install', '--no-audit', '--no-fund', '--no-save', '--prefix', str(VENDOR), MATHJAX_NPM], check=True)
    return candidates[-1]

def stage_mathjax() -> Path:
    "Copy the browser build of MathJax to docs/_build/static/mathjax (Sphinx copies it into _static/)."
    static = BUILD/'static'
    dest = static/'mathjax'
    if not (dest/'tex-chtml.js').exists():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(mathjax_dir()/'es5', dest)
    return static


# ---------------------------------------------------------------- step 2: execution
def library_hash() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    for p in sorted(LIB.glob('*.py')): h.update(p.name.encode()); h.update(p.read_bytes())
    return h.hexdigest()

ERRORS_ALLOWED_EXIT = 3  # execute_one's exit status when cells failed but --allow-errors kept going
FAILED_EXIT = 1

def execute_one(src: Path, dst: Path) -> int:
    """Run one notebook exactly as `nbdev-test` does and write it, outputs included, to `dst`.

    nbdev's own pieces decide what runs: the notebook is read through `NBProcessor` (directives parsed),
    cells are skipped by nbdev-test's predicate (`tst_flags` of pyproject's [tool.nbdev], `#| eval: false`,
    a `skip_exec` front matter), in execnb's `CaptureShell` with cwd = the notebook's folder, `IN_TEST=1`,
    and nbdev-test's cell timeout. A failing cell stops the notebook and its traceback goes to stderr,
    as nbdev-test prints it (with DOCS_ALLOW_ERRORS the remaining cells still run)."""
    from fastcore.nbio import write_nb
    from execnb.shell import CaptureShell
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell   # nbdev-test's own "leave this cell out" predicate
    os.environ['IN_TEST'] = '1'
    cfg = get_config(src.parent)
    nb = NBProcessor(src, rm_directives=False, process=True).nb
    skip = _skip_cell(nb, skip_flags=sorted(skip_flags()))
    allow = bool(os.environ.get('DOCS_ALLOW_ERRORS'))
    shell = CaptureShell(src, profile=bool(cfg.exec_profile))
    os.chdir(src.parent)
    try: shell.run_all(nb, exc_stop=not allow, preproc=skip, cell_timeout=600)
    except Exception:
        import traceback
        sys.stderr.write((shell.prettytb(fname=src) or traceback.format_exc()) + '\n')
        return FAILED_EXIT
    for c in nb.cells: c.pop('directives_', None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)
    errors = any(o.get('output_type') == 'error' for c in nb.cells for o in c.get('outputs', []))
    return ERRORS_ALLOWED_EXIT if errors else 0

def execute_all(notebooks: list[Path], jobs: int, allow_errors: bool, cache: bool=True) -> list[Path]:
    """Execute the notebooks, `jobs` processes at a time, and report each one's result.

    With `cache`, a notebook whose source, library and this script are unchanged since its last clean run is
    reused from docs/_build/exec (`make docs`); `make test` passes --no-cache, so every notebook runs once.
    Exits with the list of the notebooks that failed, each one's traceback printed above it."""
    EXEC.mkdir(parents=True, exist_ok=True)
    lib = library_hash()
    env = {**os.environ}
    env.pop('MPLBACKEND', None)  # the inline backend must draw the figures into the outputs
    if allow_errors: env['DOCS_ALLOW_ERRORS'] = '1'
    def run(nb: Path):
        out, stamp = EXEC/nb.name, EXEC/(nb.name + '.sha256')
        key = hashlib.sha256(nb.read_bytes() + lib.encode()).hexdigest()
        if cache and out.exists() and stamp.exists() and stamp.read_text() == key: return nb, 'cached', 0.0, ''
        stamp.unlink(missing_ok=True); out.unlink(missing_ok=True)  # never render a stale run of a failed notebook
        t0 = time.time()
        r = subprocess.run([sys.executable, __file__, '--execute-one', str(nb), str(out)], env=env,
                           capture_output=True, text=True)
        if r.returncode == 0: stamp.write_text(key)   # only a clean run is reused later
        status = {0: 'ok', ERRORS_ALLOWED_EXIT: 'errors'}.get(r.returncode, 'FAILED')
        return nb, status, time.time() - t0, r.stderr
    failed = []
    with ThreadPoolExecutor(jobs) as pool:
        for nb, status, dt, err in pool.map(run, notebooks):
            if status == 'FAILED':
                failed.append(nb)
                print(f'---- {nb.name} failed:\n{err[-6000:]}', file=sys.stderr, flush=True)
            print(f'  {status:6} {dt:6.1f}s  {nb.name}', flush=True)
    if failed: sys.exit(f'{len(failed)} of {len(notebooks)} notebook(s) failed to execute: {" ".join(p.name for p in failed)}')
    return [EXEC/nb.name for nb in notebooks]


# ---------------------------------------------------------------- step 3: prepare for Sphinx
WIDGET_MIMES = ('application/vnd.jupyter.widget-view+json', 'application/vnd.jupyter.widget-state+json')

def prepare_cell(cell: dict) -> dict|None:
    "nbdev directives -> MyST-NB tags; None for a cell the docs leave out."
    if cell['cell_type'] != 'code': return cell
    src = ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']
    d, body = directives(src)
    if 'hide' in d or is_false(d.get('include')) or 'default_exp' in d and not body.strip(): return None
    tags = set(cell.get('metadata', {}).get('tags', []))
    if is_false(d.get('echo')): tags.add('remove-input')
    if is_false(d.get('output')): tags.add('remove-output')
    if (flags := skip_flags() & d.keys()) or is_false(d.get('eval')):
        body = f'# not run when the docs are built (#| {" ".join(sorted(flags)) or "eval: false"})\n' + body
    cell['source'] = body
    cell['metadata'] = {'tags': sorted(tags)} if tags else {}
    outs = []
    for o in cell.get('outputs', []):
        if 'data' in o and any(m in o['data'] for m in WIDGET_MIMES):
            o['data'] = {k: v for k, v in o['data'].items() if k not in WIDGET_MIMES and k != 'text/plain'}
            if not o['data']: continue  # a live widget: its static figures are separate outputs
        outs.append(o)
    cell['outputs'] = outs
    return cell

def toctree_cell(names: list[str]) -> dict:
    "Markdown cell with one hidden MyST toctree per part of the course (the site's navigation)."
    groups: dict[str, list[str]] = {}
    for n in names:
        num = number(n)
        cap = next((c for a, b, c in PARTS if a <= num <= b), 'More')
        groups.setdefault(cap, []).append(n)
    blocks = [f'```{{toctree}}\n:caption: {cap}\n:maxdepth: 1\n:hidden:\n\n' + '\n'.join(ns) + '\n```'
              for cap, ns in groups.items()]
    return {'cell_type': 'markdown', 'metadata': {}, 'source': '\n\n'.join(blocks)}

def prepare_all(executed: list[Path]) -> str:
    "Write Sphinx-ready notebooks to docs/_build/src; returns the root document's name."
    shutil.rmtree(SRC, ignore_errors=True); SRC.mkdir(parents=True)
    names = [p.stem for p in executed]
    for p in executed:
        nb = json.loads(p.read_text())
        nb['cells'] = [c for c in (prepare_cell(c) for c in nb['cells']) if c is not None]
        nb['nbformat'], nb['nbformat_minor'] = 4, 5
        nb['metadata'] = {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
                          'language_info': {'name': 'python', 'pygments_lexer': 'ipython3'}}  # widget state dropped
        name = p.stem
        if p == executed[0]:  # the first notebook (00_index) is the home page, index.html, as nbdev names it
            nb['cells'].append(toctree_cell(names[1:])); name = 'index'
        for i, c in enumerate(nb['cells']): c['id'] = f'cell-{i}'  # nbdev-clean strips ids; nbformat 4.5 wants them
        (SRC/f'{name}.ipynb').write_text(json.dumps(nb, indent=1))
    return 'index'


# ---------------------------------------------------------------- step 4: Sphinx
def sphinx(static: Path, jobs: int) -> None:
    env = {**os.environ, 'DETR_EXPLAINED_DOCS_STATIC': str(static)}
    cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-c', str(DOCS), '-q', '-j', str(jobs), '-E',
           str(SRC), str(HTML)]
    subprocess.run(cmd, check=True, env=env)


def _lock():
    "One build at a time in this checkout (a second waits): the builds share docs/_build."
    import fcntl
    BUILD.mkdir(parents=True, exist_ok=True)
    f = open(BUILD/'.lock', 'w')
    fcntl.flock(f, fcntl.LOCK_EX)
    return f

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--jobs', type=int, default=2, help='notebooks executed at once')
    ap.add_argument('--allow-errors', action='store_true', help='render notebooks whose cells fail')
    ap.add_argument('--no-cache', action='store_true', help='execute every notebook, even one unchanged since its last clean run')
    ap.add_argument('--reuse', action='store_true', help='render the notebooks as last executed (docs/_build/exec), stale or not')
    ap.add_argument('--execute-one', nargs=2, metavar=('SRC', 'DST'), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.execute_one: sys.exit(execute_one(Path(a.execute_one[0]).resolve(), Path(a.execute_one[1]).resolve()))
    lock, t0 = _lock(), time.time()
    notebooks = course_notebooks()
    print(f'executing {len(notebooks)} notebooks ({a.jobs} at a time)', flush=True)
    if a.reuse:
        missing = [nb.name for nb in notebooks if not (EXEC/nb.name).exists()]
        if missing: sys.exit(f'--reuse: never executed: {missing}')
        executed = [EXEC/nb.name for nb in notebooks]
    else: executed = execute_all(notebooks, a.jobs, a.allow_errors, cache=not a.no_cache)
    static = stage_mathjax()   # after the execution: a failing notebook is reported without npm
    prepare_all(executed)
    print('rendering with sphinx', flush=True)
    sphinx(static, a.jobs)
    print(f'docs built in {time.time() - t0:.0f}s: {HTML/"index.html"}')

if __name__ == '__main__': main()
