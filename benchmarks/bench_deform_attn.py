"""Multi-scale deformable attention on the CPU: the fast path against the readable reference.

Forward + backward of the sampling core alone and of a whole encoder / decoder layer, in the two
regimes the model calls it in:
- encoder-like: every token of the image a query (Q = S), at 512 px (4 levels 64², 32², 16², 8²
  -> S = 5440 tokens), batch 1 and 2, and a small 128-px batch of 8 (a CPU training preset);
- decoder-like: 300 queries over the S value tokens of a 512-px (S = 5440) or 800-px (S = 13294)
  image, batch 1 and 2.
8 heads, 4 points, d_model 256. The fast path chooses its kernel by shape (canvas for dense
sampling, gather for sparse: `detr_explained.ms_deform_attn_fast`); the table says which one ran.
Median of the repeats, both implementations interleaved in one run. Writes the
"## Deformable attention" section of benchmarks/RESULTS.md (other sections are kept).

    python benchmarks/bench_deform_attn.py                            # 1 and 2 threads, OpenMP wait policy as set
    python benchmarks/bench_deform_attn.py --wait-policy env passive  # also with OMP_WAIT_POLICY=PASSIVE
    python benchmarks/bench_deform_attn.py --cases decoder --no-write # only the decoder-like cases

Each (wait policy, threads) setting runs in its own child process (OpenMP reads its environment
once, at start-up).
"""
from __future__ import annotations
import argparse, datetime, json, math, os, platform, re, statistics, subprocess, sys, time
from pathlib import Path

import torch

from detr_explained.core import atomic_write_text
from detr_explained.ms_deform_attn import MSDA_IMPLS, ms_deform_attn_core, set_ms_deform_attn_impl
from detr_explained.ms_deform_attn_fast import DENSE_POINTS
from detr_explained.deformable_transformer import (DeformableTransformerDecoderLayer, DeformableTransformerEncoderLayer,
                                                   encoder_reference_points)

RESULTS = Path(__file__).resolve().parent / 'RESULTS.md'
SECTION = '## Deformable attention'


def pyramid(image: int, strides=(8, 16, 32, 64)) -> torch.Tensor:
    return torch.tensor([[math.ceil(image / s)] * 2 for s in strides])


def core_inputs(batch: int, shapes: torch.Tensor, heads=8, head_dim=32, points=4, seed=0, queries=None):
    """Encoder-like inputs (queries=None: every token a query at its pixel centre) or decoder-like ones (`queries`
    reference points spread over the image); offsets = the official initial rays + noise, in pixels of each level."""
    g = torch.Generator().manual_seed(seed)
    S, L = int(shapes.prod(1).sum()), len(shapes)
    value = torch.randn(batch, S, heads, head_dim, generator=g)
    if queries is None: ref = encoder_reference_points(shapes, torch.ones(batch, L, 2))   # (B, S, L, 2)
    else: ref = (0.05 + 0.9 * torch.rand(batch, queries, 1, 2, generator=g)).expand(-1, -1, L, -1)  # (B, Q, L, 2)
    Q = ref.shape[1]
    theta = torch.arange(heads) * 2 * math.pi / heads
    ray = torch.stack([theta.cos(), theta.sin()], -1)
    ray = ray / ray.abs().max(-1, keepdim=True).values
    offsets = ray.view(heads, 1, 1, 2) * torch.arange(1., points + 1).view(1, 1, points, 1)  # (M, 1, P, 2) pixels
    offsets = offsets + torch.randn(batch, Q, heads, L, points, 2, generator=g)
    loc = ref[:, :, None, :, None] + offsets / shapes.flip(-1)[:, None]                    # (B, Q, M, L, P, 2)
    attn = torch.randn(batch, Q, heads, L * points, generator=g).softmax(-1)            # (B, Q, M, L*P)
    return value, shapes, loc, attn.view(batch, Q, heads, L, points)                    # -> (B, Q, M, L, P)


def bench_core(batch, shapes, repeats, queries=None):
    value, shapes, loc, attn = core_inputs(batch, shapes, queries=queries)
    def run(impl):
        v, l, a = (t.clone().requires_grad_() for t in (value, loc, attn))
        ms_deform_attn_core(v, shapes, l, a, impl=impl).sum().backward()
    return interleaved({impl: (lambda impl=impl: run(impl)) for impl in MSDA_IMPLS}, repeats)


