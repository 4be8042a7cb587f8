"""DAB-DETR against the official code (IDEA-Research/DAB-DETR @ 723ddb8, models/DAB_DETR).

The fixture `dab_detr.pt` (3 patterns x 10 anchors, ResNet-18, hidden_dim 64, 2 + 3 layers,
random_refpoints_xy) holds the official state_dict, argparse namespace, inputs, targets and every
tensor the official code computed: outputs, intermediates, matchings, losses, post-processing,
gradients. Beyond the fixture, the variants the official code offers are checked for their key
names and shapes (derived here from the official source, independently of the library) and for
strict state_dict round trips.
"""
import copy

import pytest
import torch

from detr_explained.official import from_official, official_criterion, official_postprocess
from detr_explained.dab_detr import DABDETRConfig, build_model, build_criterion, build_postprocess, FAMILY
from parity import close

config_from_args, preset = FAMILY.config_from_args, FAMILY.config   # the family reads the namespace and the presets


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "The fixture was computed with one thread; small models also run faster that way on a busy CPU."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def fx(official_fixture):
    return official_fixture('dab_detr')


@pytest.fixture(scope='module')
def run(fx):
    "The library model from the official namespace and weights, its outputs and the intermediates it computed."
    torch.manual_seed(0)
    model = from_official('dab_detr', fx['state_dict'], fx['config']['args'])
    cap = {}
    hooks = [model.backbone.register_forward_hook(lambda m, i, o: cap.update(backbone=o)),
             model.input_proj.register_forward_hook(lambda m, i, o: cap.update(input_proj=o)),
             model.transformer.encoder.register_forward_hook(lambda m, i, o: cap.update(encoder_memory=o)),
             model.transformer.register_forward_hook(lambda m, i, o: cap.update(transformer_out=o))]
    with torch.no_grad(): out = model(fx['inputs']['tensors'], fx['inputs']['mask'])
    for h in hooks: h.remove()
    return model, out, cap


@pytest.fixture(scope='module')
def criterion(fx):
    return official_criterion('dab_detr', fx['config']['args'])


# ---------------------------------------------------------------- model and intermediates

def test_state_dict_loads_strictly_with_official_keys(fx, run):
    model, _, _ = run
    assert set(model.state_dict()) == set(fx['state_dict'])
    for alias, target in fx['state_dict_aliases'].items():      # the shared box head: one tensor, two names
        assert model.state_dict()[alias].data_ptr() == model.state_dict()[target].data_ptr()
    assert model.training is False


def test_outputs(fx, run):
    _, out, _ = run
    for k in ('pred_logits', 'pred_boxes'): close(k, out[k], fx['outputs'][k])
    assert len(out['aux_outputs']) == len(fx['outputs']['aux_outputs']) == 2
    for i, (a, b) in enumerate(zip(out['aux_outputs'], fx['outputs']['aux_outputs'])):
        for k in ('pred_logits', 'pred_boxes'): close(f'aux {i} {k}', a[k], b[k])


def test_intermediates(fx, run):
    _, _, cap = run
    ref = fx['intermediates']
    (feat, mask), = cap['backbone'][0]
    close('backbone features', feat, ref['backbone']['features'][0]['tensors'])   # CPU conv rounding ~3e-5 (helper A)
    assert torch.equal(mask, ref['backbone']['features'][0]['mask'])
    close('positional encoding', cap['backbone'][1][0], ref['backbone']['pos'][0], atol=1e-6)
    close('input_proj', cap['input_proj'], ref['input_proj'])
    close('encoder memory (HW, B, C)', cap['encoder_memory'], ref['encoder_memory'])
    hs, references = cap['transformer_out']
    close('hs (L, B, Q, C) after the decoder norm', hs, ref['transformer_out'][0])
    close('anchors entering each layer (L, B, Q, 4)', references, ref['transformer_out'][1])


# ---------------------------------------------------------------- matcher, losses, post-processing

def _check_matching(criterion, outputs, targets, indices_ref, cost_ref, what):
    ours = criterion.matcher(outputs, targets)
    costs = criterion.matcher.costs(outputs, targets)
    for i, ((q, t), (q_ref, t_ref)) in enumerate(zip(ours, indices_ref)):
        assert torch.equal(q, q_ref) and torch.equal(t, t_ref), f'{what} image {i}: indices differ'
        assert q.dtype == torch.int64 and t.dtype == torch.int64
        assert costs[i].shape == cost_ref[i].shape
        close(f'{what} image {i} cost', costs[i], cost_ref[i], atol=1e-6, max_rtol=1e-4)


