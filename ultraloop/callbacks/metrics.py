"""Metrics and the loss accumulated on the batch's device and read once per epoch phase (MetricsCB), and their plot."""
from __future__ import annotations

import math
import os
import sys
import warnings
from copy import copy
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import n_counted
from ..learner import Callback, Learner, batch_split, main_process, split_batch
from ..utils import check_int, map_tensors, several_processes

__all__ = ['MetricsCB', 'MicroAccuracy', 'BalancedAccuracy', 'plot_metrics']  # format_row: for consumers that print rows


class _WeightedMean:
    """The loss as a sample-weighted mean: `update(value, weight)` queues one add on the value's device, no sync.
    The sum is float64 (float32 on mps, which has no float64), so long epochs lose no precision."""

    def __init__(self): self.reset()

    def reset(self) -> None: self.total, self.weight = None, 0

    def update(self, value: torch.Tensor, weight: int = 1) -> None:
        """Add `value` (a tensor without grad: detach it first) times `weight`."""
        if self.total is None:
            dtype = torch.float32 if value.device.type == 'mps' else torch.float64
            self.total = torch.zeros((), dtype=dtype, device=value.device)
        self.total.add_(value, alpha=weight)
        self.weight += weight

    def compute(self) -> torch.Tensor:
        if self.total is None: return torch.tensor(float('nan'))
        return self.total / self.weight

    def all_reduce(self, device) -> None:
        """Sum the total and the weight over the processes (a collective: every rank calls it once per phase)."""
        dtype = torch.float64 if self.total is None else self.total.dtype
        t = torch.stack([torch.zeros((), dtype=dtype, device=device) if self.total is None else self.total.to(device),
                         torch.tensor(float(self.weight), dtype=dtype, device=device)])
        dist.all_reduce(t)
        self.total, self.weight = (t[0], int(t[1].item())) if t[1] else (None, 0)


