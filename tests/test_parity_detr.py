"""DETR parity with the official code (facebookresearch/detr) on the official fixture.

The library's own model is built from the fixture's official argparse namespace with
`from_official('detr', ...)` and run on the fixture's padded batch. Outputs, the intermediates
(captured with forward hooks, the model is not changed), the Hungarian matching, the losses, the
post-processing and the gradients of the total loss are compared with what the official code
computed. Integers compare exactly, floats with small tolerances: float32 rounding differs
between CPUs (the backbone alone differs by up to ~3e-5 on values up to ~9, see STATUS-A).
"""

import pytest
import torch

from detr_explained.official import (from_official, official_criterion, official_postprocess,
                                     CheckpointMismatch, FAMILIES)
from detr_explained.family import family_names, get_family
from detr_explained.criterion import total_loss
from parity import close


@pytest.fixture(scope="module")
def fx(official_fixture):
    return official_fixture("detr")


@pytest.fixture(scope="module")
def args(fx):
    return fx["config"]["args"]


@pytest.fixture(scope="module")
def run(fx, args):
    "The model, its outputs on the fixture batch (graph kept) and the tensors captured by hooks."
    model = from_official("detr", fx["state_dict"], args)
    captured = {}
    def keep(name):
        return lambda module, inputs, output: captured.__setitem__(name, output)
    hooks = [model.backbone.register_forward_hook(keep("backbone")),
             model.input_proj.register_forward_hook(keep("input_proj")),
             model.transformer.encoder.register_forward_hook(keep("encoder_memory")),
             model.transformer.register_forward_hook(keep("transformer_out"))]
    try:
        out = model(fx["inputs"]["tensors"], fx["inputs"]["mask"])
    finally:
        for h in hooks: h.remove()
    return model, out, captured


@pytest.fixture(scope="module")
def criterion(args):
    return official_criterion("detr", args)


def test_families():
    assert FAMILIES[:3] == ("detr", "deformable_detr", "dab_detr")
    assert family_names() == FAMILIES and get_family("detr").title == "DETR"


def test_outputs(fx, run):
    _, out, _ = run
    ref = fx["outputs"]
    assert sorted(out) == sorted(ref)
    close("pred_logits", out["pred_logits"], ref["pred_logits"])
    close("pred_boxes", out["pred_boxes"], ref["pred_boxes"])
    assert len(out["aux_outputs"]) == len(ref["aux_outputs"]) == fx["config"]["args"]["dec_layers"] - 1
    for i, (a, b) in enumerate(zip(out["aux_outputs"], ref["aux_outputs"])):
        assert sorted(a) == sorted(b)
        for k in b: close(f"aux_outputs[{i}].{k}", a[k], b[k])


def test_intermediates(fx, run):
    _, _, cap = run
    ref = fx["intermediates"]
    features, pos = cap["backbone"]
    assert len(features) == len(ref["backbone"]["features"]) == 1
    for l, ((feat, mask), r) in enumerate(zip(features, ref["backbone"]["features"])):
        close(f"backbone features[{l}]", feat, r["tensors"])
        assert mask.dtype == torch.bool and torch.equal(mask, r["mask"]), f"feature mask [{l}]"
    for l, (p, r) in enumerate(zip(pos, ref["backbone"]["pos"])):
        close(f"backbone pos[{l}]", p, r)
    close("input_proj", cap["input_proj"], ref["input_proj"])
    close("encoder_memory (HW, B, C)", cap["encoder_memory"], ref["encoder_memory"])
    hs, memory = cap["transformer_out"]
    close("transformer hs (L, B, Q, C)", hs, ref["transformer_out"][0])
    close("transformer memory (B, C, H, W)", memory, ref["transformer_out"][1])


def test_trainable_parameters_as_official(fx, run):
    "lr_backbone > 0: backbone layer2-4 train, conv1/layer1 stay frozen (the official builder's rule)."
    model, _, _ = run
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(fx["grad_norms"])
    assert not any(n.startswith(("backbone.0.body.conv1", "backbone.0.body.layer1")) for n in trainable)


def _indices_equal(ours, theirs, what):
    assert len(ours) == len(theirs), what
    for i, ((q, t), (rq, rt)) in enumerate(zip(ours, theirs)):
        assert q.dtype == rq.dtype == torch.int64 and t.dtype == rt.dtype == torch.int64, f"{what}[{i}] dtype"
        assert torch.equal(q, rq) and torch.equal(t, rt), f"{what}[{i}]: {q.tolist()},{t.tolist()} != {rq.tolist()},{rt.tolist()}"


def _main(out):
    return {k: v for k, v in out.items() if k != "aux_outputs"}


@pytest.mark.parametrize("case", ["main", "one_empty", "all_empty"])
def test_matcher(fx, run, criterion, case):
    _, out, _ = run
    ref = fx if case == "main" else fx["extra_cases"][case]
    targets = fx["targets"] if case == "main" else ref["targets"]
    matcher = criterion.matcher
    _indices_equal(matcher(_main(out), targets), ref["matcher_indices"], f"{case} matcher_indices")
    for c, rc in zip(matcher.costs(_main(out), targets), ref["matcher_cost"]):
        close(f"{case} matcher_cost", c, rc)
    for l, aux in enumerate(out["aux_outputs"]):
        _indices_equal(matcher(aux, targets), ref["aux_matcher_indices"][l], f"{case} aux_matcher_indices[{l}]")
        for c, rc in zip(matcher.costs(aux, targets), ref["aux_matcher_cost"][l]):
            close(f"{case} aux_matcher_cost[{l}]", c, rc)