def _check_case(criterion, out, case, what):
    targets = case['targets']
    last = {k: v for k, v in out.items() if k != 'aux_outputs'}
    _check_matching(criterion, last, targets, case['matcher_indices'], case['matcher_cost'], f'{what} last layer')
    for l, aux in enumerate(out['aux_outputs']):
        _check_matching(criterion, aux, targets, case['aux_matcher_indices'][l], case['aux_matcher_cost'][l], f'{what} aux {l}')
    losses = criterion(out, targets)
    assert list(losses) == list(case['losses']), f'{what}: loss keys/order differ'
    for k, v in case['losses'].items(): close(f'{what} {k}', losses[k], v, atol=1e-6, max_rtol=1e-4)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    close(f'{what} loss_total', total, case['loss_total'], atol=1e-6, max_rtol=1e-4)


def test_matcher_and_losses(fx, run, criterion):
    _, out, _ = run
    assert criterion.weight_dict == fx['config']['weight_dict']
    case = {k: fx[k] for k in ('targets', 'matcher_indices', 'matcher_cost', 'aux_matcher_indices', 'aux_matcher_cost',
                               'losses', 'loss_total')}
    assert len(fx['losses']) == 19 and {'loss_xy', 'loss_hw', 'loss_xy_1'} <= set(fx['losses'])
    _check_case(criterion, out, case, 'fixture targets')


@pytest.mark.parametrize('name', ['one_empty', 'all_empty'])
def test_extra_cases(fx, run, criterion, name):
    _, out, _ = run
    _check_case(criterion, out, fx['extra_cases'][name], name)


def test_postprocess(fx, run):
    """Scores and labels rank for rank; boxes too, except where two (query, class) pairs of the same class
    have scores equal to float rounding (top-k may then list them in either order): such a detection
    must equal one of the official detections of that class and score."""
    _, out, _ = run
    results = official_postprocess('dab_detr', fx['config']['args'])(out, fx['inputs']['target_sizes'])
    assert len(results) == 2
    for i, (ours, ref) in enumerate(zip(results, fx['postprocess'])):
        assert ours['scores'].shape == (300,) and ours['boxes'].shape == (300, 4)
        close(f'image {i} scores', ours['scores'], ref['scores'], atol=1e-5)
        assert torch.equal(ours['labels'], ref['labels']), f'image {i} labels'
        same = (ours['boxes'] - ref['boxes']).abs().amax(1) <= 2e-3            # pixels (images up to 640 wide)
        for k in torch.nonzero(~same).flatten().tolist():
            tied = (ref['labels'] == ours['labels'][k]) & ((ref['scores'] - ours['scores'][k]).abs() <= 1e-5)
            assert ((ref['boxes'][tied] - ours['boxes'][k]).abs().amax(1) <= 2e-3).any(), f'image {i} detection {k}'
        assert same.float().mean() > 0.9


# ---------------------------------------------------------------- gradients

@pytest.fixture(scope='module')
def grads(fx, criterion):
    model = from_official('dab_detr', fx['state_dict'], fx['config']['args'])   # eval(), dropout 0, as the fixture
    out = model(fx['inputs']['tensors'], fx['inputs']['mask'])
    losses = criterion(out, fx['targets'])
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    total.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_gradients(fx, grads):
    aliases = fx['state_dict_aliases']
    ours = {aliases.get(n, n): g for n, g in grads.items()}
    assert set(fx['grads']) <= set(ours)
    for name, g_ref in fx['grads'].items():
        assert ours[name] is not None, f'{name}: no gradient'
        close(f'grad {name}', ours[name], g_ref, atol=1e-6, max_rtol=2e-3)


def test_gradient_norms(fx, grads):
    "Every trainable parameter, backbone layer2-4 included; conv1 and layer1 frozen as in the official code."
    aliases = fx['state_dict_aliases']
    norms = {aliases.get(n, n): g.norm() for n, g in grads.items() if g is not None}
    assert set(norms) == set(fx['grad_norms'])
    for name, ref in fx['grad_norms'].items(): close(f'|grad| {name}', norms[name], ref, atol=1e-6, max_rtol=2e-3)


def test_random_refpoints_xy_are_trained_as_in_the_official_code(fx, grads):
    "The official freeze of x, y is a no-op: their gradients are non-zero there and here."
    assert fx['config']['random_refpoints_xy']
    assert fx['grads']['refpoint_embed.weight'][:, :2].abs().sum() > 0
    assert grads['refpoint_embed.weight'][:, :2].abs().sum() > 0


