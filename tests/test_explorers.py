"""The attention, sampling-point and anchor explorers (nbs/40-42), headless.

Each explorer is built on the official-code fixture weights of its family, its controls are set
programmatically (`.value`, as a person moving a slider would), and what the figure then shows
(`explorer.shown`: the selected query's box, the map's argmax, the number of points drawn...) is
checked against the capture. The captured attention is checked against a recomputation from the
modules' own weights on the fixture's padded two-image batch, and the hooks are shown to leave
the model's outputs unchanged. Models also load from a training checkpoint and from an
official-format checkpoint file. What a person sees is checked too: the figure fits a notebook
column, every panel keeps the image's shape, every attention map has a colour bar, random weights
are written on the figure, the picture is a PNG that changes with the controls whatever matplotlib
backend is active, and under ipympl the canvas is the widget and takes clicks. The browser itself
is tests/test_lab_browser.py.
"""
import subprocess, sys
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.backend_bases import MouseEvent

from detr_explained.explore_base import (FIG_DPI, FIG_WIDTH, ExplorerImage, LoadedModel, argmax2d, box_to_pixels,
                                         load_image, load_model)
from detr_explained.explore_detr import (AttentionRecorder, DETRExplorer, decoder_map, detr_attention_modules,
                                         encoder_map, mha_weights_by_hand)


def _click(ex, ax, x, y):
    "Send a left click at data coordinates (x, y) of `ax`, as matplotlib would."
    ex.fig.canvas.draw()
    px, py = ax.transData.transform((x, y))
    event = MouseEvent('button_press_event', ex.fig.canvas, px, py, button=1)
    ex.fig.canvas.callbacks.process('button_press_event', event)

def _batch(fx) -> ExplorerImage:
    "The fixture's padded two-image batch as an explorer image (image 0 is the one drawn)."
    x = fx['inputs']['tensors']
    return ExplorerImage(x, np.zeros((*x.shape[-2:], 3), np.float32), 'fixture', fx['inputs']['mask'])

@pytest.fixture(scope='module')
def image():
    return load_image(size=192, max_size=288)

@pytest.fixture(scope='module')
def models(official_fixture):
    cache = {}
    def get(family):
        if family not in cache: cache[family] = load_model('fixture', family)
        return cache[family]
    return get


# ------------------------------------------------------------------ DETR
def test_detr_hooks_capture_per_head_attention_and_change_nothing(models, official_fixture):
    fx, model = official_fixture('detr'), models('detr').model
    x, mask = fx['inputs']['tensors'], fx['inputs']['mask']
    with torch.no_grad():
        plain = model(x, mask)
        with AttentionRecorder(detr_attention_modules(model)) as rec: hooked = model(x, mask)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(hooked['pred_boxes'], plain['pred_boxes'], rtol=0, atol=1e-6)
    torch.testing.assert_close(hooked['pred_boxes'], fx['outputs']['pred_boxes'], rtol=0, atol=1e-4)
    modules = detr_attention_modules(model)
    assert set(rec.records) == set(modules) and len(modules) == 4
    for name, r in rec.records.items():
        M = modules[name].num_heads
        assert r['weights'].shape[:2] == (2, M)                         # per head, not averaged
        by_hand = mha_weights_by_hand(modules[name], r['query'], r['key'], r['key_padding_mask'])
        torch.testing.assert_close(r['weights'], by_hand,
                                   rtol=0, atol=1e-5)
        pad = r['key_padding_mask']                                     # (B, HW): image 1 is padded on the right
        assert pad is not None and pad[1].any()
        assert r['weights'][1][..., pad[1]].abs().max() == 0            # the padding gets no attention


