"""COCO subsets (detr_explained.coco_subset) built from a local HTTP server on 127.0.0.1.

The server mimics images.cocodataset.org: an annotation archive (annotations_trainval2017.zip,
built from the COCO sample's annotations) and the images under /val2017/ and /train2017/ —
with faults: a connection dropped mid-file, a 404, an image served truncated, a damaged archive.
"""
import contextlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from detr_explained.coco_subset import (CocoSubsetError, check_image, choose_images, fetch_annotations,
                                        main_coco_subset, make_coco_subset, read_instances)
from detr_explained.data import find_split
from detr_explained.hub import CACHE_ENV, DownloadError

from http_server import Fault, LocalFileServer

ARCHIVE = '/annotations/annotations_trainval2017.zip'


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost'); monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setenv(CACHE_ENV, str(tmp_path/'cache'))


@pytest.fixture(scope='module')
def sample(coco_sample):
    return {split: json.loads((coco_sample/'annotations'/f'instances_{split}.json').read_text()) for split in ('val2017', 'train2017')}


@pytest.fixture
def root(tmp_path, coco_sample, sample):
    "images.cocodataset.org in miniature: the archive and the images of both splits (copies, so tests may damage them)."
    root = tmp_path/'server'
    (root/'annotations').mkdir(parents=True)
    with zipfile.ZipFile(root/'annotations'/'annotations_trainval2017.zip', 'w', zipfile.ZIP_DEFLATED) as z:
        for split, d in sample.items(): z.writestr(f'annotations/instances_{split}.json', json.dumps(d))
        z.writestr('annotations/person_keypoints_val2017.json', '{}')
    for split, d in sample.items():
        (root/split).mkdir()
        for im in d['images']: os.symlink(coco_sample/'images'/im['file_name'], root/split/im['file_name'])
    return root


def _damage(path: Path, keep: int):
    "Replace a (symlinked) file by its first `keep` bytes; returns the original bytes."
    data = path.read_bytes(); path.unlink(); path.write_bytes(data[:keep]); return data


def _kw(url, cache, **kw):
    return dict(annotations_url=url + ARCHIVE, images_url=url, cache=cache, progress=False, workers=4, **kw)


def test_subset_with_faults_then_resume(root, sample, coco_sample, tmp_path):
    val = sample['val2017']; files = {im['id']: im['file_name'] for im in val['images']}
    ids = choose_images(val, 10, seed=3)
    dropped, missing, truncated = (files[i] for i in ids[:3])
    good = _damage(root/'val2017'/truncated, 4000)
    out = tmp_path/'coco'
    faults = {f'/val2017/{dropped}': [Fault(drop_after=5000)], f'/val2017/{missing}': [Fault(status=404)],
              ARCHIVE: [Fault(drop_after=20_000)]}
    with LocalFileServer(root, faults=faults) as srv:
        with pytest.raises(CocoSubsetError) as e:
            make_coco_subset(out, 'val2017', 10, seed=3, **_kw(srv.url, tmp_path/'cache'))
        msg = str(e.value)
        assert '2 of 10 images failed' in msg and 'run the same command again' in msg
        assert missing in msg and '404' in msg and truncated in msg and 'truncated' in msg
        assert not (out/'annotations').exists()                         # no annotation file for an incomplete subset
        assert sorted(p.name for p in (out/'val2017').iterdir()) == sorted(set(files[i] for i in ids) - {missing, truncated})
        ranges = [(e['path'], e['range']) for e in srv.log]
        assert (f'/val2017/{dropped}', 'bytes=5000-') in ranges          # the dropped image was resumed
        assert (ARCHIVE, 'bytes=20000-') in ranges                       # so was the archive
        assert sum(p == f'/val2017/{truncated}' for p, _ in ranges) == 2  # a file that does not decode is fetched once more
        first = len(srv.log)
        (root/'val2017'/truncated).write_bytes(good)                     # the server is repaired
        ann = make_coco_subset(out, 'val2017', 10, seed=3, **_kw(srv.url, tmp_path/'cache'))
        assert sorted(e['path'] for e in srv.log[first:]) == sorted([f'/val2017/{missing}', f'/val2017/{truncated}'])
    d = json.loads(ann.read_text())
    assert ann == out/'annotations'/'instances_val2017.json'
    assert [im['id'] for im in d['images']] == ids
    expected = sorted((a for a in val['annotations'] if a['image_id'] in set(ids)), key=lambda a: a['id'])
    assert d['annotations'] == expected and d['categories'] == val['categories']
    assert d['info']['subset']['seed'] == 3 and d['info']['description'] == val['info']['description']
    for im in d['images']:
        assert (out/'val2017'/im['file_name']).read_bytes() == (coco_sample/'images'/im['file_name']).read_bytes()
    assert list(out.rglob('*.part')) == []
    with contextlib.redirect_stdout(io.StringIO()): api = COCO(str(ann))
    assert len(api.getImgIds()) == 10 and len(api.getAnnIds()) == len(expected)
    assert find_split(out, 'val') == (out/'val2017', ann)


