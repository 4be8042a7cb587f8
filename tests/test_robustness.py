"""Issue 11: no AP silently wrong, no dataset overwritten, no prediction lost — with real files.

Each test builds what a user would have on disk (COCO files with bad annotation ids, a phone
photo with an EXIF rotation, 32-bit float TIFFs, a folder holding someone's dataset, two
photos with the same name) and checks the library's answer. Downloads: tests/test_hub.py.
"""
import contextlib
import io
import json
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_explained.coco_subset import CocoSubsetError, make_coco_subset
from detr_explained.data import CocoDetection, DatasetError, find_split, load_rgb, make_coco_transforms, read_coco_json
from detr_explained.evaluate import coco_evaluate, predict_files
from detr_explained.synthetic import make_synthetic


def coco_files(root: Path, ann_ids, size=(64, 48), json_size=None, split='val') -> Path:
    "Three images with one or two boxes each; annotation ids from `ann_ids` (None: no 'id' field)."
    (root/'images').mkdir(parents=True, exist_ok=True); (root/'annotations').mkdir(exist_ok=True)
    w, h = json_size or size
    images = [{'id': i, 'file_name': f'{i}.png', 'width': w, 'height': h} for i in (1, 2, 3)]
    for im in images: Image.new('RGB', size, (40 * im['id'], 90, 90)).save(root/'images'/im['file_name'])
    boxes = [(1, [4, 4, 20, 16], 1), (1, [30, 10, 12, 30], 2), (2, [10, 5, 40, 30], 1), (3, [0, 0, 16, 16], 2)]
    anns = []
    for k, (image_id, bbox, cat) in enumerate(boxes):
        a = {'image_id': image_id, 'category_id': cat, 'bbox': bbox, 'area': bbox[2] * bbox[3], 'iscrowd': 0}
        if ann_ids[k] is not None: a['id'] = ann_ids[k]
        anns.append(a)
    d = {'images': images, 'annotations': anns, 'categories': [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}]}
    (root/'annotations'/f'instances_{split}.json').write_text(json.dumps(d))
    return root


def perfect(d: dict) -> list[dict]:
    return [{'image_id': a['image_id'], 'category_id': a['category_id'], 'bbox': a['bbox'], 'score': 1.0}
            for a in d['annotations']]


def pycocotools_ap(path: Path) -> float:
    "What pycocotools alone reports for perfect detections of the file at `path`."
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        E = COCOeval(gt, gt.loadRes(perfect(json.loads(path.read_text()))), 'bbox')
        E.evaluate(); E.accumulate(); E.summarize()
    return float(E.stats[0])


# --- COCOeval: annotation ids ---------------------------------------------------------------------

@pytest.mark.parametrize('ids, why', [([0, 1, 2, 3], 'has id 0'), ([1, 1, 2, 3], 'id 1 is repeated'),
                                      ([None, None, None, None], 'has no id'), ([5, 'x', 6, 7], "has id 'x'"),
                                      ([-1, 2, 3, 4], 'has id -1')])
def test_perfect_detections_score_ap_1_whatever_the_annotation_ids(tmp_path, ids, why):
    root = coco_files(tmp_path, ids)
    ann = root/'annotations'/'instances_val.json'
    if None not in ids and 'x' not in ids and -1 not in ids:
        assert pycocotools_ap(ann) < 0.99                      # the failure being guarded against is real
    with pytest.warns(UserWarning, match=f'renumbered 1..4 because .*{why}'):
        ds = CocoDetection(*find_split(root, 'val'))
    assert [a['id'] for a in ds.coco.dataset['annotations']] == [1, 2, 3, 4]
    m = coco_evaluate(ds.coco, perfect(ds.coco.dataset))
    assert m['AP'] == pytest.approx(1.0) and m['AP50'] == pytest.approx(1.0)
    assert all(v['AP'] == pytest.approx(1.0) for v in m['per_class'].values())


def test_a_coco_index_made_elsewhere_is_renumbered_for_the_evaluation(tmp_path):
    ann = coco_files(tmp_path, [0, 3, 3, 4])/'annotations'/'instances_val.json'
    with contextlib.redirect_stdout(io.StringIO()): gt = COCO(str(ann))       # pycocotools' own reader
    assert pycocotools_ap(ann) < 0.99
    with pytest.warns(UserWarning, match='renumbered'):
        assert coco_evaluate(gt, perfect(gt.dataset))['AP'] == pytest.approx(1.0)
    assert [a['id'] for a in gt.dataset['annotations']] == [0, 3, 3, 4]       # the caller's index is not changed


def test_good_ids_are_kept_without_a_warning(tmp_path):
    root = coco_files(tmp_path, [10, 20, 30, 40])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ds = CocoDetection(*find_split(root, 'val'))
        assert coco_evaluate(ds.coco, perfect(ds.coco.dataset))['AP'] == pytest.approx(1.0)
    assert [a['id'] for a in ds.coco.dataset['annotations']] == [10, 20, 30, 40]


