"""The `detr-explained` console command, run as a user runs it (a subprocess of the installed script)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest


def exe() -> str:
    p = Path(sys.executable).with_name('detr-explained')
    found = str(p) if p.exists() else shutil.which('detr-explained')
    assert found, "the console script detr-explained is not installed (pip install -e .)"
    return found


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_is_quick_and_names_every_command():
    t0 = time.time()
    r = cli('--help')
    assert r.returncode == 0 and time.time() - t0 < 10          # --help imports no torch
    for word in ('demo', 'make-synthetic', 'train', 'evaluate', 'predict', 'Start here'): assert word in r.stdout
    for cmd in ('demo', 'make-synthetic', 'train', 'evaluate', 'predict'):
        r = cli(cmd, '--help')
        assert r.returncode == 0 and 'usage: detr-explained ' + cmd in r.stdout
    assert 'Train and evaluate' in cli().stdout                  # no command: the help


def test_every_command_end_to_end(tmp_path):
    r = cli('make-synthetic', '--out', tmp_path / 'syn', '--train', 8, '--val', 4, '--size', 64)
    assert r.returncode == 0, r.stderr
    r = cli('train', '--data', tmp_path / 'syn', '--preset', 'tiny', '--epochs', 1, '--out', tmp_path / 'run',
            '--threads', 1)
    assert r.returncode == 0, r.stderr
    assert 'done: epoch 1, 4 steps' in r.stdout and 'val: AP' in r.stdout
    assert 'epoch 1/1' in r.stderr                               # the progress bar
    for f in ('checkpoint.pt', 'metrics.jsonl', 'curves.png'): assert (tmp_path / 'run' / f).stat().st_size > 0
    r = cli('evaluate', '--checkpoint', tmp_path / 'run' / 'checkpoint.pt', '--data', tmp_path / 'syn', '--quiet')
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / 'run' / 'metrics_val.json').read_text())
    assert set(m['per_class']) == {'ellipse', 'rectangle', 'triangle', 'cross'} and 'AP50' in m
    assert 'Average Precision' in r.stdout
    images = sorted((tmp_path / 'syn' / 'images').glob('val_*.png'))[:2]
    r = cli('predict', '--checkpoint', tmp_path / 'run' / 'checkpoint.pt', *images, '--out', tmp_path / 'pred',
            '--threshold', 0, '--quiet')
    assert r.returncode == 0, r.stderr
    dets = json.loads((tmp_path / 'pred' / 'detections.json').read_text())
    assert [Path(d['file']).name for d in dets] == [i.name for i in images]
    assert all((tmp_path / 'pred' / f'{i.stem}.png').exists() for i in images)


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    for args in [('train', '--data', tmp_path / 'missing'),
                 ('evaluate', '--checkpoint', tmp_path / 'none.pt', '--data', tmp_path),
                 ('train', '--data', tmp_path, '--set', 'no_such_field=1')]:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert cli('train').returncode == 2                           # argparse: --data is required


def test_demo_quick(tmp_path):
    "The demo's whole path (data, training, evaluation, pictures) with 16 images and 2 steps."
    r = cli('demo', '--out', tmp_path / 'demo', '--images', 16, '--val-images', 8, '--max-steps', 2, '--quiet')
    assert r.returncode == 0, r.stderr
    assert 'AP50' in r.stdout
    runs = [p for p in (tmp_path / 'demo').iterdir() if p.name != 'data']
    assert len(runs) == 1
    for f in ('checkpoint.pt', 'curves.png', 'predictions.png', 'metrics_val.json'): assert (runs[0] / f).exists()
    assert 'warmup 100 steps, then cosine' in r.stdout                   # cli.DEMO_TRAIN's schedule, not the preset's step
    r = cli('demo', '--out', tmp_path / 'demo', '--images', 16, '--val-images', 8, '--max-steps', 3, '--quiet')
    assert r.returncode == 0 and 'resuming' in r.stdout, r.stderr
    lrs = [rec['lr'] for rec in map(json.loads, (runs[0] / 'metrics.jsonl').read_text().splitlines()) if 'lr' in rec]
    assert lrs == pytest.approx([1e-5, 2e-5, 3e-5])                      # warmup: lr 1e-3 * step / 100, continued on resume


@pytest.mark.parametrize('family', ['detr', 'deformable_detr', 'dab_detr'])
def test_every_family_trains_resumes_and_evaluates(family, tmp_path_factory, capsys):
    "One loop for the three families (in-process, to keep it quick): train 2 steps, resume to 3, evaluate."
    from detr_explained.cli import main
    from detr_explained.synthetic import make_synthetic
    syn = make_synthetic(tmp_path_factory.mktemp('syn'), n_train=6, n_val=2, size=64)
    out = tmp_path_factory.mktemp(family)
    base = ['train', '--data', str(syn), '--family', family, '--preset', 'tiny', '--out', str(out), '--quiet']
    assert main(base + ['--max-steps', '2']) == 0
    assert main(base + ['--max-steps', '3', '--resume']) == 0
    assert 'done: epoch 1, 3 steps' in capsys.readouterr().out
    assert main(['evaluate', '--checkpoint', str(out / 'checkpoint.pt'), '--data', str(syn), '--quiet']) == 0
    assert f'{family} at step 3' in capsys.readouterr().out


def test_default_preset_trains(tmp_path, capsys):
    "`detr-explained train --data DIR` with nothing else: the 'small' preset, DETR."
    from detr_explained.cli import main
    from detr_explained.synthetic import make_synthetic
    syn = make_synthetic(tmp_path / 'syn', n_train=4, n_val=1, size=64)
    args = ['train', '--data', str(syn), '--max-steps', '1', '--eval-every', '0', '--out', str(tmp_path / 'run'),
            '--quiet']
    assert main(args) == 0
    out = capsys.readouterr().out
    assert 'detr (small preset)' in out and 'done: epoch 1, 1 steps' in out


def test_lr_schedule_options_and_resume(tmp_path, capsys):
    "--lr-schedule cosine --warmup-steps N: the logged lr follows the warmup, then the cosine; resume keeps the schedule."
    from detr_explained.cli import main
    from detr_explained.synthetic import make_synthetic
    from detr_explained.train import cosine_factor
    syn = make_synthetic(tmp_path / 'syn', n_train=6, n_val=1, size=64)
    base = ['train', '--data', str(syn), '--preset', 'tiny', '--batch-size', '2', '--epochs', '2', '--lr', '1e-3',
            '--eval-every', '0', '--quiet']
    cos = base + ['--lr-schedule', 'cosine', '--warmup-steps', '2']
    lrs = lambda run: [json.loads(l)['lr'] for l in (run / 'metrics.jsonl').read_text().splitlines() if '"lr"' in l]
    for bad, named in ((['--warmup-steps', '-1'], '--warmup-steps'), (['--lr-schedule', 'linear'], '--lr-schedule'),
                       (['--warmup-steps', '3'], '--warmup-steps 3: only with --lr-schedule cosine')):
        assert main(base + ['--out', str(tmp_path / 'bad')] + bad) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
    assert main(cos + ['--out', str(tmp_path / 'a'), '--max-steps', '3']) == 0
    assert 'warmup 2 steps, then cosine' in capsys.readouterr().out
    expected = [1e-3 * cosine_factor(s, 2 * 3, 2) for s in range(6)]      # 6 images / batch 2 = 3 steps an epoch, 2 epochs
    assert lrs(tmp_path / 'a') == pytest.approx(expected[:3], rel=1e-9)  # 5e-4, 1e-3 (warmup), then the cosine
    assert main(base + ['--out', str(tmp_path / 'a'), '--max-steps', '6', '--resume']) == 0   # no schedule options: the checkpoint's
    assert main(cos + ['--out', str(tmp_path / 'b')]) == 0                 # uninterrupted: 6 steps
    assert lrs(tmp_path / 'a') == pytest.approx(lrs(tmp_path / 'b'), rel=1e-12) == expected
    capsys.readouterr()
    assert main(base + ['--out', str(tmp_path / 'a'), '--resume', '--lr-schedule', 'step', '--max-steps', '7']) == 2
    assert "lr_schedule='cosine'; --resume cannot change it to 'step'" in capsys.readouterr().err
