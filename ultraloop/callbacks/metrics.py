"""Metrics and the loss accumulated on the batch's device and read once per epoch phase (MetricsCB), and their plot."""
from __future__ import annotations

import math
import os
import warnings
from copy import copy
from pathlib import Path

import torch

from ..learner import Callback

__all__ = ['MetricsCB', 'plot_metrics']


class _WeightedMean:
    """The loss as a sample-weighted mean: `update(value, weight)` queues one add on the value's device, no sync.
    The sum is float64 (float32 on mps, which has no float64), so long epochs lose no precision."""

    def __init__(self): self.reset()

    def reset(self) -> None: self.total, self.weight = None, 0

    def update(self, value: torch.Tensor, weight: int = 1) -> None:
        value = value.detach()
        if self.total is None:
            dtype = torch.float32 if value.device.type == 'mps' else torch.float64
            self.total = torch.zeros((), dtype=dtype, device=value.device)
        self.total.add_(value, alpha=weight)
        self.weight += weight

    def compute(self) -> torch.Tensor:
        if self.total is None: return torch.tensor(float('nan'))
        return self.total / self.weight


def _is_metric(m) -> bool: return all(callable(getattr(m, a, None)) for a in ('update', 'compute', 'reset'))


def _value(v):
    """A computed metric as a Python number (a list for a non-scalar tensor): the one read per metric per phase."""
    if isinstance(v, torch.Tensor): return v.item() if v.numel() == 1 else v.tolist()
    return v


def _fmt(v) -> str:
    if isinstance(v, list): return str([_fmt(o) for o in v])
    return f'{v:.3f}' if isinstance(v, (int, float)) else str(v)


