"""Data plumbing: DataLoaders (train + valid), a fast in-memory loader, and moving batches between devices."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

__all__ = ['DataLoaders', 'TensorLoader', 'to_device', 'to_cpu', 'def_device']

def_device = ('mps' if torch.backends.mps.is_available()
              else 'cuda' if torch.cuda.is_available()
              else 'cpu')


def _map_tensors(f: Callable[[torch.Tensor], Any], x):
    """`f` applied to every tensor in `x` (a tensor, or lists, tuples and dicts of them); other values pass through."""
    if isinstance(x, torch.Tensor): return f(x)
    if isinstance(x, Mapping): return {k: _map_tensors(f, v) for k, v in x.items()}
    if isinstance(x, (list, tuple)): return type(x)(_map_tensors(f, o) for o in x)
    return x


def to_device(x, device=def_device, non_blocking: bool = False):
    """Move every tensor in `x` (a tensor, or lists, tuples and dicts of them) to `device`; other values pass through."""
    return _map_tensors(lambda t: t.to(device, non_blocking=non_blocking), x)


def to_cpu(x):
    """Detach and copy every tensor in `x` to the CPU (note: a host-device sync for tensors on an accelerator)."""
    return _map_tensors(lambda t: t.detach().cpu(), x)


class TensorLoader:
    """Batches in-memory tensors by index slices: each batch is a list `[t[idx] for t in tensors]`.

    Several times cheaper than `DataLoader(TensorDataset(...))`, which indexes sample by sample and collates.
    With `device`, the tensors are moved there once and batches are cut on the device. The shuffle order is a
    permutation drawn from the loader's own seeded generator, so a run can be reproduced and resumed; `order` is the
    current epoch's permutation. `state_dict()` says where the loader is: the generator state the epoch's order was
    drawn from (which redraws it exactly) and how many of its batches were handed out; after `load_state_dict` the
    next iteration goes on from that batch of that order (or starts a new epoch where the saved one had ended).
    """

    def __init__(self, *tensors: torch.Tensor, bs: int = 64, shuffle: bool = False, drop_last: bool = False,
                 device=None, seed: int | None = None):
        if not tensors: raise ValueError('TensorLoader needs at least one tensor, e.g. TensorLoader(x, y, bs=64)')
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f'tensor {i} is a {type(t).__name__}; pass torch tensors (torch.as_tensor(...))')
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ValueError(f'tensors differ in length {[len(t) for t in tensors]}; every tensor needs one row per sample')
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1: raise ValueError(f'bs must be an int >= 1, got {bs!r}')
        self.tensors = [t.to(device) for t in tensors] if device is not None else list(tensors)
        self.n, self.bs, self.shuffle, self.drop_last = n, bs, shuffle, drop_last
        if seed is None: seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed
        self.generator = torch.Generator().manual_seed(seed)
        self.order: torch.Tensor | None = None
        self._drawn_from = None  # the generator state `order` was drawn from: replaying it redraws the order exactly
        self._pos, self._open, self._resume = 0, False, False  # batches handed out; epoch not run to its end; go on

    def __len__(self) -> int:
        return self.n // self.bs if self.drop_last else (self.n + self.bs - 1) // self.bs

    def __iter__(self):
        ts, bs = self.tensors, self.bs
        if self._resume: self._resume = False  # load_state_dict: go on with the loaded epoch from its position
        else: self._new_epoch()
        self._open = True
        idx = self.order
        for i in range(self._pos * bs, len(self) * bs, bs):
            self._pos += 1
            if idx is None: yield [t[i:i + bs] for t in ts]  # views, no copy
            else:
                j = idx[i:i + bs]
                yield [t[j] for t in ts]
        self._open = False

    def _new_epoch(self) -> None:
        self._pos = 0
        if not self.shuffle:
            self.order = self._drawn_from = None
            return
        self._drawn_from = self.generator.get_state()
        self.order = torch.randperm(self.n, generator=self.generator).to(self.tensors[0].device)

    def state_dict(self) -> dict:
        """Where the loader is: `generator`, the state the current (or last) epoch's order was drawn from when `drawn`,
        else the generator's state now; `batch`, how many batches of an epoch not yet run to its end were handed out
        (None when it ended or none began)."""
        drawn = self._drawn_from is not None
        return {'generator': self._drawn_from if drawn else self.generator.get_state(), 'drawn': drawn,
                'batch': self._pos if self._open else None}

    def load_state_dict(self, state: dict) -> None:
        """Put the loader where `state_dict()` said it was: the order is redrawn (so `order` and the generator are as
        they were), and an unfinished epoch goes on at its next batch when the loader is next iterated."""
        self.generator.set_state(state['generator'])
        self.order = self._drawn_from = None
        if state.get('drawn'): self._new_epoch()
        batch = state.get('batch')
        self._pos, self._open, self._resume = batch or 0, batch is not None, batch is not None


class DataLoaders:
    """A train and a valid loader: `DataLoaders(train_dl, valid_dl)`; any iterables of batches will do."""

    def __init__(self, *dls):
        if len(dls) < 2:
            raise TypeError(f'DataLoaders needs a train and a valid loader, got {len(dls)}: DataLoaders(train_dl, valid_dl)')
        self.train, self.valid = dls[:2]

    @classmethod
    def from_tensors(cls, x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor,
                     bs: int = 64, shuffle: bool = True, device=None, seed: int | None = None) -> DataLoaders:
        """In-memory loaders over (x, y) tensors: train shuffled (if `shuffle`), valid in order.
        `device` keeps the data there (e.g. 'cuda' when it fits in GPU memory)."""
        return cls(TensorLoader(x_train, y_train, bs=bs, shuffle=shuffle, device=device, seed=seed),
                   TensorLoader(x_valid, y_valid, bs=bs, shuffle=False, device=device))


# Bundled and on-disk datasets live in their own module; re-exported so `ultraloop.data.digits()` works.
from .datasets import digits, fashion_mnist  # noqa: E402

__all__ += ['digits', 'fashion_mnist']
