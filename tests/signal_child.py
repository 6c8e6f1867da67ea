"""The runs test_signals.py stops with real signals, sent by the test from outside.

`python signal_child.py OUT`: one process that (1) runs the `ultraloop fit` command (its `main`), (2) a Python `fit`, each
waiting at a known batch until the test's SIGTERM arrives, and writes what it saw to OUT/single.json; then (3) a fit that
gets SIGUSR1 and then SIGTERM, which must end the process at once, by the signal.
`torchrun ... signal_child.py OUT dist`: an uninterrupted run; then one whose rank 1 waits at a known batch for the test's
SIGTERM, which must stop every rank at one batch; then new learners resume it; then the same three runs with
AccelerateCB in place of TrainCB and DistributedCB. Each rank writes OUT/dist-rank<r>.json.
Waiting points are announced by OUT/wait-<name> files holding the pid; the test polls for them."""
import contextlib
import io
import json
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ultraloop import (AccelerateCB, Callback, CheckpointCB, DataLoaders, DistributedCB, Learner, MetricsCB, Preempted,
                       TrainCB, TrainLearner)

CLI_ARGS = ['fit', '--model', 'mlp', '--epochs', '2', '--threads', '1', '--every-batches', '10']  # 23 train batches an epoch
PY_WAIT, TWICE_WAIT, DIST_WAIT = 7, 5, 7  # the train batch (counted from 1 over the fit) each run waits at
DIST_EVERY = 5  # DistributedCB.signal_every in the two-process runs: rank 1's signal at batch 7 stops both after batch 10


def announce(out: Path, name: str) -> None:
    tmp = out / f'.wait-{name}'
    tmp.write_text(str(os.getpid()))
    tmp.rename(out / f'wait-{name}')


