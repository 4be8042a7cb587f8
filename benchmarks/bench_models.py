"""Whole models on the CPU: the library (fast paths) against the reference path and Hugging Face transformers.

For every family, in one run: inference (eval, no_grad, one image) and a training step (forward, the family's
matcher + losses, backward; batch 2) of three models holding the same random weights:
- ours: the library as it runs by default (fused attention, deformable sampling kernels, channels-last backbone);
- reference: the same model switched to the official algorithm everywhere (`set_fast_paths(model, 'reference')`:
  nn.MultiheadAttention asked for its weights as the official code does, `ms_deform_attn_core_pytorch`'s grid_sample
  per level, NCHW convolutions);
- transformers: the model written with `detr_explained.hf.to_hf` and loaded by transformers' `from_pretrained`
  (same architecture and weights; its own matcher and loss in the training step). DAB-Deformable-DETR has no
  transformers class: that column says so.
Outputs of the three are checked equal first. Timings are interleaved (ours, reference, transformers, ours, ...);
medians of --repeats; wall time and process CPU time. Peak memory: each (family, path) in a fresh child process,
the largest growth of the resident set (polled every 0.5 ms) over the RSS before the call, for one inference and
then one training step (the first of each in that process). Optional extra rows for ours: `--amp bf16` (autocast, matcher and loss in
float32) and `--compile` (torch.compile, timed after its warm-up).

    python benchmarks/bench_models.py                           # every family, 512 px, 7 repeats, 1 thread
    python benchmarks/bench_models.py --families detr --repeats 3 --no-write
    python benchmarks/bench_models.py --amp bf16 --compile      # also ours under bf16 autocast / torch.compile
Writes the "## Whole models" section of benchmarks/RESULTS.md (other sections are kept).
"""
from __future__ import annotations
import argparse, contextlib, datetime, json, os, platform, re, statistics, subprocess, sys, tempfile, time
from pathlib import Path

from detr_explained.core import atomic_write_text, configure_threads  # noqa: F401  (before torch: thread setup)
import torch

from detr_explained import official  # noqa: F401  (fills the family registry)
from detr_explained.family import get_family, family_names
from detr_explained.ms_deform_attn_fast import set_fast_paths

RESULTS = Path(__file__).resolve().parent / 'RESULTS.md'
SECTION = '## Whole models'
FAMILIES = ('detr', 'deformable_detr', 'dab_detr', 'dab_deformable_detr')
HF_FAMILIES = ('detr', 'deformable_detr', 'dab_detr')




def config(family: str, backbone: str):
    "The family's official architecture (6 + 6 layers, d_model 256, official queries) on a smaller ResNet."
    return get_family(family).config(backbone=backbone, num_classes=91)