def test_rerun_fetches_only_what_is_missing_or_broken(root, sample, tmp_path):
    out = tmp_path/'coco'
    with LocalFileServer(root) as srv:
        make_coco_subset(out, 'val2017', 6, seed=0, **_kw(srv.url, tmp_path/'cache'))
        first = len(srv.log)
        images = sorted((out/'val2017').iterdir())
        images[0].unlink()
        _damage(images[1], 1000)                                          # a truncated file on disk
        make_coco_subset(out, 'val2017', 6, seed=0, **_kw(srv.url, tmp_path/'cache'))
        assert sorted(e['path'] for e in srv.log[first:]) == sorted(f'/val2017/{p.name}' for p in images[:2])
        n = len(srv.log)
        make_coco_subset(out, 'val2017', 8, seed=0, **_kw(srv.url, tmp_path/'cache'))   # grown: only 2 new images
        assert len(srv.log) - n == 2
    for p in (out/'val2017').iterdir(): check_image(p)


def test_choice_is_deterministic_nested_and_category_aware(sample):
    val = sample['val2017']
    a = choose_images(val, 15, seed=7)
    assert a == choose_images(val, 15, seed=7) and a == sorted(a)
    assert set(a) <= set(choose_images(val, 40, seed=7))
    assert a != choose_images(val, 15, seed=8)
    dogs = choose_images(val, 2, categories=['dog'], seed=0)
    dog_images = {x['image_id'] for x in val['annotations'] if x['category_id'] == 18 and not x['iscrowd']}
    assert set(dogs) <= dog_images and choose_images(val, 2, categories=['18'], seed=0) == dogs
    both = choose_images(val, 4, categories=['dog', 'cat'])
    assert all(any(x['image_id'] == i and x['category_id'] in (17, 18) for x in val['annotations']) for i in both)
    with pytest.raises(CocoSubsetError, match='unknown category'): choose_images(val, 1, categories=['unicorn'])
    with pytest.raises(CocoSubsetError, match=f'only {len(dog_images)} qualify'):
        choose_images(val, 1000, categories=['dog'])


def test_train_split_and_annotations_from_a_local_file(root, sample, coco_sample, tmp_path):
    out = tmp_path/'coco'
    with LocalFileServer(root) as srv:
        ann = make_coco_subset(out, 'train2017', 4, seed=1,
                               annotations=coco_sample/'annotations'/'instances_train2017.json',
                               images_url=srv.url, progress=False)
        assert all(e['path'].startswith('/train2017/') for e in srv.log)    # no archive download
    d = json.loads(ann.read_text())
    assert [im['id'] for im in d['images']] == choose_images(sample['train2017'], 4, seed=1)
    assert find_split(out, 'train') == (out/'train2017', ann)