class WaitForSignal(Callback):
    """At the end of train batch `at` (counted over the fit; on process `rank` only), announces itself and waits for a
    signal to reach the fit (up to 120 s), as a long batch would. With `then_sleep`, it goes on sleeping after it: only
    a second signal can end the process then. Records the handlers installed during the fit."""
    order = 60

    def __init__(self, out: Path, name: str, at: int, rank: int = 0, then_sleep: bool = False):
        self.out, self.point, self.at, self.rank, self.then_sleep, self.n = out, name, at, rank, then_sleep, 0

    def after_batch(self, learn):
        if not learn.training: return
        self.n += 1
        self.during = {s.name: _handler_name(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        if self.n != self.at or learn.rank != self.rank: return
        announce(self.out, self.point)
        end = time.monotonic() + 120
        while learn.stop_signal is None and time.monotonic() < end: time.sleep(0.01)
        if learn.stop_signal is None: raise RuntimeError(f'no signal came to {self.point} in 120 s')
        if self.then_sleep:
            announce(self.out, f'{self.point}-{learn.stop_signal.name}')
            time.sleep(120)


def _handler_name(h) -> str:
    return {signal.SIG_DFL: 'SIG_DFL', signal.default_int_handler: 'default_int_handler'}.get(h, 'fit')


@contextlib.contextmanager
def captured():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): yield out, err


def toy_learner(folder, *cbs) -> Learner:
    """A small run: 64 samples, bs 6 (11 train batches an epoch), AdamW, a checkpoint every 4 train batches."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    dls = DataLoaders.from_tensors(x[:64], y[:64], x[64:], y[64:], bs=6, seed=3)
    return TrainLearner(model, dls, F.cross_entropy, lr=0.03, cbs=[MetricsCB(), CheckpointCB(folder, every_batches=4), *cbs],
                        opt_func=partial(torch.optim.AdamW, weight_decay=0.01))


def result(learn) -> dict:
    return {'model': learn.model.state_dict(), 'opt': learn.opt.state_dict(), 'history': learn.metrics.history}


def single(out: Path) -> None:
    from ultraloop import cli
    metric_cbs = cli._metric_cbs
    cli._metric_cbs = lambda: [*metric_cbs(), WaitForSignal(out, 'cli', 30)]  # epoch 1, its 7th batch
    argv = [*CLI_ARGS, '--out', str(out / 'run'), '--csv', str(out / 'parts.csv'), '--checkpoint-dir', str(out / 'cli')]
    with captured() as (o, e): rc = cli.main(argv)
    res = {'cli': {'rc': rc, 'out': o.getvalue(), 'err': e.getvalue(), 'files': sorted(os.listdir(out / 'cli'))}}

    before = {s.name: _handler_name(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    wait = WaitForSignal(out, 'py', 11 + PY_WAIT)  # epoch 1
    learn = toy_learner(out / 'py', wait)
    with captured() as (o, e):
        try: learn.fit(3, resume='auto')  # the folder holds nothing yet: a fresh start
        except Preempted as exc: stop = {'code': exc.code, 'signal': exc.signal.name, 'checkpoint': str(exc.checkpoint),
                                         'str': str(exc), 'system_exit': isinstance(exc, SystemExit)}
    after = {s.name: _handler_name(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    res['py'] = {**stop, 'err': e.getvalue(), 'before': before, 'during': wait.during, 'after': after,
                 'files': sorted(os.listdir(out / 'py'))}
    (out / 'single.json').write_text(json.dumps(res))

    learn = toy_learner(out / 'twice', WaitForSignal(out, 'twice', TWICE_WAIT, then_sleep=True))
    learn.fit(3)  # SIGUSR1, then SIGTERM: the process ends at once, by SIGTERM
    raise SystemExit('the second signal did not end the process')


def dist_learner(folder: Path, *cbs, accelerate: bool = False) -> Learner:
    """Two processes of bs 4 on 100 samples: 13 train batches each an epoch; with `accelerate`, AccelerateCB runs
    the processes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 8, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(8, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    steps = [AccelerateCB(mixed_precision='no', cpu=True)] if accelerate else [TrainCB(), DistributedCB()]
    steps[-1].signal_every = DIST_EVERY
    return Learner(model, DataLoaders.from_tensors(x[:100], y[:100], x[100:], y[100:], bs=4, seed=1), F.cross_entropy,
                   lr=0.05, cbs=[*steps, MetricsCB(), CheckpointCB(folder, every_batches=4, keep=20), *cbs],
                   opt_func=partial(torch.optim.SGD, momentum=0.9))


def flat(learn) -> list[float]: return torch.cat([p.detach().flatten() for p in learn.model.parameters()]).tolist()


def dist(out: Path, rank: int, accelerate: bool = False) -> dict:
    """The uninterrupted run; the run rank 1's SIGTERM stops; and a new learner resuming it (from the file alone)."""
    name = 'acc' if accelerate else 'dist'
    learn = dist_learner(out / f'{name}-ref', accelerate=accelerate)
    learn.fit(2)
    res = {'ref': {'params': flat(learn), 'history': learn.metrics.history}}
    learn = dist_learner(out / f'{name}-ck', WaitForSignal(out, name, DIST_WAIT, rank=1), accelerate=accelerate)
    with captured() as (o, e):
        try: learn.fit(2, resume='auto')
        except Preempted as exc: res['stop'] = {'code': exc.code, 'signal': exc.signal.name, 'at': [learn.epoch, learn.iter],
                                                'checkpoint': exc.checkpoint.name, 'err': e.getvalue()}
    res['files'] = sorted(os.listdir(out / f'{name}-ck')) if rank == 0 else None  # before the resume adds its own
    learn = dist_learner(out / f'{name}-ck', accelerate=accelerate)
    with captured(): learn.fit(2, resume='auto')
    res['resumed'] = {'params': flat(learn), 'history': learn.metrics.history}
    return res


if __name__ == '__main__':
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    if len(sys.argv) == 2: single(out)
    else:
        rank = int(os.environ['RANK'])
        res = {'dist': dist(out, rank), 'acc': dist(out, rank, accelerate=True)}
        (out / f'dist-rank{rank}.json').write_text(json.dumps(res))
        import torch.distributed
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # accelerate's group, left to the interpreter's exit, can abort it
