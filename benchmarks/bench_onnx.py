"""Benchmark: PyTorch (eager) against ONNX Runtime (CPU) latency for every family, from one exported graph each.

Each model is the family's small preset (`<family>_small`: ResNet-18, d_model 128, 2-3 layers; Deformable DETR in
its three variants) with random weights, exported with `detr_explained.export.export_onnx` (dynamic batch and image
size) and checked against PyTorch first (<= 1e-4, else the run stops). Then one image batch (B, 3, H, W) goes
through both, interleaved, after a warm-up; the table gives medians of the repeats and the ratio PyTorch / ONNX
Runtime measured in the same run. PyTorch runs its default path (the deformable families: the fast CPU sampling
kernel); the ONNX graph has the grid_sample reference sampling. Both are single-threaded by default
(`torch.set_num_threads`, `intra_op_num_threads`) and timed in process CPU time, which other jobs on a shared
machine do not inflate; the load average before and after is printed with the table.

    python benchmarks/bench_onnx.py                    # print the table
    python benchmarks/bench_onnx.py --write            # and replace the "## ONNX Runtime" section of RESULTS.md
"""
import argparse, os, platform, statistics, sys, tempfile, time
from pathlib import Path

import torch

import detr_explained.official  # noqa: F401  (registers every family)
from detr_explained.core import atomic_write_text
from detr_explained.family import get_family, family_names
from detr_explained.export import export_onnx, compare_onnx, onnx_session, check_inputs

SECTION = '## ONNX Runtime vs PyTorch (CPU)'
CLOCKS = {'cpu': time.process_time, 'wall': time.perf_counter}


def models():
    "(label, family, config) for every registered family's small preset (and Deformable DETR's variants)."
    for name in family_names():
        fam = get_family(name)
        preset = f'{name}_small' if f'{name}_small' in fam.presets else 'small'
        variants = ('plain', 'box_refine', 'two_stage') if name == 'deformable_detr' else (None,)
        for v in variants:
            cfg = fam.config(preset, **({'variant': v} if v else {}))
            yield (f'{fam.title} ({v.replace("_", " ")})' if v else fam.title), name, cfg


def median_ms(fn, repeats: int, clock) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock(); fn(); times.append(clock() - t0)
    return statistics.median(times) * 1e3


def run(size, repeats: int, threads: int, clock, workdir: Path):
    B, H, W = size
    rows = []
    for label, name, cfg in models():
        torch.manual_seed(0)
        model = get_family(name).build_model(cfg).eval()
        path = export_onnx(model, workdir / f'{name}_{getattr(cfg, "variant", "")}.onnx')
        worst = max(max(r['logits'], r['boxes']) for r in compare_onnx(model, path, [size]))
        assert worst <= 1e-4, f'{label}: ONNX Runtime differs from PyTorch by {worst:.2e}'
        session = onnx_session(path, threads)
        x, mask = check_inputs(B, H, W)
        feed = {'pixel_values': x.numpy(), 'pixel_mask': mask.numpy()}
        def torch_run():
            with torch.no_grad(): model(x, mask)
        def ort_run(): session.run(None, feed)
        torch_run(); ort_run()                                   # warm-up
        t_torch, t_ort = [], []
        for _ in range(repeats):                                 # interleaved, so both see the same machine
            t_torch.append(median_ms(torch_run, 1, clock)); t_ort.append(median_ms(ort_run, 1, clock))
        rows.append((label, statistics.median(t_torch), statistics.median(t_ort), worst, path.stat().st_size / 2**20))
        print(f'{label}: PyTorch {rows[-1][1]:.1f} ms, ONNX Runtime {rows[-1][2]:.1f} ms', file=sys.stderr)
    return rows


def table(rows):
    lines = ['| model | PyTorch (ms) | ONNX Runtime (ms) | PyTorch / ORT | max abs diff | .onnx (MiB) |',
             '|---|---:|---:|---:|---:|---:|']
    lines += [f'| {label} | {pt:.1f} | {ort:.1f} | {pt / ort:.2f}x | {d:.1e} | {mb:.1f} |'
              for label, pt, ort, d, mb in rows]
    return '\n'.join(lines)


def write_section(path: Path, section: str):
    "Replace (or append) this benchmark's section of RESULTS.md, leaving the other sections alone."
    text = path.read_text() if path.exists() else '# Benchmarks\n'
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.strip() == SECTION), None)
    if start is None:
        new = text.rstrip('\n') + '\n\n' + section.rstrip('\n') + '\n'
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('## ')), len(lines))
        new = '\n'.join(lines[:start] + section.rstrip('\n').splitlines() + ([''] if end < len(lines) else [])
                        + lines[end:]) + '\n'
    atomic_write_text(path, new)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--size', type=int, nargs=3, default=[1, 384, 512], metavar=('B', 'H', 'W'))
    ap.add_argument('--repeats', type=int, default=10)
    ap.add_argument('--threads', type=int, default=1, help='PyTorch and ONNX Runtime intra-op threads')
    ap.add_argument('--clock', choices=list(CLOCKS), default='cpu',
                    help='cpu: process CPU time (robust on a shared machine, exact for 1 thread); wall: elapsed time')
    ap.add_argument('--write', action='store_true', help=f'update the "{SECTION}" section of benchmarks/RESULTS.md')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        rows = run(tuple(args.size), args.repeats, args.threads, CLOCKS[args.clock], Path(d))
    load_after = os.getloadavg()
    import onnxruntime
    command = 'python benchmarks/bench_onnx.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    env = (f'torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} thread(s), '
           f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}')
    B, H, W = args.size
    section = '\n'.join([
        SECTION, '',
        f'One forward pass of a {B}x3x{H}x{W} batch (one image padded on the right and bottom when B > 1), each',
        "family's small preset (ResNet-18, d_model 128) with random weights: PyTorch eager (the deformable families",
        'on their fast CPU sampling kernel) against ONNX Runtime on the exported graph (grid_sample reference',
        f'sampling). Median of {args.repeats} interleaved repeats after a warm-up, measured as '
        f'{"process CPU time" if args.clock == "cpu" else "wall-clock time"}; "max abs diff" is the check',
        'of logits and boxes made before timing.', '',
        f'Command: `{command.strip()}`  ', f'Environment: {env}  ',
        f'Load average (1, 5, 15 min) before: {", ".join(f"{v:.2f}" for v in load_before)}; '
        f'after: {", ".join(f"{v:.2f}" for v in load_after)}', '',
        table(rows), ''])
    print(section)
    if args.write: write_section(Path(__file__).parent / 'RESULTS.md', section)
    return rows


if __name__ == '__main__':
    main()
