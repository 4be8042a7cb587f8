"""Issue 11: no run is ever lost — real `detr-explained train` processes on real folders.

Each test starts the command line as a user would (a separate Python process), and does to it
what happens to runs: a second training into the same folder, SIGKILL by pid in the middle of a
checkpoint write, Ctrl-C during a save, a read-only folder, a full disk (a 1 MB tmpfs where the
machine lets us mount one, else a simulated ENOSPC), a byte flipped in a checkpoint, a run that
is resumed after it finished.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from detr_explained.synthetic import make_synthetic

CHILD_ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp('data')/'syn', n_train=8, n_val=2, size=64)


def train_argv(data, out, *extra):
    return ['train', '--data', str(data), '--preset', 'tiny', '--out', str(out), '--quiet', *map(str, extra)]


def child_code(argv, prelude: str) -> str:
    "Python for a child process: `prelude`, then the command line's main(argv)."
    return textwrap.dedent(prelude) + f'\nimport sys\nfrom detr_explained.cli import main\nsys.exit(main({list(map(str, argv))!r}))\n'


def run(argv, prelude: str = '', timeout=300, **kw) -> subprocess.CompletedProcess:
    "`detr-explained ARGV` in a new process; `prelude` is Python run first (to slow down or break something)."
    return subprocess.run([sys.executable, '-c', child_code(argv, prelude)], capture_output=True, text=True, timeout=timeout,
                          env=CHILD_ENV, **kw)


def start(argv, prelude: str = '') -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-c', child_code(argv, prelude)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=CHILD_ENV)


def one_line_error(p: subprocess.CompletedProcess, code=2) -> str:
    err = p.stderr.strip()
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], err[-3000:])
    assert 'Traceback' not in err and len(err.splitlines()) == 1, err
    return err


def wait_for(cond, timeout=120, what=''):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout: raise AssertionError(f'timed out waiting for {what}')
        time.sleep(0.05)


def records(out: Path) -> list[str]:
    return (out/'metrics.jsonl').read_text().splitlines()


def checkpoint_step(path: Path) -> int:
    from detr_explained.train import load_training_checkpoint
    return load_training_checkpoint(path)['global_step']


# a child that writes checkpoints slowly: torch.save writes its bytes, then sleeps (a big file on a slow disk)
SLOW_SAVE = '''
import os, time, torch
DELAY = 30
_save = torch.save
def slow_save(obj, f, *a, **k):
    _save(obj, f, *a, **k)
    name = os.readlink(f'/proc/self/fd/{f.fileno()}') if hasattr(f, 'fileno') else str(f)
    if '.checkpoint.pt.' in name:
        f.flush(); open(name + '.saving', 'w').close(); time.sleep(DELAY)
torch.save = slow_save
'''


# --- a folder that holds a run ---------------------------------------------------------------------

def test_train_into_a_run_folder_refuses_unless_resume_or_overwrite(data, tmp_path):
    out = tmp_path/'run'
    assert run(train_argv(data, out, '--max-steps', 2)).returncode == 0
    before = (out/'checkpoint.pt').read_bytes(), records(out)
    err = one_line_error(run(train_argv(data, out, '--max-steps', 2)))
    assert f'{out} holds a run already' in err and '--resume' in err and '--overwrite' in err
    assert ((out/'checkpoint.pt').read_bytes(), records(out)) == before              # untouched
    assert run(train_argv(data, out, '--max-steps', 3, '--resume')).returncode == 0
    assert checkpoint_step(out/'checkpoint.pt') == 3
    assert run(train_argv(data, out, '--max-steps', 1, '--overwrite')).returncode == 0
    steps = [json.loads(r)['global_step'] for r in records(out) if 'loss' in json.loads(r)]
    assert checkpoint_step(out/'checkpoint.pt') == 1 and steps == [1]             # the old run's records are gone


def test_a_finished_run_resumed_adds_no_records(data, tmp_path):
    out = tmp_path/'run'
    assert run(train_argv(data, out, '--epochs', 2)).returncode == 0
    before = records(out)
    assert sum('eval' in json.loads(r) for r in before) == 2
    for _ in range(2): assert run(train_argv(data, out, '--epochs', 2, '--resume')).returncode == 0
    assert records(out) == before


# --- two processes, SIGKILL, Ctrl-C ------------------------------------------------------------------

def test_a_second_training_on_the_same_folder_is_stopped_and_a_killed_one_taken_over(data, tmp_path):
    out = tmp_path/'run'
    first = start(train_argv(data, out, '--epochs', 50), prelude=SLOW_SAVE.replace('DELAY = 30', 'DELAY = 0.3'))
    try:
        wait_for(lambda: (out/'.lock').exists() and (out/'.lock').read_text().strip(),
                 what='the first run to take the lock')
        err = one_line_error(run(train_argv(data, out, '--epochs', 50, '--resume')))
        assert f'another training is writing this run folder (pid {first.pid} on' in err
        os.kill(first.pid, signal.SIGKILL); first.wait()
    finally:
        if first.poll() is None: first.kill()
    # the lock died with its process: the next run takes the folder over
    p = run(train_argv(data, out, '--max-steps', 2, '--resume'))
    assert p.returncode == 0, p.stderr[-3000:]
    assert str(os.getpid()) not in (out/'.lock').read_text()


def test_sigkill_inside_a_checkpoint_write_then_resume(data, tmp_path):
    out = tmp_path/'run'
    assert run(train_argv(data, out, '--max-steps', 2)).returncode == 0
    good = (out/'checkpoint.pt').read_bytes()
    p = start(train_argv(data, out, '--max-steps', 4, '--resume'), prelude=SLOW_SAVE)
    try:
        wait_for(lambda: list(out.glob('.checkpoint.pt.*.tmp.saving')), what='a checkpoint write in progress')
        os.kill(p.pid, signal.SIGKILL); p.wait()
    finally:
        if p.poll() is None: p.kill()
    assert (out/'checkpoint.pt').read_bytes() == good                  # the previous checkpoint is whole
    assert list(out.glob('.checkpoint.pt.*.tmp'))                       # the interrupted write is still there ...
    for f in out.glob('*.saving'): f.unlink()
    assert run(train_argv(data, out, '--max-steps', 4, '--resume')).returncode == 0
    assert list(out.glob('.*.tmp')) == []                               # ... until the next start cleans it up
    assert checkpoint_step(out/'checkpoint.pt') == 4


def test_ctrl_c_during_a_save_finishes_it_and_exits_cleanly(data, tmp_path):
    out = tmp_path/'run'
    p = start(train_argv(data, out, '--max-steps', 30), prelude=SLOW_SAVE.replace('DELAY = 30', 'DELAY = 2'))
    try:
        wait_for(lambda: list(out.glob('.checkpoint.pt.*.tmp.saving')), what='a checkpoint write in progress')
        os.kill(p.pid, signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 130, stderr[-3000:]
    assert 'Traceback' not in stderr and 'interrupted' in stderr
    assert checkpoint_step(out/'checkpoint.pt') == 1                    # the save that was under way was completed
    for f in out.glob('*.saving'): f.unlink()
    assert list(out.glob('.*.tmp')) == []


# --- disks that refuse ---------------------------------------------------------------------------------

def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0: return False
    mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)], capture_output=True)
    return mount.returncode == 0


def _umount(path: Path): subprocess.run(['umount', str(path)], capture_output=True)


def test_read_only_folder(data, tmp_path):
    ro = tmp_path/'ro'
    mounted = _mount_tmpfs(ro, 'ro,size=1m')
    if not mounted: ro.chmod(0o555)
    try:
        if not mounted and os.access(ro, os.W_OK): pytest.skip('cannot make a read-only folder here')
        err = one_line_error(run(train_argv(data, ro/'run', '--max-steps', 1)))
        assert str(ro/'run') in err and ('read-only' in err or 'permission denied' in err)
    finally:
        if mounted: _umount(ro)


def test_out_is_a_file(data, tmp_path):
    (tmp_path/'f').write_text('x')
    err = one_line_error(run(train_argv(data, tmp_path/'f', '--max-steps', 1)))
    assert f'--out {tmp_path/"f"}' in err and 'is a file' in err


ENOSPC_PRELUDE = '''
import errno, os, detr_explained.core as core
_write = core._atomic_write
def full(path, write):
    if str(path).endswith('checkpoint.pt'): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return _write(path, write)
core._atomic_write = full
'''


@pytest.mark.parametrize('disk', ['tmpfs', 'simulated'])
def test_full_disk_says_so_and_what_was_kept(data, tmp_path, disk):
    if disk == 'tmpfs':
        small = tmp_path/'small'
        if not _mount_tmpfs(small, 'size=512k'): pytest.skip('cannot mount a small tmpfs here')
        try:
            err = one_line_error(run(train_argv(data, small/'run', '--max-steps', 2)))
            assert 'no space left on device' in err and 'no checkpoint had been written yet' in err
            assert [p.name for p in (small/'run').iterdir() if p.name.endswith('.tmp')] == []
        finally: _umount(small)
    else:
        out = tmp_path/'run'
        assert run(train_argv(data, out, '--max-steps', 1)).returncode == 0
        err = one_line_error(run(train_argv(data, out, '--max-steps', 3, '--resume'), prelude=ENOSPC_PRELUDE))
        assert 'no space left on device' in err and 'checkpoint.pt (global step 1) is intact' in err
        assert checkpoint_step(out/'checkpoint.pt') == 1


# --- outputs, checksums, evaluation ----------------------------------------------------------------------

@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_respect_the_umask(data, tmp_path, umask, mode):
    out = tmp_path/'run'
    assert run(train_argv(data, out, '--max-steps', 1), preexec_fn=lambda: os.umask(umask)).returncode == 0
    for name in ('checkpoint.pt', 'metrics.jsonl', 'curves.png'):
        assert (out/name).stat().st_mode & 0o777 == mode, name


def _flip_a_weight_byte(path: Path):
    "Flip one bit inside the largest tensor's bytes (the zip stores them uncompressed; torch.load does not check CRCs)."
    with zipfile.ZipFile(path) as z: big = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(data[big.header_offset + 26:big.header_offset + 28], 'little'), \
        int.from_bytes(data[big.header_offset + 28:big.header_offset + 30], 'little')
    data[big.header_offset + 30 + name_len + extra_len + big.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_checkpoint_is_an_error(data, tmp_path):
    out = tmp_path/'run'
    assert run(train_argv(data, out, '--max-steps', 1)).returncode == 0
    _flip_a_weight_byte(out/'checkpoint.pt')
    torch.load(out/'checkpoint.pt', weights_only=True)                  # torch alone does not notice
    for argv in (train_argv(data, out, '--max-steps', 2, '--resume'),
                 ['evaluate', '--checkpoint', out/'checkpoint.pt', '--data', data, '--quiet']):
        assert 'do not match the checksum saved with them' in one_line_error(run(argv))


def test_a_bad_validation_image_costs_no_training(data, tmp_path):
    import shutil
    mine = tmp_path/'data'; shutil.copytree(data, mine)
    val = json.loads((mine/'annotations'/'instances_val.json').read_text())
    broken = mine/'images'/val['images'][0]['file_name']
    good = broken.read_bytes(); broken.write_bytes(good[:100])
    out = tmp_path/'run'
    err = one_line_error(run(train_argv(mine, out, '--epochs', 1)))
    assert 'cannot read image' in err and 'is intact' in err and '--resume' in err
    assert checkpoint_step(out/'checkpoint.pt') == 4                     # the epoch (8 images, batch 2) is saved
    broken.write_bytes(good)
    assert run(train_argv(mine, out, '--epochs', 1, '--resume')).returncode == 0
    assert sum('eval' in json.loads(r) for r in records(out)) == 1


def test_diverging_weights_stop_with_one_line(data, tmp_path):
    err = one_line_error(run(train_argv(data, tmp_path/'run', '--max-steps', 5, '--lr', '1e30')))
    assert 'not finite' in err or 'nan or inf' in err


def test_a_huge_category_id_suggests_remapping(data, tmp_path):
    import shutil
    mine = tmp_path/'data'; shutil.copytree(data, mine)
    for split in ('train', 'val'):
        f = mine/'annotations'/f'instances_{split}.json'; d = json.loads(f.read_text())
        for c in d['categories']: c['id'] += 10**9
        for a in d['annotations']: a['category_id'] += 10**9
        f.write_text(json.dumps(d))
    err = one_line_error(run(train_argv(mine, tmp_path/'run', '--max-steps', 1)))
    assert '--remap-categories' in err
    assert run(train_argv(mine, tmp_path/'run2', '--max-steps', 1, '--remap-categories')).returncode == 0
