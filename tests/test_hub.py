"""Checkpoint downloads and loading (detr_explained.hub) against a real HTTP server on 127.0.0.1.

The server (`tests/http_server.LocalFileServer`, http.server in a thread) supports Range and
If-Range requests and injects faults: dropped connections, error statuses, ignored ranges,
HTML answers. The checkpoints it serves are the
official DETR fixture written in both official layouts, under names whose SHA-256 prefix is
right or wrong.
"""
import argparse
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from detr_explained.hub import (CACHE_ENV, _configuration, OFFICIAL_CHECKPOINTS, DownloadError,
                                UnsafeCheckpointError, cache_dir, checkpoint_contents, download,
                                family_of_args, family_of_state_dict, from_official_checkpoint, hash_prefix,
                                load_checkpoint, main_fetch, resolve_checkpoint, sha256_file)
from detr_explained.official import CheckpointMismatch, from_official

from http_server import Fault, LocalFileServer


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    "No proxy for 127.0.0.1, and a cache that is not the user's."
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost'); monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setenv(CACHE_ENV, str(tmp_path/'cache'))


@pytest.fixture(scope='module')
def detr_fx(official_fixture):
    return official_fixture('detr')


@pytest.fixture(scope='module')
def root(tmp_path_factory, detr_fx):
    "Served folder: detr/ with the fixture as bare and training checkpoints (right and wrong hash names), blob/."
    root = tmp_path_factory.mktemp('served')
    (root/'detr').mkdir(); (root/'blob').mkdir()
    layouts = {'bare': {'model': detr_fx['state_dict']},
               'training': {'model': detr_fx['state_dict'], 'optimizer': {'state': {}, 'param_groups': []},
                            'lr_scheduler': {'step_size': 200, 'last_epoch': 3}, 'epoch': 3,
                            'args': argparse.Namespace(**detr_fx['config']['args'])}}
    names = {}
    for layout, ckpt in layouts.items():
        tmp = root/'detr'/f'{layout}.tmp'
        torch.save(ckpt, tmp)
        names[layout] = f'detr-fixture-{layout}-{sha256_file(tmp)[:8]}.pth'
        os.replace(tmp, root/'detr'/names[layout])
    names['wrong'] = 'detr-fixture-training-deadbeef.pth'
    shutil.copy(root/'detr'/names['training'], root/'detr'/names['wrong'])
    shutil.copy(root/'detr'/names['training'], root/'detr'/'detr-r50-e632da11.pth')   # not the real DETR R50
    payload = hashlib.sha256(b'seed').digest() * 40_000                                  # 1.28 MB
    names['blob'] = f'blob-{hashlib.sha256(payload).hexdigest()[:8]}.bin'
    (root/'blob'/names['blob']).write_bytes(payload)
    return root, names


@pytest.fixture
def srv(root):
    with LocalFileServer(root[0]) as s: yield s


def _outputs(model, fx):
    with torch.no_grad(): return model(fx['inputs']['tensors'], fx['inputs']['mask'])


def _files(folder: Path): return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- hash prefix and cache -------------------------------------------------------------------

def test_hash_prefix_is_torch_hubs_rule_without_numbers():
    "torch.hub's regular expression, where what it finds is 8+ hex characters and not a number (an epoch, a date)."
    for n in [c.filename for c in OFFICIAL_CHECKPOINTS.values()] + [
            'detr-r50-e632da11.pth', 'a-.pth', 'x-dc5-ab12.pth', 'resnet50-0676ba61.pth', 'noprefix.pth', 'a-b-c']:
        m = torch.hub.HASH_REGEX.search(n)
        hub = (m.group(1) or None) if m else None
        assert hash_prefix(n) == (hub if hub and len(hub) >= 8 and not hub.isdigit() else None), n
    assert hash_prefix('detr-r101-dc5-a2e86def.pth') == 'a2e86def'
    for n in ('detr-epoch-0050.pth', 'model-20240101.pth', 'dab-detr-r50-dc5.pth', 'run-abc123.pth'):
        assert hash_prefix(n) is None, n
    assert {c.name: hash_prefix(c.filename) for c in OFFICIAL_CHECKPOINTS.values() if hash_prefix(c.filename)} == {
        'detr-r50': 'e632da11', 'detr-r50-dc5': 'f0fb7ef5', 'detr-r101': '2c7b67e5', 'detr-r101-dc5': 'a2e86def'}


