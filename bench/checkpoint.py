"""How long a checkpoint stalls the loop: CheckpointCB(background=True) against a synchronous save of the same state.

For MLPs of about 1M, 10M and 100M parameters (SGD with momentum: the state is the weights and the momentum, 8 bytes a
parameter), in one process, on CPU (and on a GPU with `--device cuda`):
- `sync_save_s`: `state.save_file(learn.state_dict(), path)` at a batch's end: torch.save into a temporary file, fsync,
  rename, folder fsync; what CheckpointCB without `background` does. The median of `--saves` saves.
- `stall_s`: the time the loop's thread spends inside CheckpointCB(background=True) per checkpoint (the copy into
  reused host buffers, handing the write to the thread, noticing the previous write's end and pruning), median.
- `lost_s`: what the fit loses per checkpoint in all: (fit time with background checkpoints - the same fit without
  checkpoints) / checkpoints; it also counts the writer thread's competition for the CPU and the GIL.
- `wait_s`: the part of the stall spent waiting for the previous write to end (median; `waits_s` lists each).
Checkpoints come every k batches, k chosen so that about 3 synchronous saves' time passes between two; a background
write that takes longer than that (the writer thread shares the CPU with training) makes the next checkpoint wait,
which the stall counts. Goal: `stall_s` <= 10% of
`sync_save_s` at 100M parameters.

Run: `python bench/checkpoint.py [--sizes 1,10,100] [--saves 5] [--threads 1] [--dir /tmp/ckbench] [--device cpu]`.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ultraloop as U  # noqa: E402
from ultraloop import state  # noqa: E402

N_IN, N_OUT, BS = 256, 10, 16


def mlp(millions: int) -> nn.Module:
    """Three hidden layers of width w: about `millions` M parameters."""
    w = int(math.sqrt(millions * 1e6 / 3))
    return nn.Sequential(nn.Linear(N_IN, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                         nn.Linear(w, w), nn.ReLU(), nn.Linear(w, N_OUT))


class TimedCheckpointCB(U.CheckpointCB):
    """CheckpointCB recording the time the loop's thread spends in it: at each save, and at the other batches' ends
    (noticing a write's end, pruning)."""

    def before_fit(self, learn):
        super().before_fit(learn)
        self.stalls, self.waits, self.between = [], [], 0.0

    def _save(self, learn):
        t = time.perf_counter()
        if self._write is not None: self._finish(learn)  # the previous write is not done yet: the loop waits for it
        self.waits.append(time.perf_counter() - t)
        super()._save(learn)

    def cleanup_batch(self, learn):
        t, saving = time.perf_counter(), self._due or learn.interrupted
        super().cleanup_batch(learn)
        if saving: self.stalls.append(time.perf_counter() - t)
        else: self.between += time.perf_counter() - t

    def after_epoch(self, learn):
        t = time.perf_counter()
        super().after_epoch(learn)
        if state.epoch_ends(learn): self.stalls.append(time.perf_counter() - t)


def learner(millions: int, n_batches: int, device: str, cbs=()):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_batches * BS, N_IN, generator=g), torch.randint(0, N_OUT, (n_batches * BS,), generator=g)
    dls = U.DataLoaders.from_tensors(x, y, x[:BS], y[:BS], bs=BS, seed=0, device=device)
    return U.TrainLearner(mlp(millions).to(device), dls, F.cross_entropy, lr=0.01, cbs=list(cbs),
                          opt_func=partial(torch.optim.SGD, momentum=0.9))


def sync_saves(millions: int, saves: int, folder: Path, device: str) -> tuple[float, float, int]:
    """Median synchronous save time, median batch time, and the parameter count."""
    learn = learner(millions, 4, device)
    times = []

    class Save(U.Callback):
        order = 50
        def cleanup_batch(self, learn):
            t = time.perf_counter()
            state.save_file(learn.state_dict(), folder / 'sync.pt')
            times.append(time.perf_counter() - t)
    learn.fit(1, valid=False)  # warm up: the momentum exists from here on
    t = time.perf_counter()
    learn.fit(1, valid=False)
    batch = (time.perf_counter() - t) / 4
    for _ in range(saves): learn.fit(1, valid=False, cbs=[Save()])
    (folder / 'sync.pt').unlink()
    return statistics.median(times[-saves:]), batch, sum(p.numel() for p in learn.model.parameters())


def background(millions: int, saves: int, every: int, folder: Path, device: str) -> tuple[list[float], list[float], float]:
    """The stall of each background checkpoint (the other batches' time in CheckpointCB shared out among them), and
    the fit time lost per checkpoint (the wait for the last write at the fit's end included)."""
    n = every * (saves + 1) - 1  # the epoch-end checkpoint comes every - 1 batches after the last periodic one
    plain = learner(millions, n, device)
    plain.fit(1, valid=False)  # warm up
    t = time.perf_counter()
    plain.fit(1, valid=False)
    t_plain = time.perf_counter() - t
    del plain
    cb = TimedCheckpointCB(folder / 'bg', every_batches=every, keep=1, background=True)
    learn = learner(millions, n, device, [cb])
    learn.fit(1, valid=False)  # warm up
    t = time.perf_counter()
    learn.fit(1, valid=False)
    t_ck = time.perf_counter() - t
    return [x + cb.between / len(cb.stalls) for x in cb.stalls], cb.waits, (t_ck - t_plain) / len(cb.stalls)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--sizes', default='1,10,100', help='model sizes in millions of parameters')
    ap.add_argument('--saves', type=int, default=5)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--dir', default=None, help='where to write (default: a temporary folder)')
    ap.add_argument('--device', default='cpu')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.dir or tempfile.mkdtemp(prefix='ckbench-'))
    folder.mkdir(parents=True, exist_ok=True)
    where = {'machine': f'{platform.machine()} {platform.processor() or ""}'.strip(), 'cpus': torch.get_num_threads(),
             'torch': torch.__version__, 'date': date.today().isoformat(), 'device': args.device}
    if args.device.startswith('cuda'): where['gpu'] = torch.cuda.get_device_name()
    try:
        for m in map(int, args.sizes.split(',')):
            sync, batch, n_params = sync_saves(m, args.saves, folder, args.device)
            every = max(1, math.ceil(3 * sync / batch))
            stalls, waits, lost = background(m, args.saves, every, folder, args.device)
            stall, wait = statistics.median(stalls), statistics.median(waits)
            print(json.dumps({'params_m': round(n_params / 1e6, 1), 'state_mb': round(n_params * 8 / 1e6),
                              'sync_save_s': round(sync, 4), 'stall_s': round(stall, 4),
                              'stall_vs_sync': round(stall / sync, 3), 'wait_s': round(wait, 4),
                              'waits_s': [round(w, 3) for w in waits], 'lost_s': round(lost, 4),
                              'lost_vs_sync': round(lost / sync, 3), 'every': every, 'batch_s': round(batch, 4),
                              'checkpoints': len(stalls), **where}), flush=True)
    finally:
        if args.dir is None: shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
    main()
