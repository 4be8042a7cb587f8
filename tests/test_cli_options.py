"""Every option of the command line, given a bad value, ends in one line on stderr and exit status 2.

The options are read from the argparse parser itself (`cli.build_parser`), so an option added
later without a bad value listed here makes `test_every_option_has_bad_values` fail: each new
option has to say how it can be misused. Each case runs the real `main()` against a real
dataset and checkpoint; nothing is mocked.
"""
import argparse
import json
from pathlib import Path

import pytest

from detr_explained import cli
from detr_explained.cli import main
from detr_explained.data import CocoDetection, find_split, make_coco_transforms
from detr_explained.synthetic import make_synthetic

NUMBER_BAD = {'an integer >= 1': ['0', '-1', 'x', '2.5'], 'an integer >= 0': ['-1', 'x'], 'an integer >= 16': ['8', 'x'],
              'a finite number > 0': ['0', '-1', 'nan', 'inf', 'x'], 'a finite number >= 0': ['-1', 'nan', 'x'],
              '_score': ['-0.1', '1.5', 'nan']}

# options that take text: bad values, written with {tmp} for the test folder (a file 'a_file', nothing at 'missing')
TEXT_BAD = {
    '--data': ['{tmp}/missing', '{tmp}/a_file', '{tmp}/empty'],
    '--checkpoint': ['{tmp}/missing.pt', '{tmp}/a_file', '{data}/annotations/instances_val.json'],
    '--official': ['no-such-model', '{tmp}/a_file', 'deformable-detr', '{ckpt}'],   # unknown, not a checkpoint, drive-only, ours
    '--pretrained-backbone': ['{tmp}/missing.pth', '{tmp}/a_file', '{tmp}/resnet34.pth'],   # missing, garbage, another ResNet
    '--resume': ['{tmp}/missing.pt', '{tmp}/a_file'],
    '--init': ['{tmp}/missing.pt', '{tmp}/a_file', 'no-such-model'],
    '--onnx': ['{tmp}/missing.onnx', '{tmp}/a_file'],
    '--out': ['{tmp}/a_file', '{tmp}/a_file/below'],
    'evaluate --out': ['{tmp}/empty', '{tmp}/a_file/m.json'],          # there --out names the metrics file
    '--preset': ['bogus'],
    '--split': ['bogus'],
    '--set': ['hidden_dim=31', 'nheads=3', 'dropout=1.5', 'dropout=-0.1', 'backbone=vgg16', 'dec_layers=0', 'num_queries=0',
              'no_such_field=1', 'lr=abc', 'lr=nan', 'hidden_dim'],
    '--device': ['gpu', 'cuda:7', 'tpu'],
    'images': ['{tmp}/missing.jpg', '{tmp}/a_file'],
}
FLAGS = ('store_true', 'store_const', 'help')


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    "A cache of its own and no proxy: nothing here may reach the internet or the user's cache."
    monkeypatch.setenv('DETR_EXPLAINED_CACHE', str(tmp_path/'cache'))


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "A synthetic dataset, a checkpoint trained on it for one step, a file, an empty folder."
    from detr_explained.train import Trainer, model_config, train_config
    tmp = tmp_path_factory.mktemp('cli')
    data = make_synthetic(tmp/'data', n_train=4, n_val=2, size=64)
    ds = CocoDetection(*find_split(data, 'train'), make_coco_transforms('train', 64, 'flip'))
    run = Trainer(train_config('tiny', max_steps=1), model_config('detr', 'tiny', num_classes=ds.num_classes), ds, tmp/'run',
                  progress=False)
    run.fit()
    (tmp/'a_file').write_text('not what was asked for'); (tmp/'empty').mkdir()
    import torch, torchvision
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp/'resnet34.pth')
    return {'tmp': tmp, 'data': data, 'ckpt': run.checkpoint_path}


def base_argv(command: str, option: str, w, out: Path) -> list[str]:
    "A command line that works (writing under `out`), into which one bad value is put."
    data, ckpt = w['data'], w['ckpt']
    if command == 'train': return ['train', '--data', data, '--preset', 'tiny', '--max-steps', '1', '--out', out/'t', '--quiet']
    if command == 'evaluate':
        which = ['--official', w['tmp']/'a_file'] if option in ('--official', '--preset') else ['--checkpoint', ckpt]
        return ['evaluate', *which, '--data', data, '--out', out/'m.json', '--quiet']
    if command == 'predict': return ['predict', '--checkpoint', ckpt, data/'images'/'val_000000.png', '--out', out/'p', '--quiet']
    if command == 'make-synthetic': return ['make-synthetic', '--out', out/'s', '--train', '2', '--val', '1', '--size', '32']
    if command == 'demo': return ['demo', '--out', out/'d', '--images', '2', '--val-images', '1', '--max-steps', '1', '--quiet']
    raise KeyError(command)


def options():
    "(command, option or positional name, action) for every argument of every sub-command of the parser."
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, p in sub.choices.items():
        if command in cli.DELEGATED: continue
        for a in p._actions:
            if isinstance(a, argparse._HelpAction): continue
            yield command, (a.option_strings[0] if a.option_strings else a.dest), a


def bad_values(command: str, action) -> list[str]|None:
    "The bad values this test tries for an argument (None: none listed)."
    if type(action).__name__.lower().replace('action', '').strip('_') in FLAGS or action.nargs == 0: return []
    if action.choices is not None: return ['bogus']
    if action.type is not None and getattr(action.type, '__name__', '') in NUMBER_BAD: return NUMBER_BAD[action.type.__name__]
    name = action.option_strings[0] if action.option_strings else action.dest
    return TEXT_BAD.get(f'{command} {name}', TEXT_BAD.get(name))


CASES = [(c, o, v) for c, o, a in options() for v in (bad_values(c, a) or [])]


def test_every_option_has_bad_values():
    missing = [(c, o) for c, o, a in options() if bad_values(c, a) is None]
    assert missing == [], f'options without bad values in this test: {missing}'
    assert len(CASES) > 100


def _put(argv: list, option: str, value: str) -> list:
    "argv with `option value` (replacing the option's value if it is there; positional 'images': the files)."
    argv = list(argv)
    if option == 'images': return [a for a in argv if not str(a).endswith('.png')] + [value]
    if option in argv: argv[argv.index(option) + 1] = value; return argv
    return argv + [option, value]


@pytest.mark.parametrize('command, option, value', CASES, ids=[f'{c} {o} {v}' for c, o, v in CASES])
def test_a_bad_value_is_one_line_and_exit_2(world, capsys, tmp_path, command, option, value):
    value = value.format(**{k: str(v) for k, v in world.items()})
    argv = [str(a) for a in _put(base_argv(command, option, world, tmp_path), option, value)]
    code = main(argv)
    out, err = capsys.readouterr()
    err = err.strip()
    assert code == 2, (argv, out[-500:], err[-2000:])
    assert 'Traceback' not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f'detr-explained {command}: error: '), err
    named = value.split('=')[0] if option == '--set' else option.lstrip('-').split('-')[0]
    if option != 'images': assert named in err or value in err or Path(value).name in err, err


def test_the_working_command_lines_work(world, capsys, tmp_path):
    "The base command lines are valid: the failures above come from the bad value alone."
    for command in ('make-synthetic', 'predict', 'evaluate', 'train'):
        argv = [str(a) for a in base_argv(command, '', world, tmp_path)]
        assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((tmp_path/'m.json').read_text())['num_images'] == 2
