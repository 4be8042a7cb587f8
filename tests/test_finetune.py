"""train --init adapts the class head by class name (official-layout checkpoints from the shared fixtures onto the COCO
sample); `check` flags xyxy boxes stored as xywh and a num_classes off by one; the trap warnings."""
import argparse, json
from pathlib import Path

import pytest
import torch

from detr_explained.family import prior_bias
from detr_explained.finetune import COCO_NAMES, flat_loss, init_trainer, load_init, main_check, trap_warnings
from detr_explained.official import CheckpointMismatch
from detr_explained.synthetic import make_synthetic
from detr_explained.train import Trainer


@pytest.fixture(scope='module')
def coco_renamed(coco_sample, tmp_path_factory):
    "The COCO sample with 'cat' renamed 'lynx' and 'dog' renamed 'wolf' (the images are the sample's own)."
    root = tmp_path_factory.mktemp('coco_renamed')
    (root / 'annotations').mkdir()
    (root / 'images').symlink_to(Path(coco_sample) / 'images')
    d = json.loads((Path(coco_sample) / 'annotations' / 'instances_train2017.json').read_text())
    for c in d['categories']: c['name'] = {'cat': 'lynx', 'dog': 'wolf'}.get(c['name'], c['name'])
    (root / 'annotations' / 'instances_train.json').write_text(json.dumps(d))
    return root


def _official_file(fx, tmp_path) -> Path:
    path = tmp_path / f"{fx['config']['family']}-official.pth"
    torch.save({'model': fx['state_dict'], 'args': argparse.Namespace(**fx['config']['args']), 'epoch': 3}, path)
    return path


@pytest.mark.parametrize('family', ['detr', 'dab_detr'])
@pytest.mark.parametrize('remap', [False, True])
def test_init_from_an_official_checkpoint_keeps_the_shared_names_rows(official_fixture, coco_renamed, tmp_path,
                                                                      family, remap):
    fx = official_fixture(family)
    path = _official_file(fx, tmp_path)
    trainer, how = init_trainer(str(path), coco_renamed, tmp_path / 'run', lambda f: ({'remap_categories': remap}, {}),
                                preset='tiny', progress=False)
    assert 'class rows re-initialised' in how and 'lynx, wolf' in how
    ds, sd, old = trainer.train_ds, trainer.model.state_dict(), fx['state_dict']
    # same seed: the init
    fresh = Trainer(trainer.tcfg, trainer.cfg, ds, tmp_path / 'fresh', progress=False).model.state_dict()
    K, by_name = trainer.cfg.num_classes, {n: i for i, n in COCO_NAMES.items()}
    assert K == (80 if remap else 91)
    for key in ('class_embed.weight', 'class_embed.bias'):
        new_rows = sd[key]
        for label, name in ds.names.items():
            if name in by_name: assert torch.equal(new_rows[label], old[key][by_name[name]]), (key, name)  # bit for bit
            # re-initialised
            else: assert torch.equal(new_rows[label], fresh[key][label]), (key, name)
        if family == 'detr':
            # no-object row kept
            assert new_rows.shape[0] == K + 1 and torch.equal(new_rows[K], old[key][91])
    if family == 'dab_detr':
        # lynx: prior bias
        assert sd['class_embed.bias'][ds.cat_to_label[17]].item() == pytest.approx(prior_bias())
    rest = [k for k in old if 'class_embed' not in k and k in sd and not k.endswith('num_batches_tracked')]
    assert rest and all(torch.equal(sd[k], old[k]) for k in rest)
    assert trainer.init_report['kept']['person'] == [1, 0 if remap else 1]


def test_init_with_another_architecture_says_which_option(official_fixture, coco_renamed, tmp_path):
    path = _official_file(official_fixture('detr'), tmp_path)
    with pytest.raises(CheckpointMismatch, match=r'--set hidden_dim=32'):
        init_trainer(str(path), coco_renamed, tmp_path / 'run', lambda f: ({}, {'hidden_dim': 32}), preset='tiny',
                     progress=False)


def test_init_names_what_it_cannot_read(tmp_path):
    from detr_explained.official import CheckpointError
    with pytest.raises(CheckpointError, match='not a file, a course model'): load_init('no-such-model')


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp('check') / 'data', n_train=6, n_val=2, size=64, seed=1)


def _copy_with(data: Path, tmp_path: Path, change) -> Path:
    root = tmp_path / 'bad'
    (root / 'annotations').mkdir(parents=True)
    (root / 'images').symlink_to(data / 'images')
    d = json.loads((data / 'annotations' / 'instances_train.json').read_text())
    change(d)
    (root / 'annotations' / 'instances_train.json').write_text(json.dumps(d))
    return root


def test_check_flags_xyxy_boxes_stored_as_xywh(shapes, tmp_path, capsys):
    def to_xyxy(d):
        for a in d['annotations']: x, y, w, h = a['bbox']; a['bbox'] = [x, y, x + w, y + h]
    assert main_check(['--data', str(shapes), '--steps', '0']) == 0
    assert 'no problem found' in capsys.readouterr().out
    assert main_check(['--data', str(_copy_with(shapes, tmp_path, to_xyxy)), '--steps', '0']) == 1
    out = capsys.readouterr().out
    assert 'problem:' in out and 'look like [x0, y0, x1, y1] (xyxy)' in out


