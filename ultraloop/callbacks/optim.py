"""Shaping the gradient before the optimiser steps: clipping its norm, and accumulating it exactly over micro-batches."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

import torch

from ..learner import Callback, CancelStepException
from ..utils import check_int, check_number

__all__ = ['GradientClippingCB', 'GradientAccumulationCB']  # batch_size stays out: a common variable name


class GradientClippingCB(Callback):
    """Clips the gradient's total `norm_type`-norm to `max_norm` before each optimiser step.
    With GradientAccumulationCB it runs once per real step, on the accumulated gradient."""
    order = -10  # after accumulation (-30) and mixed precision's unscaling (-20), so it sees the true gradient
    cuda_graph_safe = True  # no host sync: CudaGraphCB may capture it inside the step

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0):
        for nm, v in (('max_norm', max_norm), ('norm_type', norm_type)): check_number(f'GradientClippingCB: {nm}', v, gt=0)
        self.max_norm, self.norm_type = max_norm, norm_type
        self.norm: torch.Tensor | None = None  # the last total norm before clipping, on the device (reading it syncs)

    def after_backward(self, learn):
        # no host sync: clip_grad_norm_ scales by a clamped factor on the device instead of testing the norm
        self.norm = torch.nn.utils.clip_grad_norm_(learn.model.parameters(), self.max_norm, self.norm_type)


def batch_size(batch) -> int:
    """The number of samples in a batch: len of its first element (of its first value for a dict batch)."""
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return len(first)


class GradientAccumulationCB(Callback):
    """Steps the optimiser once every `n` micro-batches with the gradient one batch of all their samples would give
    (for a loss that is a mean over samples), exactly, also for uneven batches and a short last window.

    How: each micro-batch's loss is weighted by its sample count (relative to the window's first micro-batch, so
    magnitudes stay those of a plain batch, which matters under fp16 loss scaling); non-final micro-batches raise
    CancelStepException in after_backward, so later after_backward callbacks (unscaling, clipping) and the step run
    once per window; on the final one the summed gradient is divided by the window's true sample count. Metrics see
    each micro-batch's true loss. Whatever gradient zero_grad() leaves (MomentumLearner's decayed one) is set aside
    for the window and added back unscaled.

    The epoch's last window ends at its last batch (known from len(learn.dl)) and steps through the normal path.
    For a loader without a length the pending window steps in after_epoch through `learn.apply_step()` (the train
    step's tail: after_backward, step, after_step, zero_grad), then cleanup_batch (not after_batch: metrics already saw
    every micro-batch).
    Under several processes (DistributedCB), non-final micro-batches skip the gradient all-reduce (`learn.sync_grads`
    is set False in before_batch, before the forward): one all-reduce per optimiser step.
    Gradients never cross epochs: a window left open by a cancelled epoch or fit is dropped. `bs_func(batch)` counts
    a batch's samples (default: `batch_size`, the len of its first element); return token counts for a loss averaged
    over tokens. Optimiser steps per epoch: ceil(batches / n). `state_dict()` holds the open window (its counts and
    the gradients set aside; the window's own gradients are in the learner's state), so a run resumed inside a window
    steps exactly as it would have.
    """
    order = -30  # first of the gradient callbacks: later ones must see the whole window's gradient

    def __init__(self, n: int, bs_func: Callable[[Any], int] = batch_size):
        check_int('GradientAccumulationCB: n (micro-batches per optimiser step)', n, 1)
        if not callable(bs_func): raise TypeError(f'GradientAccumulationCB: bs_func must be callable, got {bs_func!r}')
        self.n, self.bs_func = n, bs_func
        self.count = self.samples = 0  # micro-batches and samples in the open window
        self._set_aside: list | None = None  # (param, grad) moved out when the window opened; None: no window open
        self._params: list = []
        self._last: int | None = None  # index of the epoch's last batch, None for a loader without a length
        self._flushing = False

    def before_epoch(self, learn):
        if not learn.training: return
        self._drop_window()
        self._params = [p for p in learn.model.parameters() if p.requires_grad]
        try: self._last = len(learn.dl) - 1
        except TypeError: self._last = None

    def before_batch(self, learn):
        # decided before the forward, where DDP prepares its gradient reduction: only a window's last micro-batch
        # reduces across processes (for a loader without a length the last window is known only after the epoch:
        # DistributedCB then reduces its gradient before the step)
        if learn.training: learn.sync_grads = self.count + 1 >= self.n or learn.iter == self._last

    def after_loss(self, learn):
        if not learn.training: return
        bs = self.bs_func(learn.batch)
        if self._set_aside is None: self._open_window(bs)
        self._bs = bs
        if bs != self._ref: learn.loss = learn.loss * (bs / self._ref)  # for backward only: the loop restores learn.loss

    def after_backward(self, learn):
        if not self._flushing:
            self.count += 1
            self.samples += self._bs
            if self.count < self.n and learn.iter != self._last: raise CancelStepException()
        self._close_window()

    def after_epoch(self, learn):
        if not learn.training or self._set_aside is None: return
        if not self.count: return self._drop_window()  # a window opened by a batch cancelled before its backward
        self._flushing = True  # the loader had no length: its last window is known to be over only now
        try:
            if not learn.apply_step(): learn.zero_grad()  # a skipped last step must not carry into the next epoch
        finally:
            self._flushing = False
            learn.callback('cleanup_batch')  # per-step bookkeeping lives there too (MixedPrecisionCB's scaler update)

    def cleanup_fit(self, learn):
        self._drop_window()
        learn.sync_grads = True

    def _open_window(self, bs: int) -> None:
        self._ref = bs
        self._set_aside = [(p, p.grad) for p in self._params if p.grad is not None]
        for p, _ in self._set_aside: p.grad = None

    def _close_window(self) -> None:
        if self.samples != self._ref:
            grads = [p.grad for p in self._params if p.grad is not None]
            if grads: torch._foreach_mul_(grads, self._ref / self.samples)
        for p, g in self._set_aside:
            if p.grad is None: p.grad = g
            else: p.grad.add_(g)
        self._set_aside, self.count, self.samples = None, 0, 0

    def _drop_window(self) -> None:
        """Forget an unfinished window's gradients, restoring what zero_grad() had left."""
        if self._set_aside is None: return
        for p in self._params: p.grad = None
        for p, g in self._set_aside: p.grad = g
        self._set_aside, self.count, self.samples = None, 0, 0

    def resume_settings(self) -> dict: return {'n': self.n}  # a resumed run must keep its optimiser steps

    def state_dict(self) -> dict:
        window = None
        if self._set_aside is not None:
            at = {id(p): i for i, p in enumerate(self._params)}
            window = {'count': self.count, 'samples': self.samples, 'ref': self._ref,
                      'set_aside': [[at[id(p)], g] for p, g in self._set_aside]}
        return {'window': window}

    def load_state_dict(self, state: dict) -> None:
        w = state['window']
        if w is None:  # the gradients are the learner's (already loaded): only forget the window
            self._set_aside, self.count, self.samples = None, 0, 0
            return
        if not self._params:
            raise ValueError(f'{self.name}: an open accumulation window loads into a fit in progress; pass the state to '
                             f'learn.fit(resume=...)')
        self.count, self.samples, self._ref = w['count'], w['samples'], w['ref']
        self._set_aside = [(self._params[i], g.to(self._params[i].device)) for i, g in w['set_aside']]

    def steps_per_epoch(self, n_batches: int) -> int:
        """Optimiser steps an epoch of `n_batches` batches makes."""
        return math.ceil(n_batches / self.n)
