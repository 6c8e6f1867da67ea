"""Callbacks that keep a long run safe: a base for watching one metric (MonitorCB), early stopping on it, and
stopping or skipping a batch whose loss is NaN or inf (TerminateOnNaNCB)."""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist

from ..learner import Callback, CancelBatchException, CancelFitException, main_process
from ..state import cpu_copy, epoch_ends
from ..utils import check_int, check_number, several_processes
from .metrics import _comm_device, _metrics_cb

__all__ = ['MonitorCB', 'EarlyStoppingCB', 'TerminateOnNaNCB']

_PHASES = {'valid': 'eval', 'train': 'train'}  # a monitor's prefix -> the `train` field of MetricsCB's rows


class MonitorCB(Callback):
    """Base for callbacks that watch one value of MetricsCB's rows (early stopping, the best checkpoint).

    `monitor` names it with its phase: 'valid_loss', 'valid_accuracy', 'train_loss' (any MetricsCB key after 'valid_'
    or 'train_'); `mode` 'min' means lower is better, 'max' higher; a value improves on `best` when it beats it by more
    than `min_delta` (NaN never does). Each row reaches `log_metrics` as its phase ends; a subclass reacts in
    `on_value(learn, value, improved)`, called after `best` has taken an improved value. `monitor=None` watches nothing."""
    lr_find_sits_out = True  # lr_find has no valid phase and its growing lr is no run to stop, save or report

    def __init__(self, monitor: str | None = 'valid_loss', mode: str = 'min', min_delta: float = 0.0):
        if monitor is not None and (not isinstance(monitor, str) or monitor.split('_', 1)[0] not in _PHASES
                                    or '_' not in monitor):
            raise ValueError(f"{self.name}: monitor names a MetricsCB value with its phase, such as 'valid_loss', "
                             f"'valid_accuracy' or 'train_loss'; got {monitor!r}")
        if mode not in ('min', 'max'):
            raise ValueError(f"{self.name}: mode must be 'min' (lower is better) or 'max' (higher is better), got {mode!r}")
        check_number(f'{self.name}: min_delta', min_delta, ge=0, finite=True)
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        self._phase, self._key = (None, None) if monitor is None else monitor.split('_', 1)
        self.best: float | None = None

    def before_fit(self, learn):
        self.best = None
        if self.monitor is None: return
        if self._phase == 'valid' and getattr(learn, '_no_valid_dl', False):
            raise ValueError(f"{self.name} watches {self.monitor!r}, but dls has no valid loader (DataLoaders(train)), so "
                             f"no valid phase runs: give one, DataLoaders(train_dl, valid_dl), or monitor='train_"
                             f"{self._key}'")
        m = _metrics_cb(learn)
        if m is None:
            raise ValueError(f'{self.name} watches {self.monitor!r}, a value MetricsCB computes: add MetricsCB(...) to cbs')
        if self._key not in m.all_metrics:
            known = ', '.join(f'{p}_{k}' for p in _PHASES for k in m.all_metrics)
            raise ValueError(f'{self.name}: monitor {self.monitor!r} is not a value of this MetricsCB; it has {known}')

    def improved(self, value) -> bool:
        """Whether `value` beats `best` by more than `min_delta` (any number beats no best; NaN never improves)."""
        if not isinstance(value, (int, float)) or math.isnan(value): return False
        if self.best is None: return True
        return value < self.best - self.min_delta if self.mode == 'min' else value > self.best + self.min_delta

    def log_metrics(self, learn, row: dict) -> None:
        if self.monitor is None or row['train'] != _PHASES[self._phase]: return
        value = row[self._key]
        better = self.improved(value)
        if better: self.best = value
        self.on_value(learn, value, better)

    def on_value(self, learn, value, improved: bool) -> None:
        """Called with each new value of the monitored metric; `improved`: it is the new `best`."""


