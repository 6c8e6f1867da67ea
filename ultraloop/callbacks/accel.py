"""Mixed precision and device placement through Hugging Face Accelerate, an optional dependency (pip install accelerate)."""
from __future__ import annotations

import copy

import torch

from ..data import to_device
from .core import TrainCB
from .distributed import DistributedCB, Shards, StopVote

__all__ = ['AccelerateCB']

_MODES = ('no', 'fp16', 'bf16', 'fp8')


class AccelerateCB(TrainCB):
    """The seed's AccelerateCB: an `accelerate.Accelerator(mixed_precision=..., **kwargs)` prepares the model, the
    optimiser and the loaders at fit start, and backward goes through it (loss scaling for fp16). It provides the
    step methods like TrainCB (`n_inp` as there: `AccelerateCB(n_inp=2)` for `model(x, t)`), so use it with a plain
    `Learner`. Each object is prepared once: later fits reuse them.
    The prepared loaders go to a copy of `learn.dls`, so the DataLoaders object the user passed keeps its own.
    On a machine without a GPU, accelerate runs 'fp16' in full precision; 'bf16' autocasts on the CPU too.
    Accelerate keeps one state per process: every AccelerateCB in a process must use the same mixed_precision.

    Under `accelerate launch` (several processes) it works as DistributedCB does: the model is wrapped in DDP by
    accelerate (`learn.model` is then that wrapper; `self.acc.unwrap_model(learn.model)` is yours), every rank starts
    from rank 0's weights, and each phase's loader is cut into this process's share by ultraloop (not by accelerate), so
    MetricsCB's numbers are exact over all processes: both phases get even shards (the DDP wrapper runs every forward,
    and its first one in a phase may sync buffers), and the repeated samples are not counted. In one process or several,
    batches are moved to `self.acc.device` (the GPU where there is one) before the step; `learn.sync_grads` reaches DDP
    before each forward (one all-reduce per accumulated step). A SIGTERM, SIGUSR1 or ctrl-C reaching any process stops
    every process at the same batch, agreed on every `signal_every` train batches as under DistributedCB."""
    signal_every = DistributedCB.signal_every

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
        self._shards, self._several, self._vote = None, False, None

    def before_fit(self, learn):
        dls = learn.dls
        self._several = self.acc.num_processes > 1
        slots = [(learn, 'model'), (learn, 'opt')] + ([] if self._several else [(dls, 'train'), (dls, 'valid')])
        todo = [(o, nm) for o, nm in slots
                if getattr(o, nm, None) is not None and not any(getattr(o, nm) is p for p in self._prepared)]
        if self._several:
            self._shards = Shards(even_valid=True)
            self._shards.start(learn)
            self._vote = StopVote(learn, self.signal_every, self.acc.device)
        if not todo: return
        out = self.acc.prepare(*(getattr(o, nm) for o, nm in todo))
        if any(o is dls for o, _ in todo): learn.dls = copy.copy(dls)  # the user's DataLoaders keep their own loaders
        for (o, nm), new in zip(todo, out if len(todo) > 1 else (out,)):
            setattr(learn.dls if o is dls else o, nm, new)
            self._prepared.append(new)

    def before_epoch(self, learn):
        # batches go to accelerate's device: its prepared torch DataLoaders hand them out there already (no copy then),
        # other loaders (a TensorLoader, or each process's share) do not
        self._move = self.acc.device.type != 'cpu'
        self._ddp = self._several and isinstance(learn.model, torch.nn.parallel.DistributedDataParallel)
        if self._several: self._shards.before_epoch(learn); self._vote.before_epoch(learn)

    def before_batch(self, learn):
        if self._move: learn.batch = to_device(learn.batch, self.acc.device, non_blocking=True)
        if self._ddp and learn.training: learn.model.require_backward_grad_sync = learn.sync_grads

    def after_batch(self, learn):
        if self._vote is not None: self._vote.after_batch(learn)

    def after_epoch(self, learn):
        if self._vote is not None: self._vote.after_epoch(learn)

    def cleanup_fit(self, learn):
        if self._shards is not None: self._shards.end(learn)
        if self._vote is not None: self._vote.end(learn)
        self._shards = self._vote = None

    def backward(self, learn): self.acc.backward(learn.loss)

    def __repr__(self) -> str:
        n = f'n_inp={self.n_inp}, ' if self.n_inp != 1 else ''
        return f'{self.name}({n}mixed_precision={self.acc.mixed_precision!r})'