@pytest.mark.parametrize('where, value, message', [
    ('images', {'id': '1'}, "images[0].id must be an integer, got '1'"),
    ('images', {'width': '64'}, "images[0].width must be a positive integer, got '64'"),
    ('images', {'height': 0}, 'images[0].height must be a positive integer, got 0'),
    ('images', {'file_name': 7}, 'images[0].file_name must be a non-empty string, got 7'),
    ('annotations', {'image_id': [1]}, 'annotations[0].image_id must be an integer, got [1]'),
    ('annotations', {'category_id': 1.5}, 'annotations[0].category_id must be an integer, got 1.5'),
    ('annotations', {'iscrowd': 'no'}, "annotations[0].iscrowd must be 0 or 1, got 'no'"),
    ('annotations', {'area': 'big'}, "annotations[0].area must be a finite number, got 'big'"),
    ('categories', {'id': None}, 'categories[0].id must be an integer, got None'),
    ('categories', {'name': 3}, 'categories[0].name must be a string, got 3')])
def test_wrong_json_field_types_are_named(tmp_path, where, value, message):
    ann = coco_files(tmp_path, [1, 2, 3, 4])/'annotations'/'instances_val.json'
    d = json.loads(ann.read_text()); d[where][0].update(value); ann.write_text(json.dumps(d))
    with pytest.raises(DatasetError) as e: read_coco_json(ann)
    assert str(e.value) == f'{ann}: {message}'


def test_a_huge_category_id_suggests_remapping(tmp_path):
    ann = coco_files(tmp_path, [1, 2, 3, 4])/'annotations'/'instances_val.json'
    d = json.loads(ann.read_text()); d['categories'][1]['id'] = 2**31
    for a in d['annotations']: a['category_id'] = 2**31 if a['category_id'] == 2 else 1
    ann.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match=r'category id 2147483648 would make a classifier with 2147483649 outputs '
                                           r'for 2 categories; use remap_categories=True \(--remap-categories\)'):
        CocoDetection(*find_split(tmp_path, 'val'))
    assert CocoDetection(*find_split(tmp_path, 'val'), remap_categories=True).num_classes == 2


# --- images: EXIF orientation, decoded size, bit depth --------------------------------------------

def _phone_photo(path: Path, orientation: int, stored=(80, 60)):
    "An image stored landscape with a red top-left corner and an EXIF orientation tag."
    im = Image.new('RGB', stored, (0, 0, 0)); im.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif(); exif[0x0112] = orientation
    im.save(path, exif=exif)


@pytest.mark.parametrize('orientation, shown, red_at', [(1, (80, 60), (2, 2)), (3, (80, 60), (77, 57)),
                                                        (6, (60, 80), (57, 2)), (8, (60, 80), (2, 77))])
def test_exif_orientation_is_applied(tmp_path, orientation, shown, red_at):
    _phone_photo(tmp_path/'p.png', orientation)
    im = load_rgb(tmp_path/'p.png')
    assert im.size == shown and im.getpixel(red_at) == (255, 0, 0)


