"""The convergence race: the command's help, bad options as one line, the stored record complete and made by the
configs the library gives today, and a short race that reproduces the first evaluation of the stored one EXACTLY."""
import json
from dataclasses import asdict

import pytest

from detr_explained.race import ENTRIES, RACE_FILE, budget_from_record, entry_configs, run_race, main_race

TWIN = ('detr', 'dab_detr', 'deformable_detr_box_refine', 'dab_deformable_detr')   # a few entries, ~60 CPU-s


@pytest.fixture(scope='module')
def stored():
    return json.loads(RACE_FILE.read_text())


def test_stored_race_is_complete(stored):
    assert stored['command'].startswith('detr-explained race')
    assert len(stored['budget']['seeds']) >= 2
    assert {r['entry'] for r in stored['runs']} == {e.name for e in ENTRIES}
    for r in stored['runs']: assert [p['step'] for p in r['points']] == stored['budget']['eval_at']


def test_stored_race_ran_the_configs_of_today(stored):
    budget = budget_from_record(stored)
    entries = {e.name: e for e in ENTRIES}
    for r in stored['runs']:
        tcfg, cfg = entry_configs(entries[r['entry']], budget, r['seed'], r['model_config']['num_classes'])
        mine = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
        mine['pretrained_backbone'] = None                  # the record leaves out the path of the shared backbone
        assert {k: mine[k] for k in r['model_config']} == r['model_config'], r['entry']
        assert {k: asdict(tcfg)[k] for k in r['train_config']} == r['train_config'], r['entry']


def test_short_race_reproduces_the_first_points_exactly(stored, tmp_path):
    budget = budget_from_record(stored, seeds=(stored['budget']['seeds'][0],))
    entries = [e for e in ENTRIES if e.name in TWIN and any(r['entry'] == e.name for r in stored['runs'])]
    assert len(entries) >= 3
    short = run_race(budget, tmp_path, entries, workers=2, eval_at=budget.eval_at[:1])
    for r in short['runs']:
        ref = next(s for s in stored['runs'] if s['entry'] == r['entry'] and s['seed'] == r['seed'])
        got, want = r['points'][0], ref['points'][0]
        assert {k: got[k] for k in ('step', 'AP', 'AP50', 'AP75')} == {k: want[k] for k in ('step', 'AP', 'AP50', 'AP75')}, r['entry']


def test_help_and_bad_options(capsys):
    with pytest.raises(SystemExit) as e: main_race(['--help'])
    assert e.value.code == 0 and '--eval-at' in capsys.readouterr().out
    assert main_race(['--eval-at', '10', '5']) == 2
    assert 'expected increasing positive steps' in capsys.readouterr().err
    assert main_race(['--workers', '0']) == 2


def test_race_is_a_command_of_the_console(capsys):
    from detr_explained.cli import main
    with pytest.raises(SystemExit) as e: main(['race', '--help'])
    assert e.value.code == 0 and 'usage: detr-explained race' in capsys.readouterr().out
