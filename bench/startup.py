"""Start-up: how long the command and the library take to start, each in fresh processes, beside torch's own start.

Each figure is the median wall time of `--runs` fresh processes (default 5), run one after another from this checkout
(PYTHONPATH is the repository root, so `python -m ultraloop` is this code), measured from the process's launch to its
end, or to the first batch's start (the loop's `_one_batch`, entered for the first time: the run then exits):

- `import torch`: torch's own import, the floor of any PyTorch script;
- `hand-written first batch`: that, the demo's CNN built with torch.nn, its AdamW optimiser (making one imports
  torch._dynamo, a few seconds every training script pays) and a batch: the baseline of the demo's first batch;
- `import ultraloop`, `ultraloop fit --help`: against `import torch`;
- `ultraloop demo --epochs 1 (first batch)`: data (the digits), model, optimiser, callbacks, up to the first batch of the
  LR finder, against the hand-written script;
- `ultraloop demo --epochs 1 (total)`: the whole demo (the LR finder, one epoch, two plots saved with matplotlib).

`beyond` is the figure minus its baseline: what is the loop's own. Goal: below 0.5 s for all but the total. Each figure
is given as wall time and as CPU time (user + system of the process, OMP_NUM_THREADS=1): on a busy machine the wall
times stray by seconds, the CPU times much less.
Run: `python bench/startup.py [--runs 5] [--root CHECKOUT]`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs the demo in this process and exits at the first batch, printing nothing more (the parent times the process).
FIRST_BATCH = '''
import os, sys
from ultraloop import learner
def first(self): os._exit(0)
learner.Learner._one_batch = first
from ultraloop.cli import main
sys.exit(main(['demo', '--epochs', '1', '--out', sys.argv[1]]))
'''

# What a hand-written script does before its first batch: torch, the demo's CNN and its AdamW optimiser (whose making
# imports torch._dynamo, seconds that any PyTorch training script pays), and a batch of the digits' shape.
HAND = '''
import torch
from torch import nn
def conv(ni, nf): return nn.Sequential(nn.Conv2d(ni, nf, 3, stride=2, padding=1), nn.ReLU())
model = nn.Sequential(conv(1, 8), conv(8, 16), conv(16, 32), nn.Conv2d(32, 10, 3, stride=2, padding=1), nn.Flatten())
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
'''

CASES = {  # name: (command after the python executable, baseline name or None)
    'import torch': (['-c', 'import torch'], None),
    'hand-written first batch': (['-c', HAND], None),
    'import ultraloop': (['-c', 'import ultraloop'], 'import torch'),
    'ultraloop fit --help': (['-m', 'ultraloop', 'fit', '--help'], 'import torch'),
    'ultraloop demo --epochs 1 (first batch)': (['-c', FIRST_BATCH, '{out}'], 'hand-written first batch'),
    'ultraloop demo --epochs 1 (total)': (['-m', 'ultraloop', 'demo', '--epochs', '1', '--out', '{out}'],
                                          'hand-written first batch'),
}


def _time(args: list[str], out: str, root: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh process running `args`."""
    env = {**os.environ, 'PYTHONPATH': str(root), 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1'}
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, *[a.replace('{out}', out) for a in args]], cwd=root, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0: raise SystemExit(f'{args[:2]} failed ({r.returncode}):\n{r.stderr[-2000:]}')
    return dt, (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)


def _commit(root: Path) -> str:
    r = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True, text=True)
    return r.stdout.strip() or 'unknown'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--runs', type=int, default=5, help='fresh processes per figure (default: 5)')
    p.add_argument('--cases', default=','.join(CASES), help='comma-separated case names (default: all)')
    p.add_argument('--root', type=Path, default=ROOT, help='the checkout to measure (default: this one), e.g. a worktree '
                   'of an earlier commit')
    a = p.parse_args()
    names = [n for n in a.cases.split(',') if n]
    need = {CASES[n][1] for n in names if CASES[n][1]}
    names = [n for n in CASES if n in names or n in need]  # baselines first, in the table's order
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        # interleaved rounds: each round runs every case once, so a busy spell of the machine touches all of them
        times: dict[str, list[float]] = {n: [] for n in names}
        cpus: dict[str, list[float]] = {n: [] for n in names}
        for r in range(a.runs):
            for n in names:
                wall, cpu = _time(CASES[n][0], str(Path(tmp) / f'run{r}'), a.root)
                times[n].append(wall)
                cpus[n].append(cpu)
    import torch  # for its version only, once the timings are done
    cpu_medians = {}
    for n in names:
        medians[n], cpu_medians[n] = statistics.median(times[n]), statistics.median(cpus[n])
        base = CASES[n][1]
        rec = {'what': n, 'median_s': round(medians[n], 3), 'min_s': round(min(times[n]), 3), 'max_s': round(max(times[n]), 3),
               'baseline': base, 'beyond_s': None if base is None else round(medians[n] - medians[base], 3),
               'cpu_median_s': round(cpu_medians[n], 3),
               'cpu_beyond_s': None if base is None else round(cpu_medians[n] - cpu_medians[base], 3),
               'runs': a.runs, 'commit': _commit(a.root), 'torch': torch.__version__, 'python': platform.python_version(),
               'machine': platform.machine(), 'cpus': os.cpu_count(), 'date': date.today().isoformat()}
        print(json.dumps(rec))


if __name__ == '__main__':
    main()