def test_boxes_follow_the_photo_as_shown(tmp_path):
    "Annotated on the displayed (rotated) photo: the box lands on the red corner after the rotation."
    root = tmp_path; (root/'images').mkdir(); (root/'annotations').mkdir()
    _phone_photo(root/'images'/'p.jpg', 6)
    d = {'images': [{'id': 1, 'file_name': 'p.jpg', 'width': 60, 'height': 80}],
         'categories': [{'id': 1, 'name': 'red'}],
         'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [50, 0, 10, 10]}]}
    (root/'annotations'/'instances_val.json').write_text(json.dumps(d))
    image, target = CocoDetection(*find_split(root, 'val')).load(0)
    x0, y0, x1, y1 = map(int, target['boxes'][0].tolist())
    patch = np.asarray(image)[y0 + 2:y1 - 2, x0 + 2:x1 - 2]
    assert image.size == (60, 80) and patch[..., 0].min() > 200 and patch[..., 1].max() < 60


@pytest.mark.parametrize('orientation, json_size, message', [
    (1, (64, 48), r'p\.jpg: the image is 80x60 pixels, but instances_val\.json says 64x48 \(width x height\) '
                  r'for image id 1$'),
    (6, (80, 60), r'p\.jpg: the image is 60x80 pixels after its EXIF rotation, but instances_val\.json says 80x60 '
                  r'.*unrotated image\?')])
def test_decoded_size_must_match_the_json(tmp_path, orientation, json_size, message, capsys):
    root = tmp_path; (root/'images').mkdir(); (root/'annotations').mkdir()
    _phone_photo(root/'images'/'p.jpg', orientation)
    d = {'images': [{'id': 1, 'file_name': 'p.jpg', 'width': json_size[0], 'height': json_size[1]}],
         'categories': [{'id': 1, 'name': 'red'}], 'annotations': []}
    (root/'annotations'/'instances_val.json').write_text(json.dumps(d))
    ds = CocoDetection(*find_split(root, 'val'), make_coco_transforms('val', 48))
    with pytest.raises(DatasetError, match=message): ds[0]


@pytest.mark.parametrize('name, array', [
    ('float01.tiff', np.full((6, 8), 0.5, np.float32)), ('float255.tiff', np.full((6, 8), 127.5, np.float32)),
    ('int32_8bit.tiff', np.full((6, 8), 127, np.int32)),
    ('int32_16bit.tiff', np.full((6, 8), 127 * 256 + 200, np.int32)),
    ('uint16.png', np.full((6, 8), 127 * 256 + 200, np.uint16))])
def test_high_bit_depth_images_are_scaled(tmp_path, name, array):
    Image.fromarray(array).save(tmp_path/name)
    assert np.asarray(load_rgb(tmp_path/name)).tolist() == np.full((6, 8, 3), 127).tolist()


@pytest.mark.parametrize('array', [np.full((6, 8), -1., np.float32), np.full((6, 8), 300., np.float32),
                                   np.full((6, 8), np.nan, np.float32), np.full((6, 8), 70_000, np.int32),
                                   np.full((6, 8), -5, np.int32)])
def test_images_without_a_known_scale_are_refused(tmp_path, array):
    Image.fromarray(array).save(tmp_path/'x.tiff')
    with pytest.raises(DatasetError, match=r"x\.tiff: a '(F|I)' image with values from .*no known scale to 8 bits"):
        load_rgb(tmp_path/'x.tiff')


# --- datasets the commands did not write ----------------------------------------------------------

def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_make_synthetic_never_overwrites_another_dataset(tmp_path):
    coco = coco_files(tmp_path/'coco', [1, 2, 3, 4], split='train')
    before = _tree(coco)
    for overwrite in (False, True):
        with pytest.raises(DatasetError, match=r"refusing to write the synthetic dataset there: "
                                               r"annotations/instances_train\.json was not written by make_synthetic\. "
                                               r"Choose a new or empty folder"):
            make_synthetic(coco, n_train=2, n_val=1, overwrite=overwrite)
    assert _tree(coco) == before
    (coco/'annotations'/'instances_train.json').unlink()
    with pytest.raises(DatasetError, match=r"images/ holds files it does not write, "
                                           r"e\.g\. \['1\.png', '2\.png', '3\.png'\]"):
        make_synthetic(coco, n_train=2, n_val=1)
    (tmp_path/'notes').mkdir(); (tmp_path/'notes'/'README.md').write_text('mine')
    with pytest.raises(DatasetError, match='README.md was not written by make_synthetic'):
        make_synthetic(tmp_path/'notes', n_train=2, n_val=1)
    (tmp_path/'file').write_text('x')
    with pytest.raises(DatasetError, match='it is a file'): make_synthetic(tmp_path/'file', n_train=2, n_val=1)
    # its own dataset: completed after a kill (images, no annotation file yet), replaced with other settings
    ours = make_synthetic(tmp_path/'ours', n_train=3, n_val=1)
    (ours/'annotations'/'instances_train.json').unlink()
    make_synthetic(ours, n_train=3, n_val=1)
    make_synthetic(ours, n_train=2, n_val=1, seed=5)
    assert sorted(p.name for p in (ours/'images').iterdir()) == ['train_000000.png', 'train_000001.png',
                                                                 'val_000000.png']
    assert json.loads((ours/'annotations'/'instances_train.json').read_text())['info']['seed'] == 5


@pytest.fixture
def archive(tmp_path):
    "A local annotation archive of a 3-image val2017, and a server folder with the images."
    served = coco_files(tmp_path/'served', [1, 2, 3, 4], split='val2017')
    shutil.move(served/'images', served/'val2017')
    ann = json.loads((served/'annotations'/'instances_val2017.json').read_text())
    with zipfile.ZipFile(tmp_path/'annotations_trainval2017.zip', 'w') as z:
        z.writestr('annotations/instances_val2017.json', json.dumps(ann))
    return tmp_path/'annotations_trainval2017.zip', served


def test_coco_subset_never_overwrites_another_dataset(tmp_path, archive, monkeypatch):
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost'); monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    from http_server import LocalFileServer
    zip_path, served = archive
    real = tmp_path/'data'/'coco'                          # the real COCO, where coco-subset writes by default
    (real/'annotations').mkdir(parents=True); (real/'val2017').mkdir()
    official = {'info': {'description': 'COCO 2017'}, 'images': []}
    (real/'annotations'/'instances_val2017.json').write_text(json.dumps(official))
    (real/'val2017'/'000000000139.jpg').write_bytes(b'jpeg')
    before = _tree(real)
    with LocalFileServer(served) as srv:
        with pytest.raises(CocoSubsetError, match='instances_val2017.json exists and was not written by coco-subset'):
            make_coco_subset(real, 'val2017', 2, annotations=zip_path, images_url=srv.url, progress=False)
        (real/'annotations'/'instances_val2017.json').unlink(); del before['annotations/instances_val2017.json']
        with pytest.raises(CocoSubsetError, match=r'val2017 already holds 1 files \(e\.g\. 000000000139\.jpg\) '
                                                  r'and no coco-subset was started there'):
            make_coco_subset(real, 'val2017', 2, annotations=zip_path, images_url=srv.url, progress=False)
        assert _tree(real) == before and srv.log == []
        # its own subset: an interrupted one is resumed, a finished one grown
        out = tmp_path/'subset'
        srv.faults['/val2017/2.png'] = [__import__('http_server').Fault(status=404)]
        with pytest.raises(CocoSubsetError, match='1 of 3 images failed'):
            make_coco_subset(out, 'val2017', 3, annotations=zip_path, images_url=srv.url, progress=False, retries=0)
        assert (out/'.coco-subset-val2017.json').exists()
        assert sorted(p.name for p in (out/'val2017').iterdir()) == ['1.png', '3.png']
        make_coco_subset(out, 'val2017', 3, annotations=zip_path, images_url=srv.url, progress=False)
        assert not (out/'.coco-subset-val2017.json').exists()
        make_coco_subset(out, 'val2017', 2, annotations=zip_path, images_url=srv.url, progress=False)
    assert len(json.loads((out/'annotations'/'instances_val2017.json').read_text())['images']) == 2


# --- predict: every input its own picture, no record lost -----------------------------------------

@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    from detr_explained.train import Trainer, model_config, train_config
    tmp = tmp_path_factory.mktemp('ckpt')
    root = make_synthetic(tmp/'syn', n_train=4, n_val=2, size=48)
    ds = CocoDetection(*find_split(root, 'train'), make_coco_transforms('train', 48, 'flip'))
    cfg = model_config('detr', 'tiny', num_classes=ds.num_classes)
    run = Trainer(train_config('tiny', max_steps=1), cfg, ds, tmp/'run', progress=False)
    run.fit()
    return run.checkpoint_path, root


def test_predict_same_stem_in_two_folders_and_an_unreadable_file(tmp_path, checkpoint):
    ckpt, data = checkpoint
    for d in ('a', 'b', 'c'): (tmp_path/d).mkdir()
    shutil.copy(data/'images'/'train_000000.png', tmp_path/'a'/'photo.png')
    shutil.copy(data/'images'/'train_000001.png', tmp_path/'b'/'photo.png')
    Image.open(data/'images'/'train_000002.png').save(tmp_path/'c'/'Photo.jpg')   # same stem, other case and type
    (tmp_path/'c'/'broken.jpg').write_bytes(b'\xff\xd8\xff not really')
    files = [tmp_path/'a'/'photo.png', tmp_path/'c'/'broken.jpg', tmp_path/'b'/'photo.png', tmp_path/'c'/'Photo.jpg',
             tmp_path/'c'/'gone.jpg']
    records = predict_files(ckpt, files, tmp_path/'out', threshold=0.0, progress=False)
    assert [r['file'] for r in records] == [str(f) for f in files]
    assert [r.get('drawing') for r in records] == ['photo.png', None, 'photo-2.png', 'Photo-3.png', None]
    assert 'broken.jpg: cannot read image' in records[1]['error']
    assert 'gone.jpg: image file not found' in records[4]['error']
    drawn = sorted(p.name for p in (tmp_path/'out').iterdir())
    assert drawn == ['Photo-3.png', 'detections.json', 'photo-2.png', 'photo.png']
    assert json.loads((tmp_path/'out'/'detections.json').read_text()) == records
    assert all(len(r['detections']) > 0 for r in records if 'error' not in r)


def test_images_too_small_for_the_model_are_one_line(tmp_path, capsys):
    "Deformable DETR's coarsest level (stride 64) of a 64-pixel image is one pixel: its GroupNorm cannot work on it."
    from detr_explained.cli import main
    data = make_synthetic(tmp_path/'syn', n_train=2, n_val=1, size=64)
    argv = ['train', '--data', data, '--family', 'deformable_detr', '--preset', 'tiny', '--batch-size', 1, '--max-steps', 1,
            '--out', tmp_path/'run', '--quiet']
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and 'too small for the model' in err and '--image-size' in err and len(err.splitlines()) == 1, err
