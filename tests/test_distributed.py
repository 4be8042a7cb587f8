"""torchrun with gloo on this CPU: two processes train like one process with the same global batch; a killed rank stops
the run with its checkpoint intact, and the run resumes (at another world size) to the same weights."""
import os, signal, subprocess, sys, time
from pathlib import Path

import pytest

from detr_explained.synthetic import make_synthetic
from detr_explained.train import load_training_checkpoint

STEPS = 6
TRAIN = ['train', '--family', 'dab_detr', '--preset', 'tiny', '--batch-size', '4', '--max-steps', str(STEPS),
         '--augment', 'none', '--epochs', '3', '--checkpoint-every', '1', '--eval-every', '0', '--set', 'dropout=0',
         '--quiet']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp('ddp') / 'data', n_train=8, n_val=4, size=64, seed=3)


def _cli(args, nproc=None, **kw):
    run = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
           f'--nproc-per-node={nproc}'] if nproc else [sys.executable]
    return run + ['-m', 'detr_explained.cli'] + args


def _weights(run: Path) -> dict:
    return load_training_checkpoint(run / 'checkpoint.pt')['model']


@pytest.fixture(scope='module')
def single(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp') / 'one'
    r = subprocess.run(_cli(TRAIN + ['--data', str(data), '--out', str(out)]), env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_two_processes_train_like_one_with_the_same_global_batch(data, single, tmp_path):
    out = tmp_path / 'two'
    r = subprocess.run(_cli(TRAIN + ['--data', str(data), '--out', str(out)], nproc=2), env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert '2 processes (gloo), 2 images each per step' in r.stdout
    one, two = _weights(single), _weights(out)
    assert load_training_checkpoint(out / 'checkpoint.pt')['global_step'] == STEPS
    assert one.keys() == two.keys()
    worst = max((one[k].double() - two[k].double()).abs().max().item() for k in one if one[k].is_floating_point())
    assert worst < 1e-5, worst
    init = _weights_init(data, single, tmp_path)
    changed = max((one[k].double() - init[k].double()).abs().max().item() for k in one if one[k].is_floating_point())
    assert changed > 1e-4                                     # the weights did move: the comparison is not vacuous
    assert not list(out.glob('.*.tmp')) and (out / 'metrics.jsonl').read_text().count('"loss"') == STEPS   # one writer


def _weights_init(data, run, tmp_path):
    "The weights the run started from: a Trainer built from the same configs (the seed fixes them)."
    from detr_explained.data import CocoDetection, find_split
    from detr_explained.train import Trainer, TrainConfig, config_from_dict
    ck = load_training_checkpoint(run / 'checkpoint.pt')
    ds = CocoDetection(*find_split(data, 'train'))
    return Trainer(TrainConfig(**ck['train_config']), config_from_dict(ck['family'], ck['model_config']), ds,
                   tmp_path / 'x', progress=False).model.state_dict()


def _rank_pid(parent: int, rank: int, timeout: float=120) -> int:
    "The pid of the worker of `rank` among the descendants of `parent` (read from /proc/<pid>/environ)."
    t0 = time.time()
    while time.time() - t0 < timeout:
        for d in Path('/proc').iterdir():
            if not d.name.isdigit(): continue
            try:
                stat, env = (d / 'stat').read_text(), (d / 'environ').read_bytes().split(b'\0')
            except OSError: continue
            if int(stat.rsplit(')', 1)[1].split()[1]) == parent and f'RANK={rank}'.encode() in env: return int(d.name)
        time.sleep(0.2)
    raise AssertionError(f'no worker of rank {rank} under {parent}')


def test_a_killed_rank_stops_the_run_cleanly_and_it_resumes(data, single, tmp_path):
    out = tmp_path / 'killed'
    args = TRAIN + ['--data', str(data), '--out', str(out)]
    args[args.index('--max-steps') + 1] = '1000'                 # would run long: it is stopped by the kill
    p = subprocess.Popen(_cli(args, nproc=2), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = _rank_pid(p.pid, 1)
        t0 = time.time()
        ckpt = out / 'checkpoint.pt'
        while not ckpt.exists() or load_training_checkpoint(ckpt)['global_step'] < 2:
            assert time.time() - t0 < 300 and p.poll() is None, 'no checkpoint written'
            time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode != 0
    assert 'another process of the run stopped' in stderr and 'is intact' in stderr, stderr[-3000:]
    ckpt = load_training_checkpoint(out / 'checkpoint.pt')             # intact: the checksum holds
    assert 2 <= ckpt['global_step'] < 1000
    if ckpt['global_step'] > STEPS: pytest.skip(f"the kill came after step {ckpt['global_step']}")
    r = subprocess.run(_cli(['train', '--data', str(data), '--out', str(out), '--resume', '--max-steps', str(STEPS),
                             '--quiet']),
                       env=ENV, capture_output=True, text=True, timeout=600)  # one process resumes what two began
    assert r.returncode == 0, r.stderr[-3000:]
    one, resumed = _weights(single), _weights(out)
    floats = [k for k in one if one[k].is_floating_point()]
    assert max((one[k].double() - resumed[k].double()).abs().max().item() for k in floats) < 1e-5


def _lrs(run: Path) -> list[float]:
    import json
    return [r['lr'] for r in map(json.loads, (run / 'metrics.jsonl').read_text().splitlines()) if 'lr' in r]


def test_a_cosine_schedule_spans_the_same_steps_at_two_processes(data, tmp_path):
    "The cosine is sized by the distributed loader: the logged lrs are one process's, step for step."
    import math
    from detr_explained.train import cosine_factor
    cos = TRAIN + ['--data', str(data), '--lr-schedule', 'cosine', '--warmup-steps', '2', '--lr', '1e-3', '--max-steps', '4',
                   '--epochs', '2', '--checkpoint-every', '0']
    runs = {}
    for nproc in (None, 2):
        out = runs[nproc] = tmp_path / f'cos{nproc}'
        r = subprocess.run(_cli(cos + ['--out', str(out)], nproc=nproc), env=ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert 'warmup 2 steps, then cosine' in r.stdout
    expected = [1e-3 * cosine_factor(s, 2 * 2, 2) for s in range(4)]     # 8 images / batch 4 = 2 steps an epoch, 2 epochs
    assert _lrs(runs[None]) == pytest.approx(expected, rel=1e-9)
    assert _lrs(runs[2]) == pytest.approx(expected, rel=1e-9)
    assert not math.isclose(expected[3], expected[2])                    # the cosine did move between the steps
