"""OpenMP's wait policy on a busy CPU: Deformable DETR inference with libgomp's default against the setup that
`detr_explained.core.configure_threads` chooses (OMP_WAIT_POLICY=PASSIVE unless the user set a policy).

With the default policy, an OpenMP thread that finishes its share of a parallel op spins for a while before it
sleeps. On a machine with more runnable jobs than cores, its partner thread is often descheduled, so every
parallel op waits for a time slice while the spinning thread burns the core the partner needs. PASSIVE makes
waiting threads sleep at once. OpenMP reads the variable once, when torch is imported, so each setting runs in
its own child process; the children stay alive and are asked for one timed inference in turn (interleaved), so
that changes of load hit every setting alike. Settings:

- `default`: OMP_WAIT_POLICY unset, torch imported before the library (a script that does `import torch` first);
- `configure_threads`: OMP_WAIT_POLICY unset, the library imported first: `detr_explained.core` calls
  `configure_threads()` before it imports torch (the `detr-explained` command's path);
- `passive`: OMP_WAIT_POLICY=PASSIVE set by the user (what `make` does).

    python benchmarks/bench_threads.py                      # 2 threads, 7 repeats, writes RESULTS.md's section
    python benchmarks/bench_threads.py --threads 1 2 --busy 2 --no-write   # 1 and 2 threads, 2 extra busy processes

Model: Deformable DETR (ResNet-18, 6 + 6 layers, d_model 256, 300 queries, random weights), one 512 x 512 image.
"""
from __future__ import annotations
import argparse, datetime, json, os, re, statistics, subprocess, sys, time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / 'RESULTS.md'
SECTION = '## Threads: the OpenMP wait policy'
SETTINGS = ('default', 'configure_threads', 'passive')
POLICY_VARS = ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')


def child(setting: str, threads: int, image: int):
    "Build the model, warm up, then answer each 'run' line on stdin with one timed inference as a JSON line."
    if setting == 'configure_threads':
        import detr_explained.core                                   # noqa: F401  (chooses the policy, then imports torch)
        import torch
    else:
        import torch
        import detr_explained.core                                   # noqa: F401  (torch came first: nothing chosen)
    from detr_explained.deformable_detr import DeformableDETRConfig, build_model
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(DeformableDETRConfig(backbone='resnet18')).eval()
    x = torch.randn(1, 3, image, image)
    def infer():
        with torch.inference_mode(): model(x)
    infer()                                                          # warm-up
    print(json.dumps({'ready': True, 'OMP_WAIT_POLICY': os.environ.get('OMP_WAIT_POLICY')}), flush=True)
    for line in sys.stdin:
        if line.strip() != 'run': break
        t0, c0 = time.perf_counter(), time.process_time(); infer()
        print(json.dumps({'wall': time.perf_counter() - t0, 'cpu': time.process_time() - c0}), flush=True)


