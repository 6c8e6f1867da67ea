"""What the agreement on a stop (SIGTERM, SIGUSR1, ctrl-C reaching any process) costs per training batch.

Under several processes every process must stop at the same batch, so DistributedCB (and AccelerateCB) agrees on it every
`signal_every` train batches, at each train phase's last batch and at each validation phase's end: one all_reduce of
one int32 and one read of it (on a GPU that read waits for the device). The script starts itself under torchrun on
127.0.0.1 (CPU, gloo, 2 processes of 1 thread) and, in each, fits `Learner + TrainCB + DistributedCB` (train phases
only) on an in-memory MLP task while counting, for the whole fit: the all_reduces called from Python other than DDP's
gradient ones (so the agreements alone), the host reads of a tensor (`Tensor.item`), and DDP's gradient all-reduces (a
communication hook) for comparison. Then it times the agreement itself (`StopVote.vote`, 2,000 calls between barriers) and the
fit's batches, and rank 0 prints one JSON line per `signal_every`: the counts per batch, microseconds per agreement and
per batch, and the share of a batch's time the agreement takes. Counts, not timings, carry the claim: at most one tiny
collective and one read per `signal_every` batches.
Run: `python bench/signals.py [--every 16,1] [--samples 16384] [--bs 64] [--epochs 2]`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ultraloop as U  # noqa: E402
from bench.distributed import free_port, make_data, make_model  # noqa: E402


class Counts(U.Callback):
    """Counts, over a fit, Python all_reduces, Tensor.item reads and DDP's gradient all-reduces."""
    order = -20  # after DistributedCB's before_fit made the DDP wrapper

    def __init__(self, dcb):
        self.dcb, self.n, self._hooked = dcb, dict.fromkeys(('all_reduce', 'item', 'ddp_grad', 'batches'), 0), False

    def before_fit(self, learn):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            self.n['ddp_grad'] += 1
            self._hooked = True  # the hook's own all_reduce is a gradient's, not counted below
            try: return allreduce_hook(None, bucket)
            finally: self._hooked = False
        self.dcb.wrapper.register_comm_hook(None, hook)
        self._all_reduce, self._item = dist.all_reduce, torch.Tensor.item

        def all_reduce(*a, **k):
            if not self._hooked: self.n['all_reduce'] += 1
            return self._all_reduce(*a, **k)

        def item(t):
            self.n['item'] += 1
            return self._item(t)
        dist.all_reduce, torch.Tensor.item = all_reduce, item

    def after_batch(self, learn):
        if learn.training: self.n['batches'] += 1

    def cleanup_fit(self, learn): dist.all_reduce, torch.Tensor.item = self._all_reduce, self._item


def worker(args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo')  # DistributedCB finds it and leaves it be
    x, y = make_data(args.samples, torch.device('cpu'))
    for every in args.every:
        dcb = U.DistributedCB()
        dcb.signal_every = every
        counts = Counts(dcb)
        dls = U.DataLoaders(U.TensorLoader(x, y, bs=args.bs, shuffle=True, seed=1), U.TensorLoader(x[:args.bs], y[:args.bs]))
        learn = U.Learner(make_model(torch.device('cpu')), dls, F.cross_entropy, lr=0.05, cbs=[U.TrainCB(), dcb, counts])
        learn.fit(1, valid=False)  # warm-up: first-fit set-up, allocator
        counts.n = dict.fromkeys(counts.n, 0)
        t = time.perf_counter()
        learn.fit(args.epochs, valid=False)
        fit_s = time.perf_counter() - t
        n = counts.n
        # the agreement alone
        vote, learn.stop_signal = U.callbacks.distributed.StopVote(learn, every, torch.device('cpu')), None
        dist.barrier()
        t = time.perf_counter()
        for _ in range(2000): vote.vote(learn)
        dist.barrier()
        agree_us = (time.perf_counter() - t) / 2000 * 1e6
        if int(os.environ['RANK']) == 0:
            b = n['batches']
            batch_us = fit_s / b * 1e6
            rec = {'setup': 'cpu gloo x2', 'signal_every': every, 'train_batches': b, 'agreements': n['all_reduce'],
                   'all_reduces_per_batch': round(n['all_reduce'] / b, 4), 'host_reads_per_batch': round(n['item'] / b, 4),
                   'ddp_grad_all_reduces_per_batch': round(n['ddp_grad'] / b, 4), 'us_per_agreement': round(agree_us, 1),
                   'us_per_batch': round(batch_us, 1), 'agreement_share': round(n['all_reduce'] * agree_us / (fit_s * 1e6), 4),
                   'bs_per_process': args.bs, 'torch': torch.__version__, 'machine': platform.machine(),
                   'date': date.today().isoformat()}
            print(json.dumps(rec), flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--every', default='16,1', help='signal_every values, comma-separated (default: 16,1: the default and '
                                                   'an agreement every batch)')
    p.add_argument('--samples', type=int, default=16384, help='training samples (default: 16384)')
    p.add_argument('--bs', type=int, default=64, help='batch size per process (default: 64)')
    p.add_argument('--epochs', type=int, default=2, help='counted epochs (default: 2)')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    args.every = [int(v) for v in args.every.split(',')]
    if args.worker: return worker(args)
    env = dict(os.environ, MASTER_ADDR='127.0.0.1', OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    if sys.platform == 'linux': env.setdefault('GLOO_SOCKET_IFNAME', 'lo')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2', '--master-addr', '127.0.0.1',
           '--master-port', str(free_port()), __file__, '--worker', '--every', ','.join(map(str, args.every)),
           '--samples', str(args.samples), '--bs', str(args.bs), '--epochs', str(args.epochs)]
    subprocess.run(cmd, env=env, check=True)


if __name__ == '__main__':
    main()