def test_published_name_with_digits_downloads(root, srv, tmp_path):
    "A checkpoint named like an epoch (detr-epoch-0050.pth) is not refused for a hash its name never promised."
    shutil.copy(root[0]/'detr'/root[1]['bare'], root[0]/'detr'/'detr-epoch-0050.pth')
    path, entry = resolve_checkpoint(f'{srv.url}/detr/detr-epoch-0050.pth', progress=False)
    assert path == cache_dir('checkpoints')/'detr-epoch-0050.pth' and entry is None
    assert sha256_file(path) == sha256_file(root[0]/'detr'/root[1]['bare'])


def test_catalogue_addresses():
    for c in OFFICIAL_CHECKPOINTS.values():
        if c.family == 'detr': assert c.url == f'https://dl.fbaipublicfiles.com/detr/{c.filename}'
        else: assert c.url is None and 'github.com/' in c.page and c.page.startswith('https://')
    assert OFFICIAL_CHECKPOINTS['detr-r50'].box_ap == 42.0


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path/'c'))
    assert cache_dir('checkpoints') == tmp_path/'c'/'checkpoints'
    monkeypatch.delenv(CACHE_ENV); monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path/'xdg'))
    assert cache_dir() == tmp_path/'xdg'/'detr_explained'


# --- downloads: resume, faults, verification ------------------------------------------------

def test_resume_after_dropped_connections(root, srv, tmp_path):
    name = root[1]['blob']; path = f'/blob/{name}'; size = (root[0]/'blob'/name).stat().st_size
    srv.faults[path] = [Fault(drop_after=300_000), Fault(drop_after=200_000)]
    got = download(srv.url + path, tmp_path/name, progress=False, backoff=0)
    assert sha256_file(got) == sha256_file(root[0]/'blob'/name)
    assert [(e['status'], e['range'], e['sent']) for e in srv.log] == [
        (200, None, 300_000), (206, 'bytes=300000-', 200_000), (206, 'bytes=500000-', size - 500_000)]
    assert _files(tmp_path) == [name]


def test_giving_up_keeps_part_and_next_call_resumes(root, srv, tmp_path):
    name = root[1]['blob']; path = f'/blob/{name}'
    srv.faults[path] = [Fault(drop_after=400_000), Fault(drop_after=100_000)]
    with pytest.raises(DownloadError, match='resumes from there'):
        download(srv.url + path, tmp_path/name, progress=False, retries=1, backoff=0)
    assert _files(tmp_path) == [name + '.part', name + '.part.meta']  # never under the final name; validators beside it
    assert (tmp_path/(name + '.part')).stat().st_size == 500_000
    download(srv.url + path, tmp_path/name, progress=False)
    assert srv.log[-1]['range'] == 'bytes=500000-'
    assert sha256_file(tmp_path/name) == sha256_file(root[0]/'blob'/name) and _files(tmp_path) == [name]


def test_complete_part_file_answered_416(root, srv, tmp_path):
    name = root[1]['blob']
    shutil.copy(root[0]/'blob'/name, tmp_path/(name + '.part'))      # interrupted just before the rename
    download(f'{srv.url}/blob/{name}', tmp_path/name, progress=False)
    assert [e['status'] for e in srv.log] == [416] and _files(tmp_path) == [name]


def test_404_fails_at_once_and_keeps_nothing(srv, tmp_path):
    with pytest.raises(DownloadError, match='404'):
        download(f'{srv.url}/blob/missing-0a.bin', tmp_path/'missing-0a.bin', progress=False)
    assert len(srv.log) == 1 and _files(tmp_path) == []


def test_503_is_retried(root, srv, tmp_path):
    name = root[1]['blob']; srv.faults[f'/blob/{name}'] = [Fault(status=503), Fault(status=503)]
    download(f'{srv.url}/blob/{name}', tmp_path/name, progress=False, backoff=0)
    assert [e['status'] for e in srv.log] == [503, 503, 200]


def test_server_ignoring_range_restarts_from_zero(root, srv, tmp_path):
    name = root[1]['blob']; srv.faults[f'/blob/{name}'] = [Fault(drop_after=70_000), Fault(ignore_range=True)]
    download(f'{srv.url}/blob/{name}', tmp_path/name, progress=False, backoff=0)
    assert [(e['status'], e['range']) for e in srv.log] == [(200, None), (200, 'bytes=70000-')]
    assert sha256_file(tmp_path/name) == sha256_file(root[0]/'blob'/name)


