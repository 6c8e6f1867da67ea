"""Learning-rate schedules: torch.optim.lr_scheduler stepped per batch or per epoch, fit_one_cycle, and recording
hyper-parameters per batch (RecorderCB)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch.optim import lr_scheduler

from ..learner import Callback, Learner, _as_cbs
from ..utils import check_int, check_number

__all__ = ['BaseSchedCB', 'BatchSchedCB', 'EpochSchedCB', 'RecorderCB']  # fit_one_cycle: use learn.fit_one_cycle

# hyper-parameters a scheduler may cycle (OneCycleLR, CyclicLR); restored after fit so later fits use the user's
_CYCLED = ('momentum', 'betas')


class BaseSchedCB(Callback):
    """The base of the schedule callbacks: creates `sched_func(learn.opt)` at fit start (`sched`; miniai's name for it,
    `schedo`, works too); `_step(learn)` steps it in training phases and records in `lrs` the learning rate (first
    parameter group) each step followed. A subclass says when to step: `def after_batch(self, learn): self._step(learn)`.
    Each fit starts a new schedule from that fit's lr; `state_dict()` holds the scheduler's own state, so a resumed fit
    goes on with the schedule where it was instead of starting it again."""

    def __init__(self, sched_func: Callable):
        if not callable(sched_func):
            raise TypeError(f'{type(self).__name__}: sched_func must be callable, taking the optimiser and returning a '
                            f'torch.optim.lr_scheduler scheduler, e.g. partial(CosineAnnealingLR, T_max=100); '
                            f'got {sched_func!r}')
        self.sched_func = sched_func
        self.sched = None
        self.lrs: list[float] = []
        self._saved: list[dict] | None = None  # the cycled hyper-parameters of the fit in progress, put back after it

    def before_fit(self, learn):
        if learn.opt is None: raise ValueError(f'{self.name} needs learn.opt: pass opt_func to Learner or set learn.opt')
        self._saved = [{k: g[k] for k in _CYCLED if k in g} for g in learn.opt.param_groups]
        for g in learn.opt.param_groups: g.pop('initial_lr', None)  # else a schedule would start from an earlier fit's lr
        sched = self.sched_func(learn.opt)
        if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
            raise TypeError(f'{self.name}: ReduceLROnPlateau needs a metric to step on; step it in your own after_epoch')
        if not isinstance(sched, lr_scheduler.LRScheduler):
            raise TypeError(f'{self.name}: sched_func returned a {type(sched).__name__}; it must return a '
                            f'torch.optim.lr_scheduler.LRScheduler built on the optimiser it is given')
        self.sched, self.lrs = sched, []

    @property
    def schedo(self): return self.sched

    def _step(self, learn) -> None:
        if not learn.training: return
        self.lrs.append(self.sched.get_last_lr()[0])  # the lr this step used (a tensor if the group's lr is one)
        self.sched.step()

    def resume_settings(self) -> dict:
        """What a resumed fit must keep: the plain arguments of a `functools.partial` sched_func (or one with the
        same `keywords`: fit_one_cycle's epochs and max_lr). The saved scheduler state carries them and would silently
        replace new ones: a run resumed with more epochs under one-cycle would end at the old step count (`Tried to step
        ... times`)."""
        kw = getattr(self.sched_func, 'keywords', None) or {}
        return {k: v for k, v in kw.items() if v is None or isinstance(v, (bool, int, float, str))}

    def state_dict(self) -> dict:
        return {'sched': None if self.sched is None else self.sched.state_dict(), 'lrs': list(self.lrs),
                'saved': self._saved}

    def load_state_dict(self, state: dict) -> None:
        if state['sched'] is not None:
            if self.sched is None:
                raise ValueError(f'{self.name}: a schedule state loads into a fit in progress; pass it to '
                                 f'learn.fit(resume=...), which loads it once the scheduler exists')
            self.sched.load_state_dict(state['sched'])
        self.lrs, self._saved = list(state['lrs']), state['saved']

    def cleanup_fit(self, learn):
        if self.lrs and isinstance(self.lrs[0], torch.Tensor):  # a tensor lr (the user's): read once per fit, not per step
            self.lrs = torch.stack([torch.as_tensor(v) for v in self.lrs]).double().tolist()
        if self._saved is None: return  # this fit's before_fit did not get this far: nothing to put back
        for g, saved in zip(learn.opt.param_groups, self._saved): g.update(saved)
        self._saved = None  # a later fit failing before its before_fit must not restore these stale values


class BatchSchedCB(BaseSchedCB):
    """Steps a torch LR scheduler after every optimiser step. A step skipped through CancelStepException (gradient
    accumulation, a mixed-precision overflow) does not advance it. `lrs`: the lr each step used."""
    cuda_graph_host_after_step = True  # under CudaGraphCB it steps on the host after each replay; the next reads its values

    def after_step(self, learn): self._step(learn)


class EpochSchedCB(BaseSchedCB):
    """Steps a torch LR scheduler after each training phase. `lrs`: the lr each epoch used."""

    def after_epoch(self, learn): self._step(learn)


class RecorderCB(Callback):
    """Records, after each training batch, `f(self)` for each `name=f` given: `RecorderCB(lr=lambda cb: cb.pg['lr'],
    mom=lambda cb: cb.pg['betas'][0])`, where `self.pg` is the optimiser's first parameter group. `recs` maps each name
    to its list of values (one per training batch of the last fit); `plot()` draws them. Functions that read the
    param group cost no host-device sync; one that reads a tensor's value does, every batch."""

    def __init__(self, **d: Callable):
        if not d: raise ValueError("RecorderCB needs something to record: RecorderCB(lr=lambda cb: cb.pg['lr'])")
        for k, f in d.items():
            if not callable(f):
                raise TypeError(f'RecorderCB: {k}={f!r} is not callable; pass a function of the callback, e.g. '
                                f"{k}=lambda cb: cb.pg['lr']")
        self.d = d
        self.recs: dict[str, list] = {k: [] for k in d}
        self.pg: dict | None = None

    def before_fit(self, learn):
        if learn.opt is None: raise ValueError(f'{self.name} reads learn.opt: pass opt_func to Learner or set learn.opt')
        self.recs = {k: [] for k in self.d}
        self.pg = learn.opt.param_groups[0]

    def after_batch(self, learn):
        if not learn.training: return
        for k, f in self.d.items(): self.recs[k].append(f(self))

    def plot(self, figsize=None, path: str | os.PathLike | None = None) -> Path | None:
        """One panel per recorded name against the training batch: inline in a notebook, else saved to `path`
        (default recorder.png). Returns the PNG's path, or None."""
        from ..plotting import show_or_save, subplots
        if not any(self.recs.values()): raise ValueError('nothing recorded yet: fit with this callback in cbs first')
        fig, axs = subplots(1, len(self.recs), figsize=figsize or (4 * len(self.recs), 3), squeeze=False)
        for ax, (k, v) in zip(axs[0], self.recs.items()):
            ax.plot(v)
            ax.set_title(k); ax.set_xlabel('batch')
        fig.tight_layout()
        return show_or_save(fig, path, 'recorder.png')


def _steps_per_epoch(learn, cbs) -> int:
    from .optim import GradientAccumulationCB
    try: n = len(learn.dls.train)
    except TypeError:
        raise TypeError('fit_one_cycle needs len(dls.train) to size the schedule; for a loader without a length use '
                        'BatchSchedCB(partial(OneCycleLR, max_lr=..., total_steps=...))') from None
    for cb in [*learn.cbs, *cbs]:
        if isinstance(cb, GradientAccumulationCB): n = cb.steps_per_epoch(n)
    return n


def fit_one_cycle(learn, n_epochs: int, lr_max: float, cbs=None, cycle_momentum: bool | None = None, resume=None,
                  **sched_kwargs) -> BatchSchedCB:
    """Fit `n_epochs` with torch's OneCycleLR up to `lr_max`, over every optimiser step of the fit, cycling SGD's
    momentum or Adam's beta1 inversely (by default not for an SGD without momentum). `sched_kwargs` go to OneCycleLR
    (pct_start, div_factor, final_div_factor, base_momentum, max_momentum, ...); `resume` to `learn.fit` (the schedule
    goes on from its saved state). The schedule is sized when the fit starts, from the batches each process takes of
    the loader it iterates (its share under DistributedCB). Returns the schedule callback."""
    check_int('fit_one_cycle: n_epochs', n_epochs, 1)
    check_number('fit_one_cycle: lr_max', lr_max, gt=0, finite=True)
    cbs = _as_cbs(cbs)
    _steps_per_epoch(learn, cbs)  # a loader without a length: refused before any work

    sched_func = _OneCycle(learn, cycle_momentum, n_epochs, lr_max, sched_kwargs)
    sched = BatchSchedCB(sched_func)
    learn.fit(n_epochs, cbs=[sched, *cbs], lr=lr_max, resume=resume)
    return sched


Learner.fit_one_cycle = fit_one_cycle  # learn.fit_one_cycle(...)


class _OneCycle:
    """fit_one_cycle's schedule factory. It sizes the schedule at fit start, from the loader the fit iterates: under
    DistributedCB (whose before_fit runs first) that is this process's share, so the schedule spans the steps each
    process really takes. `keywords` (as a `functools.partial`'s) are what a resumed fit must keep: the epochs the cycle
    spans (its steps per epoch are checked with the loaders), its peak and the other plain OneCycleLR arguments."""

    def __init__(self, learn, cycle_momentum: bool | None, n_epochs: int, lr_max: float, kwargs: dict):
        self.learn, self.cycle_momentum, self.n_epochs, self.lr_max, self.kwargs = learn, cycle_momentum, n_epochs, lr_max, kwargs
        self.keywords = {'epochs': n_epochs, 'max_lr': lr_max, **kwargs}

    def __call__(self, opt) -> lr_scheduler.OneCycleLR:
        total = self.n_epochs * _steps_per_epoch(self.learn, ())
        return _one_cycle(opt, self.cycle_momentum, max_lr=self.lr_max, total_steps=total, **self.kwargs)


def _one_cycle(opt, cycle_momentum: bool | None, **kwargs) -> lr_scheduler.OneCycleLR:
    # decided here because the optimiser may only exist once fit has created it; cycling an SGD without momentum
    # would switch momentum on
    if cycle_momentum is None:
        cycle_momentum = 'betas' in opt.defaults or any(g.get('momentum', 0) for g in opt.param_groups)
    return lr_scheduler.OneCycleLR(opt, cycle_momentum=cycle_momentum, **kwargs)
