"""The course's Jupyter kernel, and the notebooks that name it (so JupyterLab opens them without a "Select Kernel" dialog).

    .venv/bin/python tools/kernelspec.py install      # register the kernel `detr-explained` in this venv (make lab)
    .venv/bin/python tools/kernelspec.py install --prefix DIR   # ... under DIR/share/jupyter instead (the lab tests)
    .venv/bin/python tools/kernelspec.py notebooks    # write its kernelspec into the metadata of every nbs/*.ipynb
    .venv/bin/python tools/kernelspec.py check        # exit 1 naming each notebook that lacks it (a test runs this)

The kernel is this venv's Python running ipykernel, with OMP_WAIT_POLICY=PASSIVE unless the
environment already sets it (on a small, busy CPU, spinning OpenMP waits make every parallel op
slow; see the Makefile). It is installed under the venv (`--sys-prefix`), where the venv's JupyterLab
finds it. `nbdev-clean` keeps a notebook's `kernelspec` (it rewrites `display_name` to the name), so
the metadata written here survives it.
"""
from __future__ import annotations
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = 'detr-explained'
DISPLAY_NAME = 'Python 3 (detr_explained)'
# What a notebook's metadata holds; nbdev-clean sets display_name to the name, so store it that way already.
NOTEBOOK_KERNELSPEC = {'display_name': NAME, 'language': 'python', 'name': NAME}
_LAUNCH = ("import os; os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE'); "
           "import runpy; runpy.run_module('ipykernel_launcher', run_name='__main__', alter_sys=True)")


def install(prefix: str = sys.prefix) -> Path:
    "Register the kernel in `prefix`/share/jupyter/kernels/detr-explained; returns its kernel.json."
    r = subprocess.run([sys.executable, '-m', 'ipykernel', 'install', '--prefix', prefix, '--name', NAME,
                        '--display-name', DISPLAY_NAME], capture_output=True, text=True)
    if r.returncode: sys.exit(f'ipykernel install --prefix {prefix} failed:\n{r.stderr}')
    path = Path(prefix)/'share'/'jupyter'/'kernels'/NAME/'kernel.json'
    spec = json.loads(path.read_text())
    spec['argv'] = [sys.executable, '-c', _LAUNCH, '-f', '{connection_file}']
    path.write_text(json.dumps(spec, indent=1) + '\n')
    print(f'kernel {NAME!r} ({DISPLAY_NAME}) installed: {path}')
    return path


def notebooks() -> list[Path]:
    return sorted((ROOT/'nbs').glob('*.ipynb'))


def set_kernelspec(path: Path) -> bool:
    "Read, set `metadata.kernelspec`, write back at once (only if it changed); True if it changed."
    text = path.read_text(encoding='utf-8')
    nb = json.loads(text)
    if nb.get('metadata', {}).get('kernelspec') == NOTEBOOK_KERNELSPEC: return False
    nb.setdefault('metadata', {})['kernelspec'] = dict(NOTEBOOK_KERNELSPEC)
    nb['metadata'] = dict(sorted(nb['metadata'].items()))
    # nbdev-clean's layout: indent 1, keys sorted, a final newline, non-ASCII kept
    path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + '\n', encoding='utf-8')
    return True


def missing() -> list[str]:
    return [p.name for p in notebooks() if json.loads(p.read_text()).get('metadata', {}).get('kernelspec') != NOTEBOOK_KERNELSPEC]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else ''
    if cmd == 'install':
        if argv[1:2] == ['--prefix'] and len(argv) == 3: install(argv[2])
        elif len(argv) == 1: install()
        else:
            print(f'tools/kernelspec.py install: expected nothing or --prefix PATH, got {" ".join(argv[1:])}', file=sys.stderr)
            sys.exit(2)
    elif cmd == 'notebooks':
        changed = [p.name for p in notebooks() if set_kernelspec(p)]
        print(f'kernelspec {NAME!r} set in {len(changed)} notebook(s): {" ".join(changed) or "(all had it)"}')
    elif cmd == 'check':
        if (bad := missing()):
            sys.exit(f'notebooks without the kernelspec {NAME!r} (run: python tools/kernelspec.py notebooks): {" ".join(bad)}')
        print(f'every notebook names the kernel {NAME!r}')
    else:
        print(f'usage: python tools/kernelspec.py install|notebooks|check (got {" ".join(argv) or "nothing"})', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__': main()
