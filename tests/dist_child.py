"""Run by test_distributed.py in each process of a torchrun / accelerate launch: `dist_child.py OUT SCENARIO...` runs the
scenarios in order on this process's share and writes what the tests compare to OUT/<scenario>-rank<r>.json. The
tests import it too, to run the same set-ups in one process as the reference."""
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

from ultraloop import (AccelerateCB, BalancedAccuracy, Callback, CheckpointCB, CSVLoggerCB, DataLoaders, DistributedCB,
                       GradientAccumulationCB, Learner, MetricsCB, MicroAccuracy, ProgressCB, TrainCB)

N_TRAIN, N_VALID, N_IN, N_OUT = 100, 101, 8, 3  # 101: 51 and 50 on two ranks


def data(n_train=N_TRAIN, n_valid=N_VALID):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_valid, N_IN, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(N_IN, N_OUT, generator=g, dtype=torch.float64)).argmax(1)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_IN, 16), nn.ReLU(), nn.Linear(16, N_OUT)).double()


def metrics(torchmetrics: bool) -> MetricsCB:
    """A confusion matrix (it counts samples, so a double count or a counted repeat shows) from torchmetrics, which
    sums its own state over processes, or from torcheval, which MetricsCB merges; and torcheval's accuracy.
    (torchmetrics is imported only where needed: it costs seconds in every process.)"""
    from torcheval.metrics import MulticlassAccuracy
    if torchmetrics: from torchmetrics.classification import MulticlassConfusionMatrix as CM
    else: from torcheval.metrics import MulticlassConfusionMatrix as CM
    return MetricsCB(cm=CM(num_classes=N_OUT), acc=MulticlassAccuracy(num_classes=N_OUT))


def count_metrics() -> MetricsCB:
    """The built-in accuracies, whose integer counts MetricsCB sums over processes with their all_reduce."""
    class Quiet(MetricsCB):
        def _log(self, d): pass
    return Quiet(acc=MicroAccuracy(), bal=BalancedAccuracy(N_OUT))


def learner(bs: int, model_seed: int = 0, cbs=(), dls=None, step=None, torchmetrics=False) -> Learner:
    """The set-up every scenario shares; `step` provides the step methods (default TrainCB())."""
    dls = dls or DataLoaders.from_tensors(*data(), bs=bs, seed=1)
    return Learner(model(model_seed), dls, F.cross_entropy, lr=0.1, cbs=[step or TrainCB(), metrics(torchmetrics), *cbs],
                   opt_func=partial(torch.optim.SGD, momentum=0.9))  # momentum: an optimiser state to save and load


def torch_loaders(bs: int, n_train=N_TRAIN - 1):
    """torch DataLoaders: 99 train samples, so a DistributedSampler over two ranks repeats one."""
    from torch.utils.data import DataLoader, TensorDataset
    xt, yt, xv, yv = data(n_train)
    return DataLoaders(DataLoader(TensorDataset(xt, yt), batch_size=bs, shuffle=True),
                       DataLoader(TensorDataset(xv, yv), batch_size=bs))


def flat_params(m: nn.Module) -> list[float]:
    fsdp = sys.modules.get('torch.distributed.fsdp')  # imported by DistributedCB('fsdp'); costs a second elsewhere
    if fsdp is not None and isinstance(m, fsdp.FSDPModule):  # gather the shards (a collective)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True))
        return torch.cat([sd[k].flatten() for k, _ in m.named_parameters()]).tolist()
    return torch.cat([p.detach().flatten() for p in m.parameters()]).tolist()


class StepCount(Callback):
    def __init__(self): self.steps = 0
    def after_step(self, learn): self.steps += 1


class CommCount(Callback):
    """Counts DDP's gradient all-reduces with a communication hook on DistributedCB's wrapper."""
    order = -20  # after DistributedCB's before_fit made the wrapper

    def __init__(self, dcb): self.dcb, self.calls = dcb, 0

    def before_fit(self, learn):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            self.calls += 1
            return allreduce_hook(None, bucket)
        self.dcb.wrapper.register_comm_hook(None, hook)


