"""Foundation modules (box_ops, position_encoding, backbone) against the official fixtures.

Backbone feature maps are compared at atol 1e-4: the stored float32 reference was computed on
another CPU and even a float64 run differs from it by ~2.4e-5 (values up to ~9), so that is the
reference's own rounding. Masks are compared exactly, positional encodings at 1e-6.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detr_explained.backbone import (Backbone, FrozenBatchNorm2d, build_backbone, downsample_mask,
                                     load_resnet_weights, pad_images, resnet)
from detr_explained.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou,
                                    inverse_sigmoid)
from detr_explained.position_encoding import (PositionEmbeddingLearned, PositionEmbeddingSine,
                                              PositionEmbeddingSineHW, build_position_encoding)
from parity import close

FEATURE_ATOL = 1e-4
PREFIX = 'backbone.'

# family -> build_backbone keywords reproducing the official configuration of the fixture
SETUPS = {
    'detr': dict(position_embedding='sine'),
    'deformable_detr': dict(position_embedding='sine_deformable', return_interm_layers=True),
    'dab_detr': dict(position_embedding='sine_hw', temperatureH=20, temperatureW=20),
}


def _official_backbone(fx, **kw):
    "A detector-like container whose `backbone` holds the official backbone weights of fixture `fx`."
    holder = nn.Module()
    holder.backbone = build_backbone('resnet18', fx['config']['hidden_dim'], lr_backbone=1e-5, **kw).eval()
    official = {k: v for k, v in fx['state_dict'].items() if k.startswith(PREFIX)}
    assert sorted(holder.state_dict()) == sorted(official)        # exactly the official keys
    holder.load_state_dict(official)                               # strict
    return holder.backbone


@pytest.mark.parametrize('family', list(SETUPS))
def test_backbone_and_pos_parity(official_fixture, family):
    fx = official_fixture(family)
    joiner = _official_backbone(fx, **SETUPS[family])
    with torch.no_grad():
        features, pos = joiner(fx['inputs']['tensors'], fx['inputs']['mask'])
    ref = fx['intermediates']['backbone']
    assert len(features) == len(ref['features']) == len(pos) == len(ref['pos'])
    for l, ((f, m), p, rf, rp) in enumerate(zip(features, pos, ref['features'], ref['pos'])):
        close(f'{family} mask[{l}]', m, rf['mask'])
        close(f'{family} features[{l}]', f, rf['tensors'], atol=FEATURE_ATOL)
        close(f'{family} pos[{l}]', p, rp, atol=1e-6)
    official_channels = fx['config']['backbone_num_channels']
    if not isinstance(official_channels, (list, tuple)): official_channels = [official_channels]
    assert joiner.num_channels == list(official_channels)
    if family == 'deformable_detr': assert joiner.strides == list(fx['config']['backbone_strides'])


@pytest.mark.parametrize('family', list(SETUPS))
def test_pos_parity_from_image_mask(official_fixture, family):
    "The encoding alone, on feature masks recomputed from the image mask (no backbone involved)."
    fx = official_fixture(family)
    pe = _pos_module(family, fx['config']['hidden_dim'])
    bb = fx['intermediates']['backbone']
    for l, (f, rp) in enumerate(zip(bb['features'], bb['pos'])):
        m = F.interpolate(fx['inputs']['mask'][None].float(), size=f['mask'].shape[-2:]).bool()[0]
        close(f'{family} interpolated mask[{l}]', m, f['mask'])
        close(f'{family} downsample_mask[{l}]', downsample_mask(fx['inputs']['mask'], f['mask'].shape[-2:]), f['mask'])
        close(f'{family} pos[{l}] from the image mask', pe(f['tensors'], m), rp, atol=1e-6)


def _pos_module(family, hidden_dim):
    if family == 'detr': return build_position_encoding(hidden_dim, 'sine')
    if family == 'deformable_detr': return build_position_encoding(hidden_dim, 'sine_deformable')
    return build_position_encoding(hidden_dim, 'sine_hw', temperatureH=20, temperatureW=20)


def test_pos_config_matches_fixture(official_fixture):
    for family in SETUPS:
        cfg = official_fixture(family)['config']['position_encoding']
        pe = _pos_module(family, 64)
        assert type(pe).__name__ == cfg['class']
        assert pe.num_pos_feats == cfg['num_pos_feats'] and pe.normalize == cfg['normalize']
        assert math.isclose(pe.scale, cfg['scale'])
        if cfg['class'] == 'PositionEmbeddingSineHW':
            assert (pe.temperatureH, pe.temperatureW) == (cfg['temperatureH'], cfg['temperatureW'])
        else:
            assert pe.temperature == cfg['temperature']


def test_backbone_check_image(official_dir):
    bb_fx = torch.load(official_dir / 'backbone_resnet18.pt', weights_only=True)
    bb = Backbone('resnet18', train_backbone=False).eval()
    bb.load_state_dict({k[len('backbone.0.'):]: v for k, v in bb_fx['state_dict'].items()})
    with torch.no_grad():
        out = bb.body(bb_fx['check']['images'])['0']
    assert out.shape == (1, 512, 4, 4)
    close('resnet18 layer4 on the check images', out, bb_fx['check']['layer4'], atol=FEATURE_ATOL)


def test_pad_images_matches_official(official_fixture):
    fx = official_fixture('detr')
    tensors, mask = pad_images(fx['inputs']['images'])
    assert torch.equal(tensors, fx['inputs']['tensors']) and torch.equal(mask, fx['inputs']['mask'])
    sizes = [[int(s) for s in (~m).nonzero().max(0).values + 1] for m in mask]
    assert sizes == fx['inputs']['image_sizes'].tolist()


def test_pad_images():
    ims = [torch.rand(3, 7, 5), torch.rand(3, 4, 9), torch.rand(3, 6, 6)]
    t, m = pad_images(ims)
    assert t.shape == (3, 3, 7, 9) and m.shape == (3, 7, 9) and m.dtype == torch.bool
    for im, ti, mi in zip(ims, t, m):
        h, w = im.shape[1:]
        assert torch.equal(ti[:, :h, :w], im) and ti[:, h:].abs().sum() == 0 and ti[:, :, w:].abs().sum() == 0
        assert not mi[:h, :w].any() and mi[h:].all() and mi[:, w:].all()
    t, m = pad_images(ims, size_divisibility=32)
    assert t.shape[-2:] == (32, 32) and m[:, 7:].all()
    with pytest.raises(ValueError): pad_images([])
    with pytest.raises(ValueError): pad_images([torch.rand(7, 5)])


def test_frozen_bn_equals_batchnorm_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5); bn.bias.normal_(); bn.running_mean.normal_(); bn.running_var.uniform_(0.1, 2)
    fbn = FrozenBatchNorm2d(4)
    fbn.load_state_dict(bn.state_dict())                 # num_batches_tracked is dropped
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fbn(x), bn.eval()(x).detach())
    assert list(fbn.parameters()) == []


def test_trainable_layers():
    trainable = lambda bb: {n.split('.')[1] for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable(Backbone('resnet18', train_backbone=True)) == {'layer2', 'layer3', 'layer4'}
    assert trainable(Backbone('resnet18', train_backbone=False)) == set()
    assert trainable(build_backbone('resnet18', 64, lr_backbone=0.0)[0]) == set()


def test_backbone_shapes_and_keys():
    bb = Backbone('resnet18', return_interm_layers=True)
    assert bb.strides == [8, 16, 32] and bb.num_channels == [128, 256, 512]
    assert len(bb.state_dict()) == 100 and all(k.startswith('body.') for k in bb.state_dict())
    t, m = pad_images([torch.rand(3, 70, 50), torch.rand(3, 40, 90)])
    with torch.no_grad(): out = bb(t, m)
    for (f, fm), s, c in zip(out, bb.strides, bb.num_channels):
        assert f.shape == (2, c, math.ceil(70 / s), math.ceil(90 / s)) and fm.shape == (2, *f.shape[-2:])
    j = build_backbone('resnet18', 32, 'learned')
    assert {k.split('.')[0] for k in j.state_dict()} == {'0', '1'} and '1.row_embed.weight' in j.state_dict()


def test_dc5_bottleneck():
    bb = Backbone('resnet50', dilation=True)
    assert bb.strides == [16] and bb.num_channels == [2048]
    with torch.no_grad():
        (f, m), = bb(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert f.shape == (1, 2048, 4, 4)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="'resnet19'"): Backbone('resnet19')
    with pytest.raises(ValueError, match="'resnet19'"): build_backbone('resnet19')
    with pytest.raises(ValueError, match='resnet50/101'): Backbone('resnet18', dilation=True)
    with pytest.raises(ValueError, match="'rope'"): build_position_encoding(64, 'rope')
    with pytest.raises(ValueError, match='normalize'): PositionEmbeddingSine(16, scale=1.0)
    with pytest.raises(ValueError, match='larger than'): PositionEmbeddingLearned(8)(torch.zeros(1, 1, 51, 4))
    missing = tmp_path / 'no_such_weights.pth'
    with pytest.raises(FileNotFoundError, match='no_such_weights.pth'): build_backbone('resnet18', pretrained=missing)
    with pytest.raises(ValueError, match='degenerate'):
        generalized_box_iou(torch.tensor([[0., 0., -1., 1.]]), torch.tensor([[0., 0., 1., 1.]]))


def test_pretrained_local_file(tmp_path):
    torch.manual_seed(1)
    src = resnet('resnet18')
    path = tmp_path / 'r18.pth'
    sd = {f'backbone.0.body.{k}': v for k, v in src.state_dict().items()}
    torch.save({'model': sd}, path)   # a DETR-style checkpoint
    j = build_backbone('resnet18', 64, pretrained=path)
    assert torch.equal(j[0].body.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    torch.save(src.state_dict(), path)                       # plain torchvision format
    assert torch.equal(load_resnet_weights(resnet('resnet18'), path).bn1.running_mean, src.bn1.running_mean)
    with pytest.raises(ValueError, match='not a state_dict'): load_resnet_weights(resnet('resnet34'), path)


def test_position_encoding_by_hand_and_padding():
    h, w, H, W, n = 4, 6, 7, 8, 6
    mask = torch.ones(1, H, W, dtype=torch.bool); mask[:, :h, :w] = False
    for offset in (0.0, -0.5):
        pe = PositionEmbeddingSine(n, normalize=True, offset=offset)
        pos = pe(torch.zeros(1, 1, H, W), mask)
        for i, j in [(0, 0), (3, 5), (2, 1)]:
            y = (i + 1 + offset) / (h + 1e-6) * 2 * math.pi
            x = (j + 1 + offset) / (w + 1e-6) * 2 * math.pi
            ref = [(math.sin if k % 2 == 0 else math.cos)(c / 10000 ** (2 * (k // 2) / n))
                   for c in (y, x) for k in range(n)]
            torch.testing.assert_close(pos[0, :, i, j], torch.tensor(ref), rtol=0, atol=1e-5)
        torch.testing.assert_close(pos[..., :h, :w], pe(torch.zeros(1, 1, h, w)), rtol=0, atol=1e-6)
    hw = PositionEmbeddingSineHW(n, 20, 30, normalize=True)(torch.zeros(1, 1, H, W), mask)
    same = PositionEmbeddingSine(n, 20, normalize=True)(torch.zeros(1, 1, H, W), mask)
    torch.testing.assert_close(hw[:, :n], same[:, :n])                 # y half uses T_H = 20
    assert not torch.allclose(hw[:, n:], same[:, n:])                  # x half uses T_W = 30


def test_box_ops_round_trip_and_torchvision():
    torch.manual_seed(0)
    b = torch.cat([torch.rand(5, 2), torch.rand(5, 2) * 0.5 + 0.01], -1)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(b)), b)
    x = box_cxcywh_to_xyxy(b)
    torch.testing.assert_close(box_cxcywh_to_xyxy(b), torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1))
    g = generalized_box_iou(x, x)
    torch.testing.assert_close(g.diagonal(), torch.ones(5))
    assert (g <= box_iou(x, x) + 1e-6).all()
    u = torch.tensor([0., 0.3, 1., 1.5, -0.2])
    torch.testing.assert_close(inverse_sigmoid(u, 1e-3), torch.tensor(
        [math.log(1e-3), math.log(0.3 / 0.7), -math.log(1e-3), -math.log(1e-3), math.log(1e-3)]))
    z = torch.linspace(-5, 5, 11)
    torch.testing.assert_close(inverse_sigmoid(z.sigmoid()), z, rtol=0, atol=1e-4)