def test_detr_explorer_follows_its_controls(models, image):
    ex = DETRExplorer(models('detr'), image)
    H, W = ex.cap.feature_hw
    for y, x in [(0, 0), (H - 1, W - 2), (H // 2, 1)]:
        ex.controls['row'].value, ex.controls['col'].value = y, x
        assert ex.shown['pixel'] == (y, x)
        expected = encoder_map(ex.cap, ex.value('enc_layer'), y, x)
        torch.testing.assert_close(ex.shown['enc_map'], expected)
        assert ex.shown['enc_argmax'] == argmax2d(expected)
    maps = [ex.shown['enc_map']]
    ex.controls['enc_layer'].value = 0
    assert not torch.equal(ex.shown['enc_map'], maps[0])
    boxes = set()
    for _, q in ex.controls['query'].options:
        ex.controls['query'].value = q
        expected = box_to_pixels(ex.cap.outputs['pred_boxes'][0, q], image.rgb.shape[:2])
        torch.testing.assert_close(torch.tensor(ex.shown['box']), torch.tensor(expected))
        assert ex.shown['dec_argmax'] == argmax2d(decoder_map(ex.cap, ex.value('dec_layer'), q))
        boxes.add(tuple(round(v, 3) for v in ex.shown['box']))
    assert len(boxes) == len(ex.controls['query'].options)            # every query shows its own box
    ex.controls['head'].value = 2
    torch.testing.assert_close(ex.shown['dec_map'], decoder_map(ex.cap, ex.value('dec_layer'), ex.value('query'), 2))
    assert ex.shown['heads_drawn'] == ex.cap.dec_attn.shape[1]
    ex.controls['dec_layer'].value = 0
    aux_box = box_to_pixels(ex.cap.outputs['aux_outputs'][0]['pred_boxes'][0, ex.value('query')], image.rgb.shape[:2])
    torch.testing.assert_close(torch.tensor(ex.shown['box']), torch.tensor(aux_box))
    _click(ex, ex.ax_enc, (W - 1.5) * ex.cap.stride, 0.5 * ex.cap.stride)
    assert ex.shown['pixel'] == (0, W - 2)


def test_detr_explorer_takes_any_image(models):
    for img in [torch.rand(3, 100, 150), (np.random.rand(80, 60, 3) * 255).astype(np.uint8)]:
        ex = DETRExplorer(models('detr'), img, size=96)
        assert min(ex.image.rgb.shape[:2]) == 96
        assert ex.shown['enc_map'].shape == ex.cap.feature_hw


# ------------------------------------------------------------------ DAB-DETR
def test_dab_capture_matches_the_model(models, official_fixture):
    from detr_explained.dab_transformer import positional_attention, split_heads
    from detr_explained.explore_dab import capture_dab
    fx, model = official_fixture('dab_detr'), models('dab_detr').model
    cap = capture_dab(model, _batch(fx))
    official_anchors = fx['intermediates']['transformer_out'][1][:, 0]       # (L, Q, 4) anchors entering each layer
    torch.testing.assert_close(cap.anchors, official_anchors, rtol=0, atol=1e-4)
    torch.testing.assert_close(cap.outputs['pred_boxes'], fx['outputs']['pred_boxes'], rtol=0, atol=1e-4)
    dec = model.transformer.decoder
    for i, (r, layer) in enumerate(zip(cap.records, dec.layers)):
        full = cap.maps['full'][i][None]
        out = layer.cross_attn.out_proj((full @ split_heads(r['v'], layer.nhead)).transpose(1, 2).flatten(2))
        torch.testing.assert_close(out[0], r['output'][0], rtol=0, atol=1e-5)
        pos_map = positional_attention(layer, r['query_sine_embed'], r['pos'], r['mask'])[0]
        torch.testing.assert_close(cap.maps['position'][i], pos_map,
                                   rtol=0, atol=1e-5)
        sine = dec.positional_queries(r['tgt'], cap.anchors[i][None], i)[1][0]
        torch.testing.assert_close(r['query_sine_embed'][0], sine,
                                   rtol=0, atol=1e-5)
        for kind in ('position', 'content', 'full'):
            m = cap.maps[kind][i]
            torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), rtol=0, atol=1e-5)


def test_dab_explorer_follows_its_controls(models, image):
    from detr_explained.explore_dab import DABExplorer, anchor_track, dab_map
    ex = DABExplorer(models('dab_detr'), image)
    cap, hw = ex.cap, image.rgb.shape[:2]
    L, Q = cap.anchors.shape[:2]
    seen_anchors, seen_argmax = set(), set()
    for q in [o[1] for o in ex.controls['query'].options[:3]]:
        ex.controls['query'].value = q
        assert len(ex.shown['track']) == L + 1
        expected = [box_to_pixels(b, hw) for b in anchor_track(cap, q)]
        torch.testing.assert_close(torch.tensor(ex.shown['track']), torch.tensor(expected))
        for layer in range(L):
            ex.controls['layer'].value = layer
            expected = box_to_pixels(cap.anchors[layer, q], hw)
            torch.testing.assert_close(torch.tensor(ex.shown['anchor']), torch.tensor(expected))
            for kind in ('position', 'content', 'full'):
                assert ex.shown[f'{kind}_argmax'] == argmax2d(dab_map(cap, kind, layer, q))
            seen_anchors.add(tuple(round(v, 2) for v in ex.shown['anchor']))
            seen_argmax.add(ex.shown['position_argmax'])
        assert ex.shown['boxes_drawn'] == Q + L + 1
    assert len(seen_anchors) > 3 and len(seen_argmax) > 1                # the picture really changes
    ex.controls['head'].value = 1
    expected = dab_map(cap, 'position', ex.value('layer'), ex.value('query'), 1)
    torch.testing.assert_close(ex.shown['position_map'], expected)
    best = ex.controls['query'].options[0][1]
    ex.controls['query'].value = ex.controls['query'].options[-1][1]
    cx, cy = (cap.anchors[ex.value('layer'), best, :2] * torch.tensor([hw[1], hw[0]])).tolist()
    _click(ex, ex.ax_anchor, cx, cy)
    assert ex.shown['query'] == best


