"""Throughput of DistributedCB against a hand-written DDP loop doing the same work, in the same processes.

The script starts itself under torchrun (`python -m torch.distributed.run`, on 127.0.0.1): on the CPU (gloo) with
1 and then 2 processes of 1 thread each, and, where CUDA is present, with one process per GPU (nccl). In every
process both sides train the same model on the same in-memory data, bs per process, each process its share of one
shared permutation: ultraloop as `Learner + TrainCB + DistributedCB` (+ DeviceCB on a GPU), the hand-written loop
as `DistributedDataParallel` over index slices. Train epochs alternate in ABBA order between the two sides, each
timed between barriers; rank 0 prints one JSON line per set-up: samples/s over all processes for each side and the
median of the per-pair ratios ultraloop / hand-written (goal on a GPU: <= 1.05).
Run: `python bench/distributed.py [--epochs 9] [--samples 32768] [--bs 64] [--cuda-only]`. With one GPU the nccl set-up is
one process: DDP's own cost against a hand-written DDP loop (two processes sharing one GPU would measure nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ultraloop as U  # noqa: E402

LR = 0.05


def make_data(n: int, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 784, generator=g)
    y = (x @ torch.randn(784, 10, generator=g)).argmax(1)
    return x.to(device), y.to(device)


def make_model(device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)


def hand_written(x, y, bs: int, device):
    """The bar: the DDP loop a careful user writes, each rank taking positions r, r+N, ... of a shared permutation."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(make_model(device), device_ids=[device.index] if device.type == 'cuda' else None)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)  # the same seed on every rank: the same permutation
    per = len(x) // world

    def epoch():
        idx = torch.randperm(len(x), generator=g).to(device)[rank::world][:per]
        for i in range(0, per, bs):
            j = idx[i:i + bs]
            loss = F.cross_entropy(model(x[j]), y[j])
            loss.backward()
            opt.step()
            opt.zero_grad()
    return epoch


def ultraloop(x, y, bs: int, device):
    dls = U.DataLoaders(U.TensorLoader(x, y, bs=bs, shuffle=True, seed=1), U.TensorLoader(x[:bs], y[:bs], bs=bs))
    cbs = [U.TrainCB(), U.DistributedCB()] + ([U.DeviceCB(device)] if device.type == 'cuda' else [])
    learn = U.Learner(make_model(device), dls, F.cross_entropy, lr=LR, cbs=cbs)
    return lambda: learn.fit(1, valid=False)


def timed(f, device) -> float:
    dist.barrier()
    if device.type == 'cuda': torch.cuda.synchronize()
    t = time.perf_counter()
    f()
    if device.type == 'cuda': torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - t


def worker(args) -> None:
    if args.cpu: torch.set_num_threads(1)
    device = torch.device('cpu')
    if not args.cpu:
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
    # one group for both sides: DistributedCB finds it and leaves it be
    dist.init_process_group('gloo' if args.cpu else 'nccl')
    x, y = make_data(args.samples, device)
    sides = {'hand': hand_written(x, y, args.bs, device), 'ultraloop': ultraloop(x, y, args.bs, device)}
    for f in sides.values(): f()  # warm-up: allocator, kernels, first-fit set-up
    times = {k: [] for k in sides}
    for i in range(args.epochs):
        for k in (('hand', 'ultraloop') if i % 2 == 0 else ('ultraloop', 'hand')): times[k].append(timed(sides[k], device))
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        samples = (args.samples // world) * world
        rec = {'setup': f'{"cpu gloo" if args.cpu else "cuda nccl"} x{world}', 'bs_per_process': args.bs, 'n': args.samples,
               'hand_samples_per_s': round(samples / statistics.median(times['hand'])),
               'ultraloop_samples_per_s': round(samples / statistics.median(times['ultraloop'])),
               'median_ratio': round(statistics.median(u / h for u, h in zip(times['ultraloop'], times['hand'])), 3),
               'epochs': args.epochs, 'torch': torch.__version__,
               'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine(),
               'date': date.today().isoformat()}
        print(json.dumps(rec), flush=True)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch(n_proc: int, cpu: bool, args) -> None:
    env = dict(os.environ, MASTER_ADDR='127.0.0.1', OMP_NUM_THREADS='1')
    if cpu: env['CUDA_VISIBLE_DEVICES'] = ''  # the CPU set-ups stay on the CPU where a GPU is present
    if cpu and sys.platform == 'linux': env.setdefault('GLOO_SOCKET_IFNAME', 'lo')  # gloo's connections on loopback
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', str(n_proc), '--master-addr', '127.0.0.1',
           '--master-port', str(free_port()), __file__, '--worker', '--epochs', str(args.epochs), '--samples', str(args.samples),
           '--bs', str(args.bs)] + (['--cpu'] if cpu else [])
    subprocess.run(cmd, env=env, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--epochs', type=int, default=9, help='timed epochs per side (default: 9)')
    p.add_argument('--samples', type=int, default=32768, help='training samples (default: 32768)')
    p.add_argument('--bs', type=int, default=64, help='batch size per process (default: 64)')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--cpu', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--cuda-only', action='store_true', help='only the nccl set-up, one process per GPU (gpu_check.sh)')
    args = p.parse_args()
    if args.worker: return worker(args)
    if args.cuda_only and not torch.cuda.is_available(): p.error('--cuda-only: this torch sees no CUDA device')
    if not args.cuda_only:
        for n_proc in (1, 2): launch(n_proc, True, args)
    if torch.cuda.is_available(): launch(torch.cuda.device_count(), False, args)


if __name__ == '__main__':
    main()
