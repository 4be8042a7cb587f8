"""The build steps of `make test` fail when they should, and leave the working tree alone.

Each test works in a temporary copy of the repository (the files git tracks or would track, as
they are in the working tree), committed there, so that `git status` shows whatever a step wrote.
`make` runs there with this test's Python environment (VENV=...) and `-o` on its install stamp,
so that the copy never reinstalls the package.
"""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent          # .venv/bin (not resolved: the venv's own python)
VENV = BIN.parent
GIT = ['git', '-c', 'user.name=test', '-c', 'user.email=test@example.invalid', '-c', 'commit.gpgsign=false']


def _run(cmd, cwd, **kw):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=kw.pop('timeout', 600), **kw)

def repo_copy(dest: Path, only=None) -> Path:
    "Copy the repository's files (tracked and untracked-but-not-ignored) to `dest` and commit them there."
    files = _run(['git', 'ls-files', '-z', '-co', '--exclude-standard'], ROOT).stdout.split('\0')
    for f in filter(None, files):
        if only is not None and not any(f == o or f.startswith(o.rstrip('/') + '/') for o in only): continue
        src = ROOT/f
        if not src.is_file(): continue   # deleted in the working tree
        (dest/f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest/f)
    assert _run(GIT + ['init', '-q'], dest).returncode == 0
    _run(GIT + ['add', '-A'], dest)
    r = _run(GIT + ['commit', '-q', '-m', 'copy'], dest)
    assert r.returncode == 0, r.stderr
    return dest

def git_status(repo: Path) -> str:
    return _run(['git', 'status', '--porcelain', '--untracked-files=all'], repo).stdout

def make(repo: Path, *targets, **variables):
    v = {'VENV': str(VENV), **variables}
    cmd = ['make', '--no-print-directory', '-o', f'{v["VENV"]}/.installed',
           *[f'{k}={x}' for k, x in v.items()], *targets]
    return _run(cmd, repo, env={**os.environ, 'OMP_NUM_THREADS': '1'})

def commit(repo: Path, msg: str):
    _run(GIT + ['add', '-A'], repo)
    assert _run(GIT + ['commit', '-q', '--allow-empty', '-m', msg], repo).returncode == 0


@pytest.fixture
def repo(tmp_path):
    "A copy whose library is in sync with its notebooks (exported there: this working tree may be mid-edit)."
    repo = repo_copy(tmp_path/'repo', only=['Makefile', 'pyproject.toml', 'nbs', 'detr_explained', '.gitignore'])
    r = _run([str(BIN/'nbdev-export')], repo)
    assert r.returncode == 0, r.stderr
    commit(repo, 'exported')
    return repo


# ---------------------------------------------------------------- make export-check
def test_export_check_passes_on_the_repository_as_it_is(repo):
    r = make(repo, 'export-check')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'in sync' in r.stdout
    assert git_status(repo) == ''

def _exported_cell(nb: dict) -> dict:
    return next(c for c in nb['cells'] if c['cell_type'] == 'code' and ''.join(c['source']).startswith('#| export'))

def test_export_check_fails_when_a_notebook_was_not_exported(repo):
    p = repo/'nbs'/'02_box_ops.ipynb'
    nb = json.loads(p.read_text())
    cell = _exported_cell(nb)
    cell['source'] = ''.join(cell['source']) + '\nNOT_EXPORTED_YET = 1\n'
    p.write_text(json.dumps(nb, indent=1))
    commit(repo, 'edit a notebook, do not export')
    r = make(repo, 'export-check')
    assert r.returncode != 0
    assert 'differs from what nbs/ export' in r.stderr and '+NOT_EXPORTED_YET = 1' in r.stdout
    assert git_status(repo) == ''                       # the library in the copy was not rewritten
    assert 'NOT_EXPORTED_YET' not in (repo/'detr_explained'/'box_ops.py').read_text()

def test_export_check_fails_when_nbdev_export_fails(repo):
    (repo/'nbs'/'99_broken.ipynb').write_text('{"cells": [')   # not JSON: nbdev-export raises
    commit(repo, 'a broken notebook')
    r = make(repo, 'export-check')
    assert r.returncode != 0
    assert 'nbdev-export failed' in r.stderr and 'JSONDecodeError' in r.stderr
    assert git_status(repo) == ''

def test_export_check_reads_the_exit_status_of_nbdev_export(repo, tmp_path):
    "An nbdev-export that fails without changing anything (here: `false`) must fail the check."
    fake = tmp_path/'fakebin'; fake.mkdir()
    (fake/'nbdev-export').write_text('#!/bin/sh\nexit 1\n'); (fake/'nbdev-export').chmod(0o755)
    r = make(repo, 'export-check', BIN=str(fake))
    assert r.returncode != 0 and 'nbdev-export failed' in r.stderr
    assert git_status(repo) == ''


# ---------------------------------------------------------------- notebooks run once, in the docs build
def _nb(*cells: str) -> str:
    return json.dumps({'cells': [{'cell_type': 'code', 'execution_count': None, 'metadata': {}, 'outputs': [],
                                  'source': c} for c in cells],
                       'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5})

def test_make_test_runs_the_notebooks_once_in_the_docs_build():
    r = make(ROOT, '-n', 'test')
    assert r.returncode == 0, r.stderr
    assert 'nbdev-test' not in r.stdout, r.stdout
    assert r.stdout.count('docs/build.py') == 1 and 'docs/build.py --no-cache' in r.stdout, r.stdout

def test_docs_test_fails_on_a_broken_notebook_and_names_it(tmp_path):
    "`make docs-test` (the notebook step of `make test`) in a copy whose nbs/ holds 2 good notebooks, 1 broken."
    repo = repo_copy(tmp_path/'repo', only=['Makefile', 'pyproject.toml', 'docs/build.py', 'docs/conf.py',
                                            '.gitignore'])
    nbs = repo/'nbs'; nbs.mkdir()
    (nbs/'00_first.ipynb').write_text(_nb('print("first notebook ran")'))
    (nbs/'01_flags.ipynb').write_text(_nb(   # what nbdev-test skips is skipped here too
        '#| slow\nraise RuntimeError("a slow cell ran")', '#| notest\nraise RuntimeError("a notest cell ran")',
        '#| eval: false\nraise RuntimeError("an eval: false cell ran")',
        'import os; print("IN_TEST", os.environ["IN_TEST"])'))
    (nbs/'02_broken.ipynb').write_text(_nb('x = 1', 'raise ValueError("deliberately broken notebook")',
                                           'print("after")'))
    r = make(repo, 'docs-test')
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert '1 of 3 notebook(s) failed to execute: 02_broken.ipynb' in r.stderr, out
    assert 'deliberately broken notebook' in r.stderr, out          # its traceback is shown
    for name in ('00_first', '01_flags'): assert 'ok' in next(l for l in r.stdout.splitlines() if name in l), out
    executed = json.loads((repo/'docs'/'_build'/'exec'/'01_flags.ipynb').read_text())
    texts = [''.join(o.get('text', '')) for c in executed['cells'] for o in c['outputs']]
    assert texts == ['IN_TEST 1\n'], texts                           # outputs kept for the site, skipped cells empty
    assert not (repo/'docs'/'_build'/'exec'/'02_broken.ipynb').exists()
