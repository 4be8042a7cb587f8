"""Bad input is handled as the official code would, or stopped with an error that names the file, field or value.

Never a traceback from deep inside torch, never a lost or half-written checkpoint.
"""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_explained.cli import main
from detr_explained.data import CocoDetection, DatasetError, find_split, make_coco_transforms, read_coco_json
from detr_explained.train import (CheckpointError, Trainer, TrainingError, check_compatible, load_training_checkpoint,
                                  model_config, train_config, trainer_from_checkpoint)


def write_dataset(root: Path, images: list[dict], annotations: list[dict], categories=None, split='train',
                  make_files=True) -> Path:
    "A COCO-format folder with `images` (each gets a 48x64 RGB JPEG unless it has 'mode' or make_files is False)."
    (root / 'images').mkdir(parents=True, exist_ok=True); (root / 'annotations').mkdir(exist_ok=True)
    for im in images:
        if not make_files or im.get('skip'): continue
        mode = im.pop('mode', 'RGB')
        colour = {'RGB': (200, 30, 30), 'L': 128, 'RGBA': (20, 200, 20, 128), 'CMYK': (0, 255, 255, 0), 'P': 3}[mode]
        ext = '.jpg' if mode in ('RGB', 'L', 'CMYK') else '.png'
        im['file_name'] = im.get('file_name', f"{im['id']}{ext}")
        Image.new(mode, (64, 48), colour).save(root / 'images' / im['file_name'])
    for im in images: im.pop('skip', None); im.setdefault('file_name', f"{im['id']}.jpg")
    cats = categories if categories is not None else [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}]
    (root / 'annotations' / f'instances_{split}.json').write_text(
        json.dumps({'images': images, 'annotations': annotations, 'categories': cats}))
    return root


def ann(i, image_id, bbox, cat=1, **kw):
    return {'id': i, 'image_id': image_id, 'category_id': cat, 'bbox': bbox, 'area': float(bbox[2] * bbox[3]),
            'iscrowd': 0, **kw}


def dataset(root, split='train', **kw):
    return CocoDetection(*find_split(root, split), make_coco_transforms('val', 48), **kw)


def cli_error(capsys, *argv) -> str:
    "Run the CLI in-process; it must fail with exit code 2 and one line on stderr, no traceback."
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert 'Traceback' not in err and len(err.splitlines()) == 1, err
    return err


# --- images ---------------------------------------------------------------------------------------

def test_corrupt_jpeg_names_the_file(tmp_path, capsys):
    root = write_dataset(tmp_path, [{'id': 1}, {'id': 2}], [ann(1, 1, [5, 5, 20, 20]), ann(2, 2, [5, 5, 20, 20])])
    (root / 'images' / '2.jpg').write_bytes((root / 'images' / '2.jpg').read_bytes()[:200])   # truncated
    ds = dataset(root)
    ds[0]
    with pytest.raises(DatasetError, match=r'2\.jpg: cannot read image'): ds[1]
    write_dataset(root, [{'id': 1, 'skip': True}, {'id': 2, 'skip': True}], [], split='val')
    err = cli_error(capsys, 'train', '--data', root, '--preset', 'tiny', '--epochs', 1, '--out', tmp_path / 'run',
                    '--quiet')
    assert '2.jpg: cannot read image' in err


def test_missing_image_file(tmp_path):
    root = write_dataset(tmp_path, [{'id': 1}, {'id': 2, 'skip': True}], [])
    with pytest.raises(DatasetError, match=r"1 of 2 image files not found .* \['2\.jpg'\]"): dataset(root)


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'CMYK', 'P'])
def test_grayscale_rgba_cmyk_images_become_rgb(tmp_path, mode):
    root = write_dataset(tmp_path, [{'id': 1, 'mode': mode}], [ann(1, 1, [5, 5, 20, 20])])
    image, target = dataset(root)[0]
    assert image.shape == (3, 48, 64) and target['boxes'].shape == (1, 4)


@pytest.mark.parametrize('name', ['../outside.jpg', '/etc/hostname', 'sub/../../x.jpg'])
def test_file_name_outside_the_image_folder(tmp_path, name):
    root = write_dataset(tmp_path, [{'id': 1, 'file_name': name}], [], make_files=False)
    with pytest.raises(DatasetError, match='points outside the image folder'): dataset(root)


# --- annotation files -----------------------------------------------------------------------------

@pytest.mark.parametrize('missing', ['images', 'annotations', 'categories'])
def test_json_without_a_list(tmp_path, missing):
    p = tmp_path / 'a.json'
    d = {'images': [{'id': 1, 'file_name': '1.jpg'}], 'annotations': [], 'categories': [{'id': 1, 'name': 'a'}]}
    del d[missing]; p.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match=f"a.json: no '{missing}' list"): read_coco_json(p)