def test_wrong_hash_is_refused_and_nothing_kept(root, srv, tmp_path):
    with pytest.raises(DownloadError, match='promises one starting with deadbeef.*Nothing was kept'):
        download(f"{srv.url}/detr/{root[1]['wrong']}", tmp_path/root[1]['wrong'], progress=False)
    assert _files(tmp_path) == []
    with pytest.raises(DownloadError, match='deadbeef'):                # the same through the loader
        from_official_checkpoint(f"{srv.url}/detr/{root[1]['wrong']}", progress=False)
    assert _files(cache_dir('checkpoints')) == []


def test_wrong_size_is_refused(root, srv, tmp_path):
    name = root[1]['blob']
    with pytest.raises(DownloadError, match='expected 12'):
        download(f'{srv.url}/blob/{name}', tmp_path/name, size=12, progress=False)
    assert _files(tmp_path) == []


def test_existing_file_is_not_downloaded_again(root, srv, tmp_path):
    name = root[1]['blob']
    download(f'{srv.url}/blob/{name}', tmp_path/name, progress=False)
    download(f'{srv.url}/blob/{name}', tmp_path/name, progress=False)
    assert len(srv.log) == 1


def test_official_name_served_with_other_bytes_is_refused(srv):
    with pytest.raises(DownloadError, match='e632da11'):
        resolve_checkpoint('detr-r50', mirror=srv.url + '/detr', progress=False)
    assert _files(cache_dir('checkpoints')) == []


def test_drive_only_checkpoint_says_where_to_get_it():
    with pytest.raises(FileNotFoundError, match='drive.google.com/file/d/1JYKyRYzUH7uo9eVfDaVCiaIGZb5YTCuI.*r50_deformable_detr_plus_iterative_bbox_refinement-checkpoint.pth'):
        resolve_checkpoint('deformable-detr-refine')
    with pytest.raises(FileNotFoundError, match='not a known checkpoint name'):
        resolve_checkpoint('detr-r18')


# --- reading checkpoints safely ---------------------------------------------------------------

class _Trap:
    "Pickles as a call to Path.touch: loading it with full unpickling creates a file."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (Path.touch, (self.marker,))


def test_checkpoint_with_code_is_refused_and_not_run(tmp_path, detr_fx):
    marker = tmp_path/'code-ran'
    torch.save({'model': detr_fx['state_dict'], 'args': _Trap(marker)}, tmp_path/'trap.pth')
    with pytest.raises(UnsafeCheckpointError, match='was not loaded'):
        load_checkpoint(tmp_path/'trap.pth')
    with pytest.raises(UnsafeCheckpointError):
        from_official_checkpoint(tmp_path/'trap.pth')
    assert not marker.exists()
    torch.load(tmp_path/'trap.pth', weights_only=False)                # what full unpickling does
    assert marker.exists()


def test_both_layouts_read_with_namespace_allowed(root, detr_fx):
    folder, names = root
    bare_sd, bare_args = checkpoint_contents(load_checkpoint(folder/'detr'/names['bare']))
    sd, args = checkpoint_contents(load_checkpoint(folder/'detr'/names['training']))
    assert bare_args is None and args == detr_fx['config']['args']
    assert bare_sd.keys() == sd.keys() == detr_fx['state_dict'].keys()
    assert all(torch.equal(sd[k], detr_fx['state_dict'][k]) for k in sd)


def test_family_detection(official_fixture):
    for family in ('detr', 'deformable_detr', 'dab_detr'):
        fx = official_fixture(family)
        assert family_of_state_dict(fx['state_dict']) == family
        assert family_of_args(fx['config']['args']) == family


# --- loading into the library -------------------------------------------------------------------

def test_served_checkpoints_give_the_fixture_outputs(root, srv, detr_fx):
    folder, names = root
    expected = _outputs(from_official('detr', detr_fx['state_dict'], detr_fx['config']['args']), detr_fx)
    srv.faults[f"/detr/{names['training']}"] = [Fault(drop_after=700_000)]
    training = from_official_checkpoint(f"{srv.url}/detr/{names['training']}", progress=False)
    bare = from_official_checkpoint(f"{srv.url}/detr/{names['bare']}", args=detr_fx['config']['args'], progress=False)
    assert [e['range'] for e in srv.log if e['path'].endswith(names['training'])] == [None, 'bytes=700000-']
    for model in (training, bare):
        assert not model.training
        out = _outputs(model, detr_fx)
        assert torch.equal(out['pred_logits'], expected['pred_logits'])
        assert torch.equal(out['pred_boxes'], expected['pred_boxes'])
        torch.testing.assert_close(out['pred_boxes'], detr_fx['outputs']['pred_boxes'], atol=1e-5, rtol=0)
        torch.testing.assert_close(out['pred_logits'], detr_fx['outputs']['pred_logits'], atol=1e-5, rtol=0)
    info = training.checkpoint_info
    assert (info.family, info.extra, info.entry) == ('detr', {'epoch': 3}, None)
    assert info.path == cache_dir('checkpoints')/names['training']
    assert _files(cache_dir('checkpoints')) == sorted([names['bare'], names['training']])


