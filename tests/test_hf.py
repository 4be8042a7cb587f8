"""Parity with transformers: small random transformers models of every family and variant, saved by transformers,
read by `from_hf`, give the same outputs (logits, boxes, auxiliary outputs, post-processed detections) to 1e-4;
`to_hf` writes folders transformers loads with the same outputs. Nothing is downloaded: the folders are made here,
and the Hub repo-id path is exercised through huggingface_hub's own cache in offline mode."""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip('transformers')
pytest.importorskip('timm')          # transformers' timm backbone (what the Hub checkpoints use)

from detr_explained.family import get_family  # noqa: E402
from detr_explained.hf import from_hf, to_hf, config_from_hf, HFCheckpointError  # noqa: E402

ATOL = 1e-4
SMALL = dict(use_timm_backbone=True, backbone='resnet18', use_pretrained_backbone=False, encoder_layers=1,
             decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
             decoder_attention_heads=2, num_queries=6,
             num_labels=4, auxiliary_loss=True)

# DETR with auxiliary_loss=False: transformers 5.x's DetrDecoder, when auxiliary_loss is True, writes the
# layer-normed state back into the residual stream (`hidden_states = self.layernorm(hidden_states)`), so every
# later layer and the final output see it normed twice, unlike the official DETR; its auxiliary outputs are
# rebuilt here from its own decoder layers, norm and heads instead (see `detr_aux`).
CASES = {
    'detr':                 ('DetrForObjectDetection', 'DetrConfig', dict(d_model=32, auxiliary_loss=False)),
    'detr_learned_pos':     ('DetrForObjectDetection', 'DetrConfig', dict(d_model=32, auxiliary_loss=False,
                                                                          position_embedding_type='learned')),
    'deformable_plain':     ('DeformableDetrForObjectDetection', 'DeformableDetrConfig',
                             dict(d_model=64, encoder_n_points=2, decoder_n_points=2, disable_custom_kernels=True)),
    'deformable_box_refine': ('DeformableDetrForObjectDetection', 'DeformableDetrConfig',
                              dict(d_model=64, encoder_n_points=2, decoder_n_points=2, with_box_refine=True,
                                   disable_custom_kernels=True)),
    'deformable_two_stage': ('DeformableDetrForObjectDetection', 'DeformableDetrConfig',
                             dict(d_model=64, encoder_n_points=2, decoder_n_points=2, with_box_refine=True,
                                  two_stage=True,
                                  two_stage_num_proposals=6, disable_custom_kernels=True)),
    'deformable_single_scale': ('DeformableDetrForObjectDetection', 'DeformableDetrConfig',
                                dict(d_model=64, num_feature_levels=1, encoder_n_points=2, decoder_n_points=2,
                                     disable_custom_kernels=True)),
    'dab':                  ('DabDetrForObjectDetection', 'DabDetrConfig', dict(hidden_size=32)),
    'dab_patterns_keep_pos': ('DabDetrForObjectDetection', 'DabDetrConfig',
                              dict(hidden_size=32, num_patterns=2, random_refpoints_xy=True, keep_query_pos=True)),
}
FAMILY_OF = {'detr': 'detr', 'deformable': 'deformable_detr', 'dab': 'dab_detr'}


def hf_model(case):
    cls, cfg_cls, extra = CASES[case]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**{**SMALL, **extra})).eval()
    with torch.no_grad():                 # move every weight off its special init, so each one matters
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(B=2, H=96, W=128):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, 3, H, W, generator=g)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[-1, :, W * 3 // 4:] = True; mask[-1, H * 2 // 3:] = True          # last image padded right and bottom
    return x, mask


LABELS = [{'class_labels': torch.tensor([1, 3]),
           'boxes': torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]])}] * 2


def load(folder):
    "from_hf, with the auxiliary outputs switched on (the DETR folders have auxiliary_loss=False, see CASES)."
    model = from_hf(folder)
    model.aux_loss = True
    return model


