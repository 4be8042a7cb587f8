"""`detr-explained fetch` and `coco-subset` are mounted on the console command
(their parsers live in hub / coco_subset)."""
import subprocess, sys

from detr_explained.cli import main


def test_fetch_list_through_main(capsys):
    assert main(['fetch', '--list']) == 0
    assert 'detr-r50' in capsys.readouterr().out


def test_console_help_names_every_command():
    code = 'import sys; from detr_explained.cli import main; sys.exit(main(["--help"]))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    for cmd in ('demo', 'make-synthetic', 'train', 'evaluate', 'predict', 'fetch', 'coco-subset'): assert cmd in out


def test_coco_subset_bad_argument_is_a_usage_error(capsys):
    assert main(['coco-subset', '--split', 'test2099']) == 2          # a usage error: exit status 2, one line
    err = capsys.readouterr().err
    assert 'test2099' in err and len(err.strip().splitlines()) == 1


def test_evaluate_official_weights(tmp_path, official_fixture, coco_sample, capsys):
    """`evaluate --official PATH`: an official-layout checkpoint ({'model', 'args'}) evaluated with COCOeval
    on COCO images."""
    import argparse, json
    import torch
    fx = official_fixture('detr')
    ckpt = tmp_path/'detr-fixture.pth'
    torch.save({'model': fx['state_dict'], 'args': argparse.Namespace(**fx['config']['args'])}, ckpt)
    gt = json.loads((coco_sample/'annotations'/'instances_val2017.json').read_text())
    keep = {im['id'] for im in gt['images'][:2]}
    sub = {**gt, 'images': [im for im in gt['images'] if im['id'] in keep],
           'annotations': [a for a in gt['annotations'] if a['image_id'] in keep]}
    (tmp_path/'data'/'annotations').mkdir(parents=True)
    (tmp_path/'data'/'annotations'/'instances_val.json').write_text(json.dumps(sub))
    (tmp_path/'data'/'images').symlink_to(coco_sample/'images')
    out = tmp_path/'metrics.json'
    args = ['evaluate', '--official', str(ckpt), '--data', str(tmp_path/'data'), '--out', str(out), '--quiet']
    assert main(args) == 0
    m = json.loads(out.read_text())
    assert m['family'] == 'detr' and m['num_images'] == 2 and 0 <= m['AP50'] <= 1
    assert 'AP50' in capsys.readouterr().out


def test_evaluate_needs_exactly_one_model(capsys):
    assert main(['evaluate', '--data', 'x']) == 2                   # a usage error: exit status 2, one line
    err = capsys.readouterr().err
    assert '--checkpoint' in err and len(err.strip().splitlines()) == 1
