"""The pipeline on real COCO images (the shared 160-image sample): loading, the commands, and learning.

The overfitting test is the proof that the whole pipeline (data, model, matcher, loss, optimiser,
post-processing, COCOeval) can learn real data: a handful of COCO images, memorised at low
resolution in a few hundred steps, reach AP50 >= 0.5 on themselves.
"""
import json
import os
import subprocess
import sys
from pathlib import Path


from detr_explained.data import CocoDetection, find_split, make_coco_transforms
from detr_explained.evaluate import evaluate_dataset
from detr_explained.train import Trainer, model_config, train_config


def test_sample_loads_as_official(coco_sample):
    img, ann = find_split(coco_sample, 'train')
    assert (img.name, ann.name) == ('images', 'instances_train2017.json')
    ds = CocoDetection(img, ann)
    assert len(ds) == 80 and ds.num_classes == 91 and ds.names[1] == 'person'
    n_boxes = 0
    for i in range(len(ds)):
        image_id = ds.ids[i]
        info = ds.coco.imgs[image_id]
        anns = [a for a in ds.coco.imgToAnns[image_id] if not a['iscrowd'] and a['bbox'][2] > 0 and a['bbox'][3] > 0]
        if i < 10:
            image, t = ds.load(i)
            assert (image.width, image.height) == (info['width'], info['height'])
            assert len(t['boxes']) == len(anns) and t['iscrowd'].sum() == 0
            assert t['labels'].tolist() == [a['category_id'] for a in anns]
        n_boxes += len(anns)
    assert n_boxes < len(ds.coco.anns)                 # crowd annotations exist in the sample and are dropped


def test_train_and_evaluate_commands_on_the_sample(coco_sample, tmp_path):
    code = 'import sys; from detr_explained.cli import main; sys.exit(main(sys.argv[1:]))'
    run = lambda *a: subprocess.run([sys.executable, '-c', code, *map(str, a)], capture_output=True, text=True,
                                    timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    r = run('train', '--data', coco_sample, '--preset', 'tiny', '--image-size', 96, '--max-steps', 2, '--eval-every', 0,
            '--out', tmp_path / 'run', '--quiet')
    assert r.returncode == 0, r.stderr
    assert '80 training images' in r.stdout and '80 categories' in r.stdout
    r = run('evaluate', '--checkpoint', tmp_path / 'run' / 'checkpoint.pt', '--data', coco_sample, '--quiet')
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / 'run' / 'metrics_val.json').read_text())
    assert m['num_images'] == 80 and len(m['per_class']) == 80


def few_object_subset(coco_sample: Path, out: Path, n: int) -> Path:
    """An annotation file with the n train images that have the fewest (1-3), largest objects;
    images stay where they are."""
    d = json.loads((coco_sample / 'annotations' / 'instances_train2017.json').read_text())
    by_image = {}
    for a in d['annotations']: by_image.setdefault(a['image_id'], []).append(a)
    def ok(anns):
        return (1 <= len(anns) <= 3 and not any(a['iscrowd'] for a in anns)
                and min(a['area'] for a in anns) > 32 * 32 * 4)
    chosen = sorted((i for i, anns in by_image.items() if ok(anns)), key=lambda i: (len(by_image[i]), i))[:n]
    assert len(chosen) == n
    sub = {**d, 'images': [im for im in d['images'] if im['id'] in chosen],
           'annotations': [a for a in d['annotations'] if a['image_id'] in chosen]}
    (out / 'subset.json').write_text(json.dumps(sub))
    return out / 'subset.json'


def test_overfit_a_few_real_images(coco_sample, tmp_path):
    """6 real images (8 objects), 128 pixels, a frozen random backbone, 120 steps: memorised to AP50 >= 0.5
    (CPU: about a minute)."""
    ann = few_object_subset(coco_sample, tmp_path, 6)
    tcfg = train_config('tiny', image_size=128, augment='none', seed=0, checkpoint_every=0, eval_every=0,
                        epoch_checkpoints=False)
    train_ds = CocoDetection(coco_sample / 'images', ann, make_coco_transforms('train', 128, 'none'),
                             remap_categories=True)
    cfg = model_config('detr', 'tiny', num_classes=train_ds.num_classes, batch_size=6, epochs=120, hidden_dim=64,
                       nheads=4, dim_feedforward=128, num_queries=8, lr=1e-3, lr_drop=100, eos_coef=0.2)
    run = Trainer(tcfg, cfg, train_ds, tmp_path / 'run', progress=False)
    run.fit()
    val_ds = CocoDetection(coco_sample / 'images', ann, make_coco_transforms('val', 128), remap_categories=True)
    m = evaluate_dataset(run.model, run.postprocess, val_ds, progress=False)
    print({k: round(m[k], 3) for k in ('AP', 'AP50', 'AP75')})
    assert m['AP50'] >= 0.5, m['table']