def detr_aux(model, x, mask):
    "DETR's auxiliary outputs from transformers' own decoder layers, final norm and heads (hooks on the layers)."
    states = []
    hooks = [layer.register_forward_hook(lambda m, i, o: states.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.decoder.layers]
    try:
        with torch.no_grad():
            out = model(pixel_values=x, pixel_mask=(~mask).long())
            normed = [model.model.decoder.layernorm(h) for h in states[:-1]]
            aux = [{'pred_logits': model.class_labels_classifier(h), 'pred_boxes': model.bbox_predictor(h).sigmoid()}
                   for h in normed]
    finally:
        for h in hooks: h.remove()
    return out, aux


def hf_outputs(model, x, mask):
    "logits, boxes and the auxiliary outputs (transformers computes those only with labels)."
    if isinstance(model, transformers.DetrForObjectDetection): out, aux = detr_aux(model, x, mask)
    else:
        with torch.no_grad(): out = model(pixel_values=x, pixel_mask=(~mask).long(), labels=LABELS[:len(x)])
        aux = [{'pred_logits': a['logits'], 'pred_boxes': a['pred_boxes']} for a in out.auxiliary_outputs]
    return {'pred_logits': out.logits, 'pred_boxes': out.pred_boxes, 'aux_outputs': aux}


def close(ours, theirs, what):
    d = (ours - theirs).abs().max().item()
    assert ours.shape == theirs.shape and d <= ATOL, \
        f"{what}: max |diff| {d:.2e} (shapes {tuple(ours.shape)}, {tuple(theirs.shape)})"


def compare(ours, theirs, case):
    close(ours['pred_logits'], theirs['pred_logits'], f'{case} logits')
    close(ours['pred_boxes'], theirs['pred_boxes'], f'{case} boxes')
    assert len(ours['aux_outputs']) == len(theirs['aux_outputs']) == SMALL['decoder_layers'] - 1
    for i, (a, b) in enumerate(zip(ours['aux_outputs'], theirs['aux_outputs'])):
        close(a['pred_logits'], b['pred_logits'], f'{case} aux {i} logits')
        close(a['pred_boxes'], b['pred_boxes'], f'{case} aux {i} boxes')


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('hf')
    out = {}
    for case in CASES:
        m = hf_model(case)
        m.save_pretrained(root / case)
        out[case] = (m, root / case)
    return out


@pytest.mark.parametrize('case', list(CASES))
def test_from_hf_matches_transformers(folders, case):
    model, folder = folders[case]
    ours = load(folder)
    assert ours.hf_family == FAMILY_OF[case.split('_')[0]]
    x, mask = inputs()
    with torch.no_grad(): mine = ours(x, mask)
    compare(mine, hf_outputs(model, x, mask), case)


@pytest.mark.parametrize('case', list(CASES))
def test_postprocessed_detections_match(folders, case):
    model, folder = folders[case]
    ours = from_hf(folder)
    x, mask = inputs()
    sizes = torch.tensor([[480, 640], [300, 500]])
    with torch.no_grad():
        theirs = model(pixel_values=x, pixel_mask=(~mask).long())
        mine = ours(x, mask)
    if ours.hf_family == 'detr':
        ref = transformers.DetrImageProcessor().post_process_object_detection(theirs, threshold=0.0, target_sizes=sizes)
        got = get_family('detr').build_postprocess(ours.config)(mine, sizes)
    else:
        k = 10
        ref = transformers.DeformableDetrImageProcessor().post_process_object_detection(theirs, threshold=0.0,
                                                                                         target_sizes=sizes, top_k=k)
        cfg = ours.config.__class__(**{**ours.config.__dict__, 'num_select': k})
        got = get_family(ours.hf_family).build_postprocess(cfg)(mine, sizes)
    for r, g in zip(ref, got):
        keep = g['scores'] > 0.0
        r, g = canonical(r), canonical({k: v[keep] for k, v in g.items()})
        assert torch.equal(r['labels'], g['labels']), case
        close(g['scores'], r['scores'], f'{case} scores')
        close(g['boxes'], r['boxes'], f'{case} boxes (pixels)')   # absolute pixels: 1e-4 of a pixel


def canonical(det):
    "Detections sorted by (score, label, box): queries whose scores tie exactly (here the random DAB-DETR's queries"
    " of one pattern share their class logits) leave a top-k in an order of the implementation's choosing."
    import numpy as np
    b = det['boxes'].numpy()
    order = np.lexsort((b[:, 1], b[:, 0], det['labels'].numpy(), -np.round(det['scores'].numpy(), 5)))
    return {k: v[torch.from_numpy(order)] for k, v in det.items()}


@pytest.mark.parametrize('case', list(CASES))
def test_to_hf_round_trip(folders, case, tmp_path):
    model, folder = folders[case]
    ours = from_hf(folder)
    out = to_hf(ours, tmp_path / 'back', id2label={i: f'class {i}' for i in range(SMALL['num_labels'])})
    cls = type(model)
    again, info = cls.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
    assert again.config.id2label[3] == 'class 3'
    x, mask = inputs(B=1, H=128, W=96)
    compare(hf_outputs(again.eval(), x, mask), hf_outputs(model, x, mask), case)
    assert config_from_hf(json.loads((out / 'config.json').read_text())) == (ours.hf_family, ours.config)


@pytest.mark.parametrize('family,changes', [('detr', {}), ('dab_detr', {}), ('deformable_detr', {'variant': 'plain'}),
                                             ('deformable_detr', {'variant': 'box_refine'}),
                                             ('deformable_detr', {'variant': 'two_stage'})])
def test_library_model_to_hf(tmp_path, family, changes):
    "A model the library built (every weight its own) goes to transformers with the same outputs."
    fam = get_family(family)
    width = 64 if family == 'deformable_detr' else 32
    cfg = fam.config('tiny', backbone='resnet18', hidden_dim=width, nheads=2, num_classes=4, aux_loss=False, **changes)
    torch.manual_seed(0)
    model = fam.build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.05)
    out = to_hf(model, tmp_path / 'lib', family=family, cfg=cfg)
    cls = getattr(transformers, {'detr': 'DetrForObjectDetection', 'dab_detr': 'DabDetrForObjectDetection',
                                 'deformable_detr': 'DeformableDetrForObjectDetection'}[family])
    theirs = cls.from_pretrained(out).eval()
    x, mask = inputs()
    with torch.no_grad():
        mine = model(x, mask)
        ref = theirs(pixel_values=x, pixel_mask=(~mask).long())
    close(mine['pred_logits'], ref.logits, 'library -> transformers logits')
    close(mine['pred_boxes'], ref.pred_boxes, 'library -> transformers boxes')