@pytest.mark.parametrize('text, message', [
    ('{"images": [', 'not valid JSON'), ('[1, 2]', 'expected a JSON object'),
    ('{"images": [], "annotations": [], "categories": [{"id": 1}]}', "'images' is empty"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1}]}', "has no field 'file_name'")])
def test_malformed_json(tmp_path, text, message):
    p = tmp_path / 'a.json'; p.write_text(text)
    with pytest.raises(DatasetError, match=message): read_coco_json(p)


def test_unknown_category_id(tmp_path, capsys):
    root = write_dataset(tmp_path, [{'id': 1}], [ann(1, 1, [5, 5, 20, 20], cat=7)])
    with pytest.raises(DatasetError, match=r"category_id 7 is not in 'categories'"): dataset(root)
    assert 'category_id 7' in cli_error(capsys, 'train', '--data', root, '--out', tmp_path / 'r')


def test_unknown_image_id_and_bad_bbox(tmp_path):
    write_dataset(tmp_path / 'a', [{'id': 1}], [ann(1, 9, [5, 5, 20, 20])])
    with pytest.raises(DatasetError, match="image_id 9 is not in 'images'"): dataset(tmp_path / 'a')
    write_dataset(tmp_path / 'b', [{'id': 1}], [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [1, 2, 'nan']}])
    with pytest.raises(DatasetError, match=r"'bbox' must be 4 finite numbers"): dataset(tmp_path / 'b')


def test_degenerate_and_outside_boxes_as_official(tmp_path):
    "Official ConvertCocoPolysToMask: xywh -> xyxy, clamp to the image, keep x1 > x0 and y1 > y0; crowds dropped."
    boxes = [[5, 5, 20, 10], [10, 10, 0, 5], [10, 10, 5, -3], [-10, 30, 30, 40], [70, 5, 10, 10], [60, 40, 30, 30],
             [1, 1, 8, 8]]
    anns = [ann(i + 1, 1, b, cat=1 + i % 2) for i, b in enumerate(boxes)]
    anns[-1]['iscrowd'] = 1
    root = write_dataset(tmp_path, [{'id': 1}], anns)
    _, t = CocoDetection(*find_split(root, 'train')).load(0)
    # by hand: W = 64, H = 48
    expected = [[5, 5, 25, 15], [0, 30, 20, 48], [60, 40, 64, 48]]       # w=0, h<0, and x0 >= W are dropped
    assert t['boxes'].tolist() == expected
    assert t['labels'].tolist() == [1, 2, 2] and t['iscrowd'].tolist() == [0, 0, 0]
    assert t['area'].tolist() == [200.0, 1200.0, 900.0]                   # the annotation's area, as official


def test_images_without_objects_train(tmp_path):
    anns = [ann(1, 1, [5, 5, 30, 20])]
    root = write_dataset(tmp_path, [{'id': 1}, {'id': 2}, {'id': 3}, {'id': 4}], anns)
    ds = CocoDetection(*find_split(root, 'train'), make_coco_transforms('train', 48, 'flip'))
    assert ds[1][1]['boxes'].shape == (0, 4) and ds[1][1]['labels'].shape == (0,)
    tcfg = train_config('tiny', max_steps=2)
    run = Trainer(tcfg, model_config('detr', 'tiny', num_classes=ds.num_classes), ds, tmp_path / 'run', progress=False)
    assert run.fit()['global_step'] == 2


def test_category_ids_and_remapping(tmp_path):
    cats = [{'id': 1000, 'name': 'x'}, {'id': 5, 'name': 'y'}]
    root = write_dataset(tmp_path, [{'id': 1}], [ann(1, 1, [5, 5, 20, 20], cat=1000), ann(2, 1, [1, 1, 9, 9], cat=5)],
                         cats)
    ds = dataset(root)
    assert ds.num_classes == 1001 and ds[0][1]['labels'].tolist() == [1000, 5]              # official: ids are labels
    ds = dataset(root, remap_categories=True)
    assert ds.num_classes == 2 and ds[0][1]['labels'].tolist() == [1, 0] and ds.label_to_cat == {0: 5, 1: 1000}
    write_dataset(tmp_path / 'neg', [{'id': 1}], [], [{'id': -1, 'name': 'z'}])
    with pytest.raises(DatasetError, match='category id -1 is not a non-negative integer; use remap_categories'):
        dataset(tmp_path / 'neg')


