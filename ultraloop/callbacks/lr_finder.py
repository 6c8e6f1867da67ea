"""The learning-rate finder: train with a growing lr until the loss blows up, suggest an lr, then undo it all."""
from __future__ import annotations

import math
import os
import statistics
import warnings

import torch
import torch.distributed as dist

from ..learner import Callback, CancelEpochException, CancelFitException, Learner
from ..state import Snapshot
from ..utils import check_int, check_number, several_processes
from .schedule import BaseSchedCB

__all__ = ['LRFinderCB', 'suggest_lr', 'plot_lr_find']  # lr_find: use learn.lr_find


_GAMMA = 1.3  # the lr's growth per batch, by default


def _growth(who: str, gamma, lr_mult, max_mult) -> float:
    """The multiplier given as `gamma` (miniai's name) or `lr_mult` (the seed's), checked with `max_mult`."""
    nm = 'gamma'
    if lr_mult is not None:
        if gamma != _GAMMA:
            raise ValueError(f'{who}: gamma={gamma!r} and lr_mult={lr_mult!r} name the same multiplier; pass one of them')
        gamma, nm = lr_mult, 'lr_mult'
    check_number(f'{who}: {nm}', gamma, gt=1, finite=True)
    check_number(f'{who}: max_mult', max_mult, gt=1, finite=True)
    return gamma


class LRFinderCB(Callback):
    """Multiplies every group's lr by `gamma` (the seed's `lr_mult`) after each training batch, recording `lrs` and
    `losses` (each batch's own loss); ends fit when the loss, smoothed by an exponential average (`beta`), exceeds
    `max_mult` times its minimum, or is NaN; ends each valid phase at its first batch. The seed and miniai compare raw
    losses, which mini-batch noise alone can trip long before the lr is too high; beta=0 does that. Reads the loss every
    batch, a host-device sync: the price of deciding when to stop, paid only here."""

    def __init__(self, gamma: float = _GAMMA, max_mult: float = 3, beta: float = 0.9, *, lr_mult: float | None = None):
        gamma = _growth('LRFinderCB', gamma, lr_mult, max_mult)
        check_number('LRFinderCB: beta (loss smoothing)', beta, ge=0, lt=1)
        self.gamma, self.max_mult, self.beta = gamma, max_mult, beta
        self.lrs: list[float] = []
        self.losses: list[float] = []

    @property
    def lr_mult(self) -> float: return self.gamma  # the seed's name

    def before_fit(self, learn):
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.min, self._avg = math.inf, 0.0

    def after_batch(self, learn):
        if not learn.training: raise CancelEpochException()
        self.lrs.append(learn.opt.param_groups[0]['lr'])
        loss = learn.loss.detach()
        if several_processes():  # every process must see the same loss, or they would stop at different batches and hang
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        loss = float(loss)  # host sync (see the class doc)
        self.losses.append(loss)
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smooth = self._avg / (1 - self.beta ** len(self.losses))  # debiased: the average starts at 0
        if smooth < self.min: self.min = smooth
        if smooth > self.min * self.max_mult or math.isnan(loss): raise CancelFitException()
        for g in learn.opt.param_groups: g['lr'] *= self.gamma


def suggest_lr(lrs: list[float], losses: list[float], smooth_decades: float = 0.5, min_drop: float = 0.05) -> float | None:
    """The lr where the smoothed loss falls fastest against log10(lr), looking only at the descent before its minimum.

    Mini-batch losses are noisy, and the steepest point of a noisy curve is mostly noise: so the loss (its log when
    all are > 0, making the descent scale-free) is smoothed by a running median then a running mean, each centred and
    `smooth_decades` wide (an exponential average would lag and shift the answer to higher lrs), and each slope spans
    that width too. Returns None, with a warning, when there is no clear descent: too few points, or the smoothed loss
    falls by less than `min_drop` (a fraction) of its start or by less than twice its noise."""
    pts = [(lr, v) for lr, v in zip(lrs, losses) if lr > 0 and math.isfinite(v)]
    if len(pts) < 8:
        warnings.warn(f'lr_find: only {len(pts)} usable points, too few to suggest an lr: lower start_lr or gamma, '
                      f'or give more batches (max_epochs)', stacklevel=3)
        return None
    x = [math.log10(lr) for lr, _ in pts]
    y = [v for _, v in pts]
    log = min(y) > 0
    if log: y = [math.log(v) for v in y]
    step = (x[-1] - x[0]) / (len(x) - 1)
    h = max(1, round(smooth_decades / 2 / step)) if step > 0 else 1

    def near(a, i): return a[max(0, i - h):i + h + 1]
    med = [statistics.median(near(y, i)) for i in range(len(y))]
    ys = [statistics.fmean(near(med, i)) for i in range(len(y))]
    i_min = min(range(len(ys)), key=ys.__getitem__)
    drop = ys[0] - ys[i_min]
    noise = math.sqrt(statistics.fmean([(y[i] - ys[i]) ** 2 for i in range(i_min + 1)]))
    least = -math.log(1 - min_drop) if log else min_drop * abs(ys[0])
    if i_min < 2 or drop <= max(least, 2 * noise):
        warnings.warn('lr_find: the loss shows no clear descent, so no lr is suggested: look at the plot, try a lower '
                      'start_lr, or check that the model can learn', stacklevel=3)
        return None
    lo, hi = (lambda i: max(i - h, 0)), (lambda i: min(i + h, i_min))
    slopes = {i: (ys[hi(i)] - ys[lo(i)]) / (x[hi(i)] - x[lo(i)]) for i in range(1, i_min)}
    return pts[min(slopes, key=slopes.__getitem__)][0]


