"""DAB-Deformable-DETR against the official code (IDEA-Research/DAB-DETR @ 723ddb8, models/dab_deformable_detr).

The fixture `dab_deformable_detr.pt` (ResNet-18, hidden_dim 256, 3 levels, 1 + 2 layers, 10 anchors with
random_refpoints_xy, box refinement as always officially) holds the official state_dict, argparse namespace,
inputs, targets and every tensor the official code computed: outputs, intermediates, matchings, losses,
post-processing, gradients. Everything goes through the official entry points of `official.py`. Beyond the
fixture, the other configurations the official code runs (patterns, levels, points, layers, learned or random
x/y, other widths) are checked for the key names and shapes the official source creates, and for what it does
with the anchors; the one it does not run (`--two_stage`) is refused.
"""
import pytest
import torch

from detr_explained.criterion import total_loss
from detr_explained.dab_deformable_detr import FAMILY, DABDeformableDETR, build_model
from detr_explained.ms_deform_attn import MSDA_IMPLS, set_ms_deform_attn_impl
from detr_explained.official import from_official, official_criterion, official_postprocess
from parity import close, rel, run_deformable

NAME = 'dab_deformable_detr'


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "The fixture was computed with one thread; small models also run faster that way on a busy CPU."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def fx(official_fixture):
    return official_fixture(NAME)


@pytest.fixture(scope='module')
def run(fx):
    "The library model from the official namespace and weights, its outputs and the intermediates it computed."
    model = from_official(NAME, fx['state_dict'], fx['config']['args'])
    return run_deformable(model, fx)


@pytest.fixture(scope='module')
def criterion(fx):
    return official_criterion(NAME, fx['config']['args'])


# ---------------------------------------------------------------- configuration and weights
def test_config_from_official_args(fx):
    cfg = FAMILY.config_from_args(fx['config']['args'])
    assert cfg == FAMILY.presets['dab_deformable_detr_fixture']
    got = (cfg.backbone, cfg.hidden_dim, cfg.num_feature_levels, cfg.num_queries, cfg.num_classes)
    assert got == ('resnet18', 256, 3, 10, 91)
    assert cfg.num_select == 100 and fx['config']['args']['num_select'] == 300    # DAB-DETR's option, ignored here
    assert cfg.random_refpoints_xy and not cfg.freeze_refpoints_xy


@pytest.mark.parametrize('flags,match', [({'two_stage': True}, 'two_stage'), ({'masks': True}, 'masks'),
                                         ({'modelname': 'dab_detr'}, 'dab_detr'),
                                         ({'batch_norm_type': 'SyncBatchNorm'}, 'batch_norm_type')])
def test_refuses_what_the_official_model_does_not_run(fx, flags, match):
    with pytest.raises((ValueError, NotImplementedError), match=match):
        from_official(NAME, fx['state_dict'], {**fx['config']['args'], **flags})


def test_state_dict_keys_are_official(fx, run):
    model = run[0]
    assert type(model) is DABDeformableDETR
    assert sorted(model.state_dict()) == sorted(fx['state_dict'])
    assert len(fx['state_dict_aliases']) == 12
    for alias, target in fx['state_dict_aliases'].items():       # bbox_embed.{l} is transformer.decoder.bbox_embed.{l}
        assert model.state_dict()[alias].data_ptr() == model.state_dict()[target].data_ptr()


# ---------------------------------------------------------------- forward
def test_outputs(fx, run):
    out, ref = run[1], fx['outputs']
    for k in ('pred_logits', 'pred_boxes'): close(k, out[k], ref[k], atol=1e-4)
    assert set(out) == set(ref) == {'pred_logits', 'pred_boxes', 'aux_outputs'}
    close('aux_outputs', out['aux_outputs'], ref['aux_outputs'], atol=1e-4)


def test_intermediates(fx, run):
    im, cap = fx['intermediates'], run[2]
    features, pos = cap['backbone']
    assert len(features) == len(im['backbone']['features']) == 3
    for l, ((f, m), p, rf, rp) in enumerate(zip(features, pos, im['backbone']['features'], im['backbone']['pos'])):
        close(f'backbone mask[{l}]', m, rf['mask'])
        close(f'backbone features[{l}]', f, rf['tensors'], atol=1e-4)
        close(f'backbone pos[{l}]', p, rp, atol=1e-5)
    for l, ref in enumerate(im['input_proj']): close(f'input_proj[{l}]', cap[f'proj{l}'], ref, atol=1e-4)
    close('encoder memory', cap['memory'], im['encoder_memory'], atol=1e-4)
    hs, init_ref, inter_refs, enc_class, enc_coord = cap['transformer']
    ref = im['transformer_out']
    close('hs', hs, ref[0], atol=1e-4)
    close('init_reference', init_ref, ref[1].expand_as(init_ref), atol=1e-6)   # official: the (Q, 4) anchors, unbatched
    close('inter_references', inter_refs, ref[2], atol=1e-4)
    assert enc_class is None and enc_coord is None and ref[3] is None and ref[4] is None