# ------------------------------------------------------------------ Deformable DETR
def test_deformable_capture_matches_the_model(models, official_fixture):
    from detr_explained.explore_deformable import capture_deformable, deformable_attention_modules
    from detr_explained.ms_deform_attn import ms_deform_attn_core
    fx, model = official_fixture('deformable_detr'), models('deformable_detr').model
    cap = capture_deformable(model, _batch(fx))
    torch.testing.assert_close(cap.outputs['pred_boxes'], fx['outputs']['pred_boxes'], rtol=0, atol=1e-4)
    init_ref = fx['intermediates']['transformer_out'][1]                 # (B, Q, 2) official initial reference points
    ratios_x = cap.records['decoder.0']['reference_points'][..., 0, :] / init_ref   # scaled by the valid ratios
    assert torch.allclose(ratios_x, ratios_x[:, :1], atol=1e-4)
    from detr_explained.deformable_transformer import get_valid_ratio
    masks = [F.interpolate(fx['inputs']['mask'][None].float(), size=hw).bool()[0] for hw in cap.spatial_shapes[:3]]
    ratios = [get_valid_ratio(m)[0] for m in masks]                      # image 0: 96 x 128 in a 112 x 128 batch
    for (ew, eh), (rx, ry) in zip(cap.extents, ratios):
        assert abs(ew - 128 / float(rx)) < 1e-4 and abs(eh - 96 / float(ry)) < 1e-4
    for name, m in deformable_attention_modules(model).items():
        r = cap.records[name]
        loc, w = m.sample_points(r['query'], r['reference_points'], r['input_spatial_shapes'])
        torch.testing.assert_close(r['locations'], loc, rtol=0, atol=1e-6)
        torch.testing.assert_close(r['weights'], w, rtol=0, atol=1e-6)
        value = m.value_proj(r['input_flatten']).masked_fill(r['input_padding_mask'][..., None], 0.)
        out = m.output_proj(ms_deform_attn_core(value.view(*value.shape[:2], m.n_heads, -1), r['input_spatial_shapes'],
                                                r['locations'], r['weights']))
        torch.testing.assert_close(out, r['output'], rtol=0, atol=1e-5)


def test_deformable_explorer_follows_its_controls(models, image):
    from detr_explained.explore_deformable import DeformableExplorer, encoder_query
    ex = DeformableExplorer(models('deformable_detr'), image)
    cap, hw = ex.cap, image.rgb.shape[:2]
    M, L, P = cap.dec[0]['weights'].shape[1:]
    assert ex.shown['dec_points'] == M * L * P and ex.shown['level_points'] == [M * P] * L
    ex.controls['level'].value = L - 1
    assert ex.shown['dec_points'] == M * P
    ex.controls['head'].value = 0
    assert ex.shown['dec_points'] == P and ex.shown['level_points'] == [P] * L
    ex.controls['level'].value = -1
    assert ex.shown['dec_points'] == L * P
    refs = set()
    for _, q in ex.controls['query'].options:
        ex.controls['query'].value = q
        expected = box_to_pixels(cap.outputs['pred_boxes'][0, q], hw)
        torch.testing.assert_close(torch.tensor(ex.shown['box']), torch.tensor(expected))
        refs.add(tuple(round(v, 2) for v in ex.shown['reference']))
    assert len(refs) == len(ex.controls['query'].options)
    for level in range(L):
        ex.controls['enc_level'].value = level
        H, W = cap.spatial_shapes[level]
        assert (ex.controls['row'].max, ex.controls['col'].max) == (H - 1, W - 1)
        ex.controls['row'].value, ex.controls['col'].value = H - 1, 0
        assert ex.shown['enc_query'] == encoder_query(cap, level, H - 1, 0)
        ew, eh = cap.extents[level]
        expected = [0.5 / W * ew, (H - 0.5) / H * eh]
        torch.testing.assert_close(torch.tensor(ex.shown['enc_reference']), torch.tensor(expected))
    _click(ex, ex.ax_enc, 0.5 / W * ew, 0.5 / H * eh)
    assert ex.shown['enc_query'] == encoder_query(cap, L - 1, 0, 0)