def test_pytorch_model_bin(folders, tmp_path):
    "The older pickled format is read with weights_only=True."
    from safetensors.torch import load_file
    model, folder = folders['detr']
    shutil.copy(folder / 'config.json', tmp_path / 'config.json')
    torch.save(load_file(folder / 'model.safetensors'), tmp_path / 'pytorch_model.bin')
    x, mask = inputs()
    with torch.no_grad(): a, b = from_hf(tmp_path)(x, mask), from_hf(folder)(x, mask)
    assert torch.equal(a['pred_logits'], b['pred_logits'])


def hub_cache(folder, tmp_path, monkeypatch, repo_id='someone/dab-tiny'):
    "huggingface_hub's cache laid out as its client lays it (refs/main -> snapshots/<sha>/...), used offline."
    hub = pytest.importorskip('huggingface_hub')
    sha = '0123456789abcdef0123456789abcdef01234567'
    repo = tmp_path / ('models--' + repo_id.replace('/', '--'))
    snap = repo / 'snapshots' / sha
    snap.mkdir(parents=True)
    for f in ('config.json', 'model.safetensors'): shutil.copy(folder / f, snap / f)
    (repo / 'refs').mkdir(); (repo / 'refs' / 'main').write_text(sha)
    monkeypatch.setattr(hub.constants, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr(hub.constants, 'HF_HUB_OFFLINE', True)
    return snap


def test_repo_id_through_the_hub_cache(folders, tmp_path, monkeypatch):
    "A repo id resolves through huggingface_hub's cache, offline: nothing is downloaded."
    model, folder = folders['dab']
    hub_cache(folder, tmp_path, monkeypatch)
    ours = from_hf('someone/dab-tiny')
    x, mask = inputs()
    with torch.no_grad(): compare(ours(x, mask), hf_outputs(model, x, mask), 'repo id')


def test_fetch_hf_command(folders, tmp_path, monkeypatch, capsys):
    from detr_explained.hf import main_fetch_hf
    snap = hub_cache(folders['dab'][1], tmp_path, monkeypatch)
    assert main_fetch_hf(['hf:someone/dab-tiny']) == 0
    assert capsys.readouterr().out.startswith(f'hf:someone/dab-tiny: {snap} (DAB-DETR, ')
    assert main_fetch_hf(['hf:someone/not-cached']) == 2
    assert main_fetch_hf(['someone/dab-tiny']) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("detr-explained fetch: error: could not fetch 'someone/not-cached' from the Hub")
    assert err[1] == "detr-explained fetch: error: 'someone/dab-tiny': expected hf:<owner>/<name>"


def test_clear_errors(tmp_path, folders):
    with pytest.raises(HFCheckpointError, match='no config.json'): from_hf(tmp_path)
    (tmp_path / 'x.bin').write_bytes(b'')
    with pytest.raises(HFCheckpointError, match='is a file'): from_hf(tmp_path / 'x.bin')
    with pytest.raises(HFCheckpointError, match='neither a local folder nor a Hub repo id'): from_hf('not a repo id')
    _, folder = folders['detr']
    cfg = json.loads((folder / 'config.json').read_text())
    bad = tmp_path / 'bad'; bad.mkdir()
    (bad / 'config.json').write_text(json.dumps({**cfg, 'num_queries': 7}))
    shutil.copy(folder / 'model.safetensors', bad / 'model.safetensors')
    with pytest.raises(HFCheckpointError, match='query_position_embeddings'): from_hf(bad)


def test_fetch_hf_through_the_cli(folders, tmp_path, monkeypatch, capsys):
    from detr_explained.cli import main
    snap = hub_cache(folders['dab'][1], tmp_path, monkeypatch)
    assert main(['fetch', 'hf:someone/dab-tiny']) == 0
    assert str(snap) in capsys.readouterr().out
