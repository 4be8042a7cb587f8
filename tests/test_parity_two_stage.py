"""Two-stage Deformable DETR against the official code (fundamentalvision/Deformable-DETR @ 11169a6).

The fixture `deformable_detr_two_stage.pt` is `--with_box_refine --two_stage` at hidden_dim 256 (the official
proposal embedding hard-codes 128 channels per coordinate), ResNet-18, 3 levels, 1 + 2 layers, 10 queries. Beyond
what the single-stage fixture covers it holds the encoder's proposals (`enc_outputs`: one class score and box per
encoder token, 296 here), their matching against class-agnostic targets, and the `_enc` losses. Everything goes
through the official entry points of `official.py`.
"""
import pytest
import torch

from detr_explained.criterion import total_loss
from detr_explained.deformable_detr import DeformableDETRTwoStage
from detr_explained.deformable_transformer import TwoStageDeformableTransformer
from detr_explained.ms_deform_attn import MSDA_IMPLS, set_ms_deform_attn_impl
from detr_explained.official import from_official, official_criterion, official_postprocess
from parity import close, rel, run_deformable

NAME = 'deformable_detr'


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def fx(official_fixture):
    return official_fixture('deformable_detr_two_stage')


@pytest.fixture(scope='module')
def run(fx):
    model = from_official(NAME, fx['state_dict'], fx['config']['args'])
    return run_deformable(model, fx)


@pytest.fixture(scope='module')
def criterion(fx):
    return official_criterion(NAME, fx['config']['args'])


def test_variant_and_keys(fx, run):
    model = run[0]
    assert type(model) is DeformableDETRTwoStage and isinstance(model.transformer, TwoStageDeformableTransformer)
    assert sorted(model.state_dict()) == sorted(fx['state_dict'])
    assert len(fx['state_dict']) == 229                            # 129 + the 100 backbone keys merged in
    assert len(fx['state_dict_aliases']) == 24                      # box heads and class heads, registered twice
    for alias, target in fx['state_dict_aliases'].items():
        assert model.state_dict()[alias].data_ptr() == model.state_dict()[target].data_ptr()
    assert model.transformer.two_stage_num_proposals == 10


def test_outputs_and_proposals(fx, run):
    out, ref = run[1], fx['outputs']
    assert set(out) == set(ref) == {'pred_logits', 'pred_boxes', 'aux_outputs', 'enc_outputs'}
    for k in ('pred_logits', 'pred_boxes'): close(k, out[k], ref[k], atol=1e-4)
    close('aux_outputs', out['aux_outputs'], ref['aux_outputs'], atol=1e-4)
    assert out['enc_outputs']['pred_logits'].shape == (2, 296, 91)
    close('enc_outputs', out['enc_outputs'], ref['enc_outputs'], atol=1e-4)


def test_intermediates(fx, run):
    im, cap = fx['intermediates'], run[2]
    features, pos = cap['backbone']
    for l, ((f, m), p, rf, rp) in enumerate(zip(features, pos, im['backbone']['features'], im['backbone']['pos'])):
        close(f'backbone mask[{l}]', m, rf['mask'])
        close(f'backbone features[{l}]', f, rf['tensors'], atol=1e-4)
        close(f'backbone pos[{l}]', p, rp, atol=1e-5)
    for l, ref in enumerate(im['input_proj']): close(f'input_proj[{l}]', cap[f'proj{l}'], ref, atol=1e-4)
    close('encoder memory', cap['memory'], im['encoder_memory'], atol=1e-4)
    names = ('hs', 'init_reference (the top-10 proposals)', 'inter_references', 'enc_outputs_class',
             'enc_outputs_coord_unact')
    for name, got, ref in zip(names, cap['transformer'], im['transformer_out']):
        close(name, got.masked_fill(got.isinf(), 0), ref.masked_fill(ref.isinf(), 0), atol=1e-4)
        assert torch.equal(got.isinf(), ref.isinf()), name          # disabled proposals (padding, borders): +inf alike


def test_transformer_on_official_inputs(fx, run):
    "The transformer alone, fed the official projected maps: proposals, their top-k and the decoder."
    model, im = run[0], fx['intermediates']
    masks = [f['mask'] for f in im['backbone']['features']]
    with torch.no_grad(): got = model.transformer(im['input_proj'], masks, list(im['backbone']['pos']), None)
    ref = im['transformer_out']
    close('hs from the official projected maps', got[0], ref[0], atol=1e-5)
    close('init_reference from the official projected maps', got[1], ref[1], atol=1e-6)
    close('enc class from the official projected maps', got[3], ref[3], atol=1e-5)