def test_weights_only_file_needs_a_configuration(root, detr_fx):
    path = root[0]/'detr'/root[1]['bare']
    with pytest.raises(ValueError, match="holds weights only.*preset="):
        from_official_checkpoint(path)
    with pytest.raises(ValueError, match="configuration says 'dab_detr' but the weights are 'detr'"):
        from_official_checkpoint(path, family='dab_detr', args=detr_fx['config']['args'])
    # a preset's flags, overridden field by field by the reader's args
    model = from_official_checkpoint(path, preset='detr-r50-dc5', args=detr_fx['config']['args'])
    assert model.checkpoint_info.entry == 'detr-r50-dc5' and model.checkpoint_info.args['dilation'] is False
    args = {k: v for k, v in detr_fx['config']['args'].items() if k not in ('backbone', 'dilation')}
    family, merged = _configuration(detr_fx['state_dict'], None, None, args, OFFICIAL_CHECKPOINTS['detr-r101-dc5'])
    assert (family, merged['backbone'], merged['dilation'], merged['hidden_dim']) == ('detr', 'resnet101', True, 64)
    family, merged = _configuration(detr_fx['state_dict'], {'hidden_dim': 64, 'num_queries': 10}, None, {'num_queries': 5},
                                    OFFICIAL_CHECKPOINTS['detr-r101'])     # a file's own args beat the catalogue
    assert merged == {'hidden_dim': 64, 'num_queries': 5}


def test_cached_catalogue_file_is_used_without_network(root, detr_fx):
    target = cache_dir('checkpoints')/'detr-r50-e632da11.pth'
    target.parent.mkdir(parents=True)
    shutil.copy(root[0]/'detr'/root[1]['bare'], target)                 # as if downloaded earlier
    model = from_official_checkpoint('detr-r50', args=detr_fx['config']['args'], mirror='http://127.0.0.1:9/unused')
    assert model.checkpoint_info.entry == 'detr-r50'
    torch.testing.assert_close(_outputs(model, detr_fx)['pred_boxes'], detr_fx['outputs']['pred_boxes'], atol=1e-5, rtol=0)


def test_mismatch_is_explained_in_words(root, detr_fx):
    path = root[0]/'detr'/root[1]['training']
    with pytest.raises(CheckpointMismatch) as e:
        from_official_checkpoint(path, args={'dec_layers': 4, 'backbone': 'resnet34'})
    msg = str(e.value)
    assert "dec_layers=4" in msg and "backbone='resnet34'" in msg
    assert 'tensors the model needs are not in the checkpoint' in msg
    assert 'transformer.decoder.layers.{2-3}.* (36)' in msg and 'backbone.0.body.layer3.{2-5}.* (40)' in msg
    assert 'The checkpoint has 2 decoder layers, the configuration 4' in msg
    assert 'The ResNet depth differs' in msg


# --- the fetch command --------------------------------------------------------------------------

def test_fetch_command(root, srv, capsys, tmp_path):
    assert main_fetch(['--list']) == 0
    assert 'detr-r50-e632da11.pth' in capsys.readouterr().out
    assert main_fetch(['dab-detr-r50-dc5-3pat']) == 1
    assert 'cloud.tsinghua.edu.cn' in capsys.readouterr().err
    url = f"{srv.url}/detr/{root[1]['training']}"
    assert main_fetch([url, '--check', '--no-progress', '--cache-dir', str(tmp_path/'other')]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path/'other'/'checkpoints'/root[1]['training']) in out and 'strict: ok' in out
    assert main_fetch([f"{srv.url}/detr/{root[1]['wrong']}", '--no-progress']) == 1
    assert 'deadbeef' in capsys.readouterr().err


def test_concurrent_download_of_the_same_file_is_refused(root, srv, tmp_path):
    import fcntl
    name = root[1]['blob']
    with open(tmp_path/(name + '.part'), 'ab') as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match='another process'):
            download(f'{srv.url}/blob/{name}', tmp_path/name, progress=False)
    assert srv.log == []
    download(f'{srv.url}/blob/{name}', tmp_path/name, progress=False)     # once the other one is gone
    assert _files(tmp_path) == [name]