def plot_lr_find(lrs: list[float], losses: list[float], suggestion: float | None = None,
                 path: str | os.PathLike | None = None):
    """Loss against lr on a log axis, the suggestion marked (or "no suggestion" written on the plot); inline in a
    notebook, else saved to `path` (default lr_find.png). Returns the PNG's path, or None."""
    from ..plotting import show_or_save
    return show_or_save(_lr_find_figure(lrs, losses, suggestion), path, 'lr_find.png')


def _lr_find_figure(lrs: list[float], losses: list[float], suggestion: float | None):
    from ..plotting import subplots
    fig, ax = subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.set_xscale('log')
    ax.set_xlabel('learning rate')
    ax.set_ylabel('loss')
    finite = [v for v in losses if math.isfinite(v)]
    if finite:
        # the y range of the part before the loss diverges: the final blow-up would otherwise flatten the descent
        # the suggestion is read from
        i_min = min(range(len(losses)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
        lo, hi = min(finite), max(v for v in losses[:i_min + 1] if math.isfinite(v))
        pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
        ax.set_ylim(lo - pad, hi + pad)
    if suggestion is not None:
        ax.axvline(suggestion, color='red', linestyle='--', label=f'suggested lr {suggestion:.2e}')
        ax.legend()
    else:
        ax.text(0.5, 0.95, 'no suggestion: the loss shows no clear descent', transform=ax.transAxes, ha='center',
                va='top', color='red')
    return fig


def lr_find(learn, gamma: float = _GAMMA, max_mult: float = 3, start_lr: float = 1e-5, max_epochs: int = 10, *,
            plot: bool = True, plot_path: str | os.PathLike | None = None, lr_mult: float | None = None) -> float | None:
    """Train from `start_lr`, multiplying the lr by `gamma` (the seed's `lr_mult`) each batch, until the smoothed loss
    exceeds `max_mult` times its minimum (at most `max_epochs` train phases, no valid phases); plot loss against lr;
    return `suggest_lr`'s lr or None. miniai's signature, plus the keyword-only `plot`, `plot_path` and `lr_mult`.
    Afterwards the learner is as it was (`state.Snapshot`: weights, gradients, optimiser state and lrs, learner
    attributes, callbacks and their states, loaders' order and position, and every RNG), so a fit after lr_find equals
    a fit without it. Callbacks in learn.cbs that would take the finder's growing lr for a run sit out: schedules (they
    would overwrite its lrs) and those with `lr_find_sits_out = True`, which keep a record outside the learner or act
    on the run (CheckpointCB, EarlyStoppingCB and the other monitors, the loggers and trackers: no checkpoint the next
    `fit(resume='auto')` would take, no log row). The others run."""
    gamma = _growth('lr_find', gamma, lr_mult, max_mult)
    check_number('lr_find: start_lr', start_lr, gt=0, finite=True)
    check_int('lr_find: max_epochs', max_epochs, 1)
    if not isinstance(learn.model, torch.nn.Module):
        raise TypeError(f'lr_find: model must be a torch.nn.Module, got {type(learn.model).__name__}')
    finder = LRFinderCB(gamma, max_mult)
    saved = Snapshot(learn)
    try:
        out = [cb for cb in learn.cbs if isinstance(cb, BaseSchedCB) or getattr(cb, 'lr_find_sits_out', False)]
        if out: learn.rm_cbs(out)  # Snapshot.restore puts them back
        learn.fit(max_epochs, valid=False, cbs=[finder], lr=start_lr)
    finally:
        saved.restore()
    main = learn.is_main
    with warnings.catch_warnings():
        if not main: warnings.simplefilter('ignore')  # the main process says it once
        suggestion = suggest_lr(finder.lrs, finder.losses)
    if plot and main: plot_lr_find(finder.lrs, finder.losses, suggestion, plot_path)
    return suggestion


Learner.lr_find = lr_find  # learn.lr_find(...): attached here, so the core knows nothing of the finder