def test_transformer_on_official_inputs(fx, run):
    "The transformer alone, fed the official projected maps: isolates it from the backbone's float32 rounding."
    model, im = run[0], fx['intermediates']
    srcs = im['input_proj']
    masks = [f['mask'] for f in im['backbone']['features']]
    assert len(srcs) == 3                                          # 3 levels = 3 backbone levels: no extra conv level
    with torch.no_grad():
        pos = list(im['backbone']['pos'])
        hs, init_ref, inter_refs, _, _ = model.transformer(srcs, masks, pos, model.query_embeds())
    close('hs from the official projected maps', hs, im['transformer_out'][0], atol=1e-5)
    close('inter_references from the official projected maps', inter_refs, im['transformer_out'][2], atol=1e-6)


# ---------------------------------------------------------------- matching, losses, post-processing
def check_matching(criterion, outputs, targets, indices, costs, what):
    close(f'{what} indices', criterion.matcher(outputs, targets), indices)
    close(f'{what} costs', criterion.matcher.costs(outputs, targets), costs, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('case', ['main', 'one_empty', 'all_empty'])
def test_matcher_losses_total(fx, run, criterion, case):
    out = run[1]
    data = fx if case == 'main' else fx['extra_cases'][case]
    targets = fx['targets'] if case == 'main' else data['targets']
    check_matching(criterion, out, targets, data['matcher_indices'], data['matcher_cost'], f'{case} last layer')
    assert len(out['aux_outputs']) == len(data['aux_matcher_indices']) == 1
    aux_data = zip(out['aux_outputs'], data['aux_matcher_indices'], data['aux_matcher_cost'])
    for i, (aux, idx, cost) in enumerate(aux_data):
        check_matching(criterion, aux, targets, idx, cost, f'{case} aux layer {i}')
    losses = criterion(out, targets)
    assert set(losses) == set(data['losses']) and len(losses) == 9
    for k, v in data['losses'].items(): close(f'{case} {k}', losses[k], v, atol=1e-4, rtol=1e-4)
    close(f'{case} loss_total', total_loss(losses, criterion.weight_dict), data['loss_total'], atol=1e-4, rtol=1e-4)


def test_weight_dict_and_postprocess(fx, run, criterion):
    assert criterion.weight_dict == fx['config']['weight_dict']      # the `_enc` keys too, as the official builder
    results = official_postprocess(NAME, fx['config']['args'])(run[1], fx['inputs']['target_sizes'])
    assert len(results) == 2
    for i, (r, ref) in enumerate(zip(results, fx['postprocess'])):
        assert r['scores'].shape == (100,)                             # top 100 (hard-coded), not the namespace's 300
        close(f'image {i} labels', r['labels'], ref['labels'])
        close(f'image {i} scores', r['scores'], ref['scores'], atol=1e-5)
        scale = fx['inputs']['target_sizes'].max().item()             # boxes are in pixels
        close(f'image {i} boxes', r['boxes'], ref['boxes'], atol=1e-4 * scale)


# ---------------------------------------------------------------- gradients
def backward_total(fx, model):
    criterion = official_criterion(NAME, fx['config']['args'])
    model.zero_grad()
    out = model(fx['inputs']['tensors'], fx['inputs']['mask'])
    loss = total_loss(criterion(out, fx['targets']), criterion.weight_dict)
    loss.backward()
    return loss


@pytest.mark.parametrize('impl', MSDA_IMPLS)
def test_gradients_on_official_backbone_features(fx, impl):
    """Every gradient of fx['grads'], with the backbone's output replaced by the official one: relative 1e-4."""
    model = set_ms_deform_attn_impl(from_official(NAME, fx['state_dict'], fx['config']['args']), impl)
    bb = fx['intermediates']['backbone']
    features = [(f['tensors'], f['mask']) for f in bb['features']]
    model.backbone.forward = lambda tensors, mask: (features, list(bb['pos']))
    loss = backward_total(fx, model)
    close(f'{impl} loss_total', loss, fx['loss_total'], atol=1e-5, rtol=1e-5)
    assert len(fx['grads']) == 87
    for k, g in fx['grads'].items():
        assert rel(model.get_parameter(k).grad, g) < 1e-4, k
    xy = model.refpoint_embed.weight.grad[:, :2]                  # random_refpoints_xy: x, y still trained, as official
    assert xy.abs().sum() > 0


def test_gradients_end_to_end(fx):
    """Through our own backbone, whose float32 features differ from the official ones by ~1e-5: a few encoder
    sampling points can cross a pixel centre, where the bilinear derivative w.r.t. the location jumps, so the
    encoder's sampling_offsets and level_embed gradients get the same looser bound as Deformable DETR's."""
    model = from_official(NAME, fx['state_dict'], fx['config']['args'])
    backward_total(fx, model)
    errors = {k: rel(model.get_parameter(k).grad, g) for k, g in fx['grads'].items()}
    assert max(errors.values()) < 2e-2
    assert max(v for k, v in errors.items() if 'sampling_offsets' not in k and 'level_embed' not in k) < 2e-3
    assert len(fx['grad_norms']) == 114
    for k, n in fx['grad_norms'].items():
        got = model.get_parameter(k).grad.norm()
        assert abs(got - n) <= 1e-3 * n + 1e-7, k
    for n, p in model.backbone.named_parameters():                  # official rule: only layer2-4 train
        assert p.requires_grad == any(f'layer{i}' in n for i in (2, 3, 4)), n


# ---------------------------------------------------------------- other configurations (no fixture)
def small(**kw):
    base = dict(backbone='resnet18', num_feature_levels=3, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
                dim_feedforward=64, num_queries=6, num_classes=5, lr_backbone=0., enc_n_points=2, dec_n_points=2)
    return FAMILY.config(**{**base, **kw})


def official_top_keys(dec_layers, num_patterns, levels):
    """Keys outside backbone/encoder/decoder layers, as the official DABDeformableDETR/DeformableTransformer/decoder
    __init__ create them with use_dab=True, with_box_refine=True, two_stage=False (read from the source)."""
    mlp = lambda p, n: [f'{p}.layers.{j}.{w}' for j in range(n) for w in ('weight', 'bias')]
    keys = ['transformer.level_embed', 'tgt_embed.weight', 'refpoint_embed.weight']
    keys += mlp('transformer.decoder.query_scale', 2) + mlp('transformer.decoder.ref_point_head', 2)
    for l in range(dec_layers):
        keys += [f'class_embed.{l}.weight', f'class_embed.{l}.bias']
        keys += mlp(f'bbox_embed.{l}', 3) + mlp(f'transformer.decoder.bbox_embed.{l}', 3)
    if num_patterns > 0: keys.append('patterns_embed.weight')
    keys += [f'input_proj.{i}.{j}.{w}' for i in range(levels) for j in range(2) for w in ('weight', 'bias')]
    return sorted(keys)


@pytest.mark.parametrize('kw', [dict(), dict(num_patterns=3), dict(num_feature_levels=4), dict(num_feature_levels=1),
                                dict(dec_layers=3, dec_n_points=3, enc_n_points=1), dict(random_refpoints_xy=True),
                                dict(hidden_dim=64, nheads=8)])
def test_configurations_keys_shapes_round_trip(kw):
    cfg = small(**kw)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    skip = ('backbone.', 'transformer.encoder.', 'transformer.decoder.layers.')
    assert sorted(k for k in model.state_dict() if not k.startswith(skip)) == \
        official_top_keys(cfg.dec_layers, cfg.num_patterns, cfg.num_feature_levels)
    D, L, M, P = cfg.hidden_dim, cfg.num_feature_levels, cfg.nheads, cfg.dec_n_points
    sd = model.state_dict()
    assert sd['transformer.decoder.layers.0.cross_attn.sampling_offsets.weight'].shape == (M * L * P * 2, D)
    assert sd['transformer.decoder.ref_point_head.layers.0.weight'].shape == (D, 2 * D)    # official: (256, 512)
    assert sd['refpoint_embed.weight'].shape == (cfg.num_queries, 4)
    assert sd['tgt_embed.weight'].shape == (cfg.num_queries, D)
    if cfg.num_patterns: assert sd['patterns_embed.weight'].shape == (cfg.num_patterns, D)
    nq = cfg.num_queries * max(cfg.num_patterns, 1)
    with torch.no_grad(): out = model([torch.randn(3, 64, 96), torch.randn(3, 80, 48)])
    assert out['pred_logits'].shape == (2, nq, 5) and out['pred_boxes'].shape == (2, nq, 4)
    assert len(out['aux_outputs']) == cfg.dec_layers - 1
    fresh = build_model(cfg)
    fresh.load_state_dict(model.state_dict())                       # strict round trip


def test_random_refpoints_xy_initialisation_and_freeze():
    torch.manual_seed(0)
    xy = build_model(small(random_refpoints_xy=True)).refpoint_embed.weight.detach()[:, :2].sigmoid()
    assert ((xy > 0) & (xy < 1)).all() and xy.std() > 0.1             # uniform in (0, 1) after the sigmoid
    torch.manual_seed(0)
    frozen = build_model(small(random_refpoints_xy=True, freeze_refpoints_xy=True)).train()
    frozen([torch.randn(3, 64, 64)])['aux_outputs'][0]['pred_boxes'].sum().backward()
    g = frozen.refpoint_embed.weight.grad
    assert g[:, :2].abs().sum() == 0 and g[:, 2:].abs().sum() > 0


def test_patterns_layout():
    "Official: content k = tgt_embed[k % Q] + patterns_embed[k // Q], anchor k = refpoint_embed[k % Q]."
    torch.manual_seed(0)
    model = build_model(small(num_patterns=2))
    qe, Q, D = model.query_embeds(), 6, 32
    tgt, pat, ref = model.tgt_embed.weight, model.patterns_embed.weight, model.refpoint_embed.weight
    expected = torch.cat([tgt.repeat(2, 1) + pat[:, None, :].repeat(1, Q, 1).flatten(0, 1), ref.repeat(2, 1)], 1)
    close('query_embeds with patterns', qe, expected, atol=0)
    assert qe.shape == (2 * Q, D + 4)


def test_refinement_detaches_anchor():
    torch.manual_seed(0)
    model = build_model(small()).train()
    for b in model.bbox_embed: torch.nn.init.normal_(b.layers[-1].weight, std=0.1)
    model([torch.randn(3, 64, 64)])['pred_boxes'].sum().backward()
    g0 = model.bbox_embed[0].layers[2].weight.grad
    assert g0 is None or g0.abs().sum() == 0                        # layer 1's boxes: no gradient into head 0
    assert model.bbox_embed[1].layers[2].weight.grad.abs().sum() > 0


def test_criterion_and_postprocess_follow_the_config():
    cfg = small(dec_layers=3, cls_loss_coef=3, num_select=7)
    crit = official_criterion(NAME, {'dec_layers': 3, 'cls_loss_coef': 3, 'num_classes': 5})
    assert crit.weight_dict == FAMILY.build_criterion(cfg).weight_dict
    assert {'loss_ce_0', 'loss_ce_1', 'loss_ce_enc'} <= set(crit.weight_dict) and 'loss_ce_2' not in crit.weight_dict
    assert FAMILY.build_postprocess(cfg).num_select == 7



def test_checkpoints_name_their_family(fx):
    "A DAB-Deformable state_dict has Deformable DETR's and DAB-DETR's marks; the family with the most marks wins."
    from detr_explained.family import family_of_args, family_of_state_dict
    assert family_of_state_dict(fx['state_dict']) == NAME
    assert family_of_args(fx['config']['args']) == NAME                     # the official `-m dab_deformable_detr`


def test_official_r50_preset_keys():
    "The README's R50 recipe: 4 levels (one extra stride-64 conv), 6 + 6 layers, 300 anchors, official key names."
    cfg = FAMILY.config('dab_deformable_detr_r50')
    assert (cfg.backbone, cfg.num_feature_levels, cfg.dec_layers, cfg.num_queries, cfg.epochs, cfg.lr_drop) == \
        ('resnet50', 4, 6, 300, 50, 40)
    model = build_model(cfg)
    skip = ('backbone.', 'transformer.encoder.', 'transformer.decoder.layers.')
    assert sorted(k for k in model.state_dict() if not k.startswith(skip)) == official_top_keys(6, 0, 4)
    sd = model.state_dict()
    assert sd['input_proj.3.0.weight'].shape == (256, 2048, 3, 3)   # the extra level: 3x3 stride-2 conv on layer4
    assert sd['transformer.decoder.ref_point_head.layers.0.weight'].shape == (256, 512)
    assert sd['transformer.encoder.layers.5.linear1.weight'].shape == (2048, 256)   # DAB-DETR's dim_feedforward
