"""The data pipeline keeps the official semantics and is reproducible to the bit."""
import json

import pytest
import torch
from torchvision import tv_tensors

from detr_explained.data import (CocoDetection, EpochBatchSampler, crop, derive_seed, find_split, hflip,
                                 make_coco_transforms, make_loader, resize, resize_size)
from detr_explained.synthetic import make_synthetic


def official_get_size(w, h, size, max_size=None):
    "The official DETR get_size_with_aspect_ratio, written out from its description (datasets/transforms.py)."
    if max_size is not None:
        mn, mx = float(min(w, h)), float(max(w, h))
        if mx / mn * size > max_size: size = int(round(max_size * mn / mx))
    if (w <= h and w == size) or (h <= w and h == size): return h, w
    if w < h: return int(size * h / w), size
    return size, int(size * w / h)


@pytest.mark.parametrize('w, h', [(640, 480), (480, 640), (1000, 200), (333, 500), (800, 800), (77, 1300)])
@pytest.mark.parametrize('size, max_size', [(800, 1333), (480, 1333), (128, 213), (96, None)])
def test_resize_rule_is_official(w, h, size, max_size):
    assert resize_size(w, h, size, max_size) == official_get_size(w, h, size, max_size)


def target(boxes, w, h):
    b = torch.tensor(boxes, dtype=torch.float32)
    return {'boxes': tv_tensors.BoundingBoxes(b, format='XYXY', canvas_size=(h, w)), 'labels': torch.arange(len(b)),
            'area': (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) * 0.7, 'iscrowd': torch.zeros(len(b), dtype=torch.int64),
            'size': torch.tensor([h, w])}


def test_box_arithmetic_is_official():
    img = tv_tensors.Image(torch.rand(3, 50, 80))
    t = target([[10, 5, 30, 25], [60, 30, 80, 50], [0, 0, 5, 4]], 80, 50)
    b = t['boxes'].as_subclass(torch.Tensor)
    # flip: boxes[:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [w, 0, w, 0]
    _, f = hflip(img, t)
    flipped = b[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([80, 0, 80, 0])
    assert torch.equal(f['boxes'].as_subclass(torch.Tensor), flipped)
    # resize: boxes * (rw, rh, rw, rh), area * rw * rh
    i2, r = resize(img, t, 100, 1333)
    rw, rh = i2.shape[-1] / 80, i2.shape[-2] / 50
    assert torch.allclose(r['boxes'].as_subclass(torch.Tensor), b * torch.tensor([rw, rh, rw, rh]))
    assert torch.allclose(r['area'], t['area'] * rw * rh)
    # crop (i, j, h, w) = (10, 20, 30, 50): boxes - [j, i, j, i], min with [w, h], clamp 0,
    # keep x1 > x0 & y1 > y0, area = box area
    _, c = crop(img, t, 10, 20, 30, 50)
    cb = torch.min((b - torch.tensor([20, 10, 20, 10])).reshape(-1, 2, 2), torch.tensor([50., 30])).clamp(min=0)
    keep = torch.all(cb[:, 1, :] > cb[:, 0, :], dim=1)
    assert torch.equal(c['boxes'].as_subclass(torch.Tensor), cb.reshape(-1, 4)[keep])
    assert torch.equal(c['area'], (cb[:, 1, :] - cb[:, 0, :]).prod(1)[keep])
    assert c['labels'].tolist() == torch.arange(3)[keep].tolist() and c['size'].tolist() == [30, 50]


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp('syn'), n_train=12, n_val=4, size=96)


@pytest.mark.parametrize('augment', ['official', 'multiscale', 'flip', 'none'])
def test_targets_are_normalised_cxcywh_of_the_transformed_image(syn, augment):
    ds = CocoDetection(*find_split(syn, 'train'), make_coco_transforms('train', 96, augment))
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x, t = ds[i]
            assert x.dtype == torch.float32 and x.shape[0] == 3 and t['size'].tolist() == list(x.shape[1:])
            assert t['boxes'].dtype == torch.float32 and ((t['boxes'] >= 0) & (t['boxes'] <= 1)).all()
            assert (t['boxes'][:, 2:] > 0).all()
            assert set(t) == {'boxes', 'labels', 'image_id', 'area', 'iscrowd', 'orig_size', 'size'}
            assert t['orig_size'].tolist() == [96, 96] and len(t['labels']) == len(t['boxes']) == len(t['area'])


def test_untransformed_boxes_match_the_annotations(syn):
    ds = CocoDetection(*find_split(syn, 'val'), make_coco_transforms('val', 96))
    for i in range(len(ds)):
        _, t = ds[i]
        anns = ds.coco.imgToAnns[ds.ids[i]]
        expect = torch.tensor([[(a['bbox'][0] + a['bbox'][2] / 2) / 96, (a['bbox'][1] + a['bbox'][3] / 2) / 96,
                                a['bbox'][2] / 96, a['bbox'][3] / 96] for a in anns])
        assert torch.allclose(t['boxes'], expect, atol=1e-6)


def test_samples_depend_only_on_seed_epoch_index(syn):
    ds = CocoDetection(*find_split(syn, 'train'), make_coco_transforms('train', 96), seed=3)
    ds.set_epoch(2)
    a = {i: ds[i] for i in (5, 1, 7)}
    torch.manual_seed(123); torch.rand(10)                     # the global generator's state does not matter
    b = {i: ds[i] for i in (7, 5, 1)}                          # nor the order
    for i in a:
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1]['boxes'], b[i][1]['boxes'])
    state = torch.get_rng_state(); ds[0]; assert torch.equal(state, torch.get_rng_state())
    assert derive_seed(3, 2, 5) != derive_seed(3, 5, 2)


def test_sampler_resumes_mid_epoch_and_loader_pads(syn):
    s = EpochBatchSampler(12, 4, seed=1)
    s.set_epoch(3); full = list(s)
    s.set_epoch(3, start=1); assert list(s) == full[1:] and len(s) == 2
    assert sorted(sum(full, [])) == list(range(12))
    ds = CocoDetection(*find_split(syn, 'train'), make_coco_transforms('train', 96, 'multiscale'))
    tensors, mask, targets = next(iter(make_loader(ds, 4, train=True)))
    assert tensors.shape[0] == 4 and mask.shape == (4, *tensors.shape[-2:])
    for x, m, t in zip(tensors, mask, targets):
        h, w = t['size'].tolist()
        assert not m[:h, :w].any() and m.sum() == m.numel() - h * w and (x[:, h:, :] == 0).all()


def test_synthetic_is_deterministic(tmp_path):
    a = make_synthetic(tmp_path / 'a', n_train=3, n_val=1, size=64)
    b = make_synthetic(tmp_path / 'b', n_train=3, n_val=1, size=64, seed=0)
    for p in sorted((tmp_path / 'a').rglob('*')):
        if p.is_file(): assert p.read_bytes() == (tmp_path / 'b' / p.relative_to(tmp_path / 'a')).read_bytes(), p
    d = json.loads((a / 'annotations' / 'instances_train.json').read_text())
    assert [c['name'] for c in d['categories']] == ['ellipse', 'rectangle', 'triangle', 'cross']
    assert len({x['id'] for x in d['annotations']}) == len(d['annotations']) > 3