def test_missing_data_folder_and_split(tmp_path, capsys):
    assert 'data folder not found' in cli_error(capsys, 'train', '--data', tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    assert "no annotation file for split 'train'" in cli_error(capsys, 'train', '--data', tmp_path / 'empty')


# --- checkpoints and training faults -------------------------------------------------------------

@pytest.fixture(scope='module')
def small_run(tmp_path_factory):
    "A tiny DETR run of 3 steps on a 4-image dataset."
    tmp = tmp_path_factory.mktemp('run')
    root = write_dataset(tmp / 'data', [{'id': i} for i in range(1, 5)],
                         [ann(i, i, [4 * i, 5, 20, 20]) for i in range(1, 5)])
    ds = CocoDetection(*find_split(root, 'train'), make_coco_transforms('train', 48, 'flip'))
    tcfg = train_config('tiny', max_steps=3)
    run = Trainer(tcfg, model_config('detr', 'tiny', num_classes=ds.num_classes), ds, tmp / 'run', progress=False)
    run.fit()
    return run


def test_checkpoint_of_another_family(small_run, tmp_path):
    ckpt = load_training_checkpoint(small_run.checkpoint_path)
    with pytest.raises(CheckpointError, match="a 'detr' checkpoint, but the family asked for is 'dab_detr'"):
        check_compatible(ckpt, small_run.checkpoint_path, family='dab_detr')
    # the same weights under another family's name: the keys do not fit, and the message says so
    from dataclasses import asdict
    ckpt = {**ckpt, 'family': 'dab_detr',
            'model_config': asdict(model_config('dab_detr', 'tiny', num_classes=small_run.cfg.num_classes))}
    torch.save(ckpt, tmp_path / 'renamed.pt')
    with pytest.raises(CheckpointError, match='do not fit the model'):
        trainer_from_checkpoint(tmp_path / 'renamed.pt', small_run.train_ds, tmp_path / 'r', progress=False)


def test_checkpoint_of_another_size(small_run, tmp_path, capsys):
    other = Trainer(small_run.tcfg, replace(small_run.cfg, hidden_dim=64), small_run.train_ds, tmp_path / 'o',
                    progress=False)
    with pytest.raises(CheckpointError, match='hidden_dim is 32 in the checkpoint, 64 here'):
        other.load_state(load_training_checkpoint(small_run.checkpoint_path), small_run.checkpoint_path)
    from detr_explained.train import load_weights
    with pytest.raises(CheckpointError, match=r'has shape .* in the checkpoint, .* in the model'):
        load_weights(other.model, load_training_checkpoint(small_run.checkpoint_path)['model'], 'ckpt')
    err = cli_error(capsys, 'train', '--data', small_run.train_ds.img_folder.parent,
                    '--resume', small_run.checkpoint_path, '--set', 'hidden_dim=64', '--out', tmp_path / 'x')
    assert 'hidden_dim=32; --resume cannot change it to 64' in err


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / 'x.pt').write_text('hello')
    torch.save({'model': {}}, tmp_path / 'official.pt')
    with pytest.raises(CheckpointError, match='not a checkpoint'): load_training_checkpoint(tmp_path / 'x.pt')
    with pytest.raises(CheckpointError, match='not a detr_explained training checkpoint'):
        load_training_checkpoint(tmp_path / 'official.pt')
    err = cli_error(capsys, 'evaluate', '--checkpoint', tmp_path / 'no.pt', '--data', tmp_path)
    assert 'checkpoint not found' in err


def test_nan_loss_stops_and_keeps_the_checkpoint(small_run, tmp_path, monkeypatch):
    import detr_explained.train as train
    ckpt_before = small_run.checkpoint_path.read_bytes()
    params = {k: v.clone() for k, v in small_run.model.named_parameters()}
    real = train.weighted_loss
    monkeypatch.setattr(train, 'weighted_loss', lambda l, w: real(l, w) * float('nan'))
    small_run.tcfg = replace(small_run.tcfg, max_steps=6)
    expected = r'step 4\): the loss is nan .* the last checkpoint .* \(global step 3\) is intact'
    with pytest.raises(TrainingError, match=expected):
        small_run.fit()
    assert small_run.checkpoint_path.read_bytes() == ckpt_before
    assert all(torch.equal(params[k], v) for k, v in small_run.model.named_parameters())
    assert 'error' in small_run.log.read()[-1]


def test_missing_pretrained_backbone(tmp_path, capsys):
    root = write_dataset(tmp_path, [{'id': 1}], [ann(1, 1, [5, 5, 20, 20])])
    err = cli_error(capsys, 'train', '--data', root, '--preset', 'tiny',
                    '--pretrained-backbone', tmp_path / 'resnet18.pth', '--out', tmp_path / 'r')
    assert 'resnet18.pth: file not found. Nothing is downloaded' in err
