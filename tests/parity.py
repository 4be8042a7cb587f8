"""One comparison for every parity test: `close(name, ours, ref, atol)`.

    from parity import close            # tests/ is on sys.path under pytest (rootdir conftest)
    close('pred_boxes', out['pred_boxes'], fx['outputs']['pred_boxes'], atol=1e-4)
    close('losses', losses, fx['losses'], atol=1e-6, rtol=1e-5)      # dicts: same keys, in the same order
    close('aux_outputs', out['aux_outputs'], fx['outputs']['aux_outputs'])   # lists/tuples: same length
    close('grad', g, g_ref, atol=1e-6, max_rtol=2e-3)                # tolerance relative to max |ref|

Tolerance, elementwise: |ours - ref| <= atol + rtol * |ref| + max_rtol * max|ref|. Integer and
bool tensors must be equal (and of the same dtype). Floats are compared in float64, after
`detach()`, so a float32 result may be compared with a float64 reference. The failure message
names the value (`name`, with the key or index inside a dict/list), its shape, the largest
difference, where it is, and both values there.
"""
from __future__ import annotations
import math
from collections.abc import Mapping, Sequence

import torch

ATOL = 1e-4   # float32 rounding of a small model's forward on different CPUs (the backbone alone: ~3e-5)


def max_abs_diff(ours, ref) -> float:
    "max |ours - ref| in float64 (0.0 for empty tensors)."
    a, b = _as_tensor(ours), _as_tensor(ref)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor): return x.detach().as_subclass(torch.Tensor).cpu()
    return torch.as_tensor(x)


def close(name: str, ours, ref, atol: float=ATOL, rtol: float=0.0, max_rtol: float=0.0, equal_nan: bool=False):
    "Assert that `ours` matches the reference `ref` (tensors, numbers, or dicts/lists/tuples of them)."
    if isinstance(ref, Mapping):
        assert isinstance(ours, Mapping), f'{name}: {type(ours).__name__}, expected a mapping like the reference'
        assert list(ours) == list(ref), f'{name}: keys {list(ours)} != reference keys {list(ref)}'
        for k in ref: close(f'{name}[{k!r}]', ours[k], ref[k], atol, rtol, max_rtol, equal_nan)
        return
    if isinstance(ref, Sequence) and not isinstance(ref, (str, bytes)):
        assert isinstance(ours, Sequence), f'{name}: {type(ours).__name__}, expected a sequence like the reference'
        assert len(ours) == len(ref), f'{name}: {len(ours)} items, the reference has {len(ref)}'
        for i, (o, r) in enumerate(zip(ours, ref)): close(f'{name}[{i}]', o, r, atol, rtol, max_rtol, equal_nan)
        return
    a, b = _as_tensor(ours), _as_tensor(ref)
    assert a.shape == b.shape, f'{name}: shape {tuple(a.shape)} != reference {tuple(b.shape)}'
    if not (a.is_floating_point() or a.is_complex() or b.is_floating_point() or b.is_complex()):
        assert a.dtype == b.dtype, f'{name}: dtype {a.dtype} != reference {b.dtype}'
        if not torch.equal(a, b):
            idx = (a != b).nonzero()[0].tolist()
            raise AssertionError(f'{name}: {int((a != b).sum())} of {a.numel()} elements differ '
                                 '(integers must be equal), '
                                 f'first at {idx}: {a[tuple(idx)].item()} != reference {b[tuple(idx)].item()}')
        return
    if a.numel() == 0: return
    a, b = a.double(), b.double()
    nan = a.isnan() & b.isnan() if equal_nan else torch.zeros_like(a, dtype=torch.bool)
    diff = (a - b).abs().masked_fill(nan, 0.0)
    tol = atol + rtol * b.abs() + max_rtol * b.abs().masked_fill(b.isnan(), 0).max()
    bad = ~(diff <= tol) & ~nan                     # NaN differences count as failures
    if bad.any():
        worst = torch.where(bad, diff.nan_to_num(math.inf), -1.0).flatten().argmax().item()
        idx = tuple(torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        idx = tuple(int(i) for i in idx)
        raise AssertionError(
            f'{name}: {int(bad.sum())} of {a.numel()} elements off, max |ours - ref| = {diff[idx].item():.3g} '
            f'at {list(idx)} (ours {a[idx].item():.6g}, reference {b[idx].item():.6g}); '
            f'tolerance atol={atol:g} rtol={rtol:g} max_rtol={max_rtol:g} -> {tol[idx].item():.3g} there, '
            f'shape {tuple(a.shape)}')


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    "Relative difference |a - b| / |b| (norms), for gradients compared by size rather than element by element."
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def run_deformable(model, fx) -> tuple:
    """`(model, outputs, captures)` of a deformable model on the fixture's batch; the captures (forward hooks) are the
    backbone's, every input_proj.{l}'s, the encoder memory and the transformer's outputs."""
    cap = {}
    hooks = [model.backbone.register_forward_hook(lambda m, i, o: cap.update(backbone=o)),
             model.transformer.encoder.register_forward_hook(lambda m, i, o: cap.update(memory=o)),
             model.transformer.register_forward_hook(lambda m, i, o: cap.update(transformer=o))]
    for l, proj in enumerate(model.input_proj):
        hooks.append(proj.register_forward_hook(lambda m, i, o, l=l: cap.update({f'proj{l}': o})))
    try:
        with torch.no_grad(): out = model(fx['inputs']['tensors'], fx['inputs']['mask'])
    finally:
        for h in hooks: h.remove()
    return model, out, cap
