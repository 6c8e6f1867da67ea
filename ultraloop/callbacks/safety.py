"""Callbacks that keep a long run safe: TerminateOnNaNCB stops or skips a batch whose loss is NaN or inf."""
from __future__ import annotations

import math
import warnings

from ..learner import Callback, CancelBatchException, CancelFitException

__all__ = ['TerminateOnNaNCB']


class TerminateOnNaNCB(Callback):
    """Checks each training batch's loss before backward, so a NaN or inf never reaches the gradients or the weights.
    `action='stop'` ends the fit there (fit returns normally) with a warning naming the epoch and batch, also kept in
    `message` and `stopped_at` (epoch, batch), both counted from 0; `action='skip'` drops that batch as if it were
    cancelled after its loss (no backward, no step, gradients and schedules as they were, no metrics) and training goes
    on, `skipped` counting the batches dropped this fit. Costs one host read of the loss per training batch (a
    host-device sync); valid phases are not checked (MetricsCB warns when a phase's mean loss is not finite)."""
    order = -40  # before GradientAccumulationCB (-30) and MixedPrecisionCB (-20) scale the loss in after_loss

    def __init__(self, action: str = 'stop'):
        if action not in ('stop', 'skip'):
            raise ValueError(f"TerminateOnNaNCB: action must be 'stop' (end the fit) or 'skip' (drop the batch), "
                             f'got {action!r}')
        self.action = action
        self.skipped, self.stopped_at, self.message = 0, None, None

    def before_fit(self, learn): self.skipped, self.stopped_at, self.message = 0, None, None

    def after_loss(self, learn):
        if not learn.training: return
        v = learn.loss.item()  # the one host read per step (see the class doc)
        if math.isfinite(v): return
        if self.action == 'skip':
            self.skipped += 1
            raise CancelBatchException()
        self.stopped_at = (learn.epoch, learn.iter)
        self.message = (f'the training loss is {v} at epoch {learn.epoch}, batch {learn.iter} (both counted from 0); the '
                        f'fit stopped before that batch\'s step: lower the lr, or look for NaN/inf in the data')
        warnings.warn(f'TerminateOnNaNCB: {self.message}', stacklevel=2)
        raise CancelFitException()
