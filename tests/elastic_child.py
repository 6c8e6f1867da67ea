"""One training script for elastic restarts and for changing the number of processes on resume, run by tests/test_elastic.py
and bench/elastic.py under torchrun (or in one process):

    elastic_child.py OUT FOLDER LOADER EPOCHS BS [FOLDER LOADER EPOCHS BS ...] [--kill SPEC[,SPEC...]]

runs one fit per FOLDER, in order: a float64 MLP trained with `fit_one_cycle` (DistributedCB, CheckpointCB into
FOLDER every 2 train batches), going on from FOLDER's newest checkpoint when it holds one, as a script relaunched by
`torchrun --max-restarts` must; LOADER is 'tensors' (DataLoaders.from_tensors) or 'torch' (shuffled torch
DataLoaders); BS is per process; a FOLDER written '@FOLDER' is waited for (another process prepares it). After each
fit every rank writes OUT/<FOLDER's name>-rank<r>.pt: weights, optimiser, metric history, the lrs the schedule gave,
and the checkpoint it resumed from.
`--kill SPECS`: the i-th of the comma-separated SPECS in round i (TORCHELASTIC_RESTART_COUNT; an empty one: no kill):
'batch:R:K' SIGKILLs rank R before its K-th train batch of the round (counted over its fits); 'save:R:K' SIGKILLs rank
R inside its K-th checkpoint of the round (rank 0 half way through writing the file, another rank once its parts are
gathered). Before a planned kill the time goes to OUT/killed-at-round<n>. Each process notes its pid in
OUT/pid-rank<r>-round<n>, so a campaign can SIGKILL one at a random moment from outside."""
import io
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

N_TRAIN, N_VALID, N_IN, N_OUT = 96, 40, 8, 3  # 96: divides by 1, 2, 3, 4 processes, with no repeated sample


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VALID, N_IN, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(N_IN, N_OUT, generator=g, dtype=torch.float64)).argmax(1)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def loaders(kind: str, bs: int):
    from ultraloop import DataLoaders
    xt, yt, xv, yv = data()
    if kind == 'tensors': return DataLoaders.from_tensors(xt, yt, xv, yv, bs=bs, seed=1)
    from torch.utils.data import DataLoader, TensorDataset
    return DataLoaders(DataLoader(TensorDataset(xt, yt), batch_size=bs, shuffle=True),
                       DataLoader(TensorDataset(xv, yv), batch_size=bs))


def learner(folder, kind: str, bs: int, timeout: float = 60.0):
    from functools import partial

    from ultraloop import CheckpointCB, DistributedCB, Learner, MetricsCB, TrainCB
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_IN, 16), nn.ReLU(), nn.Linear(16, N_OUT)).double()
    cbs = [TrainCB(), MetricsCB(), DistributedCB(timeout=timeout), CheckpointCB(folder, every_batches=2, keep=99)]
    return Learner(model, loaders(kind, bs), F.cross_entropy, lr=0.1, cbs=cbs,
                   opt_func=partial(torch.optim.SGD, momentum=0.9))


def train(folder: Path, kind: str, epochs: int, bs: int) -> dict:
    """The run: resumed from `folder`'s newest checkpoint when there is one. Returns what the tests compare."""
    from ultraloop.state import newest_checkpoint
    learn = learner(folder, kind, bs)
    resume = folder if folder.is_dir() and newest_checkpoint(folder) is not None else None
    resumed = None if resume is None else newest_checkpoint(folder).name
    sched = learn.fit_one_cycle(epochs, 0.1, resume=resume)
    return {'model': learn.model.state_dict(), 'opt': learn.opt.state_dict(), 'history': learn.metrics.history,
            'lrs': list(sched.lrs), 'last_lr': learn.opt.param_groups[0]['lr'], 'resumed': resumed,
            'world_size': learn.world_size}


class _Killer:
    """The first round's planned SIGKILL (see the module's docstring)."""

    def __init__(self, spec: str, rank: int):
        what, r, k = spec.split(':')
        self.what, self.k, self.on, self.seen = what, int(k), int(r) == rank, 0

    def install(self) -> list:
        if not self.on: return []
        if self.what == 'batch':
            from ultraloop import Callback
            killer = self

            class KillAt(Callback):
                order = -100

                def before_batch(self, learn):
                    if not learn.training: return
                    killer.seen += 1
                    if killer.seen == killer.k: _die()
            return [KillAt()]
        import torch.distributed as dist
        if int(os.environ['RANK']) == 0:  # half way through writing the checkpoint's temporary file
            save = torch.save

            def half_save(obj, f, *a, **kw):
                self.seen += 1
                if self.seen != self.k or not hasattr(f, 'write'): return save(obj, f, *a, **kw)
                buf = io.BytesIO()
                save(obj, buf, *a, **kw)
                f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                f.flush()
                _die()
            torch.save = half_save
        else:  # its parts handed to rank 0, which writes the file
            gather = dist.gather_object

            def gather_then_die(*a, **kw):
                gather(*a, **kw)
                self.seen += 1
                if self.seen == self.k: _die()
            dist.gather_object = gather_then_die
        return []


def _die():
    (OUT / f'killed-at-round{ROUND}').write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


OUT, ROUND = Path('.'), 0

if __name__ == '__main__':
    torch.set_num_threads(1)
    args = sys.argv[1:]
    kill = None
    if '--kill' in args:
        i = args.index('--kill')
        kill, args = args[i + 1], args[:i] + args[i + 2:]
    OUT = Path(args[0])
    rank, ROUND = int(os.environ.get('RANK', 0)), int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f'pid-rank{rank}-round{ROUND}').write_text(str(os.getpid()))
    if os.environ.get('ULTRALOOP_ONE_PREFIX'):  # bench/elastic.py --unfixed: one store prefix for every round, for comparison
        import ultraloop.callbacks.distributed as D
        D._prefix = lambda group: f'ultraloop/{group}'
    specs = [] if kill is None else kill.split(',')
    if ROUND < len(specs) and specs[ROUND]:
        import ultraloop.learner as L
        extra = _Killer(specs[ROUND], rank).install()
        if extra:  # added to every fit of this process
            add = L.Learner.fit

            def fit(self, *a, cbs=None, **kw): return add(self, *a, cbs=[*(cbs or []), *extra], **kw)
            L.Learner.fit = fit
    for j in range(1, len(args), 4):
        folder, kind, epochs, bs = Path(args[j].lstrip('@')), args[j + 1], int(args[j + 2]), int(args[j + 3])
        for _ in range(6000 if args[j].startswith('@') else 0):
            if folder.exists(): break
            time.sleep(0.1)
        torch.save(train(folder, kind, epochs, bs), OUT / f'{folder.name}-rank{rank}.pt')
