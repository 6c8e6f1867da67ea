"""A fault campaign for elastic restarts: `torchrun --nproc-per-node 2 --max-restarts 1` (CPU, gloo, 127.0.0.1) runs
tests/elastic_child.py (a float64 MLP, fit_one_cycle, a checkpoint every 2 train batches, resumed from the folder's
newest checkpoint when relaunched), and in each trial one rank, chosen at random, is SIGKILLed once: at a random moment
from outside (half the trials), before a random train batch, or inside a random checkpoint write (rank 0 half way
through writing the file, rank 1 after handing its parts over). Each trial ends bitwise equal to the uninterrupted
2-process run (weights, optimiser, metric history, lrs), differs, fails (non-zero exit) or hangs (past --timeout).
`--unfixed` sets the groups up under one store prefix for every round, as torch does by default, for comparison.
Run: `python bench/elastic.py [--trials 20] [--seed 0]`; prints one line per trial and the tally.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / 'tests' / 'elastic_child.py'
ARGS = ['tensors', '2', '8']  # loader, epochs, bs per process: 12 train batches per rank, 6 checkpoints in the fit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def env(unfixed: bool) -> dict:
    inherited = [q for q in os.environ.get('PYTHONPATH', '').split(os.pathsep) if q]
    e = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), *inherited]), 'CUDA_VISIBLE_DEVICES': '',
         'OMP_NUM_THREADS': '1', 'GLOO_SOCKET_IFNAME': 'lo'}
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_PORT', 'MASTER_ADDR'): e.pop(k, None)
    if unfixed: e['ULTRALOOP_ONE_PREFIX'] = '1'
    return e


def launch(out: Path, restarts: int, unfixed: bool, kill: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2', '--max-restarts', str(restarts),
           '--master-addr', '127.0.0.1', '--master-port', str(free_port()), str(CHILD), str(out), str(out / 'ckpt'), *ARGS]
    if kill: cmd += ['--kill', kill]
    out.mkdir(parents=True)
    log = open(out / 'log', 'w')
    return subprocess.Popen(cmd, env=env(unfixed), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor): return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict): return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def results(out: Path) -> list[dict] | None:
    files = [out / f'ckpt-rank{r}.pt' for r in (0, 1)]
    if not all(f.exists() for f in files): return None
    return [{k: v for k, v in torch.load(f).items() if k != 'resumed'} for f in files]


def wait_for(path: Path, proc: subprocess.Popen, limit: float) -> bool:
    end = time.time() + limit
    while not path.exists():
        if proc.poll() is not None or time.time() > end: return False
        time.sleep(0.05)
    return True


def stop(proc: subprocess.Popen) -> None:
    try: os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started (its own session)
    except ProcessLookupError: pass
    proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--trials', type=int, default=20)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--timeout', type=float, default=240.0, help='seconds after which a trial counts as hung')
    ap.add_argument('--unfixed', action='store_true', help='one store prefix for every round, as torch by default')
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix='elastic-'))
    try:
        ref_dir = tmp / 'reference'
        p = launch(ref_dir, 0, args.unfixed)
        wait_for(ref_dir / 'pid-rank0-round0', p, args.timeout)
        t0 = time.time()
        p.wait(timeout=args.timeout)
        span = time.time() - t0  # from the ranks' start to the end: the moments an outside kill is drawn from
        ref = results(ref_dir)
        if p.returncode != 0 or ref is None: sys.exit(f'the uninterrupted run failed:\n{(ref_dir / "log").read_text()[-3000:]}')
        tally, missed = {'equal': 0, 'differ': 0, 'failed': 0, 'hung': 0}, 0
        for i in range(args.trials):
            rank, how = rnd.randrange(2), rnd.choice(['moment', 'moment', 'batch', 'save'])
            kill = {'moment': None, 'batch': f'batch:{rank}:{rnd.randint(1, 12)}',
                    'save': f'save:{rank}:{rnd.randint(1, 6)}'}[how]
            out = tmp / f'trial{i}'
            t = time.time()
            p = launch(out, 1, args.unfixed, kill)
            what = kill
            if how == 'moment':
                delay = rnd.uniform(0, 0.8 * span)  # 0.8: the load of the machine varies, the kill must land
                what = f'rank {rank} at {delay:.1f} s'
                if wait_for(out / f'pid-rank{rank}-round0', p, args.timeout):
                    time.sleep(delay)
                    try: os.kill(int((out / f'pid-rank{rank}-round0').read_text()), signal.SIGKILL)
                    except ProcessLookupError:
                        what += ' (already ended: no kill)'
                        missed += 1
            try:
                p.wait(timeout=max(1.0, args.timeout - (time.time() - t)))
                got = results(out)
                verdict = 'failed' if p.returncode != 0 or got is None else 'equal' if same(got, ref) else 'differ'
            except subprocess.TimeoutExpired: verdict = 'hung'
            finally: stop(p)  # also when this script is interrupted: no rank is left running
            tally[verdict] += 1
            rounds = len(list(out.glob('pid-rank0-round*')))
            print(f'trial {i + 1:2d}: kill {what}: {verdict} ({rounds} rounds, {time.time() - t:.0f} s)', flush=True)
            if verdict != 'equal': shutil.copy(out / 'log', tmp.parent / f'elastic-trial{i}.log')
            shutil.rmtree(out, ignore_errors=True)
        mode = 'one store prefix for every round (--unfixed)' if args.unfixed else 'ultraloop'
        print(f'{tally["equal"]} of {args.trials} trials ended bitwise equal to the uninterrupted run, {tally["differ"]} '
              f'differed, {tally["failed"]} failed, {tally["hung"]} hung (> {args.timeout:.0f} s); {args.trials - missed} '
              f'kills landed; {mode}; torch '
              f'{torch.__version__}, {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, {date.today()}')
    finally: shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
