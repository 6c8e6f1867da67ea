"""Mixed precision and device placement through Hugging Face Accelerate, an optional dependency (pip install accelerate)."""
from __future__ import annotations

import copy

from .core import TrainCB

__all__ = ['AccelerateCB']

_MODES = ('no', 'fp16', 'bf16', 'fp8')


class AccelerateCB(TrainCB):
    """The seed's AccelerateCB: an `accelerate.Accelerator(mixed_precision=..., **kwargs)` prepares the model, the
    optimiser and the loaders at fit start, and backward goes through it (loss scaling for fp16). It provides the
    step methods like TrainCB (`n_inp` as there: `AccelerateCB(n_inp=2)` for `model(x, t)`), so use it with a plain
    `Learner`. Each object is prepared once: later fits reuse them.
    The prepared loaders go to a copy of `learn.dls`, so the DataLoaders object the user passed keeps its own.
    On a machine without a GPU, accelerate runs 'fp16' in full precision; 'bf16' autocasts on the CPU too.
    Accelerate keeps one state per process: every AccelerateCB in a process must use the same mixed_precision."""

    def __init__(self, n_inp: int = 1, mixed_precision: str = 'fp16', **accelerator_kwargs):
        if isinstance(n_inp, str):
            raise TypeError(f'AccelerateCB(n_inp=1, mixed_precision=...): the first parameter is n_inp, got {n_inp!r}; '
                            f'pass the mode by name: AccelerateCB(mixed_precision={n_inp!r})')
        if mixed_precision not in _MODES:
            raise ValueError(f'AccelerateCB: mixed_precision must be one of {", ".join(map(repr, _MODES))}, '
                             f'got {mixed_precision!r}')
        super().__init__(n_inp)  # checks n_inp before accelerate is imported
        try: from accelerate import Accelerator
        except ImportError: raise ImportError('AccelerateCB needs the accelerate package: pip install accelerate') from None
        self.acc = Accelerator(mixed_precision=mixed_precision, **accelerator_kwargs)
        self._prepared: list = []  # what prepare() returned, so a second fit does not wrap it again

    def before_fit(self, learn):
        dls = learn.dls
        slots = [(learn, 'model'), (learn, 'opt'), (dls, 'train'), (dls, 'valid')]
        todo = [(o, nm) for o, nm in slots
                if getattr(o, nm, None) is not None and not any(getattr(o, nm) is p for p in self._prepared)]
        if not todo: return
        out = self.acc.prepare(*(getattr(o, nm) for o, nm in todo))
        if any(o is dls for o, _ in todo): learn.dls = copy.copy(dls)  # the user's DataLoaders keep their own loaders
        for (o, nm), new in zip(todo, out if len(todo) > 1 else (out,)):
            setattr(learn.dls if o is dls else o, nm, new)
            self._prepared.append(new)

    def backward(self, learn): self.acc.backward(learn.loss)

    def __repr__(self) -> str:
        n = f'n_inp={self.n_inp}, ' if self.n_inp != 1 else ''
        return f'{self.name}({n}mixed_precision={self.acc.mixed_precision!r})'