def bench_layer(batch, shapes, repeats, queries=None, d_model=256):
    "A whole encoder layer (queries=None) or decoder layer (`queries` queries over the memory), forward + backward."
    torch.manual_seed(0)
    L, S = len(shapes), int(shapes.prod(1).sum())
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    src = torch.randn(batch, S, d_model)
    if queries is None:
        layer = DeformableTransformerEncoderLayer(d_model, 4 * d_model, 0.0, 'relu', L, 8, 4)
        attn, x0, pos = layer.self_attn, src, torch.randn(batch, S, d_model)
        ref = encoder_reference_points(shapes, torch.ones(batch, L, 2))
        call = lambda x: layer(x, pos, ref, shapes, starts)
    else:
        layer = DeformableTransformerDecoderLayer(d_model, 4 * d_model, 0.0, 'relu', L, 8, 4)
        attn, x0, pos = layer.cross_attn, torch.randn(batch, queries, d_model), torch.randn(batch, queries, d_model)
        ref = torch.rand(batch, queries, 1, 2).expand(-1, -1, L, -1)                      # (B, Q, L, 2)
        call = lambda x: layer(x, pos, ref, src, shapes, starts)
    with torch.no_grad():                                             # offsets/weights as after some training
        attn.sampling_offsets.weight.normal_(0, 0.02); attn.attention_weights.weight.normal_(0, 0.02)
    def run(impl):
        set_ms_deform_attn_impl(layer, impl)
        call(x0.clone().requires_grad_()).sum().backward()
    return interleaved({impl: (lambda impl=impl: run(impl)) for impl in MSDA_IMPLS}, repeats)


def interleaved(fns: dict, repeats: int) -> dict:
    """Median wall seconds and median process CPU seconds per function, the functions alternating so that load
    changes hit both alike. With one thread, CPU time is not inflated by other jobs on the machine."""
    for fn in fns.values(): fn()                                     # warm-up
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time(); fn()
            wall[k].append(time.perf_counter() - t0); cpu[k].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


CASES = [  # (name, regime, what, batch, image size, queries: None = every token)
    ('core, 512 px, batch 1', 'encoder', 'core', 1, 512, None),
    ('core, 512 px, batch 2', 'encoder', 'core', 2, 512, None),
    ('core, 128 px, batch 8 (small)', 'encoder', 'core', 8, 128, None),
    ('encoder layer, 512 px, batch 1', 'encoder', 'layer', 1, 512, None),
    ('encoder layer, 512 px, batch 2', 'encoder', 'layer', 2, 512, None),
    ('core, 512 px, batch 1, 300 queries', 'decoder', 'core', 1, 512, 300),
    ('core, 512 px, batch 2, 300 queries', 'decoder', 'core', 2, 512, 300),
    ('core, 800 px, batch 1, 300 queries', 'decoder', 'core', 1, 800, 300),
    ('core, 800 px, batch 2, 300 queries', 'decoder', 'core', 2, 800, 300),
    ('decoder layer, 512 px, batch 2, 300 queries', 'decoder', 'layer', 2, 512, 300),
    ('decoder layer, 800 px, batch 2, 300 queries', 'decoder', 'layer', 2, 800, 300),
]


def kernel_for(S: int, queries: int|None, levels=4, points=4) -> str:
    "The kernel `ms_deform_attn_core_fast` picks for these sizes (its rule, restated for the table)."
    return 'canvas' if (queries or S) * levels * points >= DENSE_POINTS * S else 'gather'


def run_all(threads: int, repeats: int, regimes) -> list[tuple]:
    torch.set_num_threads(threads)
    rows = []
    for name, regime, what, batch, image, queries in CASES:
        if regime not in regimes: continue
        shapes = pyramid(image)
        S = int(shapes.prod(1).sum())
        t = (bench_core if what == 'core' else bench_layer)(batch, shapes, repeats, queries=queries)
        (rw, rc), (fw, fc) = t['reference'], t['fast']
        rows.append((name, regime, S, queries or S, kernel_for(S, queries), rw, fw, rw / fw, rc, fc, rc / fc))
        print(f'  {name:44s} S={S:5d} Q={queries or S:5d} ({rows[-1][4]})  wall: reference {rw*1e3:6.0f} ms, '
              f'fast {fw*1e3:6.0f} ms, {rw/fw:.2f}x;  CPU: {rc*1e3:6.0f} / {fc*1e3:6.0f} ms, {rc/fc:.2f}x;  '
              f'load {os.getloadavg()[0]:.1f}', file=sys.stderr, flush=True)
    return rows


def run_child(policy: str, threads: int, repeats: int, regimes) -> list[tuple]:
    "Run one setting in a fresh process (the OpenMP wait policy is read at start-up)."
    env = dict(os.environ)
    if policy != 'env': env['OMP_WAIT_POLICY'] = policy.upper()
    print(f'OMP_WAIT_POLICY={env.get("OMP_WAIT_POLICY", "(unset)")}, {threads} thread(s):', file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, __file__, '--child', '--threads', str(threads), '--repeats', str(repeats),
                          '--cases', *regimes], env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return [tuple(r) for r in json.loads(out.strip().splitlines()[-1])]


def cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or 'unknown CPU'