@pytest.mark.parametrize("case", ["main", "one_empty", "all_empty"])
def test_losses(fx, run, criterion, case):
    _, out, _ = run
    ref = fx if case == "main" else fx["extra_cases"][case]
    targets = fx["targets"] if case == "main" else ref["targets"]
    losses = criterion(out, targets)
    assert list(losses) == list(ref["losses"]), "loss names and order"
    for k, v in ref["losses"].items():
        close(f"{case} {k}", losses[k], v, atol=1e-5, rtol=1e-4)
    close(f"{case} loss_total", total_loss(losses, criterion.weight_dict), ref["loss_total"], atol=1e-5, rtol=1e-4)


def test_criterion_state(fx, criterion, args):
    assert criterion.weight_dict == fx["config"]["weight_dict"]
    sd = criterion.state_dict()
    assert sorted(sd) == sorted(fx["criterion_state_dict"])
    for k, v in fx["criterion_state_dict"].items(): assert torch.equal(sd[k], v), k


def test_postprocess(fx, run, args):
    _, out, _ = run
    results = official_postprocess("detr", args)(out, fx["inputs"]["target_sizes"])
    assert len(results) == len(fx["postprocess"])
    for i, (r, ref) in enumerate(zip(results, fx["postprocess"])):
        assert sorted(r) == sorted(ref)
        assert torch.equal(r["labels"], ref["labels"]), f"postprocess[{i}] labels"
        close(f"postprocess[{i}] scores", r["scores"], ref["scores"], atol=1e-5, rtol=1e-4)
        close(f"postprocess[{i}] boxes", r["boxes"], ref["boxes"], atol=1e-3, rtol=1e-4)  # pixels, up to 640


def test_gradients(fx, args):
    "Gradient of loss_total for every parameter; a fresh model so that nothing accumulates."
    model = from_official("detr", fx["state_dict"], args)
    criterion = official_criterion("detr", args)
    out = model(fx["inputs"]["tensors"], fx["inputs"]["mask"])
    total_loss(criterion(out, fx["targets"]), criterion.weight_dict).backward()
    params = dict(model.named_parameters())
    with_grad = {n for n, p in params.items() if p.grad is not None}
    assert with_grad == set(fx["grad_norms"]), "parameters receiving a gradient"
    assert set(fx["grads"]) <= with_grad
    for n, g_ref in fx["grads"].items():
        # relative to the gradient's norm, with an absolute floor of 1e-6 for gradients that are
        # exactly zero in exact arithmetic (see test_zero_gradient_of_first_self_attention)
        err = (params[n].grad - g_ref).norm().item()
        assert err <= 1e-4 * g_ref.norm().item() + 1e-6, f"grad {n}: |diff| {err:.2e}, |ref| {g_ref.norm().item():.2e}"
    for n, norm_ref in fx["grad_norms"].items():
        norm = params[n].grad.norm()
        assert abs(norm.item() - norm_ref.item()) <= 1e-4 * norm_ref.item() + 1e-6, f"grad norm {n}: {norm.item()} vs {norm_ref.item()}"


def test_rejects_missing_and_extra_keys(fx, args):
    sd = dict(fx["state_dict"])
    dropped = sd.pop("transformer.decoder.layers.1.norm3.weight")
    with pytest.raises(CheckpointMismatch, match=r"the model needs is not in the checkpoint: transformer\.decoder\.layers\.1\.norm3\.weight"):
        from_official("detr", sd, args)
    sd["transformer.decoder.layers.1.norm3.weight"] = dropped
    sd["class_embed.extra"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatch, match=r"no place in the model: class_embed\.extra"):
        from_official("detr", sd, args)
    with pytest.raises(CheckpointMismatch, match=r"class_embed\.weight has shape \(92, 64\) in the checkpoint, \(21, 64\) in the model"):
        from_official("detr", fx["state_dict"], {**args, "dataset_file": "voc"})


def test_rejects_unknown_family(fx, args):
    with pytest.raises(ValueError, match="unknown model family 'conditional_detr'"):
        from_official("conditional_detr", fx["state_dict"], args)
    with pytest.raises(ValueError, match="unknown model family"):
        official_criterion("detr_v2", args)


def test_zero_gradient_of_first_self_attention(fx):
    """tgt = 0 at decoder layer 0, so its self-attention values are the bias b_v for every query and
    the output out_proj(b_v) depends on neither W_q, W_k (attention weights sum to 1 over identical
    values) nor W_v (it multiplies zero): the exact gradient of `in_proj_weight` is 0. The official
    gradient is float noise; so is ours (the parity test above uses an absolute floor for it)."""
    g_ref = fx["grads"]["transformer.decoder.layers.0.self_attn.in_proj_weight"]
    assert g_ref.norm() < 1e-5
    assert fx["grads"]["transformer.decoder.layers.1.self_attn.in_proj_weight"].norm() > 1e-2
    b_ref = fx["grads"]["transformer.decoder.layers.0.self_attn.in_proj_bias"]
    C = b_ref.shape[0] // 3
    assert b_ref[:2 * C].norm() < 1e-5 < b_ref[2 * C:].norm()   # only the value bias b_v matters
