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
def test_rebuild_reproduces_the_shipped_detr(tmp_path):
    out = tmp_path/'models'
    out.mkdir()
    shutil.copy(backbone_file('deformable_detr'), backbone_file('deformable_detr', out))
    card = build_course_model('detr', out, tmp_path/'work')
    shipped = json.loads(card_file('detr').read_text())
    assert card['steps'] == shipped['steps']
    for k in ('AP', 'AP50'):
        assert abs(card['metrics'][k] - shipped['metrics'][k]) <= 0.02, (k, card['metrics'][k], shipped['metrics'][k])


def test_course_models_command_lists_the_cards(capsys):
    from detr_explained.cli import main
    assert main(['course-models']) == 0
    out = capsys.readouterr().out
    for name in RECIPES: assert f'| {name} |' in out