def inputs(batch: int, size: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    mask = torch.zeros(batch, size, size, dtype=torch.bool)
    if batch > 1: mask[1:, :, size * 3 // 4:] = True; x[1:, :, :, size * 3 // 4:] = 0   # image 2 is narrower
    targets = [{'boxes': torch.tensor([[.5, .5, .3, .4], [.25, .3, .2, .2], [.7, .6, .1, .3]]), 'labels': torch.tensor([1, 17, 3])}
               for _ in range(batch)]
    return x, mask, targets


class Ours:
    "The library's model and criterion, on its fast path ('fast') or the reference path ('reference')."
    def __init__(self, family, cfg, impl, amp=None, compile=False):
        fam = get_family(family)
        torch.manual_seed(0)
        self.model, self.criterion = set_fast_paths(fam.build_model(cfg), impl), fam.build_criterion(cfg)
        self.amp, self.forward = amp, self.model
        if compile: self.forward = torch.compile(self.model)

    def _autocast(self):
        if self.amp is None: return contextlib.nullcontext()
        return torch.autocast('cpu', dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}[self.amp])

    def infer(self, x, mask):
        self.model.eval()
        with torch.no_grad(), self._autocast(): out = self.forward(x, mask)
        return out['pred_logits'].float(), out['pred_boxes'].float()

    def train_step(self, x, mask, targets):
        self.model.train(); self.model.zero_grad(set_to_none=True)
        with self._autocast(): out = self.forward(x, mask)
        out = {k: v.float() for k, v in out.items() if torch.is_tensor(v)} | {
            'aux_outputs': [{k: v.float() for k, v in a.items()} for a in out.get('aux_outputs', [])]}
        losses = self.criterion(out, targets)                           # matcher and losses in float32
        loss = sum(losses[k] * self.criterion.weight_dict[k] for k in losses if k in self.criterion.weight_dict)
        loss.backward()
        return loss.item()


class HF:
    "The same model and weights in transformers (from `to_hf`)."
    def __init__(self, ours: Ours, family, cfg):
        import transformers
        from detr_explained.hf import to_hf
        with tempfile.TemporaryDirectory() as d:
            to_hf(ours.model, d, family=family, cfg=cfg)
            self.model = transformers.AutoModelForObjectDetection.from_pretrained(d)

    def infer(self, x, mask):
        self.model.eval()
        with torch.no_grad(): out = self.model(pixel_values=x, pixel_mask=(~mask).long())
        return out.logits, out.pred_boxes

    def train_step(self, x, mask, targets):
        self.model.train(); self.model.zero_grad(set_to_none=True)
        labels = [{'class_labels': t['labels'], 'boxes': t['boxes']} for t in targets]
        out = self.model(pixel_values=x, pixel_mask=(~mask).long(), labels=labels)
        out.loss.backward()
        return out.loss.item()


def build(family, cfg, path, amp=None, compile=False):
    if path == 'transformers': return HF(Ours(family, cfg, 'fast'), family, cfg)
    return Ours(family, cfg, 'fast' if path.startswith('ours') else 'reference', amp=amp, compile=compile)


def paths_for(family, args) -> list[str]:
    paths = ['ours', 'reference'] + (['transformers'] if family in HF_FAMILIES and not args.no_hf else [])
    if args.amp: paths.append(f'ours {args.amp}')
    if args.compile: paths.append('ours compiled')
    return paths


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def bench_family(family, args) -> dict:
    cfg = config(family, args.backbone)
    paths = paths_for(family, args)
    runners = {p: build(family, cfg, p, amp=args.amp if p.endswith(str(args.amp)) else None, compile=p == 'ours compiled')
               for p in paths}
    x1, m1, _ = inputs(1, args.size)
    x2, m2, t2 = inputs(args.batch, args.size)
    ref_logits, ref_boxes = runners['reference'].infer(x1, m1)
    check = {}
    for p, r in runners.items():                                        # outputs equal first (also: warm-up, compile)
        logits, boxes = r.infer(x1, m1)
        check[p] = (boxes - ref_boxes).abs().max().item()
        r.train_step(x2, m2, t2)
    times = {(p, mode): [] for p in paths for mode in ('infer', 'train')}
    for i in range(args.repeats):
        print(f'  {family}: repeat {i + 1}/{args.repeats} (load average {loadavg()})', flush=True)
        for p, r in runners.items():
            times[p, 'infer'].append(timed(lambda: r.infer(x1, m1)))
            times[p, 'train'].append(timed(lambda: r.train_step(x2, m2, t2)))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    return {'paths': paths, 'median': {f'{p}|{m}': v for (p, m), v in med.items()}, 'max_box_diff': check}


class RSSPeak:
    "Context manager: the largest resident set size (bytes) seen by a thread polling /proc/self/statm every 0.5 ms."
    def __enter__(self):
        import threading
        self.base = self.peak = rss(); self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True); self._thread.start()
        return self
    def _poll(self):
        while not self._stop.is_set(): self.peak = max(self.peak, rss()); time.sleep(5e-4)
    def __exit__(self, *exc): self._stop.set(); self._thread.join(); self.peak = max(self.peak, rss())
    @property
    def growth_mib(self) -> float: return (self.peak - self.base) / 2**20


def rss() -> int: return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def peak_memory_child(family, path, args) -> dict:
    "In this (fresh) process: RSS growth during one inference, then during one training step, over the RSS before it."
    cfg = config(family, args.backbone)
    r = build(family, cfg, path, amp=args.amp if path.endswith(str(args.amp)) else None)
    x1, m1, _ = inputs(1, args.size)
    x2, m2, t2 = inputs(args.batch, args.size)
    with RSSPeak() as inf: r.infer(x1, m1)
    with RSSPeak() as tr: r.train_step(x2, m2, t2)
    return {'infer': inf.growth_mib, 'train': tr.growth_mib}