def start(setting: str, threads: int, image: int) -> tuple[subprocess.Popen, str|None]:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARS + ('OMP_NUM_THREADS',)}
    if setting == 'passive': env['OMP_WAIT_POLICY'] = 'PASSIVE'
    p = subprocess.Popen([sys.executable, __file__, '--child', setting, '--threads', str(threads), '--image', str(image)],
                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = json.loads(p.stdout.readline())
    return p, ready['OMP_WAIT_POLICY']


def measure(threads: int, repeats: int, image: int) -> dict:
    "Median wall and CPU seconds per setting, the settings asked in turn."
    procs = {s: start(s, threads, image) for s in SETTINGS}
    times = {s: [] for s in SETTINGS}
    try:
        for _ in range(repeats):
            for s, (p, _) in procs.items():
                p.stdin.write('run\n'); p.stdin.flush()
                times[s].append(json.loads(p.stdout.readline()))
    finally:
        for p, _ in procs.values():
            p.stdin.close(); p.wait(timeout=60)
    out = {}
    for s in SETTINGS:
        wall, cpu = statistics.median(t['wall'] for t in times[s]), statistics.median(t['cpu'] for t in times[s])
        out[s] = dict(wall=wall, cpu=cpu, policy=procs[s][1], walls=[t['wall'] for t in times[s]])
        print(f'  {threads} thread(s), {s:18s} (OMP_WAIT_POLICY seen by the child: {procs[s][1]}): median wall '
              f'{wall:6.2f} s, CPU {cpu:6.2f} s   load {os.getloadavg()[0]:.1f}', file=sys.stderr, flush=True)
    return out


def burn():
    while True: pass


def section(results: dict, repeats: int, image: int, busy: int, command: str, load_before: str, load_after: str) -> str:
    lines = [SECTION, '',
             'Deformable DETR inference (ResNet-18, 6 + 6 layers, d_model 256, 300 queries, random weights) on one '
             f'{image} x {image} image, with libgomp\'s default wait policy against the setup '
             '`detr_explained.core.configure_threads()` chooses before torch starts (OMP_WAIT_POLICY=PASSIVE unless '
             'the user set `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`). Each setting is a child process kept alive and '
             'asked for one timed inference in turn (interleaved); median of the repeats. `default`: policy unset, '
             'torch imported before the library; `configure_threads`: policy unset, the library imported first (the '
             '`detr-explained` command calls `configure_threads()` before importing torch); `passive`: '
             'OMP_WAIT_POLICY=PASSIVE set by the user, as the Makefile does.', '',
             f'Command: `{command}`  ',
             f'Date: {datetime.datetime.now().isoformat(timespec="minutes")}; {os.cpu_count()} logical CPUs; '
             f'repeats {repeats}; extra busy processes started by the benchmark: {busy}.  ',
             f'Load average (1/5/15 min) before: {load_before}, after: {load_after} (the machine was shared with '
             'other jobs: that is the busy machine this benchmark is about).', '',
             '| threads | setting | OMP_WAIT_POLICY in the child | median wall (s) | median CPU (s) | default / this (wall) |',
             '|---:|---|---|---:|---:|---:|']
    for threads, res in results.items():
        base = res['default']['wall']
        for s in SETTINGS:
            r = res[s]
            lines.append(f"| {threads} | {s} | {r['policy'] or 'unset'} | {r['wall']:.2f} | {r['cpu']:.2f} | "
                         f"**{base / r['wall']:.2f}x** |")
    return '\n'.join(lines) + '\n'


def write_section(text: str, path: Path = RESULTS):
    from detr_explained.core import atomic_write_text
    old = path.read_text() if path.exists() else '# Benchmarks\n'
    pattern = re.compile(rf'^{re.escape(SECTION)}\n.*?(?=^## |\Z)', re.S | re.M)
    new = (pattern.sub(lambda m: text.rstrip() + '\n\n', old) if pattern.search(old)
           else old.rstrip() + '\n\n' + text.rstrip() + '\n')
    atomic_write_text(path, new.rstrip() + '\n')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--threads', type=int, nargs='+', default=[2], help='torch thread counts')
    p.add_argument('--repeats', type=int, default=7, help='timed inferences per setting (the median is reported)')
    p.add_argument('--image', type=int, default=512, help='image side in pixels')
    p.add_argument('--busy', type=int, default=0, help='extra busy-looping processes to start during the measurement')
    p.add_argument('--no-write', action='store_true', help=f'print only, do not update {RESULTS.name}')
    p.add_argument('--child', choices=SETTINGS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child: return child(a.child, a.threads[0], a.image)
    import multiprocessing as mp
    burners = [mp.Process(target=burn, daemon=True) for _ in range(a.busy)]
    for b in burners: b.start()
    try:
        load_before = ' '.join(f'{x:.1f}' for x in os.getloadavg())
        print(f'load average (1/5/15 min): {load_before}', file=sys.stderr, flush=True)
        results = {t: measure(t, a.repeats, a.image) for t in a.threads}
        load_after = ' '.join(f'{x:.1f}' for x in os.getloadavg())
    finally:
        for b in burners: b.terminate()
    command = 'python benchmarks/bench_threads.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    text = section(results, a.repeats, a.image, a.busy, command.strip(), load_before, load_after)
    print('\n' + text)
    if not a.no_write: write_section(text); print(f'written to {RESULTS}')


if __name__ == '__main__':
    main()
