"""Peak memory of one epoch with metrics: ultraloop's MetricsCB against a hand-written loop, each in a fresh process.

Each side runs one epoch (train + valid) of a Linear(784, C) on 60,000 x 784 in-memory samples (bs 64) with a
torchmetrics accuracy, and reports its peak resident memory above the level just before the epoch (ru_maxrss, so
one process per measurement). The hand-written loop sums the correct count and the loss on the device per batch and
reads them once per phase: what it holds beyond the model is two scalars. Goal: ultraloop within 16 MiB of it, for
any class count C. Run: `python bench/memory.py [--classes 10,1000]`.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _epoch(side: str, classes: int, n: int) -> float:
    """Peak RSS growth in MiB over one epoch of `side` ('hand' or 'ultraloop'), measured in this process."""
    import torch
    from torch import nn
    from torch.nn import functional as F
    sys.path.insert(0, str(ROOT))
    import ultraloop as U
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + n // 6, 784, generator=g)
    y = torch.randint(0, classes, (len(x),), generator=g)
    dls = U.DataLoaders.from_tensors(x[:n], y[:n], x[n:], y[n:], bs=64, seed=0)
    torch.manual_seed(0)
    model = nn.Linear(784, classes)
    from torchmetrics.classification import MulticlassAccuracy  # imported and built before the baseline, on both sides

    class Quiet(U.MetricsCB):
        def _log(self, d): pass
    cbs = [U.DeviceCB('cpu'), Quiet(accuracy=MulticlassAccuracy(num_classes=classes, average='micro'))]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if side == 'hand':
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for training, dl in ((True, dls.train), (False, dls.valid)):
            model.train(training)
            correct, loss_sum, count = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.float64), 0
            with torch.set_grad_enabled(training):
                for xb, yb in dl:
                    preds = model(xb)
                    loss = F.cross_entropy(preds, yb)
                    if training: loss.backward(); opt.step(); opt.zero_grad()
                    correct += (preds.argmax(1) == yb).sum(); loss_sum.add_(loss.detach(), alpha=len(yb)); count += len(yb)
            (correct / count).item(), (loss_sum / count).item()
    else:
        U.TrainLearner(model, dls, F.cross_entropy, lr=0.01, cbs=cbs).fit(1)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB on Linux


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--classes', default='10,1000')
    p.add_argument('--n', type=int, default=60000)
    p.add_argument('--side', help=argparse.SUPPRESS)  # internal: measure one side in this process
    a = p.parse_args(argv)
    if a.side:
        print(_epoch(a.side, int(a.classes), a.n))
        return
    for c in map(int, a.classes.split(',')):
        mib = {side: float(subprocess.run([sys.executable, __file__, '--side', side, '--classes', str(c), '--n', str(a.n)],
                                          check=True, capture_output=True, text=True).stdout)
               for side in ('hand', 'ultraloop')}
        print(json.dumps({'case': f'metrics_memory_{c}_classes', 'hand_peak_mib': round(mib['hand'], 1),
                          'ultraloop_peak_mib': round(mib['ultraloop'], 1),
                          'extra_mib': round(mib['ultraloop'] - mib['hand'], 1), 'n': a.n, 'bs': 64,
                          'machine': f'{platform.machine()} {platform.processor() or ""}'.strip(),
                          'date': date.today().isoformat()}), flush=True)


if __name__ == '__main__':
    main()