def test_freeze_refpoints_xy(fx):
    cfg = config_from_args(fx['config']['args'])
    cfg.freeze_refpoints_xy = True
    model = build_model(cfg)
    model.load_state_dict(fx['state_dict'])
    criterion = build_criterion(cfg)
    out = model(fx['inputs']['tensors'], fx['inputs']['mask'])
    losses = criterion(out, fx['targets'])
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    g = model.refpoint_embed.weight.grad
    assert torch.equal(g[:, :2], torch.zeros_like(g[:, :2])) and g[:, 2:].abs().sum() > 0
    close('freezing changes no value', out['pred_boxes'].detach(), fx['outputs']['pred_boxes'])


# ---------------------------------------------------------------- configurations beyond the fixture

def official_keys(hidden=64, ffn=128, enc=2, dec=3, num_queries=10, num_patterns=0, keep_query_pos=False,
                  query_scale_type='cond_elewise', modulate_hw_attn=True, iter_update=True, num_classes=91,
                  backbone_channels=512, pre_norm=False):
    """Non-backbone keys and shapes of the official DABDETR, written out from the official source
    (DABDETR.py, transformer.py, attention.py), not from the library."""
    d = hidden
    lin = lambda p, i, o: {f'{p}.weight': (o, i), f'{p}.bias': (o,)}
    mlp = lambda p, i, h, o, n: {k: v for j, (a, b) in enumerate(zip([i] + [h] * (n - 1), [h] * (n - 1) + [o]))
                                 for k, v in lin(f'{p}.layers.{j}', a, b).items()}
    ln = lambda p: {f'{p}.weight': (d,), f'{p}.bias': (d,)}
    keys = {}
    for i in range(enc):                      # TransformerEncoderLayer: nn.MultiheadAttention, FFN, 2 norms, PReLU
        p = f'transformer.encoder.layers.{i}'
        keys.update({f'{p}.self_attn.in_proj_weight': (3 * d, d), f'{p}.self_attn.in_proj_bias': (3 * d,)})
        keys.update(lin(f'{p}.self_attn.out_proj', d, d)); keys.update(lin(f'{p}.linear1', d, ffn)); keys.update(lin(f'{p}.linear2', ffn, d))
        keys.update(ln(f'{p}.norm1')); keys.update(ln(f'{p}.norm2')); keys[f'{p}.activation.weight'] = (1,)
    keys.update(mlp('transformer.encoder.query_scale', d, d, d, 2))     # sized by hidden_dim (README patch 6)
    if pre_norm: keys.update(ln('transformer.encoder.norm'))
    for i in range(dec):                      # TransformerDecoderLayer
        p = f'transformer.decoder.layers.{i}'
        for n in ('sa_qcontent_proj', 'sa_qpos_proj', 'sa_kcontent_proj', 'sa_kpos_proj', 'sa_v_proj',
                  'ca_qcontent_proj', 'ca_kcontent_proj', 'ca_kpos_proj', 'ca_v_proj', 'ca_qpos_sine_proj',
                  'self_attn.out_proj', 'cross_attn.out_proj', ):
            keys.update(lin(f'{p}.{n}', d, d))
        if i == 0 or keep_query_pos: keys.update(lin(f'{p}.ca_qpos_proj', d, d))
        keys.update(lin(f'{p}.linear1', d, ffn)); keys.update(lin(f'{p}.linear2', ffn, d))
        for n in ('norm1', 'norm2', 'norm3'): keys.update(ln(f'{p}.{n}'))
        keys[f'{p}.activation.weight'] = (1,)
    keys.update(ln('transformer.decoder.norm'))
    if query_scale_type == 'cond_elewise': keys.update(mlp('transformer.decoder.query_scale', d, d, d, 2))
    elif query_scale_type == 'cond_scalar': keys.update(mlp('transformer.decoder.query_scale', d, d, 1, 2))
    else: keys['transformer.decoder.query_scale.weight'] = (dec, d)
    keys.update(mlp('transformer.decoder.ref_point_head', 2 * d, d, d, 2))
    if modulate_hw_attn: keys.update(mlp('transformer.decoder.ref_anchor_head', d, d, 2, 2))
    box = mlp('bbox_embed', d, d, 4, 3)
    keys.update(box)
    if iter_update: keys.update({f'transformer.decoder.{k}': v for k, v in box.items()})
    if num_patterns > 0: keys['transformer.patterns.weight'] = (num_patterns, d)
    keys.update(lin('class_embed', d, num_classes))
    keys['refpoint_embed.weight'] = (num_queries, 4)
    keys.update({'input_proj.weight': (d, backbone_channels, 1, 1), 'input_proj.bias': (d,)})
    return keys


def _non_backbone_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith('backbone.')}


