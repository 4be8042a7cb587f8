"""`detr-explained fetch` and `coco-subset` are mounted on the console command (their parsers live in hub / coco_subset)."""
import subprocess, sys

from detr_explained.cli import main


def test_fetch_list_through_main(capsys):
    assert main(['fetch', '--list']) == 0
    assert 'detr-r50' in capsys.readouterr().out


def test_console_help_names_every_command():
    out = subprocess.run([sys.executable, '-c', 'import sys; from detr_explained.cli import main; sys.exit(main(["--help"]))'],
                         capture_output=True, text=True, check=True).stdout
    for cmd in ('demo', 'make-synthetic', 'train', 'evaluate', 'predict', 'fetch', 'coco-subset'): assert cmd in out


def test_coco_subset_bad_argument_is_a_usage_error(capsys):
    try: main(['coco-subset', '--split', 'test2099'])
    except SystemExit as e: assert e.code == 2
    else: raise AssertionError('expected a usage error')
    assert 'test2099' in capsys.readouterr().err