def test_archive_is_cached_and_checked(root, sample, tmp_path):
    with LocalFileServer(root) as srv:
        a = fetch_annotations(srv.url + ARCHIVE, cache=tmp_path/'c', progress=False)
        fetch_annotations(srv.url + ARCHIVE, cache=tmp_path/'c', progress=False)
        assert len(srv.log) == 1 and a == tmp_path/'c'/'coco'/'annotations_trainval2017.zip'
        assert read_instances(a, 'train2017') == sample['train2017']
        (root/'bad').mkdir(); (root/'bad'/'annotations_trainval2017.zip').write_bytes(b'<html>not found</html>')
        with pytest.raises(DownloadError, match='check failed'):
            fetch_annotations(srv.url + '/bad/annotations_trainval2017.zip', cache=tmp_path/'d', progress=False)
        assert list((tmp_path/'d'/'coco').iterdir()) == []


def test_damaged_archive_member_is_detected(root, tmp_path):
    data = bytearray((root/'annotations'/'annotations_trainval2017.zip').read_bytes())
    with zipfile.ZipFile(root/'annotations'/'annotations_trainval2017.zip') as z:
        info = z.getinfo('annotations/instances_val2017.json')
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[middle] ^= 0xFF                                               # one flipped byte inside the compressed JSON
    (tmp_path/'damaged.zip').write_bytes(bytes(data))
    with pytest.raises(CocoSubsetError, match='instances_val2017.json is damaged.*download it again'):
        read_instances(tmp_path/'damaged.zip', 'val2017')


def test_command(root, sample, tmp_path, capsys):
    with LocalFileServer(root) as srv:
        argv = ['--split', 'val2017', '-n', '3', '--categories', 'person', '--seed', '2', '--out', str(tmp_path/'coco'),
                '--annotations-url', srv.url + ARCHIVE, '--images-url', srv.url, '--cache-dir', str(tmp_path/'c'),
                '--no-progress']
        assert main_coco_subset(argv) == 0
        assert '3 images' in capsys.readouterr().out
        assert main_coco_subset(argv[:5] + ['unicorn'] + argv[6:]) == 2            # a bad input: exit status 2
        assert 'unknown category' in capsys.readouterr().err
    d = json.loads((tmp_path/'coco'/'annotations'/'instances_val2017.json').read_text())
    assert [im['id'] for im in d['images']] == choose_images(sample['val2017'], 3, categories=['person'], seed=2)


@pytest.mark.parametrize('argv, message', [
    (['-n', '0'], "argument -n/--num-images: '0' is not an integer >= 1"),
    (['-n', 'many'], "'many' is not an integer >= 1"),
    (['--seed', '-1'], "argument --seed: '-1' is not an integer >= 0"),
    (['--workers', '0'], "'0' is not an integer >= 1"),
    (['--retries', '-2'], "'-2' is not an integer >= 0"), (['--split', 'test2017'], "invalid choice: 'test2017'"),
    (['--annotations', '{tmp}/missing.json'], 'missing.json: file not found'),
    (['--annotations', '{tmp}/bad.json'], 'neither the annotation archive (zip) nor an instances JSON'),
    (['--annotations', '{tmp}/val.json', '-n', '100000'], 'asked for 100000 images but only'),
    (['--annotations', '{tmp}/val.json', '--categories', 'unicorn'], "unknown category 'unicorn'")])
def test_command_bad_inputs_are_one_line_exit_2(tmp_path, capsys, sample, argv, message):
    (tmp_path/'bad.json').write_text('{"images": ['); (tmp_path/'val.json').write_text(json.dumps(sample['val2017']))
    argv = [a.format(tmp=tmp_path) for a in argv] + ['--out', str(tmp_path/'out'), '--no-progress']
    assert main_coco_subset(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert not (tmp_path/'out'/'annotations').exists()