def test_official_keys_match_the_fixture(fx):
    "The hand-derived key list is right: it reproduces the fixture's state_dict exactly."
    expected = official_keys(num_patterns=3)
    got = {k: tuple(v.shape) for k, v in fx['state_dict'].items() if not k.startswith('backbone.')}
    assert got == expected


VARIANTS = [
    dict(),                                                       # no patterns, learned x/y (random_refpoints_xy False)
    dict(num_patterns=2, random_refpoints_xy=True),
    dict(keep_query_pos=True),
    dict(query_scale_type='cond_scalar'),
    dict(query_scale_type='fix_elewise'),
    dict(modulate_hw_attn=False),
    dict(iter_update=False),
    dict(pre_norm=True),
    dict(hidden_dim=128, nheads=8, dim_feedforward=256, enc_layers=1, dec_layers=4, num_queries=7, num_classes=5),
]


@pytest.mark.parametrize('kw', VARIANTS, ids=lambda kw: ','.join(f'{k}={v}' for k, v in kw.items()) or 'plain')
def test_variant_keys_shapes_and_round_trip(kw):
    base = dict(backbone='resnet18', hidden_dim=64, nheads=4, enc_layers=2, dec_layers=3, dim_feedforward=128, num_queries=10)
    cfg = DABDETRConfig(**{**base, **kw})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    expected = official_keys(hidden=cfg.hidden_dim, ffn=cfg.dim_feedforward, enc=cfg.enc_layers, dec=cfg.dec_layers,
                             num_queries=cfg.num_queries, num_patterns=cfg.num_patterns, keep_query_pos=cfg.keep_query_pos,
                             query_scale_type=cfg.query_scale_type, modulate_hw_attn=cfg.modulate_hw_attn,
                             iter_update=cfg.iter_update, num_classes=cfg.num_classes, pre_norm=cfg.pre_norm)
    assert _non_backbone_shapes(model) == expected
    assert sum(k.startswith('backbone.0.body.') for k in model.state_dict()) == 100 + 0     # resnet18 body, official keys

    x = torch.randn(2, 3, 64, 96); mask = torch.zeros(2, 64, 96, dtype=torch.bool); mask[1, 40:] = True
    with torch.no_grad(): out = model(x, mask)
    Q = cfg.num_queries * max(cfg.num_patterns, 1)
    assert out['pred_logits'].shape == (2, Q, cfg.num_classes) and out['pred_boxes'].shape == (2, Q, 4)
    assert len(out['aux_outputs']) == cfg.dec_layers - 1
    assert torch.isfinite(out['pred_logits']).all() and ((out['pred_boxes'] > 0) & (out['pred_boxes'] < 1)).all()

    torch.manual_seed(1)
    other = build_model(cfg).eval()                               # different random init ...
    other.load_state_dict(copy.deepcopy(model.state_dict()), strict=True)   # ... the same weights, strictly
    with torch.no_grad(): out2 = other(x, mask)
    assert torch.equal(out['pred_logits'], out2['pred_logits']) and torch.equal(out['pred_boxes'], out2['pred_boxes'])
    assert other.bbox_embed is other.transformer.decoder.bbox_embed or not cfg.iter_update

    crit = build_criterion(cfg)
    n_aux = cfg.dec_layers - 1
    assert set(crit.weight_dict) == {f'{k}{s}' for k in ('loss_ce', 'loss_bbox', 'loss_giou') for s in [''] + [f'_{i}' for i in range(n_aux)]}
    assert build_postprocess(cfg).num_select == 300


def test_iter_update_false_keeps_anchors_fixed():
    torch.manual_seed(0)
    cfg = DABDETRConfig(backbone='resnet18', hidden_dim=64, nheads=4, enc_layers=1, dec_layers=3, dim_feedforward=128,
                        num_queries=5, iter_update=False)
    model = build_model(cfg).eval()
    cap = {}
    model.transformer.register_forward_hook(lambda m, i, o: cap.update(refs=o[1]))
    with torch.no_grad(): model(torch.randn(1, 3, 64, 64))
    assert cap['refs'].shape == (1, 1, 5, 4)
    close('anchors entering layer 0', cap['refs'][0, 0], model.refpoint_embed.weight.sigmoid(), atol=1e-6)


def test_presets_and_args():
    assert preset('dab_detr_r50') == DABDETRConfig()
    assert config_from_args({'num_patterns': 3, 'random_refpoints_xy': True}).num_patterns == 3
    with pytest.raises(NotImplementedError): config_from_args({'masks': True})
    with pytest.raises(ValueError, match="unknown DAB-DETR preset 'nope'"): preset('nope')
