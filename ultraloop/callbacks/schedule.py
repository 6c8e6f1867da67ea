"""Learning-rate schedules: torch.optim.lr_scheduler stepped per batch or per epoch, and fit_one_cycle."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

from torch.optim import lr_scheduler

from ..learner import Callback, _as_cbs

__all__ = ['BatchSchedCB', 'EpochSchedCB']  # fit_one_cycle: use learn.fit_one_cycle

# hyper-parameters a scheduler may cycle (OneCycleLR, CyclicLR); restored after fit so later fits use the user's
_CYCLED = ('momentum', 'betas')


class _SchedCB(Callback):
    """Creates `sched_func(learn.opt)` at fit start and records in `lrs` the learning rate (first parameter group)
    each scheduler step followed. Each fit starts a new schedule from that fit's lr."""

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

    def _step(self, learn) -> None:
        self.lrs.append(learn.opt.param_groups[0]['lr'])
        self.sched.step()

    def cleanup_fit(self, learn):
        if self._saved is None: return  # this fit's before_fit did not get this far: nothing to put back
        for g, saved in zip(learn.opt.param_groups, self._saved): g.update(saved)
        self._saved = None  # a later fit failing before its before_fit must not restore these stale values


class BatchSchedCB(_SchedCB):
    """Steps a torch LR scheduler after every optimiser step. A step skipped through CancelStepException (gradient
    accumulation, a mixed-precision overflow) does not advance it. `lrs`: the lr each step used."""

    def after_step(self, learn): self._step(learn)


class EpochSchedCB(_SchedCB):
    """Steps a torch LR scheduler after each training phase. `lrs`: the lr each epoch used."""

    def after_epoch(self, learn):
        if learn.training: self._step(learn)


def _steps_per_epoch(learn, cbs) -> int:
    from .optim import GradientAccumulationCB
    try: n = len(learn.dls.train)
    except TypeError:
        raise TypeError('fit_one_cycle needs len(dls.train) to size the schedule; for a loader without a length use '
                        'BatchSchedCB(partial(OneCycleLR, max_lr=..., total_steps=...))') from None
    for cb in [*learn.cbs, *cbs]:
        if isinstance(cb, GradientAccumulationCB): n = cb.steps_per_epoch(n)
    return n


def fit_one_cycle(learn, n_epochs: int, lr_max: float, cbs=None, cycle_momentum: bool | None = None,
                  **sched_kwargs) -> BatchSchedCB:
    """Fit `n_epochs` with torch's OneCycleLR up to `lr_max`, over every optimiser step of the fit, cycling SGD's
    momentum or Adam's beta1 inversely (by default not for an SGD without momentum). `sched_kwargs` go to OneCycleLR
    (pct_start, div_factor, final_div_factor, base_momentum, max_momentum, ...). Returns the schedule callback."""
    if isinstance(n_epochs, bool) or not isinstance(n_epochs, int) or n_epochs < 1:
        raise ValueError(f'fit_one_cycle: n_epochs must be an int >= 1, got {n_epochs!r}')
    if isinstance(lr_max, bool) or not isinstance(lr_max, (int, float)) or not 0 < lr_max < math.inf:
        raise ValueError(f'fit_one_cycle: lr_max must be a finite number > 0, got {lr_max!r}')
    cbs = _as_cbs(cbs)
    total = n_epochs * _steps_per_epoch(learn, cbs)
    sched = BatchSchedCB(partial(_one_cycle, max_lr=lr_max, total_steps=total, cycle_momentum=cycle_momentum, **sched_kwargs))
    learn.fit(n_epochs, cbs=[sched, *cbs], lr=lr_max)
    return sched


def _one_cycle(opt, cycle_momentum: bool | None, **kwargs) -> lr_scheduler.OneCycleLR:
    # decided here because the optimiser may only exist once fit has created it; cycling an SGD without momentum
    # would switch momentum on
    if cycle_momentum is None:
        cycle_momentum = 'betas' in opt.defaults or any(g.get('momentum', 0) for g in opt.param_groups)
    return lr_scheduler.OneCycleLR(opt, cycle_momentum=cycle_momentum, **kwargs)