def section(tables: dict[tuple, list[tuple]], repeats: int, command: str, load_before, load_after) -> str:
    lines = [SECTION, '',
             'Forward + backward of multi-scale deformable attention: the fast path (`impl="fast"`, the default: '
             'weighted gathers with `F.embedding_bag` and a hand-written backward, `detr_explained.ms_deform_attn_fast`, '
             'notebook `10a`) against the readable reference (`impl="reference"`: one `F.grid_sample` per level, as '
             'the official `ms_deform_attn_core_pytorch`). The fast path picks its kernel by shape: a zero-framed '
             f'canvas when each value token is read by at least {DENSE_POINTS} points per head (encoder-like: every '
             'token a query), a gather of the four corners straight from the value otherwise (decoder-like: 300 '
             'queries). Heads 8, points 4, levels at strides 8/16/32/64; the core has head_dim 32 (d_model 256); the '
             'layers are a whole `DeformableTransformerEncoderLayer` / `DeformableTransformerDecoderLayer` '
             '(d_model 256, FFN 1024, with their linear layers, self-attention and FFN). Median of the repeats, '
             'both implementations interleaved in one run.', '',
             f'Command: `{command}`  ', f'Date: {datetime.datetime.now().isoformat(timespec="minutes")}; '
             f'torch {torch.__version__}; {cpu_name()}, {os.cpu_count()} logical CPUs; repeats {repeats}.  ',
             f'Load average (1/5/15 min) before: {load_before}, after: {load_after}. The machine was shared with other '
             'jobs, so wall times are noisy; the ratios come from interleaved runs. Process CPU time (all threads) is '
             'the cleaner measure with one thread; with two threads on an overloaded machine it also counts OpenMP '
             'threads waiting for each other. With the default (spinning) OpenMP wait policy, two threads on an '
             'overloaded machine make every parallel op wait for a descheduled partner thread; the fast path has more, '
             'smaller ops than the reference and suffers more from it. `OMP_WAIT_POLICY=PASSIVE` removes that effect; '
             'it is what the library chooses itself (`detr_explained.core.configure_threads`, when the library is '
             'imported before torch, as by the `detr-explained` command; also the Makefile\'s and the course kernel\'s '
             'default). The \'unset\' tables show libgomp\'s own default, which a program that imports torch first '
             '(as this benchmark does) gets.', '']
    for (policy, threads), rows in tables.items():
        wait = os.environ.get('OMP_WAIT_POLICY', 'unset (libgomp default: spin, then sleep)') if policy == 'env' else policy.upper()
        lines += [f'### {threads} thread(s), OMP_WAIT_POLICY {wait}', '',
                  '| case | regime | tokens S | queries Q | fast kernel | reference wall (ms) | fast wall (ms) '
                  '| speed-up (wall) | reference CPU (ms) | fast CPU (ms) | speed-up (CPU) |',
                  '|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|']
        lines += [f'| {n} | {reg} | {s} | {q} | {k} | {rw*1e3:.0f} | {fw*1e3:.0f} | **{rw/fw:.2f}x** | {rc*1e3:.0f} '
                  f'| {fc*1e3:.0f} | {rc/fc:.2f}x |' for n, reg, s, q, k, rw, fw, _, rc, fc, _ in rows]
        lines += ['', summary(rows), '']
    return '\n'.join(lines)


def summary(rows: list[tuple]) -> str:
    "One line per table: the range of wall-clock speed-ups of the core and of the layers, per regime."
    parts = []
    for regime in ('encoder', 'decoder'):
        for what in ('core', 'layer'):
            sp = [r[7] for r in rows if r[1] == regime and r[0].startswith('core') == (what == 'core')]
            if sp: parts.append(f'{regime}-like {what}: {min(sp):.2f}-{max(sp):.2f}x')
    return 'Speed-up of the fast path (wall): ' + '; '.join(parts) + '.'


def write_section(text: str, path: Path = RESULTS):
    "Replace (or append) the '## Deformable attention' section of RESULTS.md, leaving the other sections alone."
    old = path.read_text() if path.exists() else '# Benchmarks\n'
    pattern = re.compile(rf'^{re.escape(SECTION)}\n.*?(?=^## |\Z)', re.S | re.M)
    new = pattern.sub(lambda m: text.rstrip() + '\n\n', old) if pattern.search(old) else old.rstrip() + '\n\n' + text.rstrip() + '\n'
    atomic_write_text(path, new.rstrip() + '\n')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--threads', type=int, nargs='+', default=[1, 2], help='torch thread counts to run')
    p.add_argument('--wait-policy', nargs='+', default=['env'], choices=['env', 'passive', 'active'],
                   help="OpenMP wait policy per setting: 'env' = as in the environment")
    p.add_argument('--repeats', type=int, default=7, help='timed repeats per case (the median is reported)')
    p.add_argument('--cases', nargs='+', default=['encoder', 'decoder'], choices=['encoder', 'decoder'],
                   help='which regimes to run')
    p.add_argument('--no-write', action='store_true', help=f'print only, do not update {RESULTS.name}')
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(run_all(a.threads[0], a.repeats, a.cases))); return
    load_before = ' '.join(f'{x:.1f}' for x in os.getloadavg())
    print(f'load average (1/5/15 min): {load_before}', file=sys.stderr, flush=True)
    tables = {(pol, t): run_child(pol, t, a.repeats, a.cases) for pol in a.wait_policy for t in a.threads}
    load_after = ' '.join(f'{x:.1f}' for x in os.getloadavg())
    command = 'python benchmarks/bench_deform_attn.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    text = section(tables, a.repeats, command.strip(), load_before, load_after)
    print('\n' + text)
    if not a.no_write: write_section(text); print(f'written to {RESULTS}')


if __name__ == '__main__':
    main()
