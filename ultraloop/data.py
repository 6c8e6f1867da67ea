"""Data plumbing: DataLoaders (train + valid; from tensors or, as in the course, a dict of datasets), a fast
in-memory loader, moving batches between devices, and seeding every RNG (set_seed)."""
from __future__ import annotations

import copy
import random
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, default_collate

from .utils import check_int, is_int, map_tensors

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
        self._shard: tuple[int, int, bool] | None = None  # (rank, world_size, even) of a shard() copy

    def __len__(self) -> int:
        n = self.n if self._shard is None else self._shard_len()
        return n // self.bs if self.drop_last else (n + self.bs - 1) // self.bs

    def __iter__(self):
        ts, bs = self.tensors, self.bs
        if self._resume: self._resume = False  # load_state_dict: go on with the loaded epoch from its position
        else: self._new_epoch()
        self._open = True
        idx = self.order if self._shard is None else self._shard_order(self.order, ts[0].device)
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

    # ---- one process's share of each epoch, as DistributedSampler cuts it -----------------------------------------
    def shard(self, rank: int, world_size: int, even: bool = True) -> TensorLoader:
        """A copy of this loader yielding process `rank`'s share of each epoch, cut as `DistributedSampler` cuts it:
        rank r takes positions r, r+N, ... of the epoch's order (the same permutation on every rank, as long as every
        rank's generator holds the same state: DistributedCB gives them rank 0's). `bs` stays per process, so N shards
        of bs b together see the single-process batches of bs N*b. With `even` (training) every rank gets ceil(n/N)
        samples, the order's first samples repeated to fill the last positions, so all ranks take the same number of
        equal steps; `n_counted` is how many of a rank's samples are not such repeats. Without it (validation), rank
        r gets the positions r, r+N, ... below n: 101 samples on 2 ranks are 51 and 50. The copy shares the tensors
        and the generator."""
        if not (is_int(world_size) and world_size >= 1 and is_int(rank) and 0 <= rank < world_size):
            raise ValueError(f'shard needs 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}')
        c = copy.copy(self)
        c._shard = (rank, world_size, bool(even))
        return c

    def _shard_len(self) -> int:
        r, w, even = self._shard
        return -(-self.n // w) if even else len(range(r, self.n, w))

    @property
    def n_counted(self) -> int | None:
        """Samples of this process's share per epoch that are not repeats added to even out the shards (None: all count)."""
        if self._shard is None: return None
        r, w, _ = self._shard
        real = len(range(r, self.n, w))
        return real if real < self._shard_len() else None

    def _shard_order(self, order: torch.Tensor | None, device) -> torch.Tensor:
        r, w, even = self._shard
        idx = order if order is not None else torch.arange(self.n, device=device)
        total = -(-self.n // w) * w
        if even and total > self.n: idx = idx.repeat(-(-total // self.n))[:total]  # as DistributedSampler pads
        return idx[r::w]

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


def shard(dl, rank: int, world_size: int, even: bool = True, seed: int = 0):
    """Process `rank`'s share of the loader `dl` among `world_size` processes, cut as `DistributedSampler` cuts it:
    rank r takes positions r, r+N, ... of each epoch's order. A TensorLoader gives its `shard` copy; a torch DataLoader
    over a map-style dataset is rebuilt with a `DistributedSampler` (`even`: training, shuffled as the original was, by
    `seed` and the epoch given to `set_epoch`) or with the positions r, r+N, ... in order (no repeats: validation); a
    DataLoader that already has a DistributedSampler is its owner's choice and is returned as it is.
    Anything else cannot be cut without knowing how it makes its batches: a one-line error says what to do."""
    if isinstance(dl, TensorLoader): return dl.shard(rank, world_size, even)
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
    from torch.utils.data.distributed import DistributedSampler
    hint = ('give each process its own share: a TensorLoader (DataLoaders.from_tensors), a DataLoader over a map-style '
            'dataset, or a DataLoader with your own DistributedSampler')
    if not isinstance(dl, DataLoader): raise TypeError(f'cannot shard a {type(dl).__name__} across processes; {hint}')
    if isinstance(dl.sampler, DistributedSampler): return dl
    if (not isinstance(dl.batch_sampler, BatchSampler) or type(dl.sampler) not in (RandomSampler, SequentialSampler)
            or isinstance(dl.dataset, torch.utils.data.IterableDataset)):
        raise TypeError(f'cannot shard this DataLoader across processes (its dataset, sampler or batch_sampler is its '
                        f'own: {type(dl.dataset).__name__}, {type(dl.sampler).__name__}); {hint}')
    n = len(dl.dataset)
    sampler = (DistributedSampler(dl.dataset, world_size, rank, shuffle=isinstance(dl.sampler, RandomSampler), seed=seed)
               if even else range(rank, n, world_size))
    kw = dict(num_workers=dl.num_workers, collate_fn=dl.collate_fn, pin_memory=dl.pin_memory, drop_last=dl.drop_last,
              timeout=dl.timeout, worker_init_fn=dl.worker_init_fn, multiprocessing_context=dl.multiprocessing_context,
              generator=dl.generator, persistent_workers=dl.persistent_workers)
    if dl.num_workers: kw['prefetch_factor'] = dl.prefetch_factor
    return DataLoader(dl.dataset, batch_size=dl.batch_size, sampler=sampler, **kw)


def n_counted(dl) -> int | None:
    """How many of this process's samples in an epoch of `dl` count in metrics: all but the repeats a sampler adds to
    even out the shards (a DistributedSampler without drop_last, an even TensorLoader shard), which come last in the
    process's epoch. None when every sample counts."""
    n = getattr(dl, 'n_counted', None)  # a TensorLoader shard, also through wrappers that pass attributes on
    if n is not None: return n
    from torch.utils.data.distributed import DistributedSampler
    s = getattr(dl, 'sampler', None)
    if isinstance(s, DistributedSampler) and not s.drop_last:
        real = len(range(s.rank, len(s.dataset), s.num_replicas))
        return real if real < s.num_samples else None
    return None


class DataLoaders:
    """A train and a valid loader: `DataLoaders(train_dl, valid_dl)`; any iterables of batches will do.
    `DataLoaders(train_dl)` (or a valid loader of None) trains without validation: `fit` runs no valid phase."""

    def __init__(self, *dls):
        if not dls or dls[0] is None:
            raise TypeError('DataLoaders needs a train loader: DataLoaders(train_dl, valid_dl), or DataLoaders(train_dl) '
                            'to train without validation')
        self.train, self.valid = dls[0], dls[1] if len(dls) > 1 else None

    @classmethod
    def from_tensors(cls, x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor,
                     bs: int = 64, shuffle: bool = True, device=None, seed: int | None = None) -> DataLoaders:
        """In-memory loaders over (x, y) tensors: train shuffled (if `shuffle`), valid in order.
        `device` keeps the data there (e.g. 'cuda' when it fits in GPU memory)."""
        return cls(TensorLoader(x_train, y_train, bs=bs, shuffle=shuffle, device=device, seed=seed),
                   TensorLoader(x_valid, y_valid, bs=bs, shuffle=False, device=device))

    @classmethod
    def from_dd(cls, dd: Mapping, batch_size: int, as_tuple: bool = True, **kwargs) -> DataLoaders:
        """The course's loaders from a dict of datasets of dicts (a Hugging Face `DatasetDict` such as
        `dsd.with_transform(f)`): `get_dls` over 'train' and the valid split with `collate_dict(dd['train'], as_tuple)`,
        so batches are tuples of the columns (x, y), or with `as_tuple=False` dicts (name the keys with
        `TrainCB(inputs=..., target=...)`). The valid split is `valid='validation'` (a keyword: its name), else the one
        split besides 'train'; a dict with 'train' alone trains without validation. Other `kwargs` (num_workers, ...)
        go to both DataLoaders."""
        valid = kwargs.pop('valid', None)  # keyword-only, after **kwargs in effect: miniai's signature stays as it was
        if not isinstance(dd, Mapping) or 'train' not in dd:
            raise TypeError(f"from_dd needs a dict of datasets with a 'train' split (a DatasetDict), got "
                            f'{type(dd).__name__}' + (f' with splits {list(dd)}' if isinstance(dd, Mapping) else ''))
        if valid is not None and (valid == 'train' or valid not in dd):
            raise ValueError(f'from_dd: valid={valid!r} is not a split besides train; the splits are {list(dd)}')
        if valid is None and len(dd) > 2:
            raise ValueError(f"from_dd needs exactly two splits ('train' and a valid one), got {list(dd)}: name the valid "
                             f"one, e.g. from_dd(dd, {batch_size}, valid={next(k for k in dd if k != 'train')!r})")
        if valid is None: valid = next((k for k in dd if k != 'train'), None)  # 'test', 'validation', ...: the other one
        collate = collate_dict(dd['train'], as_tuple)
        if valid is None:  # training without validation
            check_int('from_dd: batch_size', batch_size, 1)
            return cls(DataLoader(dd['train'], batch_size=batch_size, shuffle=True, collate_fn=collate, **kwargs))
        return cls(*get_dls(dd['train'], dd[valid], bs=batch_size, collate_fn=collate, **kwargs))


# Bundled and on-disk datasets live in their own module; re-exported so `ultraloop.data.digits()` works.
from .datasets import digits, fashion_mnist  # noqa: E402

__all__ += ['digits', 'fashion_mnist']
