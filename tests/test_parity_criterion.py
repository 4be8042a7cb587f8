"""Parity of the matcher, the set criteria and the post-processing with the official code.

The official fixtures (shared/fixtures/official, see its README) hold, for each family, the model
outputs for one batch, the targets, and what the official HungarianMatcher, SetCriterion and
PostProcess returned for them. The library gets the same outputs and targets, so the results
must agree to float32 rounding: indices and labels exactly, costs and losses to ~1e-6.
"""
import pytest
import torch

from detr_explained.criterion import (SetCriterion, FocalSetCriterion, DABSetCriterion, PostProcess,
                                      PostProcessTopK, build_set_criterion, total_loss)
from parity import close

FAMILIES = ['detr', 'deformable_detr', 'dab_detr']
FLAVOUR = {'detr': SetCriterion, 'deformable_detr': FocalSetCriterion, 'dab_detr': DABSetCriterion}


def criterion_from_args(family: str, args: dict, num_classes: int):
    "Build the criterion from the complete official argument namespace, as the official builders do."
    return build_set_criterion(
        FLAVOUR[family], num_classes=num_classes, dec_layers=args['dec_layers'], aux_loss=args['aux_loss'],
        set_cost_class=args['set_cost_class'], set_cost_bbox=args['set_cost_bbox'], set_cost_giou=args['set_cost_giou'],
        cls_loss_coef=args.get('cls_loss_coef', 1),            # DETR's builder hard-codes loss_ce: 1
        bbox_loss_coef=args['bbox_loss_coef'], giou_loss_coef=args['giou_loss_coef'],
        eos_coef=args.get('eos_coef', 0.1), focal_alpha=args.get('focal_alpha', 0.25),
        matcher_focal_alpha=0.25 if family == 'deformable_detr' else None,  # Deformable DETR's matcher hard-codes 0.25
        enc_weights=family == 'deformable_detr')                           # ... and its builder adds `_enc` weights


def postprocess_from_args(family: str, args: dict):
    if family == 'detr': return PostProcess()
    return PostProcessTopK(num_select=args.get('num_select', 100))       # Deformable DETR hard-codes 100


@pytest.fixture(params=FAMILIES)
def case(request, official_fixture):
    fx = official_fixture(request.param)
    return request.param, fx, criterion_from_args(request.param, fx['config']['args'], fx['config']['num_classes'])


def test_configuration(case):
    family, fx, crit = case
    assert type(crit) is FLAVOUR[family]
    assert crit.weight_dict == fx['config']['weight_dict']
    assert list(crit.weight_dict) == list(fx['config']['weight_dict'])  # same order: the total sums in it
    m = crit.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou) == (fx['config']['set_cost_class'], fx['config']['set_cost_bbox'], fx['config']['set_cost_giou'])
    assert m.focal == (family != 'detr')


def test_criterion_state_dict(case):
    family, fx, crit = case
    sd = crit.state_dict()
    assert list(sd) == list(fx['criterion_state_dict'])
    for k, v in fx['criterion_state_dict'].items(): assert torch.equal(sd[k], v)


def test_matcher_last_layer(case):
    family, fx, crit = case
    close(f'{family} indices', crit.matcher(fx['outputs'], fx['targets']), fx['matcher_indices'])   # int64, equal
    close(f'{family} costs', crit.matcher.costs(fx['outputs'], fx['targets']), fx['matcher_cost'], atol=1e-5)


def test_matcher_aux_layers(case):
    family, fx, crit = case
    aux = fx['outputs']['aux_outputs']
    assert len(aux) == len(fx['aux_matcher_indices']) == fx['config']['dec_layers'] - 1
    for l, (layer, ref_idx, ref_cost) in enumerate(zip(aux, fx['aux_matcher_indices'], fx['aux_matcher_cost'])):
        close(f'{family} aux {l} indices', crit.matcher(layer, fx['targets']), ref_idx)
        close(f'{family} aux {l} costs', crit.matcher.costs(layer, fx['targets']), ref_cost, atol=1e-5)


def test_losses_and_total(case):
    family, fx, crit = case
    losses = crit(fx['outputs'], fx['targets'])
    assert len(losses) == {'detr': 9, 'deformable_detr': 9, 'dab_detr': 19}[family]
    close(f'{family} losses', losses, fx['losses'], atol=1e-6, rtol=1e-5)    # same names, same order
    close(f'{family} loss_total', total_loss(losses, crit.weight_dict), fx['loss_total'], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('extra', ['one_empty', 'all_empty'])
def test_extra_cases(case, extra):
    family, fx, crit = case
    ex = fx['extra_cases'][extra]
    targets, outputs = ex['targets'], fx['outputs']
    what = f'{family} {extra}'
    close(f'{what} indices', crit.matcher(outputs, targets), ex['matcher_indices'])
    close(f'{what} costs', crit.matcher.costs(outputs, targets), ex['matcher_cost'], atol=1e-5)
    for l, (layer, ref_idx, ref_cost) in enumerate(zip(outputs['aux_outputs'], ex['aux_matcher_indices'], ex['aux_matcher_cost'])):
        close(f'{what} aux {l} indices', crit.matcher(layer, targets), ref_idx)
        close(f'{what} aux {l} costs', crit.matcher.costs(layer, targets), ref_cost, atol=1e-5)
    losses = crit(outputs, targets)
    close(f'{what} losses', losses, ex['losses'], atol=1e-6, rtol=1e-5)
    close(f'{what} loss_total', total_loss(losses, crit.weight_dict), ex['loss_total'], atol=1e-6, rtol=1e-6)


def test_postprocess(case):
    family, fx, crit = case
    post = postprocess_from_args(family, fx['config']['args'])
    results = post(fx['outputs'], fx['inputs']['target_sizes'])
    assert len(results) == len(fx['postprocess'])
    for i, (r, ref) in enumerate(zip(results, fx['postprocess'])):
        assert list(r) == ['scores', 'labels', 'boxes']
        assert torch.equal(r['labels'], ref['labels'])
        close(f'{family} image {i} scores', r['scores'], ref['scores'], atol=1e-5)
        close(f'{family} image {i} boxes', r['boxes'], ref['boxes'], atol=1e-5, rtol=1e-5)   # absolute pixels, up to ~600


def test_matcher_full_batch_equals_official_way(case):
    "The library's per-image blocks equal the full-batch (official) computation on the fixture."
    from detr_explained.matcher import full_batch_match
    family, fx, crit = case
    m = crit.matcher
    idx, costs = full_batch_match(fx['outputs'], fx['targets'], m.cost_class, m.cost_bbox, m.cost_giou, class_cost=m.class_cost)
    close(f'{family} indices', m(fx['outputs'], fx['targets']), idx)
    for c, r in zip(m.costs(fx['outputs'], fx['targets']), costs): assert torch.equal(c, r)