class _CountMetric:
    """A metric whose state is integer counts (int64 tensors named in `_counts`, kept on the batches' device): updating
    queues device work only, and `all_reduce` sums the counts over processes exactly (MetricsCB calls it once per phase).
    `update(preds, targets)`: preds are scores with the classes along dim 1 (logits or probabilities: the argmax is the
    class) or the predicted classes themselves (an integer tensor shaped like targets)."""
    _counts: tuple[str, ...] = ()

    def _shape(self) -> tuple: return ()

    def reset(self) -> None:
        dev = getattr(self, 'device', torch.device('cpu'))
        for nm in self._counts: setattr(self, nm, torch.zeros(self._shape(), dtype=torch.int64, device=dev))

    def to(self, device):
        self.device = torch.device(device)
        for nm in self._counts: setattr(self, nm, getattr(self, nm).to(device))
        return self

    def _classes(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if p.ndim == y.ndim + 1: return p.argmax(1)
        if p.shape == y.shape and not p.is_floating_point(): return p
        raise ValueError(f'{type(self).__name__}: predictions of shape {tuple(p.shape)} do not fit targets of shape '
                         f'{tuple(y.shape)}: give scores with the classes along dim 1 (N, C, ...) or integer classes '
                         f'shaped like the targets')

    def all_reduce(self, device) -> None:
        """Sum the counts over every process (a collective: every rank calls it once per phase)."""
        own = getattr(self, 'device', torch.device('cpu'))
        t = torch.cat([getattr(self, nm).reshape(-1) for nm in self._counts]).to(device)
        dist.all_reduce(t)
        for nm, part in zip(self._counts, t.to(own).split(t.numel() // len(self._counts))):
            setattr(self, nm, part.reshape(self._shape()).clone())

    def state_dict(self) -> dict: return {nm: getattr(self, nm) for nm in self._counts}

    def load_state_dict(self, sd: dict) -> None:
        for nm in self._counts: setattr(self, nm, sd[nm].to(getattr(self, 'device', torch.device('cpu'))))


class MicroAccuracy(_CountMetric):
    """The share of samples classified right (micro accuracy: torchmetrics' `MulticlassAccuracy(average='micro')`,
    whose default is the macro mean over classes), from exact counts: `correct` and `total`, int64 on the device, summed
    over processes exactly. `MetricsCB(accuracy=MicroAccuracy())`; with `update`/`compute`/`reset`, so it also works
    alone. Light: no import beyond torch."""
    _counts = ('correct', 'total')

    def __init__(self): self.reset()

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        self.correct += (self._classes(preds, targets) == targets).sum()
        self.total += targets.numel()

    def compute(self) -> torch.Tensor:
        return self.correct.double() / self.total if self.total.item() else torch.tensor(float('nan'))

    def __repr__(self) -> str: return 'MicroAccuracy()'


class BalancedAccuracy(_CountMetric):
    """Balanced accuracy: the mean over classes of each class's recall (the share of its samples classified right), over
    the classes the targets hold (scikit-learn's `balanced_accuracy_score`; torchmetrics'
    `MulticlassAccuracy(average='macro')` also averages classes seen only in predictions). On unbalanced classes it shows
    what micro accuracy hides: a model that always answers the majority class scores 1 / num_classes. Per-class counts
    `correct` and `total` (int64 on the device) are summed over processes exactly."""
    _counts = ('correct', 'total')

    def __init__(self, num_classes: int):
        self.num_classes = check_int('BalancedAccuracy: num_classes', num_classes, 1)
        self.reset()

    def _shape(self) -> tuple: return (self.num_classes,)

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        y = targets.reshape(-1)
        hit = (self._classes(preds, targets).reshape(-1) == y).to(torch.int64)
        self.total.index_add_(0, y, torch.ones_like(y))  # index_add_, unlike bincount, needs no host read of the max
        self.correct.index_add_(0, y, hit)

    def compute(self) -> torch.Tensor:
        seen = self.total > 0
        if not seen.any(): return torch.tensor(float('nan'))
        return (self.correct[seen].double() / self.total[seen]).mean()

    def __repr__(self) -> str: return f'BalancedAccuracy(num_classes={self.num_classes})'


def _sync_kind(m) -> str | None:
    """How a metric's state is summed over processes: 'sum' (it has `all_reduce(device)`, which sums its state over the
    processes: MicroAccuracy, BalancedAccuracy, or yours), 'self' (torchmetrics: its compute() gathers its own state),
    'torcheval' (its toolkit merges the ranks' states), or None (no known way)."""
    if callable(getattr(m, 'all_reduce', None)): return 'sum'
    tm = sys.modules.get('torchmetrics')
    if tm is not None and isinstance(m, tm.Metric): return 'self'
    te = sys.modules.get('torcheval.metrics')
    if te is not None and isinstance(m, te.Metric): return 'torcheval'
    return None


def _reduced(m):
    """`m.compute()` over every process's samples (a collective)."""
    kind = _sync_kind(m)
    if kind == 'sum':
        m.all_reduce(_comm_device())
        return m.compute()
    if kind == 'self': return m.compute()  # reducing it again would count every sample world_size times
    if kind == 'torcheval':
        from torcheval.metrics.toolkit import sync_and_compute
        return sync_and_compute(m)
    raise ValueError(_NO_SYNC.format(type(m).__name__))


_NO_SYNC = ('MetricsCB: the metric {} has no known way to sum its state over processes, so each process would report '
            'only its own share: use MicroAccuracy, BalancedAccuracy, a torchmetrics or torcheval metric (each sums its '
            'state across processes), or give it an all_reduce(device) method that sums its state')


def _is_metric(m) -> bool: return all(callable(getattr(m, a, None)) for a in ('update', 'compute', 'reset'))


def _value(v):
    """A computed metric as a Python number (a list for a non-scalar tensor): the one read per metric per phase."""
    if isinstance(v, torch.Tensor): return v.item() if v.numel() == 1 else v.tolist()
    return v


def _fmt(v) -> str:
    if isinstance(v, list): return str([_fmt(o) for o in v])
    return f'{v:.3f}' if isinstance(v, (int, float)) else str(v)


def format_row(row: dict) -> dict:
    """A history row as the seed prints it: each value as text with 3 decimals, the epoch and phase as they are."""
    return {k: v if k in ('epoch', 'train') else _fmt(v) for k, v in row.items()}


class _Rows:
    """Predictions and targets of a phase's batches, copied (`copy_`, no host sync) into two preallocated device tensors
    of about `nbytes` together, then handed to the metrics as one chunk when full and at the phase end. Memory stays
    bounded whatever the class count, no per-batch allocation fragments the allocator, and outputs that a step writes
    in place (a CUDA graph replay) are safe, as each batch is copied. A batch of another row size closes the chunk (so
    sequences of varying length are handed over batch by batch; a row of the same size in another shape cannot be
    copied in and fails loudly); the buffers take the dtype and device of the chunk's first batch."""

    def __init__(self, nbytes: int): self.nbytes, self.p, self.n, self.cap = nbytes, None, 0, 0

    def fits(self, p: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether the batch can join the open chunk (False: take() the chunk first). Per batch: a few integer tests."""
        k = len(p)
        return self.n + k <= self.cap and p.numel() == k * self.prow and y.numel() == k * self.yrow

    def add(self, p: torch.Tensor, y: torch.Tensor) -> None:
        n, k = self.n, len(p)
        if self.p is None:  # as many rows of this shape as fit in nbytes, at least one batch
            self.cap = max(k, self.nbytes // max(p[:1].nbytes + y[:1].nbytes, 1))
            self.p, self.y = p.new_empty((self.cap, *p.shape[1:])), y.new_empty((self.cap, *y.shape[1:]))
            self.prow, self.yrow = self.p[0].numel(), self.y[0].numel()
        self.p[n:n + k].copy_(p)
        self.y[n:n + k].copy_(y)
        self.n = n + k

    def state(self) -> dict | None:
        """The rows held so far and the chunk's capacity, so a resumed phase hands the metrics the same chunks. Copies:
        torch.save writes a slice's whole storage (the chunk, `nbytes`), whatever the slice holds."""
        return None if self.p is None else {'p': self.p[:self.n].clone(), 'y': self.y[:self.n].clone(), 'cap': self.cap}

    def load(self, s: dict | None, device) -> None:
        self.p = self.y = None
        self.n = self.cap = 0
        if s is None: return
        p, y = s['p'].to(device), s['y'].to(device)
        self.cap = s['cap']
        self.p, self.y = p.new_empty((self.cap, *p.shape[1:])), y.new_empty((self.cap, *y.shape[1:]))
        self.prow, self.yrow = self.p[0].numel(), self.y[0].numel()
        self.p[:len(p)].copy_(p)
        self.y[:len(y)].copy_(y)
        self.n = len(p)

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chunk's rows; the next add allocates anew, so a metric may keep what it is given."""
        if not self.n: return None
        out = self.p[:self.n], self.y[:self.n]
        self.p = self.y = None
        self.n = self.cap = 0
        return out


class _BatchLosses:
    """Each training batch's loss for the metrics plot: kept on the device (stacked every 64 batches, so a long phase
    holds a few tensors, not one per batch) and read once, at the phase end."""

    def __init__(self): self.pending, self.chunks = [], []

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)
        if len(self.pending) == 64: self.chunks.append(torch.stack(self.pending)); self.pending = []

    def held(self) -> torch.Tensor | None:
        """The phase's losses so far as one device tensor (no host sync), or None."""
        if self.pending: self.chunks.append(torch.stack(self.pending)); self.pending = []
        if len(self.chunks) > 1: self.chunks = [torch.cat(self.chunks)]
        return self.chunks[0] if self.chunks else None

    def take(self) -> list[float]:
        held = self.held()
        self.chunks = []
        return [] if held is None else held.tolist()


class MetricsCB(Callback):
    """Tracks metric objects (anything with `update`/`compute`/`reset`: torchmetrics, torcheval) and the loss, a
    sample-weighted mean, over each train and valid phase, and hands each phase's row on: to `history`, to every
    callback in learn.cbs with a `log_metrics(learn, row)` method (ProgressCB, the loggers, early stopping), in their
    order, and to one printer: `_log` (the seed's printed dict) or, where a callback has a `print_metrics(learn, row)`
    method (ProgressCB's table), that one, unless you override `_log`. `batch_losses` holds each training batch's
    loss as (epochs trained, loss), for the plot; a phase whose mean loss is NaN or inf is warned of, once per fit.

    Nothing is read from the device per batch: each batch's predictions and targets are copied into a bounded device
    buffer (`buffer_bytes`) handed to the metrics in one `update` per chunk, when full and at the phase end. For metrics
    that accumulate over samples (accuracy, F1, MSE, AUROC, ...: the classification and regression metrics of
    torchmetrics and torcheval) that equals one update per batch; set `buffer_bytes = 0` for a metric whose value
    depends on how the samples are split into batches (a running mean over a window of batches).

    `state_dict()` holds `history`, `batch_losses` and, inside a phase, what the phase has gathered so far (the loss
    sum, each metric's state, the buffered rows, each batch's loss), so a run resumed mid-phase reports the numbers it
    would have and its plot has every batch's loss. A metric's state is
    read through torchmetrics' `metric_state` or the metric's own `state_dict`/`load_state_dict` (torcheval)."""
    order = 0
    buffer_bytes = 2**20  # device memory holding predictions and targets between metric updates; a metric's update may
    # make temporaries several times a chunk's size (one-hot targets), so a small chunk also bounds those

    def __init__(self, *ms, **metrics):
        for o in ms: metrics[type(o).__name__] = o
        for k, m in metrics.items():
            if isinstance(m, type):
                raise TypeError(f'metric {k!r} is the class {m.__name__}; pass an instance: {m.__name__}(...)')
            if not _is_metric(m):
                raise TypeError(f'metric {k!r} is a {type(m).__name__} without update/compute/reset; pass a metric object, '
                                f'e.g. torchmetrics.classification.MulticlassAccuracy(num_classes=10)')
        if 'loss' in metrics: raise ValueError("MetricsCB tracks 'loss' itself; give your metric another name")
        self.metrics = metrics
        self.all_metrics = copy(metrics)
        self.all_metrics['loss'] = self.loss = _WeightedMean()
        self.history: list[dict] = []
        self.batch_losses: list[tuple[float, float]] = []
        self._device = None

    def _log(self, d: dict) -> None: print(d)

    def added(self, learn) -> None: learn.metrics = self  # learn.metrics exists from when the callback is added

    def before_fit(self, learn):
        learn.metrics = self
        self.history, self.batch_losses, self._device, self._warned, self._rows_shown = [], [], None, False, 0
        if several_processes():
            for m in self.metrics.values():
                if _sync_kind(m) is None: raise ValueError(_NO_SYNC.format(type(m).__name__))
        self._main = main_process(learn)  # only the main process prints
        ordered = sorted(learn.cbs, key=lambda cb: getattr(cb, 'order', 0))
        self._consumers = [cb.log_metrics for cb in ordered if cb is not self and callable(getattr(cb, 'log_metrics', None))]
        printers = [cb.print_metrics for cb in ordered if callable(getattr(cb, 'print_metrics', None))]
        own_log = type(self)._log is not MetricsCB._log or '_log' in vars(self)  # the seed's override always runs
        self._print = printers[0] if printers and not own_log else lambda learn, row: self._log(format_row(row))

    def before_epoch(self, learn):
        for m in self.all_metrics.values(): m.reset()
        self._rows, self._batch = _Rows(self.buffer_bytes), _BatchLosses()
        self._left = n_counted(learn.dl)  # samples still to count; None: all (no repeats evening out the shards)
        self._in_phase = True
        self._split = batch_split(learn)  # a dict batch's target: the key the step's loss takes first

    def after_batch(self, learn):
        b = learn.batch
        try: y = b[1] if isinstance(b, (list, tuple)) else split_batch(b, *self._split)[1][0]  # the seed's batch: (x, y, ...)
        except IndexError:
            where = ("batch[1], but the batch is a {} without one: yield (x, y, ...) batches" if isinstance(b, (list, tuple))
                     else "the first key after the model's inputs, but the {} batch has none: name it, TrainCB(target=...)")
            raise TypeError(f'MetricsCB reads the targets as {where.format(type(b).__name__)}') from None
        n, loss = len(y), learn.loss.detach()
        if learn.model.training: self._batch.add(loss)
        if self._left is not None:
            if n > self._left: return self._count_head(learn, y, self._left)
            self._left -= n
        self.loss.update(loss, n)
        if self.metrics: self._add(learn.preds, y)

    def _count_head(self, learn, y, k: int) -> None:
        """Count only the batch's first `k` samples: the rest repeat samples a sampler added to even out the shards
        (they come last in a process's epoch). The loss of those `k` is computed anew with `learn.loss_func`."""
        self._left = 0
        if not k: return
        p = map_tensors(lambda t: t[:k].detach(), learn.preds)
        with torch.no_grad(): self.loss.update(learn.loss_func(p, y[:k]), k)
        if self.metrics: self._add(p, y[:k])

    def _add(self, p, y) -> None:
        if not (self.buffer_bytes and isinstance(p, torch.Tensor) and isinstance(y, torch.Tensor)):
            return self._update(p.detach() if isinstance(p, torch.Tensor) else p, y)
        p = p.detach()
        if not self._rows.fits(p, y): self._flush()
        self._rows.add(p, y)

    def _flush(self) -> None:
        chunk = self._rows.take()
        if chunk is not None: self._update(*chunk)

    def _update(self, p, y) -> None:
        dev = getattr(p, 'device', None)
        if dev is not None and dev != self._device:
            for m in self.metrics.values():
                if hasattr(m, 'to'): m.to(dev)  # torchmetrics and torcheval move their state in place
            self._device = dev
        for m in self.metrics.values(): m.update(p, y)

    def after_epoch(self, learn):
        self._flush()
        if several_processes():  # once per phase: the loss sum and count, and each metric's state, over every process
            self.loss.all_reduce(_comm_device())
            row = {k: _value(_reduced(m)) for k, m in self.metrics.items()}
            row['loss'] = _value(self.loss.compute())
        else: row = {k: _value(m.compute()) for k, m in self.all_metrics.items()}
        row['epoch'] = learn.epoch
        row['train'] = 'train' if learn.model.training else 'eval'  # a hand-written learner may have no .training
        self.history.append(row)
        losses = self._batch.take()  # one read per train phase
        self.batch_losses += [(learn.epoch + (i + 1) / len(losses), v) for i, v in enumerate(losses)]
        if not self._warned and self._main and isinstance(row['loss'], float) and not math.isfinite(row['loss']):
            self._warned = True
            warnings.warn(f"MetricsCB: the {row['train']} loss of epoch {row['epoch']} is {row['loss']}: training "
                          f'diverged or the data holds NaN/inf; lower the lr or check the inputs (TerminateOnNaNCB() '
                          f'stops a fit at the first such batch)', stacklevel=2)
        self._in_phase, self._rows_shown = False, self._rows_shown + 1
        if self._main: self._print(learn, row)  # first: a consumer may end the fit (early stopping), and the row is still shown
        for f in self._consumers: f(learn, row)

    def cleanup_epoch(self, learn): self._in_phase = False

    def after_fit(self, learn):
        # a fit that ran no phase but holds rows resumed a finished run: show its table rather than nothing
        if self._main and not self._rows_shown:
            for row in self.history: self._print(learn, row)

    def state_dict(self) -> dict:
        # batch_losses as one float64 tensor (Python floats are float64: exact), not a list of pairs, in every checkpoint
        s = {'history': [dict(r) for r in self.history], 'phase': None,
             'batch_losses': torch.tensor(self.batch_losses, dtype=torch.float64).reshape(-1, 2)}
        if getattr(self, '_in_phase', False):
            total = self.loss.total
            s['phase'] = {'loss': {'total': total, 'weight': self.loss.weight}, 'rows': self._rows.state(), 'left': self._left,
                          'batch_losses': self._batch.held(),
                          'device': str(total.device) if total is not None else 'cpu',
                          'metrics': {k: _metric_state(k, m) for k, m in self.metrics.items()}}
        return s

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(r) for r in state['history']]
        if 'batch_losses' in state: self.batch_losses = [tuple(r) for r in state['batch_losses'].tolist()]
        ph = state['phase']
        if ph is None: return
        dev = torch.device(ph['device'])  # where the phase's batches are (a checkpoint is read onto the CPU)
        if dev.type == 'cuda' and not torch.cuda.is_available(): dev = torch.device('cpu')
        self._batch = _BatchLosses()
        if ph.get('batch_losses') is not None: self._batch.chunks = [ph['batch_losses'].to(dev)]
        total = ph['loss']['total']
        self.loss.total, self.loss.weight = None if total is None else total.to(dev), ph['loss']['weight']
        self._rows = _Rows(self.buffer_bytes)
        self._rows.load(ph['rows'], dev)
        for k, m in self.metrics.items(): _load_metric_state(m, ph['metrics'][k])
        self._device = None  # the next update moves the metrics, with the states just loaded, to the batches' device
        self._left = ph.get('left')
        self._in_phase = True

    @property
    def columns(self) -> list[str]:
        """The keys of each `history` row (and of each logged dict), in order."""
        return [*self.all_metrics, 'epoch', 'train']




def _comm_device() -> torch.device:
    """Where the loss is summed over processes: nccl needs a CUDA tensor, gloo takes a CPU one."""
    if dist.get_backend() == 'nccl': return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def _metric_state(name: str, m) -> dict:
    if hasattr(m, 'metric_state') and hasattr(m, '_defaults'):  # torchmetrics: its states are attributes
        return {'states': dict(m.metric_state), 'updates': m._update_count}
    if callable(getattr(m, 'state_dict', None)) and callable(getattr(m, 'load_state_dict', None)):
        return {'state_dict': m.state_dict()}
    raise ValueError(f'MetricsCB cannot save metric {name!r} in the middle of a phase: a {type(m).__name__} has no '
                     f'state_dict()/load_state_dict(); give it those, or checkpoint only at epoch ends')


def _load_metric_state(m, s: dict) -> None:
    if 'states' in s:
        for k, v in s['states'].items(): setattr(m, k, v)
        m._update_count, m._computed = s['updates'], None
    else: m.load_state_dict(s['state_dict'])


def _metrics_cb(learn) -> MetricsCB | None:
    return next((cb for cb in learn.cbs if isinstance(cb, MetricsCB)), None)


def _plot_phase_means(ax, history: list[dict], key: str) -> None:
    """Each phase's `key` from MetricsCB rows, train and eval as two lines, drawn where the phase ended: epoch e's row
    at e + 1 epochs trained (the x axis the per-batch losses share: batch i of n of epoch e is at e + (i + 1) / n)."""
    for phase in ('train', 'eval'):
        pts = [(r['epoch'] + 1, r[key]) for r in history if r['train'] == phase]
        if pts: ax.plot(*zip(*pts), marker='o', label=f'{phase} (phase mean)' if key == 'loss' else phase)
    ax.set_xlabel('epochs trained')
    ax.xaxis.get_major_locator().set_params(integer=True)


def plot_metrics(learn, path: str | os.PathLike | None = None) -> Path | None:
    """Plot each metric of the last fit's `MetricsCB.history` against the epochs trained, train and eval phases as two
    lines, and each training batch's loss on the loss panel: inline in a notebook, else saved to `path` (default
    `metrics.png`). Returns the PNG's path, or None. (also in every
    process but the main one, which alone draws)."""
    from ..plotting import show_or_save, subplots
    m = getattr(learn, 'metrics', None)
    if not isinstance(m, MetricsCB) or not m.history:
        raise ValueError('no metrics to plot: fit with a MetricsCB first, e.g. learn.fit(1, cbs=[MetricsCB()])')
    if not main_process(learn): return None  # one process draws
    keys = [k for k in m.all_metrics if all(isinstance(r.get(k), (int, float)) for r in m.history)]
    fig, axs = subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axs[0], keys):
        if k == 'loss' and m.batch_losses: ax.plot(*zip(*m.batch_losses), alpha=0.4, label='train (each batch)')
        _plot_phase_means(ax, m.history, k)
        ax.set_title(k); ax.legend()
    fig.tight_layout()
    return show_or_save(fig, path, 'metrics.png')


Learner.plot_metrics = plot_metrics  # learn.plot_metrics(path)