def peak_memory(family, path, args) -> dict:
    cmd = [sys.executable, __file__, '--memory-child', family, path, '--size', str(args.size), '--batch', str(args.batch),
           '--backbone', args.backbone, '--threads', str(args.threads)] + (['--amp', args.amp] if args.amp else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode: return {'infer': float('nan'), 'train': float('nan'), 'error': out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def loadavg() -> str: return ' '.join(f'{v:.1f}' for v in os.getloadavg())


def table(family, res, mem) -> str:
    rows = ['| path | inference wall (ms) | inference CPU (ms) | training step wall (ms) | training step CPU (ms) | '
            'reference / this (inference, wall) | reference / this (training, wall) | peak memory, training step (MiB) | '
            'peak memory, inference (MiB) | max box difference vs reference |',
            '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    ref_i, ref_t = res['median']['reference|infer'][0], res['median']['reference|train'][0]
    for p in res['paths']:
        (iw, ic), (tw, tc) = res['median'][f'{p}|infer'], res['median'][f'{p}|train']
        m = mem.get(p, {})
        rows.append(f"| {p} | {iw * 1e3:.0f} | {ic * 1e3:.0f} | {tw * 1e3:.0f} | {tc * 1e3:.0f} | **{ref_i / iw:.2f}x** | "
                    f"**{ref_t / tw:.2f}x** | {m.get('train', float('nan')):.0f} | {m.get('infer', float('nan')):.0f} | "
                    f"{res['max_box_diff'][p]:.1e} |")
    if family not in HF_FAMILIES: rows.append('\n(transformers has no DAB-Deformable-DETR class: no transformers row.)')
    return '\n'.join(rows)


def write_section(text: str, section: str=SECTION):
    old = RESULTS.read_text() if RESULTS.exists() else '# Benchmarks\n'
    pattern = re.compile(rf'^{re.escape(section)}\n.*?(?=^## |\Z)', re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip('\n') + '\n\n' + text
    atomic_write_text(RESULTS, new)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--families', nargs='+', default=[f for f in FAMILIES], choices=FAMILIES)
    ap.add_argument('--size', type=int, default=512, help='square image side in pixels')
    ap.add_argument('--batch', type=int, default=2, help='images per training step')
    ap.add_argument('--backbone', default='resnet18')
    ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--amp', choices=('bf16', 'fp16'), default=None, help='also time ours under autocast')
    ap.add_argument('--compile', action='store_true', help='also time ours under torch.compile')
    ap.add_argument('--no-hf', action='store_true', help='leave transformers out')
    ap.add_argument('--no-memory', action='store_true', help='skip the peak-memory child processes')
    ap.add_argument('--no-write', action='store_true', help='print only; do not write benchmarks/RESULTS.md')
    ap.add_argument('--section', default=SECTION, help='the RESULTS.md section (a "## " heading) this run writes')
    ap.add_argument('--memory-child', nargs=2, metavar=('FAMILY', 'PATH'), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(peak_memory_child(*args.memory_child, args))); return
    cmd = 'python benchmarks/bench_models.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    started, load0 = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M'), loadavg()
    print(f'{started} UTC; torch {torch.__version__}; {os.cpu_count()} logical CPUs; threads {args.threads}; '
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average {load0}", flush=True)
    tables = []
    for family in args.families:
        if family not in family_names(): print(f'{family}: not registered, skipped'); continue
        res = bench_family(family, args)
        mem = {} if args.no_memory else {p: peak_memory(family, p, args) for p in res['paths'] if p != 'ours compiled'}
        t = f"### {get_family(family).title}\n\n{table(family, res, mem)}"
        print('\n' + t + f'\n(load average now {loadavg()})', flush=True); tables.append(t)
        if not args.no_write: write_section(header(args, cmd, started, load0, loadavg()) + '\n\n'.join(tables) + '\n', args.section)
    print(f'load average before {load0}, after {loadavg()}')


def header(args, cmd, started, load0, load1) -> str:
    return (f"{args.section}\n\nInference (one {args.size} x {args.size} image, eval, no_grad) and a training step (batch {args.batch}, "
            f"forward + matcher + losses + backward, no optimiser) of each family at its official architecture (6 + 6 layers, "
            f"d_model 256, official queries and FFN width) on a {args.backbone} backbone, random weights, float32. `ours`: the "
            "library's default fast paths; `reference`: the same model switched to the official algorithm "
            "(`set_fast_paths(model, 'reference')`); `transformers`: the same weights written by `hf.to_hf` and loaded by "
            "transformers (its own matcher and loss). Outputs checked equal first (last column). Timings interleaved, "
            f"median of {args.repeats}. Peak memory: largest growth of the resident set (polled every 0.5 ms) during the "
            "call, in a fresh process per path (its first inference, then its first training step).\n\n"
            f"Command: `{cmd.strip()}`  \nDate: {started} UTC; torch {torch.__version__}; {platform.machine()}, "
            f"{os.cpu_count()} logical CPUs, {args.threads} thread(s), OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}.  \nLoad average (1/5/15 min) before: {load0}, after: {load1} "
            "(the machine was shared with other jobs: wall times are noisy, the interleaved ratios and CPU times less so).\n\n")


if __name__ == '__main__':
    main()
