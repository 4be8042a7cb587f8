"""Mixed precision (`--amp bf16|fp16`) and `torch.compile` (`--compile`): outputs within tolerance of float32 eager.

The model runs under autocast; its outputs are cast back to float32 before the Hungarian matcher, the losses and the
post-processing (train.float32_outputs), so matching never sees 16-bit costs (transformers #42202).
"""
from __future__ import annotations
import pytest
import torch

from detr_explained import official  # noqa: F401  (fills the family registry)
from detr_explained.cli import build_parser, train_changes
from detr_explained.evaluate import predict
from detr_explained.family import ConfigError, get_family
from detr_explained.train import (TrainConfig, autocast, check_settings, compiled, float32_outputs, grad_scaler,
                                  train_config, train_step)

FAMILIES = ['detr', 'deformable_detr', 'dab_detr', 'dab_deformable_detr']
SMALL = dict(backbone='resnet18', hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
             num_queries=12, num_classes=7, dropout=0.0)


def small(family):
    fam = get_family(family)
    cfg = fam.config(**{k: v for k, v in SMALL.items() if k in fam.field_names})
    torch.manual_seed(0)
    return fam.build_model(cfg).eval(), fam.build_criterion(cfg), fam.build_postprocess(cfg)


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 128, 96, generator=g)
    mask = torch.zeros(2, 128, 96, dtype=torch.bool); mask[1, 96:] = True
    targets = [{'boxes': torch.tensor([[.5, .5, .3, .4], [.2, .3, .1, .2]]), 'labels': torch.tensor([1, 3])},
               {'boxes': torch.tensor([[.4, .6, .2, .2]]), 'labels': torch.tensor([5])}]
    return x, mask, targets


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
@pytest.mark.parametrize('family', FAMILIES)
def test_inference_under_autocast_is_close_to_float32(family, amp):
    model, _, postprocess = small(family)
    x, mask, _ = batch()
    with torch.no_grad():
        ref = model(x, mask)
        with autocast('cpu', amp): low = model(x, mask)
    assert low['pred_boxes'].dtype != torch.float32 or low['pred_logits'].dtype != torch.float32 or amp == 'fp16'
    low = float32_outputs(low)
    assert all(v.dtype == torch.float32 for v in (low['pred_logits'], low['pred_boxes'], low['aux_outputs'][0]['pred_boxes']))
    tol = {'bf16': 0.05, 'fp16': 0.01}[amp]       # boxes in [0, 1]; bf16 keeps 8 bits of mantissa, fp16 11
    torch.testing.assert_close(low['pred_boxes'], ref['pred_boxes'], rtol=0, atol=tol)
    torch.testing.assert_close(low['pred_logits'], ref['pred_logits'], rtol=0.05, atol=5 * tol)
    sizes = torch.tensor([[128, 96], [96, 96]])
    r_ref, r_low = predict(model, postprocess, x, mask, sizes), predict(model, postprocess, x, mask, sizes, amp=amp)
    assert all(r['scores'].dtype == torch.float32 and r['boxes'].dtype == torch.float32 for r in r_low)
    top = lambda r: r['scores'].sort(descending=True).values[:5]     # near-equal scores may swap ranks: compare the values
    torch.testing.assert_close(top(r_low[0]), top(r_ref[0]), rtol=0, atol=tol)


@pytest.mark.parametrize('family', FAMILIES)
def test_training_step_bf16_matches_float32_and_matches_in_float32(family):
    x, mask, targets = batch()
    results = {}
    for amp in (None, 'bf16'):
        model, criterion, _ = small(family)
        model.train()
        seen = []
        matcher = criterion.matcher
        hook = matcher.register_forward_pre_hook(lambda m, args: seen.append(args[0]['pred_logits'].dtype))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        results[amp] = train_step(model, criterion, opt, (x, mask, targets), 0.1, 'cpu', amp=amp, scaler=grad_scaler('cpu', amp))
        hook.remove()
        assert seen and set(seen) == {torch.float32}      # the Hungarian matcher only ever sees float32 costs
    for k in ('loss', 'loss_bbox', 'loss_giou'):
        assert results['bf16'][k] == pytest.approx(results[None][k], rel=0.05), k


def test_compiled_model_equals_eager():
    "torch.compile (inductor) of a tiny DETR: the same outputs as eager (compiling takes a minute or more on a busy CPU)."
    fam = get_family('detr')
    cfg = fam.config(**{**SMALL, 'hidden_dim': 32, 'enc_layers': 1, 'dec_layers': 1, 'dim_feedforward': 64, 'num_queries': 5})
    torch.manual_seed(0)
    model = fam.build_model(cfg).eval()
    x, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        ref = model(x, mask)
        out = compiled(model, True)(x, mask)
    torch.testing.assert_close(out['pred_boxes'], ref['pred_boxes'], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out['pred_logits'], ref['pred_logits'], rtol=1e-4, atol=1e-4)
    assert compiled(model, False) is model


def test_settings_and_scaler():
    assert not grad_scaler('cpu', 'fp16').is_enabled() and not grad_scaler('cpu', 'bf16').is_enabled()
    check_settings(train_config('tiny', amp='bf16', compile=True))
    with pytest.raises(ConfigError, match="TrainConfig.amp is 'fp8'"): check_settings(TrainConfig(amp='fp8'))
    with pytest.raises(ConfigError, match='expected one of bf16, fp16'): autocast('cpu', 'int8')


def test_command_line_options():
    p = build_parser()
    args = p.parse_args(['train', '--data', 'd', '--amp', 'bf16', '--compile'])
    t, _ = train_changes(args, 'detr')
    assert t['amp'] == 'bf16' and t['compile'] is True
    assert 'amp' not in train_changes(p.parse_args(['train', '--data', 'd']), 'detr')[0]
    for cmd in (['evaluate', '--checkpoint', 'c.pt', '--data', 'd'], ['predict', '--checkpoint', 'c.pt', 'a.jpg']):
        a = p.parse_args(cmd + ['--amp', 'fp16', '--compile'])
        assert a.amp == 'fp16' and a.compile
    with pytest.raises(SystemExit): p.parse_args(['train', '--data', 'd', '--amp', 'fp8'])
