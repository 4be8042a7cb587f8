"""The library's fast paths against the readable reference path, whole models of every family in float32.

Fast paths (all on by default): fused attention in DETR's layers (`transformer.set_attention_impl`, also the
DAB-DETR encoder), the deformable sampling kernels (`ms_deform_attn.set_ms_deform_attn_impl`) and the
channels-last backbone (`backbone.Backbone.channels_last`). `set_fast_paths(model, 'reference')` switches a model to the
official algorithm everywhere; outputs, losses and every parameter gradient must agree with the fast path.
"""
from __future__ import annotations
import pytest
import torch

from detr_explained import official  # noqa: F401  (fills the family registry)
from detr_explained.family import get_family, family_names
from detr_explained.transformer import set_attention_impl
from detr_explained.ms_deform_attn_fast import set_fast_paths

SMALL = dict(backbone='resnet18', hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
             num_queries=12, num_classes=7, dropout=0.0)




def small_model(family: str, **changes):
    fam = get_family(family)
    cfg = fam.config(**{k: v for k, v in {**SMALL, **changes}.items() if k in fam.field_names})
    torch.manual_seed(0)
    return fam.build_model(cfg), fam.build_criterion(cfg)


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 128, 96, generator=g)
    mask = torch.zeros(2, 128, 96, dtype=torch.bool); mask[1, 96:] = True; mask[1, :, 64:] = True
    targets = [{'boxes': torch.tensor([[.5, .5, .3, .4], [.2, .3, .1, .2]]), 'labels': torch.tensor([1, 3])},
               {'boxes': torch.tensor([[.4, .6, .2, .2]]), 'labels': torch.tensor([5])}]
    return x, mask, targets


def step(model, criterion, impl):
    "Loss and gradients of one training step (dropout 0: deterministic) on the chosen path."
    set_fast_paths(model, impl).train(); model.zero_grad()
    x, mask, targets = batch()
    losses = criterion(model(x, mask), targets)
    loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('family', ['detr', 'deformable_detr', 'dab_detr', 'dab_deformable_detr'])
def test_inference_fast_equals_reference(family):
    if family not in family_names(): pytest.skip(f'{family} is not registered')
    model, _ = small_model(family)
    x, mask, _ = batch()
    with torch.no_grad():
        ref = set_fast_paths(model, 'reference').eval()(x, mask)
        fast = set_fast_paths(model, 'fast')(x, mask)
    for k in ('pred_logits', 'pred_boxes'):
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(fast['aux_outputs'], ref['aux_outputs']):
        torch.testing.assert_close(a['pred_boxes'], b['pred_boxes'], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('family', ['detr', 'deformable_detr', 'dab_detr', 'dab_deformable_detr'])
def test_training_step_fast_equals_reference(family):
    if family not in family_names(): pytest.skip(f'{family} is not registered')
    model, criterion = small_model(family)
    loss_ref, grads_ref = step(model, criterion, 'reference')
    loss_fast, grads_fast = step(model, criterion, 'fast')
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-4, atol=1e-5)
    assert grads_fast.keys() == grads_ref.keys() and len(grads_ref) > 20
    for name, g in grads_ref.items():   # within 0.2 % of the tensor's largest entry (1e-6 for gradients that are 0 in exact maths)
        atol = max(2e-3 * g.abs().max().item(), 1e-6)
        torch.testing.assert_close(grads_fast[name], g, rtol=0, atol=atol, msg=name)


def test_the_switch_reaches_every_layer():
    model, _ = small_model('detr')
    set_fast_paths(model, 'reference')
    impls = {m.impl for m in model.modules() if hasattr(m, 'impl')}
    assert impls == {'reference'} and not model.backbone[0].channels_last
    set_fast_paths(model, 'fast')
    assert {m.impl for m in model.modules() if hasattr(m, 'impl')} == {'fast'} and model.backbone[0].channels_last
    with pytest.raises(ValueError, match='impl must be one of'): set_attention_impl(model, 'flash')


def test_fast_path_does_not_ask_for_attention_weights():
    "The fused path calls nn.MultiheadAttention with need_weights=False; the reference path as the official code."
    model, _ = small_model('detr')
    seen = []
    hook = lambda m, args, kwargs, out: seen.append((kwargs.get('need_weights'), out[1] is None))
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, torch.nn.MultiheadAttention)]
    x, mask, _ = batch()
    with torch.no_grad():
        set_fast_paths(model, 'fast').eval()(x, mask)
        fast, seen[:] = list(seen), []
        set_fast_paths(model, 'reference')(x, mask)
    for h in handles: h.remove()
    assert fast and all(s == (False, True) for s in fast)
    assert seen and all(s == (True, False) for s in seen)


def test_channels_last_features():
    "Inference runs the backbone in NHWC (channels-last), training in NCHW (its NHWC backward is slower on a CPU)."
    model, _ = small_model('deformable_detr')
    x, mask, _ = batch()
    with torch.no_grad(): feats = model.backbone[0](x, mask)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f, _ in feats)
    assert all(f.is_contiguous() for f, _ in model.backbone[0](x, mask))          # gradients enabled: NCHW
    model.backbone[0].channels_last = False
    with torch.no_grad(): assert all(f.is_contiguous() for f, _ in model.backbone[0](x, mask))
