"""ONNX export of every family and variant: the graph passes onnx.checker, has dynamic batch/height/width, and ONNX
Runtime matches PyTorch (<= 1e-4 on logits and boxes) at three batch/image sizes other than the traced example;
the ONNX predictor and the `export` / `predict --onnx` command-line functions."""
import argparse
import json

import pytest
import torch

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

import detr_explained.official  # noqa: E402,F401  (registers every family)
from detr_explained.family import get_family, family_names  # noqa: E402
from detr_explained.export import (export_onnx, compare_onnx, model_metadata, OnnxDetector, CHECK_SIZES,  # noqa: E402
                                   EXAMPLE_SIZE, add_export_args, run_export, predict_files_onnx, export_levels)

ATOL = 1e-4
VARIANTS = {'deformable_detr': [{'variant': v} for v in ('plain', 'box_refine', 'two_stage')]}


def cases():
    for name in family_names():
        for changes in VARIANTS.get(name, [{}]):
            yield pytest.param(name, changes, id='-'.join([name, *changes.values()]))


def tiny(name, changes):
    fam = get_family(name)
    width = 64 if 'deformable' in name else 32          # GroupNorm(32, C) in the deformable input projections
    cfg = fam.config('tiny', backbone='resnet18', hidden_dim=width, nheads=2, num_classes=5, **changes)
    torch.manual_seed(0)
    model = fam.build_model(cfg).eval()
    with torch.no_grad():                  # off the special init (zero sampling weights, zero box heads ...)
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.02)
    return model, cfg


def test_check_sizes_differ_from_the_example():
    assert all((B, H, W) != (EXAMPLE_SIZE[0], *EXAMPLE_SIZE[2:]) for B, H, W in CHECK_SIZES) and len(CHECK_SIZES) >= 2
    assert any(H > W for _, H, W in CHECK_SIZES) and any(H < W for _, H, W in CHECK_SIZES)


@pytest.mark.parametrize('name,changes', list(cases()))
def test_onnx_matches_pytorch(tmp_path, name, changes):
    model, cfg = tiny(name, changes)
    path = export_onnx(model, tmp_path / 'm.onnx', model_metadata(name, cfg, 320))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {'pixel_values': ['batch', 3, 'height', 'width'], 'pixel_mask': ['batch', 'height', 'width']}
    ops = {n.op_type for n in proto.graph.node}
    if 'deformable' in name: assert 'GridSample' in ops          # the reference sampling path
    for row in compare_onnx(model, path, CHECK_SIZES):
        assert row['logits'] <= ATOL and row['boxes'] <= ATOL, (name, changes, row)


def test_export_leaves_the_library_as_it_was():
    from detr_explained import deformable_transformer as dt, ms_deform_attn as msda
    before = (dt.flatten_levels, dt.encoder_reference_points, dt.encoder_proposals,
              msda.ms_deform_attn_core_reference, msda.MSDeformAttn.forward)
    with pytest.raises(RuntimeError):
        with export_levels(): raise RuntimeError('boom')
    assert before == (dt.flatten_levels, dt.encoder_reference_points, dt.encoder_proposals,
                      msda.ms_deform_attn_core_reference, msda.MSDeformAttn.forward)


def test_onnx_predictor_equals_library_predict(tmp_path):
    from PIL import Image
    import numpy as np
    from detr_explained.evaluate import predict_image
    model, cfg = tiny('dab_detr', {})
    names = {i: f'c{i}' for i in range(5)}
    path = export_onnx(model, tmp_path / 'dab.onnx', model_metadata('dab_detr', cfg, 224, names))
    image = Image.fromarray((np.random.default_rng(0).random((240, 320, 3)) * 255).astype('uint8'))
    det = OnnxDetector(path)
    assert (det.family, det.image_size, det.names[4]) == ('dab_detr', 224, 'c4')
    got = det.predict_image(image)
    ref = predict_image(model, get_family('dab_detr').build_postprocess(cfg), image, 224)
    assert torch.equal(got['labels'], ref['labels'])
    assert (got['scores'] - ref['scores']).abs().max() <= ATOL
    assert (got['boxes'] - ref['boxes']).abs().max() <= 1e-2                # absolute pixels on a 320x240 image


