"""The course's photos (`detr-explained course-photos`), fetched into a temporary user cache from a local HTTP server.

The server on 127.0.0.1 mimics images.cocodataset.org for the 32 course photos: an annotation archive
(annotations_trainval2017.zip holding an instances_val2017.json with the course's image ids and a few
others) and small generated JPEGs under /val2017/. Needs neither ../shared nor the internet:
`DETR_EXPLAINED_SHARED` points at a folder that does not exist, so `core.coco_sample_dir()` can only
find the cache.
"""
import json
import os
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from detr_explained import cli, core
from detr_explained.coco_subset import COURSE_PHOTO_IDS, CocoSubsetError, fetch_course_photos, main_course_photos
from detr_explained.data import find_split

from http_server import Fault, LocalFileServer

ARCHIVE = '/annotations/annotations_trainval2017.zip'


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost'); monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setenv(core.CACHE_ENV, str(tmp_path/'cache'))
    monkeypatch.setenv('DETR_EXPLAINED_SHARED', str(tmp_path/'nonexistent'))


@pytest.fixture(scope='module')
def server_root(tmp_path_factory):
    "A miniature images.cocodataset.org: the archive, and a JPEG for each course photo and for four other images."
    root = tmp_path_factory.mktemp('server'); (root/'annotations').mkdir(); (root/'val2017').mkdir()
    rng = np.random.default_rng(0); images, anns = [], []
    for k, i in enumerate(COURSE_PHOTO_IDS + (1, 2, 3, 4)):
        w, h = (96, 64) if k % 2 else (64, 80)
        name = f'{i:012d}.jpg'
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root/'val2017'/name, quality=95)
        images.append({'id': i, 'file_name': name, 'width': w, 'height': h})
        anns.append({'id': 1000 + k, 'image_id': i, 'category_id': 1, 'bbox': [2, 3, 20, 10], 'area': 200, 'iscrowd': 0})
    coco = {'info': {'description': 'fake'}, 'licenses': [], 'images': images, 'annotations': anns,
            'categories': [{'id': 1, 'name': 'person', 'supercategory': 'person'}]}
    with zipfile.ZipFile(root/'annotations'/'annotations_trainval2017.zip', 'w', zipfile.ZIP_DEFLATED) as z:
        z.writestr('annotations/instances_val2017.json', json.dumps(coco))
    return root


def _args(url):
    return ['--annotations-url', url + ARCHIVE, '--images-url', url, '--no-progress']


def _dead_url():
    "An address on 127.0.0.1 where nobody listens (connection refused)."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return f'http://127.0.0.1:{s.getsockname()[1]}'


def test_fetch_then_coco_sample_dir_finds_it(server_root, tmp_path, capsys):
    assert core.coco_sample_dir() is None                                   # no ../shared, nothing cached
    with LocalFileServer(server_root) as srv:
        assert cli.main(['course-photos', *_args(srv.url)]) == 0
        n_requests = len(srv.log)
        assert n_requests == 1 + len(COURSE_PHOTO_IDS)                       # the archive and exactly the course photos
        assert cli.main(['course-photos', *_args(srv.url)]) == 0             # a second call downloads nothing
        assert len(srv.log) == n_requests
    out = capsys.readouterr().out
    assert 'already in' in out.splitlines()[-1]
    d = tmp_path/'cache'/'course-photos'
    assert core.coco_sample_dir() == d == core.course_photos_dir()
    ann = json.loads((d/'annotations'/'instances_val2017.json').read_text())
    assert [im['id'] for im in ann['images']] == sorted(COURSE_PHOTO_IDS)
    assert {a['image_id'] for a in ann['annotations']} == set(COURSE_PHOTO_IDS)  # the other images' annotations left out
    assert sorted(p.name for p in (d/'images').iterdir()) == sorted(f'{i:012d}.jpg' for i in COURSE_PHOTO_IDS)
    assert find_split(d, 'val')[1] == d/'annotations'/'instances_val2017.json'   # the course's loader reads it
    (tmp_path/'nonexistent'/'coco-sample'/'annotations').mkdir(parents=True)
    assert core.coco_sample_dir() == tmp_path/'nonexistent'/'coco-sample'    # ../shared still comes first


def test_interrupted_fetch_is_not_used_and_resumes(server_root, tmp_path):
    names = [f'{i:012d}.jpg' for i in COURSE_PHOTO_IDS]
    faults = {f'/val2017/{names[0]}': [Fault(drop_after=500)] * 2, f'/val2017/{names[1]}': [Fault(status=503)] * 2}
    kw = dict(annotations_url=None, progress=False)
    with LocalFileServer(server_root, faults=faults) as srv:
        kw.update(annotations_url=srv.url + ARCHIVE, images_url=srv.url)
        with pytest.raises(CocoSubsetError, match='2 of 32 photos failed'):
            fetch_course_photos(**kw)
        d = core.course_photos_dir()
        assert (d/'images').is_dir() and not (d/'annotations'/'instances_val2017.json').exists()
        assert core.coco_sample_dir() is None                               # the incomplete folder is not returned
        first = len(srv.log)
        assert fetch_course_photos(**kw) == d
        again = srv.log[first:]
        assert sorted(e['path'] for e in again) == sorted(f'/val2017/{n}' for n in names[:2])   # only what was missing
        assert any(e['range'] == 'bytes=1000-' for e in again)              # the dropped photo resumed where it stopped
    assert core.coco_sample_dir() == d
    (d/'images'/names[5]).unlink()                                           # a photo deleted later: no longer complete
    assert core.coco_sample_dir() is None


def test_offline_fails_fast_in_one_line(tmp_path, capsys):
    dead = _dead_url()
    t0 = time.perf_counter()
    assert main_course_photos(_args(dead)) == 1
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith('course-photos: fetching'), err   # what it is about to do, then why not
    assert err[1].startswith(f'course-photos: photos not fetched ({dead[7:]} unreachable: ') and 'synthetic images' in err[1], err
    assert elapsed < 5, elapsed
    assert core.coco_sample_dir() is None
    assert not (tmp_path/'cache'/'coco'/'annotations_trainval2017.zip').exists()


def test_offline_command_no_traceback(tmp_path):
    "The installed command, as `make lab` runs it: exit 1, no traceback, the reason in one line."
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, '-m', 'detr_explained.cli', 'course-photos', *_args(_dead_url())],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert 'Traceback' not in r.stderr and r.stdout == ''
    assert [l for l in r.stderr.splitlines() if 'photos not fetched' in l] and len(r.stderr.splitlines()) == 2, r.stderr
    assert time.perf_counter() - t0 < 60


def test_bad_annotations_is_exit_2(tmp_path, capsys):
    bad = tmp_path/'instances_val2017.json'; bad.write_text(json.dumps({'images': [], 'annotations': [], 'categories': []}))
    assert main_course_photos(['--annotations', str(bad), '--no-progress']) == 2
    assert main_course_photos(['--annotations', str(tmp_path/'missing.zip')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and 'no val2017 image with id' in err[0] and 'file not found' in err[1], err
