"""Where a training step and an inference spend their time: backbone, encoder, decoder, matcher, losses, backward by part.

Process CPU time (one thread: not inflated by other jobs on a busy machine) of each part, from forward hooks and
from the moment each part's output receives its gradient in the backward pass; medians of --repeats; for the
library's fast path and the reference path. A torch.profiler table of the top operators is printed with --ops.

    python benchmarks/profile_models.py --families detr dab_detr --size 384 --repeats 3
"""
from __future__ import annotations
import argparse, statistics, sys, time
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import config, inputs, loadavg  # noqa: E402
from detr_explained.ms_deform_attn_fast import set_fast_paths  # noqa: E402
from detr_explained.family import get_family  # noqa: E402

PARTS = ('backbone', 'transformer.encoder', 'transformer.decoder')


def first_tensor(out):
    if torch.is_tensor(out): return out
    if isinstance(out, (list, tuple)):
        for o in out:
            t = first_tensor(o)
            if t is not None: return t
    if isinstance(out, dict): return first_tensor(list(out.values()))
    return None


def profile_step(model, criterion, x, mask, targets, train=True) -> dict:
    clock, marks, handles = time.process_time, {}, []
    def pre(name): return lambda m, a: marks.__setitem__(f'{name} fwd start', clock())
    def post(name):
        def hook(m, a, out):
            marks[f'{name} fwd end'] = clock()
            t = first_tensor(out)
            if train and t is not None and t.requires_grad:
                t.register_hook(lambda g: marks.__setitem__(f'{name} grad in', clock()))
        return hook
    for name in PARTS:
        m = model.get_submodule(name)
        handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
    handles += [criterion.matcher.register_forward_pre_hook(pre('matcher')), criterion.matcher.register_forward_hook(post('matcher'))]
    t0 = clock()
    if train:
        model.train(); model.zero_grad(set_to_none=True)
        out = model(x, mask); t_fwd = clock()
        losses = criterion(out, targets)
        loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict); t_loss = clock()
        loss.backward(); t_end = clock()
    else:
        model.eval()
        with torch.no_grad(): model(x, mask)
        t_fwd = t_loss = t_end = clock()
    for h in handles: h.remove()
    f = lambda n: marks[f'{n} fwd end'] - marks[f'{n} fwd start']
    r = {'backbone fwd': f('backbone'), 'encoder fwd': f('transformer.encoder'), 'decoder fwd': f('transformer.decoder')}
    r['other fwd (input_proj, heads, pos)'] = (t_fwd - t0) - sum(r.values())
    if train:
        r['matcher'] = f('matcher'); r['losses (without matcher)'] = (t_loss - t_fwd) - r['matcher']
        g = lambda n: marks[f'{n} grad in']          # the moment the part's output has its gradient: what is above it is done
        r['losses + heads bwd'] = g('transformer.decoder') - t_loss
        r['decoder bwd'] = g('transformer.encoder') - g('transformer.decoder')
        r['encoder + input_proj bwd'] = g('backbone') - g('transformer.encoder')
        r['backbone bwd'] = t_end - g('backbone')
    r['total'] = t_end - t0
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--families', nargs='+', default=['detr', 'deformable_detr', 'dab_detr'])
    ap.add_argument('--size', type=int, default=384); ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--backbone', default='resnet18'); ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--ops', action='store_true', help='also a torch.profiler table of the top operators (fast path)')
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f'torch {torch.__version__}; 1 thread; {args.size} px; batch {args.batch}; load average {loadavg()}')
    for family in args.families:
        fam, cfg = get_family(family), config(family, args.backbone)
        torch.manual_seed(0)
        model, criterion = fam.build_model(cfg), fam.build_criterion(cfg)
        x1, m1, _ = inputs(1, args.size); x2, m2, t2 = inputs(args.batch, args.size)
        res = {}
        for impl in ('fast', 'reference'):
            set_fast_paths(model, impl); profile_step(model, criterion, x2, m2, t2)           # warm-up
        for _ in range(args.repeats):
            for impl in ('fast', 'reference'):
                set_fast_paths(model, impl)
                res.setdefault((impl, 'train'), []).append(profile_step(model, criterion, x2, m2, t2))
                res.setdefault((impl, 'infer'), []).append(profile_step(model, criterion, x1, m1, None, train=False))
        print(f'\n### {fam.title} (process CPU ms, median of {args.repeats}; load average {loadavg()})\n')
        for mode in ('train', 'infer'):
            keys = list(res['fast', mode][0])
            print(f'| {mode} part | fast | reference | reference / fast |\n|---|---:|---:|---:|')
            for k in keys:
                a = statistics.median(r[k] for r in res['fast', mode]) * 1e3
                b = statistics.median(r[k] for r in res['reference', mode]) * 1e3
                print(f'| {k} | {a:.0f} | {b:.0f} | {b / a if a > 0 else float("nan"):.2f}x |')
            print()
        if args.ops:
            from torch.profiler import profile, ProfilerActivity
            set_fast_paths(model, 'fast')
            with profile(activities=[ProfilerActivity.CPU]) as p: profile_step(model, criterion, x2, m2, t2)
            print(p.key_averages().table(sort_by='self_cpu_time_total', row_limit=15))


if __name__ == '__main__':
    main()
