"""The shipped course models: they load by name, fit the size budget, measure what their cards say,
and (slow: DETR_EXPLAINED_SLOW=1) a rebuild by the recipe lands within 0.02 AP of the shipped model."""
import json, os, shutil

import pytest

from detr_explained import course
from detr_explained.course import (COURSE_DIR, COURSE_DATA, RECIPES, course_model, course_model_names, card_file,
                                   backbone_file, build_course_model, main_course_models)
from detr_explained.data import CocoDetection, find_split, make_coco_transforms
from detr_explained.evaluate import evaluate_dataset
from detr_explained.synthetic import make_synthetic

slow = pytest.mark.skipif(os.environ.get('DETR_EXPLAINED_SLOW') != '1',
                          reason='rebuilds a course model (minutes of CPU); set DETR_EXPLAINED_SLOW=1')


@pytest.fixture(scope='module')
def val_ds(tmp_path_factory):
    root = make_synthetic(tmp_path_factory.mktemp('syn'), **{**COURSE_DATA, 'n_train': 1})
    return CocoDetection(*find_split(root, 'val'), make_coco_transforms('val', 128))


def test_every_recipe_is_shipped_within_the_size_budget():
    assert course_model_names() == tuple(RECIPES)
    total = sum(p.stat().st_size for p in COURSE_DIR.glob('*.pt'))
    assert total <= 25e6, f'{total / 1e6:.1f} MB of course models'
    for name in RECIPES:
        card = json.loads(card_file(name).read_text())
        for fname, f in card['files'].items():
            assert (COURSE_DIR/fname).stat().st_size == f['bytes'], fname


@pytest.mark.parametrize('name', list(RECIPES))
def test_course_model_measures_what_its_card_says(name, val_ds):
    cm = course_model(name)
    assert cm.family == RECIPES[name].family and cm.classes == {1: 'ellipse', 2: 'rectangle', 3: 'triangle', 4: 'cross'}
    assert not cm.model.training
    m = evaluate_dataset(cm.model, cm.postprocess, val_ds, progress=False)
    assert len(val_ds) == cm.card['num_val_images'] == COURSE_DATA['n_val']
    for k in ('AP', 'AP50'): assert abs(m[k] - cm.metrics[k]) < 1e-3, (k, m[k], cm.metrics[k])


def test_unknown_names_are_one_clear_error(capsys):
    with pytest.raises(course.CourseModelError, match="unknown course model 'yolo'; the course models are"):
        course_model('yolo')
    assert main_course_models(['--rebuild', 'yolo']) == 2
    assert "unknown course model 'yolo'" in capsys.readouterr().err


@slow
def test_rebuild_reproduces_the_shipped_dab_deformable_detr(tmp_path):
    """The cheapest model on the shared backbone (2000 steps, ~6 CPU minutes on one thread): rebuilt by its recipe,
    it lands within 0.02 AP of its card (on the same torch and thread count it is the same to the bit)."""
    out = tmp_path/'models'
    out.mkdir()
    shutil.copy(backbone_file('deformable_detr'), backbone_file('deformable_detr', out))
    card = build_course_model('dab_deformable_detr', out, tmp_path/'work')
    shipped = json.loads(card_file('dab_deformable_detr').read_text())
    assert card['steps'] == shipped['steps']
    for k in ('AP', 'AP50'):
        assert abs(card['metrics'][k] - shipped['metrics'][k]) <= 0.02, (k, card['metrics'][k], shipped['metrics'][k])


def test_course_models_command_lists_the_cards(capsys):
    from detr_explained.cli import main
    assert main(['course-models']) == 0
    out = capsys.readouterr().out
    for name in RECIPES: assert f'| {name} |' in out


def test_recipes_are_pinned_to_the_shipped_configs():
    from dataclasses import asdict
    from detr_explained.course import read_packed, model_file, recipe_configs, COURSE_FORMAT
    for name in RECIPES:
        shipped = read_packed(model_file(name), COURSE_FORMAT)
        tcfg, cfg = recipe_configs(RECIPES[name], shipped['model_config']['num_classes'])
        mine = {**asdict(cfg), 'pretrained_backbone': None}
        assert {k: mine[k] for k in shipped['model_config']} == shipped['model_config'], name
        t = {k: v for k, v in asdict(tcfg).items() if k in shipped['train_config'] and k != 'preset'}
        assert t == {k: v for k, v in shipped['train_config'].items() if k != 'preset'}, name


def test_course_models_and_race_do_not_follow_the_demo_preset(monkeypatch):
    "Changing the 'demo' presets (as the demo's own tuning does) changes no recipe and no race entry."
    from detr_explained import family, train
    from detr_explained.course import recipe_configs
    from detr_explained.race import ENTRIES, Budget, entry_configs
    before = ([recipe_configs(r, 5) for r in RECIPES.values()], [entry_configs(e, Budget(), 0, 5) for e in ENTRIES])
    monkeypatch.setitem(family._TRAIN_MODEL_CHANGES, 'demo', dict(family._TRAIN_MODEL_CHANGES['demo'], hidden_dim=64,
                        num_queries=30, lr=3e-4, dropout=0.1, enc_layers=1))
    monkeypatch.setitem(train.PRESETS, 'demo', dict(train.PRESETS['demo'], image_size=160, augment='none', seed=7))
    for fam in ('detr', 'deformable_detr', 'dab_detr', 'dab_deformable_detr'):
        f = family.get_family(fam)
        monkeypatch.setitem(f.train_presets, 'demo', {**f.train_presets['demo'], 'hidden_dim': 64, 'num_queries': 30})
    assert train.model_config('detr', 'demo').hidden_dim == 64          # the demo did change
    after = ([recipe_configs(r, 5) for r in RECIPES.values()], [entry_configs(e, Budget(), 0, 5) for e in ENTRIES])
    assert after == before