def check_matching(criterion, outputs, targets, indices, costs, what):
    close(f'{what} indices', criterion.matcher(outputs, targets), indices)
    close(f'{what} costs', criterion.matcher.costs(outputs, targets), costs, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('case', ['main', 'one_empty', 'all_empty'])
def test_matcher_losses_total(fx, run, criterion, case):
    out = run[1]
    data = fx if case == 'main' else fx['extra_cases'][case]
    targets = fx['targets'] if case == 'main' else data['targets']
    check_matching(criterion, out, targets, data['matcher_indices'], data['matcher_cost'], f'{case} last layer')
    aux_data = zip(out['aux_outputs'], data['aux_matcher_indices'], data['aux_matcher_cost'])
    for i, (aux, idx, cost) in enumerate(aux_data):
        check_matching(criterion, aux, targets, idx, cost, f'{case} aux layer {i}')
    binary = [{**t, 'labels': torch.zeros_like(t['labels'])} for t in targets]      # proposals: class-agnostic
    check_matching(criterion, out['enc_outputs'], binary, data['enc_matcher_indices'], data['enc_matcher_cost'],
                   f'{case} enc')
    losses = criterion(out, targets)
    assert set(losses) == set(data['losses'])
    assert {'loss_ce_enc', 'loss_bbox_enc', 'loss_giou_enc', 'cardinality_error_enc'} <= set(losses)
    for k, v in data['losses'].items(): close(f'{case} {k}', losses[k], v, atol=1e-4, rtol=1e-4)
    close(f'{case} loss_total', total_loss(losses, criterion.weight_dict), data['loss_total'], atol=1e-4, rtol=1e-4)


def test_weight_dict_and_postprocess(fx, run, criterion):
    assert criterion.weight_dict == fx['config']['weight_dict']
    results = official_postprocess(NAME, fx['config']['args'])(run[1], fx['inputs']['target_sizes'])
    scale = fx['inputs']['target_sizes'].max().item()
    for i, (r, ref) in enumerate(zip(results, fx['postprocess'])):
        close(f'image {i} labels', r['labels'], ref['labels'])
        close(f'image {i} scores', r['scores'], ref['scores'], atol=1e-5)
        close(f'image {i} boxes', r['boxes'], ref['boxes'], atol=1e-4 * scale)


def backward_total(fx, model):
    criterion = official_criterion(NAME, fx['config']['args'])
    model.zero_grad()
    out = model(fx['inputs']['tensors'], fx['inputs']['mask'])
    loss = total_loss(criterion(out, fx['targets']), criterion.weight_dict)
    loss.backward()
    return loss


@pytest.mark.parametrize('impl', MSDA_IMPLS)
def test_gradients_on_official_backbone_features(fx, impl):
    "Every gradient of fx['grads'] (proposal layers and heads too), the backbone's output replaced by the official one."
    model = set_ms_deform_attn_impl(from_official(NAME, fx['state_dict'], fx['config']['args']), impl)
    bb = fx['intermediates']['backbone']
    features = [(f['tensors'], f['mask']) for f in bb['features']]
    model.backbone.forward = lambda tensors, mask: (features, list(bb['pos']))
    loss = backward_total(fx, model)
    close(f'{impl} loss_total', loss, fx['loss_total'], atol=1e-5, rtol=1e-5)
    assert len(fx['grads']) == 93
    assert {'transformer.enc_output.weight', 'transformer.pos_trans.weight',
            'transformer.decoder.class_embed.2.weight'} <= set(fx['grads'])      # shared heads: under their first name
    for k, g in fx['grads'].items():
        assert rel(model.get_parameter(k).grad, g) < 1e-4, k


def test_gradients_end_to_end(fx):
    "Through our own backbone: the same bounds as single-stage Deformable DETR (see test_parity_deformable.py)."
    model = from_official(NAME, fx['state_dict'], fx['config']['args'])
    backward_total(fx, model)
    errors = {k: rel(model.get_parameter(k).grad, g) for k, g in fx['grads'].items()}
    assert max(errors.values()) < 2e-2
    assert max(v for k, v in errors.items() if 'sampling_offsets' not in k and 'level_embed' not in k) < 2e-3
    assert len(fx['grad_norms']) == 120
    for k, n in fx['grad_norms'].items():
        got = model.get_parameter(k).grad.norm()
        assert abs(got - n) <= 1e-3 * n + 1e-7, k