class MetricsCB(Callback):
    """Tracks metric objects (anything with `update`/`compute`/`reset`: torchmetrics, torcheval) and the loss, a
    sample-weighted mean, over each train and valid phase; `_log` gets the seed's dict once per phase, `history` the
    numbers, `batch_losses` each training batch's loss as (epochs trained, loss), for the plot. It warns once per fit
    when a phase's mean loss is NaN or inf. Nothing is read from the device per batch: predictions and targets are kept (detached) on the device and
    handed to the metrics in one `update` per chunk, when `buffer_bytes` is reached and at the phase end. For metrics
    that accumulate over samples (accuracy, F1, MSE, AUROC, ...: the classification and regression metrics of torchmetrics
    and torcheval) that equals one update per batch; set `buffer_bytes = 0` for a metric whose value depends on how the
    samples are split into batches (a running mean over a window of batches).
    A step that writes its outputs into the same tensors every batch (a CUDA graph replay) must say so with
    `reuses_outputs = True` on its callback or Learner: MetricsCB then copies each batch's outputs."""
    order = 0
    buffer_bytes = 64 * 2**20  # device memory held for predictions and targets before an update; bounds the chunk

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

    def before_fit(self, learn):
        learn.metrics = self
        self.history, self.batch_losses, self._device, self._warned = [], [], None, False
        # a step that writes its outputs into the same tensors every batch (CUDA graphs) says so: copy them
        self._clone = getattr(learn, 'reuses_outputs', False) or any(getattr(cb, 'reuses_outputs', False) for cb in learn.cbs)

    def before_epoch(self, learn):
        for m in self.all_metrics.values(): m.reset()
        self._ps, self._ys, self._nbytes, self._ptrs, self._losses = [], [], 0, None, []

    def after_batch(self, learn):
        try: y = learn.batch[1]  # the seed's batch: (x, y, ...)
        except (KeyError, IndexError):
            raise TypeError(f'MetricsCB reads the targets as batch[1], but the batch is a {type(learn.batch).__name__} '
                            f'without one: yield (x, y, ...) batches') from None
        self.loss.update(learn.loss, len(y))
        if learn.training: self._losses.append(learn.loss.detach())  # kept on the device: read once, at the phase end
        if self.metrics: self._add(learn.preds, y)

    def _add(self, p, y) -> None:
        if not (isinstance(p, torch.Tensor) and isinstance(y, torch.Tensor)): return self._update(p, y)
        p = p.detach()
        if self._clone: p, y = p.clone(), y.clone()  # the next step overwrites these tensors
        else:
            ptrs = p.data_ptr(), y.data_ptr()  # the last batch's tensors are alive in the buffer: same address, same memory
            if self._ps and (ptrs[0] == self._ptrs[0] or ptrs[1] == self._ptrs[1]): p, y = self._reused(p, y)
            self._ptrs = ptrs
        self._ps.append(p); self._ys.append(y)
        self._nbytes += p.nbytes + y.nbytes
        if self._nbytes >= self.buffer_bytes: self._flush()

    def _reused(self, p, y):
        """This batch's outputs sit where the last batch's did, so the buffered last batch now reads as this one: drop it
        and copy every batch from now on."""
        warnings.warn('MetricsCB: learn.preds or the targets reuse the last batch\'s memory, so that batch is left out of '
                      'this phase\'s metrics and later ones are copied; a callback or Learner that writes its outputs in '
                      'place should set reuses_outputs = True', stacklevel=3)
        self._nbytes -= self._ps[-1].nbytes + self._ys[-1].nbytes
        del self._ps[-1], self._ys[-1]
        self._clone = True
        return p.clone(), y.clone()

    def _flush(self) -> None:
        ps, ys = self._ps, self._ys
        if not ps: return
        self._ps, self._ys, self._nbytes = [], [], 0
        try: p, y = (ps[0], ys[0]) if len(ps) == 1 else (torch.cat(ps), torch.cat(ys))
        except RuntimeError:  # shapes that do not concatenate (e.g. sequences of varying length): one update each
            for p, y in zip(ps, ys): self._update(p, y)
            return
        self._update(p, y)

    def _update(self, p, y) -> None:
        dev = getattr(p, 'device', None)
        if dev is not None and dev != self._device:
            for m in self.metrics.values():
                if hasattr(m, 'to'): m.to(dev)  # torchmetrics and torcheval move their state in place
            self._device = dev
        for m in self.metrics.values(): m.update(p, y)

    def after_epoch(self, learn):
        self._flush()
        row = {k: _value(m.compute()) for k, m in self.all_metrics.items()}
        row['epoch'] = learn.epoch
        row['train'] = 'train' if learn.training else 'eval'
        self.history.append(row)
        if self._losses:
            n, losses = len(self._losses), torch.stack(self._losses).tolist()  # one read per train phase
            self.batch_losses += [(learn.epoch + (i + 1) / n, v) for i, v in enumerate(losses)]
            self._losses = []
        if not self._warned and isinstance(row['loss'], float) and not math.isfinite(row['loss']):
            self._warned = True
            warnings.warn(f"MetricsCB: the {row['train']} loss of epoch {row['epoch']} is {row['loss']}: training "
                          f'diverged or the data holds NaN/inf; lower the lr or check the inputs (TerminateOnNaNCB() '
                          f'stops a fit at the first such batch)', stacklevel=2)
        self._log({k: _fmt(v) if k in self.all_metrics else v for k, v in row.items()})

    @property
    def columns(self) -> list[str]:
        """The keys of each `history` row (and of each logged dict), in order."""
        return [*self.all_metrics, 'epoch', 'train']


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
    `metrics.png`). Returns the PNG's path, or None."""
    from ..plotting import get_plt, show_or_save
    m = getattr(learn, 'metrics', None)
    if not isinstance(m, MetricsCB) or not m.history:
        raise ValueError('no metrics to plot: fit with a MetricsCB first, e.g. learn.fit(1, cbs=[MetricsCB()])')
    keys = [k for k in m.all_metrics if all(isinstance(r.get(k), (int, float)) for r in m.history)]
    plt = get_plt()
    fig, axs = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axs[0], keys):
        if k == 'loss' and m.batch_losses: ax.plot(*zip(*m.batch_losses), alpha=0.4, label='train (each batch)')
        _plot_phase_means(ax, m.history, k)
        ax.set_title(k); ax.legend()
    fig.tight_layout()
    return show_or_save(fig, path, 'metrics.png')
