"""Overhead of ultraloop's loop against a hand-written PyTorch loop doing the same work, in one process.

Each case builds both sides from the same seed (same model, optimiser, data and loader), then alternates
timed epochs (train + valid) between them, so drift in the machine hits both alike, and prints the median
ratio ultraloop / hand-written. Run: `python bench/overhead.py [--epochs 15] [--n 64000] [--threads 1]`.
The `nan` case measures what TerminateOnNaNCB costs: it reads each training loss on the host (one read per step, a
host-device sync on a GPU), so its baseline is the same ultraloop loop without it (`core`'s ultraloop side); goal on
CPU: <= 1.03.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ultraloop as U  # noqa: E402

LR = 0.05


def make_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nv = n // 5
    x = torch.randn(n + nv, 1, 28, 28, generator=g)
    y = (x.flatten(1) @ torch.randn(784, 10, generator=g)).argmax(1)
    return x[:n], y[:n], x[n:], y[n:]


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def hand_written(data, bs):
    """The bar: the loop a careful user writes by hand, over the same in-memory loaders."""
    torch.manual_seed(0)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dls = U.DataLoaders.from_tensors(*data, bs=bs, seed=0)

    def epoch():
        for training, dl in ((True, dls.train), (False, dls.valid)):
            model.train(training)
            with torch.set_grad_enabled(training):
                for x, y in dl:
                    loss = F.cross_entropy(model(x), y)
                    if training:
                        loss.backward()
                        opt.step()
                        opt.zero_grad()
    return epoch


def ultraloop_core(data, bs):
    torch.manual_seed(0)
    dls = U.DataLoaders.from_tensors(*data, bs=bs, seed=0)
    learn = U.TrainLearner(tiny_model(), dls, loss_func=F.cross_entropy, lr=LR, cbs=[U.DeviceCB('cpu')])
    return lambda: learn.fit(1)


def hand_metrics(data, bs):
    """The bar with metrics: accuracy (a correct count) and the sample-weighted loss summed on the device per batch,
    read once per phase."""
    torch.manual_seed(0)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dls = U.DataLoaders.from_tensors(*data, bs=bs, seed=0)
    results = []

    def epoch():
        for training, dl in ((True, dls.train), (False, dls.valid)):
            model.train(training)
            correct, loss_sum, n = torch.zeros((), dtype=torch.long), torch.zeros(()), 0
            with torch.set_grad_enabled(training):
                for x, y in dl:
                    preds = model(x)
                    loss = F.cross_entropy(preds, y)
                    if training:
                        loss.backward()
                        opt.step()
                        opt.zero_grad()
                    correct += (preds.argmax(1) == y).sum()
                    loss_sum += loss.detach() * len(y)
                    n += len(y)
            results.append((correct.item() / n, loss_sum.item() / n))
    return epoch


class _QuietMetricsCB(U.MetricsCB):
    def _log(self, d): pass  # keep stdout for the JSON records


def ultraloop_metrics(data, bs):
    from torchmetrics.classification import MulticlassAccuracy
    torch.manual_seed(0)
    dls = U.DataLoaders.from_tensors(*data, bs=bs, seed=0)
    cbs = [U.DeviceCB('cpu'), _QuietMetricsCB(accuracy=MulticlassAccuracy(num_classes=10, average='micro'))]
    learn = U.TrainLearner(tiny_model(), dls, loss_func=F.cross_entropy, lr=LR, cbs=cbs)
    return lambda: learn.fit(1)


def hand_deferred(data, bs, chunk_bytes: int = 2**20):
    """The bar for MetricsCB's own work: the same deferred metric a careful user writes by hand. Per batch the
    predictions and targets are copied into preallocated buffers and the sample-weighted loss added on the device; the
    torchmetrics accuracy gets one update per full buffer and at the phase end, and each value is read once a phase."""
    from torchmetrics.classification import MulticlassAccuracy
    torch.manual_seed(0)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dls = U.DataLoaders.from_tensors(*data, bs=bs, seed=0)
    acc = MulticlassAccuracy(num_classes=10, average='micro')
    cap = chunk_bytes // (10 * 4 + 8)
    results = []

    def epoch():
        for training, dl in ((True, dls.train), (False, dls.valid)):
            model.train(training)
            acc.reset()
            pbuf, ybuf, n = torch.empty(cap, 10), torch.empty(cap, dtype=torch.long), 0
            loss_sum, count = torch.zeros((), dtype=torch.float64), 0
            with torch.set_grad_enabled(training):
                for x, y in dl:
                    preds = model(x)
                    loss = F.cross_entropy(preds, y)
                    if training:
                        loss.backward()
                        opt.step()
                        opt.zero_grad()
                    k = len(y)
                    if n + k > cap:
                        acc.update(pbuf[:n], ybuf[:n])
                        pbuf, ybuf, n = torch.empty(cap, 10), torch.empty(cap, dtype=torch.long), 0
                    pbuf[n:n + k].copy_(preds.detach()); ybuf[n:n + k].copy_(y); n += k
                    loss_sum.add_(loss.detach(), alpha=k); count += k
            if n: acc.update(pbuf[:n], ybuf[:n])
            results.append((acc.compute().item(), (loss_sum / count).item()))
    return epoch


def ultraloop_nan(data, bs):
    torch.manual_seed(0)
    dls = U.DataLoaders.from_tensors(*data, bs=bs, seed=0)
    cbs = [U.DeviceCB('cpu'), U.TerminateOnNaNCB('stop')]
    learn = U.TrainLearner(tiny_model(), dls, loss_func=F.cross_entropy, lr=LR, cbs=cbs)
    return lambda: learn.fit(1)


# 'noise': the hand-written loop against a second copy of itself; how far its ratio strays from 1.0 is the
# machine's noise floor for the other cases' ratios. 'nan': the baseline ("hand" in the record) is ultraloop's core.
CASES = {'noise': (hand_written, hand_written), 'core': (hand_written, ultraloop_core),
         'metrics': (hand_metrics, ultraloop_metrics), 'metrics_deferred': (hand_deferred, ultraloop_metrics),
         'nan': (ultraloop_core, ultraloop_nan)}


def interleaved(a, b, epochs: int) -> tuple[float, float, float, float]:
    """Median epoch time of each side, the median of the per-pair ratios b / a, and the ratio of the fastest epochs
    (the machine's noise only ever adds time, so the fastest epoch of each side is the least disturbed). The garbage
    collector runs between epochs, not inside them."""
    a(); b()  # warm-up
    ta, tb, ratios = [], [], []
    for i in range(epochs):
        pair = ((a, ta), (b, tb))
        for f, ts in pair if i % 2 == 0 else pair[::-1]:  # ABBA: neither side always runs second
            gc.collect(); gc.disable()
            try:
                t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
            finally: gc.enable()
        ratios.append(tb[-1] / ta[-1])
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios), min(tb) / min(ta)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--epochs', type=int, default=15)
    p.add_argument('--n', type=int, default=64000)
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--cases', default=','.join(CASES))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = make_data(a.n)
    n_batches = -(-a.n // a.bs) + -(-(a.n // 5) // a.bs)
    for name in a.cases.split(','):
        hand, ours = CASES[name]
        th, tu, r, rmin = interleaved(hand(data, a.bs), ours(data, a.bs), a.epochs)
        print(json.dumps({'case': name, 'baseline': hand.__name__, 'hand_us_per_batch': round(th / n_batches * 1e6, 1),
                          'ultraloop_us_per_batch': round(tu / n_batches * 1e6, 1), 'median_ratio': round(r, 3),
                          'fastest_ratio': round(rmin, 3),
                          'threads': a.threads, 'bs': a.bs, 'n': a.n, 'torch': torch.__version__,
                          'machine': f'{platform.machine()} {platform.processor() or ""}'.strip(),
                          'date': date.today().isoformat()}), flush=True)


if __name__ == '__main__':
    main()
