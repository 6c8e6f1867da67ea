"""Data plumbing: DataLoaders (train + valid; from tensors or, as in the course, a dict of datasets), a fast
in-memory loader, moving batches between devices, and seeding every RNG (set_seed)."""
from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, default_collate

from .utils import check_int, map_tensors

__all__ = ['DataLoaders', 'TensorLoader', 'to_device', 'to_cpu', 'def_device', 'set_seed', 'collate_dict', 'get_dls']

def_device = ('mps' if torch.backends.mps.is_available()
              else 'cuda' if torch.cuda.is_available()
              else 'cpu')


def to_device(x, device=def_device, non_blocking: bool = False):
    """Move every tensor in `x` (a tensor, or lists, tuples and dicts of them) to `device`; other values pass through."""
    return map_tensors(lambda t: t.to(device, non_blocking=non_blocking), x)


def to_cpu(x):
    """Detach and copy every tensor in `x` to the CPU (note: a host-device sync for tensors on an accelerator)."""
    return map_tensors(lambda t: t.detach().cpu(), x)


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed torch (every device), python's `random` and numpy (when installed) with `seed`, and switch
    `torch.use_deterministic_algorithms(deterministic)` (True makes ops without a deterministic kernel raise)."""
    check_int('set_seed: seed', seed)
    torch.use_deterministic_algorithms(deterministic)
    torch.manual_seed(seed)
    random.seed(seed)
    try: import numpy as np
    except ImportError: return
    np.random.seed(seed % 2**32)  # numpy takes 0 .. 2**32 - 1


def _columns(ds) -> list:
    """A dataset's column names: its `features` (a Hugging Face Dataset's), else the keys of its first sample."""
    features = getattr(ds, 'features', None)
    if features is not None: return list(features)
    sample = ds[0]
    if not isinstance(sample, Mapping):
        raise TypeError(f'collate_dict needs a dataset of dicts (such as a Hugging Face Dataset); its first sample is a '
                        f'{type(sample).__name__}: use a DataLoader with the default collate instead')
    return list(sample)


def collate_dict(ds, as_tuple: bool = True) -> Callable[[list], Any]:
    """A DataLoader `collate_fn` for a dataset of dicts (the course's Hugging Face datasets): collates the samples
    with `default_collate` and returns the batch as a tuple of the dataset's columns in order (`ds.features`), e.g.
    (images, labels); `as_tuple=False` keeps the dict."""
    cols = _columns(ds)

    def _collate(b):
        d = default_collate(b)
        return tuple(d[k] for k in cols) if as_tuple else d
    return _collate


def get_dls(train_ds, valid_ds, bs: int, **kwargs) -> tuple[DataLoader, DataLoader]:
    """The course's pair of torch DataLoaders: train shuffled with batch size `bs`, valid in order with `2 * bs` (no
    gradients, so twice the batch fits); `kwargs` (num_workers, collate_fn, ...) go to both."""
    check_int('get_dls: bs', bs, 1)
    return (DataLoader(train_ds, batch_size=bs, shuffle=True, **kwargs),
            DataLoader(valid_ds, batch_size=bs * 2, **kwargs))


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
        check_int('bs', bs, 1)
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

    @classmethod
    def from_dd(cls, dd: Mapping, batch_size: int, as_tuple: bool = True, **kwargs) -> DataLoaders:
        """The course's loaders from a dict of two datasets of dicts, 'train' and the valid one (a Hugging Face
        `DatasetDict` such as `dsd.with_transform(f)`): `get_dls` over them with `collate_dict(dd['train'], as_tuple)`,
        so batches are tuples of the columns (x, y); `kwargs` (num_workers, ...) go to both DataLoaders."""
        if not isinstance(dd, Mapping) or 'train' not in dd:
            raise TypeError(f"from_dd needs a dict of datasets with a 'train' split (a DatasetDict), got "
                            f'{type(dd).__name__}' + (f' with splits {list(dd)}' if isinstance(dd, Mapping) else ''))
        if len(dd) != 2:
            raise ValueError(f"from_dd needs exactly two splits ('train' and a valid one), got {list(dd)}: pass "
                             f"{{'train': dd['train'], 'valid': dd[...]}}")
        valid = next(v for k, v in dd.items() if k != 'train')  # 'test', 'validation', ...: the other split
        return cls(*get_dls(dd['train'], valid, bs=batch_size, collate_fn=collate_dict(dd['train'], as_tuple), **kwargs))


# Bundled and on-disk datasets live in their own module; re-exported so `ultraloop.data.digits()` works.
from .datasets import digits, fashion_mnist  # noqa: E402

__all__ += ['digits', 'fashion_mnist']