def test_cli_functions(tmp_path, capsys):
    from PIL import Image
    pytest.importorskip('transformers')
    transformers = pytest.importorskip('transformers')
    pytest.importorskip('timm')
    torch.manual_seed(0)
    hf = transformers.DetrForObjectDetection(transformers.DetrConfig(
        use_timm_backbone=True, backbone='resnet18', use_pretrained_backbone=False, d_model=32, encoder_layers=1,
        decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=6, id2label={0: 'cat', 1: 'dog'})).eval()
    hf.save_pretrained(tmp_path / 'hub')
    parse = add_export_args(argparse.ArgumentParser()).parse_args
    assert run_export(parse(['--hf', str(tmp_path / 'hub'), '--out', str(tmp_path / 'm.onnx')])) == 0
    assert 'ONNX Runtime = PyTorch within' in capsys.readouterr().out
    Image.new('RGB', (200, 150), (120, 30, 200)).save(tmp_path / 'a.png')
    (tmp_path / 'broken.jpg').write_bytes(b'not an image')
    files = [tmp_path / 'a.png', tmp_path / 'broken.jpg']
    recs = predict_files_onnx(tmp_path / 'm.onnx', files, tmp_path / 'pred', 0.0)
    assert len(recs[0]['detections']) == 6 and {d['label'] for d in recs[0]['detections']} <= {'cat', 'dog'}
    assert 'error' in recs[1]
    assert json.loads((tmp_path / 'pred' / 'detections.json').read_text())[0]['file'].endswith('a.png')
    assert run_export(parse(['--hf', str(tmp_path / 'hub'), '--out', str(tmp_path / 'm.pt')])) == 2
    assert run_export(parse(['--checkpoint', str(tmp_path / 'missing.pt'), '--out', str(tmp_path / 'x.onnx')])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"detr-explained export: error: --out {tmp_path / 'm.pt'}: expected a file name ending in .onnx",
                   f"detr-explained export: error: --checkpoint {tmp_path / 'missing.pt'}: no such file"]
    with pytest.raises(FileNotFoundError, match='ONNX model not found'): OnnxDetector(tmp_path / 'nope.onnx')


def test_command_line(tmp_path, capsys):
    "`detr-explained export --hf ...` then `detr-explained predict --onnx ...`, through the CLI's main."
    from PIL import Image
    from detr_explained.cli import main
    transformers = pytest.importorskip('transformers')
    pytest.importorskip('timm')
    torch.manual_seed(0)
    transformers.DabDetrForObjectDetection(transformers.DabDetrConfig(
        use_timm_backbone=True, backbone='resnet18', use_pretrained_backbone=False, hidden_size=32, encoder_layers=1,
        decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=5, num_labels=3)).save_pretrained(tmp_path / 'dab')
    onnx_file = str(tmp_path / 'dab.onnx')
    assert main(['export', '--hf', str(tmp_path / 'dab'), '--out', onnx_file, '--image-size', '128']) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'dab.onnx'} (dab_detr, ")
    Image.new('RGB', (160, 120), (10, 200, 30)).save(tmp_path / 'g.png')
    assert main(['predict', '--onnx', str(tmp_path / 'dab.onnx'), str(tmp_path / 'g.png'), '--out', str(tmp_path / 'p'),
                 '--threshold', '0']) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'g.png'}: " in out and (tmp_path / 'p' / 'detections.json').exists()
    assert main(['predict', '--onnx', str(tmp_path / 'dab.onnx'), '--checkpoint', 'c.pt', str(tmp_path / 'g.png')]) == 2
    assert 'not allowed with argument' in capsys.readouterr().err