# ------------------------------------------------------------------ loading from checkpoints
def test_explorer_on_a_training_checkpoint(tmp_path):
    from detr_explained.synthetic import make_synthetic
    from detr_explained.train import Trainer, datasets_from_folder, model_config, train_config
    data = make_synthetic(tmp_path/'data', n_train=4, n_val=2, size=64)
    tcfg = train_config('tiny', family='detr')
    train_ds, _ = datasets_from_folder(data, tcfg)
    path = Trainer(tcfg, model_config('detr', 'tiny'), train_ds, tmp_path/'run', progress=False).save()
    lm = load_model(path)
    assert lm.family == 'detr' and lm.image_size == 64 and not lm.model.training
    assert set(lm.names.values()) == set(train_ds.names.values())
    ex = DETRExplorer(lm)                                               # image size from the checkpoint
    assert min(ex.image.rgb.shape[:2]) == 64
    known = set(train_ds.names.values()) | {f'class {i}' for i in range(100)}
    assert all(opt[0].split(': ')[1].rsplit(' ', 1)[0] in known
               for opt in ex.controls['query'].options)
    with pytest.raises(ValueError, match='not'):
        load_model(path, family='dab_detr')


def test_explorer_on_an_official_format_checkpoint(tmp_path, official_fixture):
    fx = official_fixture('dab_detr')
    path = tmp_path/'dab_checkpoint.pth'
    torch.save({'model': fx['state_dict'], 'args': fx['config']['args']}, path)
    lm = load_model(path)
    assert isinstance(lm, LoadedModel) and lm.family == 'dab_detr'
    with torch.no_grad(): out = lm.model(fx['inputs']['tensors'], fx['inputs']['mask'])
    torch.testing.assert_close(out['pred_boxes'], fx['outputs']['pred_boxes'], rtol=0, atol=1e-4)


# ------------------------------------------------------------------ what a person sees
def _explorers(models, image):
    from detr_explained.explore_dab import DABExplorer
    from detr_explained.explore_deformable import DeformableExplorer
    return {'detr': DETRExplorer(models('detr'), image),
            'deformable_detr': DeformableExplorer(models('deformable_detr'), image),
            'dab_detr': DABExplorer(models('dab_detr'), image)}