def test_check_flags_num_classes_off_by_one(shapes, capsys):
    assert main_check(['--data', str(shapes), '--steps', '0', '--num-classes', '4']) == 1     # ids 1..4 need 5
    assert 'use num_classes=5' in capsys.readouterr().out
    assert main_check(['--data', str(shapes), '--steps', '0', '--num-classes', '6']) == 0     # one too many: a warning
    assert 'warning:' in (out := capsys.readouterr().out) and 'do not count no-object' in out


def test_check_overfits_one_batch(shapes, capsys):
    code = main_check(['--data', str(shapes), '--family', 'detr', '--steps', '200', '--images', '1', '--image-size',
                       '64'])
    out = capsys.readouterr().out
    assert 'overfit 1 images for 200 steps' in out and 'cardinality error' in out
    assert code == 0, out


def test_check_user_errors_are_one_line(tmp_path, capsys):
    assert main_check(['--data', str(tmp_path / 'nothing')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('detr-explained check: error:') and err.count('\n') == 1


def test_trap_warnings(shapes, tmp_path):
    from detr_explained.data import CocoDetection, find_split
    from detr_explained.train import model_config, train_config
    ds = CocoDetection(*find_split(shapes, 'train'))
    t = Trainer(train_config('tiny', family='detr'), model_config('detr', 'tiny', num_classes=5, lr=0.05,
                                                                  eos_coef=0.9), ds,
                tmp_path / 'r', progress=False)
    text = '\n'.join(trap_warnings(t))
    assert 'lr 0.05 is high' in text and 'eos_coef=0.9' in text and 'only 6 steps' in text
    assert flat_loss([1.0] * 100) and flat_loss([1.0 - i / 200 for i in range(100)]) is None


def test_cli_train_init_freeze_and_resume(shapes, tmp_path, capsys):
    "train --init from a training checkpoint with --freeze encoder: logged, frozen parts unchanged, resumable."
    from detr_explained.cli import main
    from detr_explained.train import load_training_checkpoint
    base = ['train', '--data', str(shapes), '--preset', 'tiny', '--eval-every', '0', '--quiet']
    assert main(base + ['--family', 'dab_detr', '--max-steps', '2', '--out', str(tmp_path / 'src')]) == 0
    src = load_training_checkpoint(tmp_path / 'src' / 'checkpoint.pt')
    run = ['--init', str(tmp_path / 'src' / 'checkpoint.pt'), '--freeze', 'encoder', '--out', str(tmp_path / 'ft')]
    assert main(base + run + ['--max-steps', '2', '--lr', '1e-3']) == 0
    out = capsys.readouterr().out
    assert 'init: ' in out and 'old label->new): ellipse, rectangle, triangle, cross' in out
    assert 'warning: only 2 steps' in out
    ft = load_training_checkpoint(tmp_path / 'ft' / 'checkpoint.pt')
    assert ft['train_config']['freeze'] == 'encoder' and ft['train_config']['init'].endswith('checkpoint.pt')
    enc = [k for k in ft['model'] if k.startswith(('transformer.encoder.', 'input_proj.'))]
    assert enc and all(torch.equal(ft['model'][k], src['model'][k]) for k in enc)            # frozen: as loaded
    assert not torch.equal(ft['model']['class_embed.weight'], src['model']['class_embed.weight'])   # the head trained
    first = json.loads((tmp_path / 'ft' / 'metrics.jsonl').read_text().splitlines()[0])
    assert first['init']['kept']['cross'] == [4, 4] and first['init']['reinitialised'] == []
    # freeze kept on resume
    assert main(base + ['--out', str(tmp_path / 'ft'), '--resume', '--max-steps', '3']) == 0
    again = load_training_checkpoint(tmp_path / 'ft' / 'checkpoint.pt')
    assert again['global_step'] == 3 and all(torch.equal(again['model'][k], src['model'][k]) for k in enc)


def test_finetuning_a_course_model_beats_scratch_at_equal_steps(tmp_path):
    "A new class list (two names known, two new): 40 steps from the Deformable DETR course model vs 40 from scratch."
    from detr_explained.course import course_model_names
    from detr_explained.evaluate import evaluate_dataset
    from detr_explained.train import datasets_from_folder, model_config, train_config
    if 'deformable_detr' not in course_model_names(): pytest.skip('the Deformable DETR course model is not built')
    data = make_synthetic(tmp_path / 'data', n_train=40, n_val=20, size=128, seed=11)
    relabel = {2: (1, 'rectangle'), 3: (2, 'triangle'), 1: (3, 'blob'), 4: (4, 'plus')}
    for split in ('train', 'val'):
        p = data / 'annotations' / f'instances_{split}.json'
        d = json.loads(p.read_text())
        d['categories'] = [{'id': n, 'name': name} for n, name in sorted(relabel.values())]
        for a in d['annotations']: a['category_id'] = relabel[a['category_id']][0]
        p.write_text(json.dumps(d))
    run = {'max_steps': 40, 'eval_every': 0, 'epoch_checkpoints': False, 'checkpoint_every': 0}
    ft, _ = init_trainer('deformable_detr', data, tmp_path / 'ft', lambda f: (run, {}), preset='demo', progress=False)
    tcfg = train_config('demo', family='deformable_detr', **run)
    train, val = datasets_from_folder(data, tcfg)
    scratch = Trainer(tcfg, model_config('deformable_detr', 'demo', num_classes=train.num_classes), train,
                      tmp_path / 's', progress=False)
    aps = {}
    for name, t in (('finetune', ft), ('scratch', scratch)):
        t.fit()
        aps[name] = evaluate_dataset(t.model, t.postprocess, val, progress=False)['AP']
    print(aps)
    assert aps['finetune'] > aps['scratch'] + 0.05, aps
