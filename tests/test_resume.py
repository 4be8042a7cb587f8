"""A run killed with SIGKILL at random steps and resumed reaches the same weights as an uninterrupted run.

Training runs as a subprocess through the console command, exactly as a user runs it.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detr_explained.synthetic import make_synthetic

EPOCHS, STEPS_PER_EPOCH = 3, 6          # 12 training images, batch 2 (tiny preset)


def train_cmd(data: Path, out: Path, *extra) -> list[str]:
    code = 'import sys; from detr_explained.cli import main; sys.exit(main(sys.argv[1:]))'
    return [sys.executable, '-c', code, 'train', '--data', str(data), '--preset', 'tiny', '--epochs', str(EPOCHS),
            '--checkpoint-every', '4', '--eval-every', '0', '--set', 'dropout=0.1', '--out', str(out), '--threads', '1',
            '--quiet', *extra]


def env():
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONHASHSEED': '0'}


def logged_steps(out: Path) -> int:
    "The highest global step in the metrics log (lines cut by a kill are ignored)."
    p, best = out / 'metrics.jsonl', 0
    if not p.exists(): return 0
    for line in p.read_text().splitlines():
        try: best = max(best, json.loads(line).get('global_step', 0))
        except json.JSONDecodeError: pass
    return best


def run_until_killed(cmd, out: Path, kill_at: int, timeout: float=240) -> int:
    "Start training, SIGKILL it once the log reaches step `kill_at`; return the step it had reached."
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while logged_steps(out) < kill_at:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {kill_at}: {proc.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout: proc.kill(); raise AssertionError('training too slow')
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL); proc.wait()
    return logged_steps(out)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp('syn'), n_train=12, n_val=2, size=64)


def test_sigkill_and_resume_give_the_same_weights(data, tmp_path):
    total = EPOCHS * STEPS_PER_EPOCH
    ref = subprocess.run(train_cmd(data, tmp_path / 'ref'), env=env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    rng = random.Random(int(os.environ.get('KILL_SEED', time.time_ns() % 10_000)))
    out, reached = tmp_path / 'killed', 0
    kills = sorted(rng.sample(range(2, total - 1), 3))
    print('kill at steps', kills)
    for k in kills:
        k = max(k, reached + 1)
        reached = run_until_killed(train_cmd(data, out, '--resume'), out, k)
    final = subprocess.run(train_cmd(data, out, '--resume'), env=env(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert 'resumed from' in final.stdout

    a = torch.load(tmp_path / 'ref' / 'checkpoint.pt', weights_only=True)
    b = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert (a['epoch'], a['global_step']) == (b['epoch'], b['global_step']) == (EPOCHS, total)
    different = [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]
    assert different == [], f'weights differ after resuming (kills at {kills}): {different[:5]}'
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a['rng']['torch'], b['rng']['torch'])
    # the log has each step exactly once, with the same losses as the uninterrupted run
    def steps(d):
        rows = map(json.loads, (d / 'metrics.jsonl').read_text().splitlines())
        return [(r['global_step'], r['loss']) for r in rows if 'loss' in r]
    assert steps(out) == steps(tmp_path / 'ref') and len(steps(out)) == total


def test_resume_of_a_finished_run_does_nothing(data, tmp_path):
    cmd = train_cmd(data, tmp_path / 'run', '--max-steps', '2')
    assert subprocess.run(cmd, env=env(), capture_output=True, timeout=300).returncode == 0
    before = (tmp_path / 'run' / 'checkpoint.pt').stat().st_mtime_ns
    r = subprocess.run(train_cmd(data, tmp_path / 'run', '--max-steps', '2', '--resume'), env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'global step 2' in r.stdout
    assert (tmp_path / 'run' / 'checkpoint.pt').stat().st_mtime_ns == before