class RaiseAt(Callback):
    """Rank `rank` raises before train batch `it`, noting the time in `path` first."""
    def __init__(self, rank: int, it: int, path: Path): self.rank, self.it, self.path = rank, it, path

    def before_batch(self, learn):
        if learn.training and learn.rank == self.rank and learn.iter == self.it:
            self.path.write_text(repr(time.time()))
            raise RuntimeError(f'rank {self.rank} fails at batch {self.it}')


@contextlib.contextmanager
def captured():
    """What this process prints (stdout and stderr, where tqdm draws) while the block runs."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf): yield buf


# ---- the scenarios: each returns what its tests compare -------------------------------------------------------------
def ddp(out: Path, rank: int) -> dict:
    """Ranks seeded differently; validation-only fit, then a 2-epoch fit (a second process group); writers on."""
    d = out / f'files-rank{rank}'
    d.mkdir()
    learn = learner(16, model_seed=rank, cbs=[DistributedCB(), ProgressCB(), CSVLoggerCB(d / 'history.csv')],
                    torchmetrics=True)
    with captured() as printed:
        learn.fit(1, train=False)
        first = learn.metrics.history
        learn.fit(2)
        plotted = learn.plot_metrics(d / 'metrics.png')
    res = {'valid_only': first, 'history': learn.metrics.history, 'params': flat_params(learn.model),
           'printed': printed.getvalue(), 'files': sorted(os.listdir(d)), 'plotted': plotted is not None,
           'keys': list(learn.model.state_dict()), 'world_size': learn.world_size}
    try: learn.fit(1, cbs=[MetricsCB(own=OwnMean())])
    except ValueError as e: res['own_metric_error'] = str(e)
    learn = learner(16, model_seed=rank, cbs=[DistributedCB(), counts := count_metrics()])
    with captured(): learn.fit(1, train=False)  # 101 valid samples: 51 and 50
    res['counts'] = counts.history
    res['counted'] = [int(counts.metrics['acc'].total), int(counts.metrics['bal'].total.sum())]  # summed once: 101
    return res


class OwnMean:
    """A metric object with no way to sum its state over processes."""
    def reset(self): self.total = 0.0
    def update(self, p, y): self.total += float(p.sum())
    def compute(self): return self.total


def fsdp(out: Path, rank: int) -> dict:
    """As ddp, sharded; then a saved state (weights gathered to rank 0, written by it) loaded back goes on exactly."""
    learn = learner(16, model_seed=rank, cbs=[DistributedCB('fsdp')], torchmetrics=True)
    with captured():
        learn.fit(1, train=False)
        first = learn.metrics.history
        learn.fit(2)
        res = {'valid_only': first, 'history': learn.metrics.history, 'params': flat_params(learn.model),
               'keys': list(learn.model.state_dict())}
        learn.save_state(out / 'fsdp-state.pt')
        learn.fit(1)
        res['on'] = flat_params(learn.model)
        learn.load_state(out / 'fsdp-state.pt')
        res['loaded'] = flat_params(learn.model)
        learn.fit(1)
        res['on_again'] = flat_params(learn.model)
    return res


def accumulate(out: Path, rank: int) -> dict:
    dcb, steps = DistributedCB(), StepCount()
    comm = CommCount(dcb)
    learn = learner(16, model_seed=rank, cbs=[dcb, comm, steps, GradientAccumulationCB(2)])
    with captured(): learn.fit(2)
    return {'all_reduces': comm.calls, 'steps': steps.steps, 'params': flat_params(learn.model),
            'history': learn.metrics.history}


def dataloader(out: Path, rank: int) -> dict:
    """torch DataLoaders: validation exact (before training, whose order a DistributedSampler draws its own way)."""
    learn = learner(16, model_seed=rank, cbs=[DistributedCB()], dls=torch_loaders(16))
    with captured():
        learn.fit(1, train=False)
        first = learn.metrics.history
        learn.fit(1)
    return {'valid_only': first, 'history': learn.metrics.history, 'params': flat_params(learn.model)}


class PoisonAt(Callback):
    """Rank `rank`'s train batch `it` of epoch 0 becomes NaN."""
    def __init__(self, rank: int, it: int): self.rank, self.it = rank, it

    def before_batch(self, learn):
        if learn.training and learn.epoch == 0 and learn.iter == self.it and learn.rank == self.rank:
            learn.batch[0] = learn.batch[0] * float('nan')