# --- the server's file changed, HTML answers, files that are not checkpoints ----------------------

def _replace_file(path: Path, data: bytes):
    "Write new bytes with a modification time one second later (a new release under the same name)."
    path.write_bytes(data); st = path.stat(); os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize('server', ['honours If-Range', 'ignores If-Range', 'no validators'])
def test_resumed_download_of_a_changed_file_restarts(tmp_path, server):
    served = tmp_path/'served'; served.mkdir()
    old, new = os.urandom(150_000), os.urandom(150_000 if server != 'no validators' else 160_000)
    (served/'release.bin').write_bytes(old)
    second = {'honours If-Range': Fault(), 'ignores If-Range': Fault(ignore_if_range=True), 'no validators': Fault(no_validators=True)}[server]
    faults = {'/release.bin': [Fault(drop_after=60_000, no_validators=server == 'no validators'), second]}
    with LocalFileServer(served, faults=faults) as srv:
        url = f'{srv.url}/release.bin'
        with pytest.raises(DownloadError, match='resumes from there'):
            download(url, tmp_path/'c'/'release.bin', progress=False, retries=0)
        _replace_file(served/'release.bin', new)
        download(url, tmp_path/'c'/'release.bin', progress=False, backoff=0)
    assert (tmp_path/'c'/'release.bin').read_bytes() == new
    assert _files(tmp_path/'c') == ['release.bin']
    statuses = [(e['status'], e['range'], e['if_range'] is not None) for e in srv.log]
    if server == 'honours If-Range': assert statuses == [(200, None, False), (200, 'bytes=60000-', True)]
    elif server == 'ignores If-Range': assert statuses == [(200, None, False), (206, 'bytes=60000-', True), (200, None, False)]
    else: assert statuses == [(200, None, False), (206, 'bytes=60000-', False), (200, None, False)]   # caught by the size


def test_unchanged_file_resumes_with_if_range(root, srv, tmp_path):
    name = root[1]['blob']; srv.faults[f'/blob/{name}'] = [Fault(drop_after=500_000)]
    with pytest.raises(DownloadError): download(f'{srv.url}/blob/{name}', tmp_path/name, progress=False, retries=0)
    download(f'{srv.url}/blob/{name}', tmp_path/name, progress=False)
    assert [(e['status'], e['range'], bool(e['if_range'])) for e in srv.log] == [(200, None, False), (206, 'bytes=500000-', True)]
    assert sha256_file(tmp_path/name) == sha256_file(root[0]/'blob'/name)


def test_html_answers_are_refused_before_a_byte_is_written(root, srv, tmp_path):
    with pytest.raises(DownloadError, match=r'HTML page \(text/html\).*folder listing'):
        download(f'{srv.url}/detr/', tmp_path/'model.pth', progress=False)         # a folder: its listing
    srv.faults[f"/detr/{root[1]['bare']}"] = [Fault(content_type='text/html')]
    with pytest.raises(DownloadError, match='HTML page'):
        resolve_checkpoint(f"{srv.url}/detr/{root[1]['bare']}", progress=False)
    assert _files(tmp_path) == ['cache'] and _files(cache_dir('checkpoints')) == []
    assert [e['status'] for e in srv.log] == [200, 200]                              # not retried


@pytest.mark.parametrize('content', [b'<!DOCTYPE html><html><body>Sign in</body></html>', b'PK\x03\x04 not a zip', b'\x00' * 100])
def test_a_file_that_is_not_a_checkpoint_never_enters_the_cache(tmp_path, content):
    (tmp_path/'s').mkdir(); (tmp_path/'s'/'model.pth').write_bytes(content)
    with LocalFileServer(tmp_path/'s') as srv:
        with pytest.raises(DownloadError, match='check failed: .*(not a PyTorch checkpoint|damaged zip).*Nothing was kept'):
            resolve_checkpoint(f'{srv.url}/model.pth', progress=False)
    assert _files(cache_dir('checkpoints')) == []


def test_legacy_checkpoint_format_is_accepted(tmp_path, detr_fx):
    (tmp_path/'s').mkdir()
    torch.save({'model': detr_fx['state_dict']}, tmp_path/'s'/'legacy.pth', _use_new_zipfile_serialization=False)
    with LocalFileServer(tmp_path/'s') as srv:
        path, _ = resolve_checkpoint(f'{srv.url}/legacy.pth', progress=False)
    assert sha256_file(path) == sha256_file(tmp_path/'s'/'legacy.pth')
