"""Debugging callbacks: stop after one batch or one epoch, and record every event the loop fires."""
from __future__ import annotations

from ..learner import EVENTS, Callback, CancelFitException

__all__ = ['SingleBatchCB', 'SingleEpochCB', 'TraceCB']


class SingleBatchCB(Callback):
    """Ends fit after the first batch: a quick check that a model, its data and callbacks run at all."""
    order = 100  # after the other callbacks' after_batch, so they see the batch

    def after_batch(self, learn):
        print('[SingleBatchCB] Terminating . . . ')
        raise CancelFitException()


class SingleEpochCB(Callback):
    """Ends fit after the first valid phase (so after one train and one valid epoch)."""
    order = 100  # after MetricsCB's after_epoch, so the epoch's metrics are logged first

    def after_epoch(self, learn):
        if not learn.training:
            print('[SingleEpochCB] Terminating . . . ')
            raise CancelFitException()


class TraceCB(Callback):
    """Records every event in `events` as it fires (and prints it, indented, with `verbose=True`).
    Runs before every other callback, so an event is recorded even when a later callback cancels there."""
    order = -1_000_000

    def __init__(self, verbose: bool = False):
        self.verbose, self.events = verbose, []

    def _record(self, event: str, learn) -> None:
        self.events.append(event)
        if self.verbose:
            lvl = {'fit': 0, 'epoch': 1}.get(event.split('_', 1)[1], 2)
            phase = '' if lvl == 0 else (' train' if learn.training else ' valid')
            print(f'{"  " * lvl}{event}{phase}')


def _recorder(event: str):
    def hook(self, learn): self._record(event, learn)
    hook.__name__ = event
    hook.__doc__ = EVENTS[event]
    return hook


for _ev in EVENTS: setattr(TraceCB, _ev, _recorder(_ev))