def nan(out: Path, rank: int) -> dict:
    """A NaN loss on one rank only: TerminateOnNaNCB skips that batch on both, or they would part ways and hang."""
    from ultraloop import TerminateOnNaNCB
    stop = TerminateOnNaNCB('skip')
    learn = learner(16, model_seed=rank, cbs=[DistributedCB(), PoisonAt(1, 1), stop])
    with captured(): learn.fit(1)
    return {'skipped': stop.skipped, 'params': flat_params(learn.model)}


def cli(out: Path, rank: int) -> dict:
    from ultraloop.cli import main
    d = out / f'cli-rank{rank}'
    with captured() as printed:
        rc = main(['fit', '--model', 'mlp', '--epochs', '1', '--bs', '32', '--opt', 'sgd', '--threads', '1',
                   '--out', str(d), '--csv', str(d / 'history.csv')])
    return {'rc': rc, 'printed': printed.getvalue(), 'files': sorted(os.listdir(d)) if d.exists() else None}


def accelerate(out: Path, rank: int) -> dict:
    acb = AccelerateCB(mixed_precision='no', cpu=True)
    learn = learner(16, model_seed=rank, step=acb)
    with captured() as printed: learn.fit(2)
    return {'history': learn.metrics.history, 'params': flat_params(acb.acc.unwrap_model(learn.model)),
            'printed': printed.getvalue(), 'world_size': learn.world_size}


def checkpointed(folder: Path, rank: int, *cbs) -> Learner:
    """The set-up of the kill-and-resume scenarios: a checkpoint every 2 train batches (each rank has 4 per epoch)."""
    return learner(16, model_seed=rank, cbs=[DistributedCB(), CheckpointCB(folder, every_batches=2, keep=9), *cbs])


def machines(out: Path, rank: int) -> dict:
    """Uninterrupted: what the killed run, resumed, must end with."""
    learn = checkpointed(out / 'ckpt-full', rank)
    with captured(): learn.fit(2)
    return {'history': learn.metrics.history, 'params': flat_params(learn.model)}


class KillAt(Callback):
    """Rank `rank` is killed (SIGKILL: no cleanup, no exception) before train batch `it` of epoch `epoch`."""
    def __init__(self, rank: int, epoch: int, it: int): self.rank, self.epoch, self.it = rank, epoch, it

    def before_batch(self, learn):
        if learn.training and learn.rank == self.rank and (learn.epoch, learn.iter) == (self.epoch, self.it):
            os.kill(os.getpid(), signal.SIGKILL)


def kill(out: Path, rank: int) -> dict:
    learn = checkpointed(out / 'ckpt', rank, KillAt(1, 1, 3))  # the newest checkpoint is then epoch 1, train batch 2
    learn.fit(2)
    return {}


def resume(out: Path, rank: int) -> dict:
    from ultraloop.state import newest_checkpoint
    learn = checkpointed(out / 'ckpt', rank)
    start = newest_checkpoint(out / 'ckpt').name
    with captured(): learn.fit(2, resume=out / 'ckpt')
    return {'history': learn.metrics.history, 'params': flat_params(learn.model), 'from': start}


def fail(out: Path, rank: int) -> dict:
    learn = learner(4, model_seed=rank, cbs=[DistributedCB(), RaiseAt(1, 2, out / 'failed-at')])
    learn.fit(1)
    return {}


SCENARIOS = {f.__name__: f for f in (ddp, fsdp, accumulate, dataloader, nan, cli, accelerate, machines, kill, resume, fail)}

if __name__ == '__main__':
    torch.set_num_threads(1)
    out, names = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ['RANK'])
    for name in names:
        res = SCENARIOS[name](out, rank)
        (out / f'{name}-rank{rank}.json').write_text(json.dumps(res))
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # a group (accelerate's) left to the interpreter's exit can abort the process