class EarlyStoppingCB(MonitorCB):
    """Ends fit once `monitor` has gone `patience` phases without improving by more than `min_delta`, at the end of that
    epoch (fit returns normally; `stopped_epoch` says when). `restore_best=True` puts the weights of the best phase back
    when fit ends, stopped or not. `best`, `wait` (phases since the best) and the best weights are in `state_dict()`,
    so patience runs on across a resume."""
    order = 40  # after MetricsCB (0) and the loggers (10); before CheckpointCB (50), so a stopped epoch is not saved

    def __init__(self, monitor: str = 'valid_loss', patience: int = 3, min_delta: float = 0.0, mode: str = 'min',
                 restore_best: bool = False):
        if monitor is None: raise ValueError("EarlyStoppingCB needs a monitor, such as 'valid_loss'")
        super().__init__(monitor, mode, min_delta)
        self.patience = check_int('EarlyStoppingCB: patience', patience, 1)
        if not isinstance(restore_best, bool):
            raise TypeError(f'EarlyStoppingCB: restore_best must be True or False, got {restore_best!r}')
        self.restore_best = restore_best
        self.wait, self.best_epoch, self.best_weights, self.stopped_epoch = 0, None, None, None
        self._stop = self._done = False

    def before_fit(self, learn):
        super().before_fit(learn)
        self.wait, self.best_epoch, self.best_weights, self.stopped_epoch = 0, None, None, None
        self._stop = self._done = False

    def on_value(self, learn, value, improved: bool) -> None:
        if improved:
            self.wait, self.best_epoch = 0, learn.epoch
            if self.restore_best: self.best_weights = cpu_copy(learn.model.state_dict())
            return
        self.wait += 1
        if self.wait >= self.patience: self._stop = True

    def after_epoch(self, learn):
        if self._stop and epoch_ends(learn):
            self.stopped_epoch = learn.epoch
            raise CancelFitException()

    def after_fit(self, learn): self._done = True

    def cleanup_fit(self, learn):
        # after a finished or stopped fit; not after an error or ctrl-C, which leave the weights to look at
        if self.restore_best and self.best_weights is not None and (self._done or self.stopped_epoch is not None):
            learn.model.load_state_dict(self.best_weights)

    def state_dict(self) -> dict:
        return {'best': self.best, 'wait': self.wait, 'best_epoch': self.best_epoch, 'stop': self._stop,
                'best_weights': self.best_weights}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait, self.best_epoch, self._stop = state['best'], state['wait'], state['best_epoch'], state['stop']
        self.best_weights = state['best_weights']

    def __repr__(self) -> str: return f'{self.name}({self.monitor!r}, patience={self.patience})'


class TerminateOnNaNCB(Callback):
    """Checks each training batch's loss before backward, so a NaN or inf never reaches the gradients or the weights.
    `action='stop'` ends the fit there (fit returns normally) with a warning naming the epoch and batch, also kept in
    `message` and `stopped_at` (epoch, batch), both counted from 0; `action='skip'` drops that batch as if it were
    cancelled after its loss (no backward, no step, gradients and schedules as they were, no metrics) and training goes
    on, `skipped` counting the batches dropped this fit. Costs one host read of the loss per training batch (a
    host-device sync); valid phases are not checked (MetricsCB warns when a phase's mean loss is not finite). Under
    several processes a loss that is not finite on any of them stops (or skips) the batch on all."""
    order = -40  # before GradientAccumulationCB (-30) and MixedPrecisionCB (-20) scale the loss in after_loss

    def __init__(self, action: str = 'stop'):
        if action not in ('stop', 'skip'):
            raise ValueError(f"TerminateOnNaNCB: action must be 'stop' (end the fit) or 'skip' (drop the batch), "
                             f'got {action!r}')
        self.action = action
        self.skipped, self.stopped_at, self.message = 0, None, None

    def before_fit(self, learn):
        self.skipped, self.stopped_at, self.message = 0, None, None
        self._several, self._main = several_processes(), main_process(learn)

    def after_loss(self, learn):
        if not learn.training: return
        if self._several: v = self._any_rank(learn.loss.detach())
        else: v = learn.loss.item()  # the one host read per step (see the class doc)
        if math.isfinite(v): return
        if self.action == 'skip':
            self.skipped += 1
            raise CancelBatchException()
        self.stopped_at = (learn.epoch, learn.iter)
        self.message = (f'the training loss is {v} at epoch {learn.epoch}, batch {learn.iter} (both counted from 0); the '
                        f'fit stopped before that batch\'s step: lower the lr, or look for NaN/inf in the data')
        if self._main: warnings.warn(f'TerminateOnNaNCB: {self.message}', stacklevel=2)
        raise CancelFitException()

    @staticmethod
    def _any_rank(loss) -> float:
        """This process's loss, or NaN when any process's is not finite: all stop or skip at the same batch, or the
        others would wait in the gradient all-reduce for one that left (one all-reduce, on the same host read)."""
        t = torch.stack([loss.float(), (~torch.isfinite(loss)).float()]).to(_comm_device())
        bad = t[1:].clone()
        dist.all_reduce(bad)
        v = t[0].item()
        return v if not bad.item() else (v if not math.isfinite(v) else float('nan'))