def test_figures_fit_a_column_keep_the_image_shape_and_say_random_weights(models, image):
    aspect = image.rgb.shape[0] / image.rgb.shape[1]
    for family, ex in _explorers(models, image).items():
        W, H = ex.fig.get_size_inches()
        assert W * FIG_DPI == pytest.approx(800) and W == FIG_WIDTH, family
        panels = [ax for ax in ex.fig.axes if ax.images and ax.get_visible()]
        assert len(panels) >= 4, family
        for ax in panels:                                             # no squeezing: each panel has the image's shape
            x0, y0, w, h = ax.get_position().bounds
            assert h * H / (w * W) == pytest.approx(aspect, rel=1e-6), family
            assert ax.title.get_fontsize() >= 9, family                # readable at 100 % zoom
        right = ex.fig.bbox.x1
        for t in [*ex.fig.texts, *(ax.title for ax in panels)]:          # no title or banner cut off at an edge
            box = t.get_window_extent()
            assert box.x0 >= 0 and box.x1 <= right, (family, t.get_text(), box, right)
        texts = [t.get_text() for t in ex.fig.texts]
        assert any('random weights' in t for t in texts), (family, texts)
        bars = [ax for ax in ex.fig.axes if hasattr(ax, '_colorbar')]
        maps = [ax for ax in panels if len(ax.images) > 1]             # an attention map drawn over the photo
        if family == 'deformable_detr':
            assert maps == [] and ex.ax_enc.get_legend().get_title().get_text() == 'attention weight'
        else:
            M = ex.cap.dec_attn.shape[1] if family == 'detr' else ex.cap.maps['position'].shape[1]
            heads_rows = -(-(M + 1) // 5)
            big = 2 if family == 'detr' else 3
            assert len(maps) > big and len(bars) == big + heads_rows + (family == 'dab_detr'), family  # + DAB's layers
            for ax in maps:                                          # one colour bar per big map, one per head row
                assert any(b.get_position().y0 == pytest.approx(ax.get_position().y0) and
                           b.get_position().x0 > ax.get_position().x0 for b in bars), family


def test_the_picture_is_a_png_that_follows_the_controls(models, image):
    from PIL import Image
    import io
    ex = DETRExplorer(models('detr'), image)
    assert ex.view.value == b''                                        # nothing rendered while not on screen
    bundle = ex._repr_mimebundle_()
    assert {'image/png', 'application/vnd.jupyter.widget-view+json'} <= set(bundle)
    first = ex.view.value
    w, h = Image.open(io.BytesIO(first)).size
    assert w == 800 and abs(h - ex.fig.get_size_inches()[1] * FIG_DPI) <= 1     # the figure's own size, uncropped
    ex.controls['row'].value = 0
    assert ex.view.value != first
    opts = ex.controls['query'].options                                # no option wider than its dropdown
    assert ex.controls['query'].layout.width == f"{len('query') + max(len(t) for t, _ in opts) + 8}ch"
    assert ex.picture().data[:4] == b'\x89PNG'


def test_random_weights_without_the_shared_folder(tmp_path, image):
    "With no ../shared and no download: the course model where one ships, else random weights; the figure says which."
    env = {'DETR_EXPLAINED_SHARED': str(tmp_path/'none'), 'DETR_EXPLAINED_CACHE': str(tmp_path/'cache')}
    code = """
from detr_explained.explore_base import default_source, load_model, load_image
from detr_explained.explore_dab import DABExplorer
from detr_explained.course import course_model_names
assert default_source('dab_detr') == ('course' if 'dab_detr' in course_model_names() else 'random')
lm = load_model('random', 'dab_detr')                          # random weights when asked, and said so
ex = DABExplorer(lm, load_image(size=96))
texts = [t.get_text() for t in ex.fig.texts]
assert lm.random_weights and any('random weights (untrained)' in t for t in texts), texts
if 'deformable_detr' in course_model_names():                 # the shipped course model, without ../shared
    from detr_explained.explore_deformable import DeformableExplorer
    assert default_source('deformable_detr') == 'course'
    dx = DeformableExplorer(load_model(family='deformable_detr'))
    texts = [t.get_text() for t in dx.fig.texts]
    assert any("course model 'deformable_detr'" in t for t in texts) and not dx.lm.random_weights, texts
    assert dx.image.name == 'ndarray' and set(dx.names.values()) >= {'ellipse', 'rectangle', 'triangle'}
print('ok', ex.image.name)
"""
    import os
    r = subprocess.run([sys.executable, '-c', code], env={**os.environ, **env, 'OMP_NUM_THREADS': '1'},
                       capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and 'ok synthetic' in r.stdout, r.stderr[-2000:]


def test_ipympl_canvas_is_the_widget_and_takes_clicks(official_dir):
    "Under `%matplotlib widget` the figure is an ipympl canvas (a widget) and a click on it moves the pixel."
    pytest.importorskip('ipympl')
    code = """
import matplotlib; matplotlib.use('module://ipympl.backend_nbagg')
import ipywidgets
from matplotlib.backend_bases import MouseEvent
from detr_explained.explore_base import load_model, load_image
from detr_explained.explore_detr import DETRExplorer
ex = DETRExplorer(load_model('fixture', 'detr'), load_image(size=128, max_size=192))
assert ex.view is ex.fig.canvas and isinstance(ex.fig.canvas, ipywidgets.DOMWidget), type(ex.fig.canvas)
assert ex.fig.canvas in ex.widget.children
ex.fig.canvas.draw()
s = ex.cap.stride
px, py = ex.ax_enc.transData.transform((1.5 * s, 0.5 * s))
ex.fig.canvas.callbacks.process('button_press_event', MouseEvent('button_press_event', ex.fig.canvas, px, py, button=1))
assert ex.shown['pixel'] == (0, 1), ex.shown['pixel']
print('ok')
"""
    import os
    r = subprocess.run([sys.executable, '-c', code], env={**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': ''},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith('ok'), r.stderr[-2000:]
