"""Data plumbing: DataLoaders (train + valid), a fast in-memory loader, and moving batches between devices."""
from __future__ import annotations

import torch

from .utils import check_int, map_tensors

__all__ = ['DataLoaders', 'TensorLoader', 'to_device', 'to_cpu', 'def_device']

def_device = ('mps' if torch.backends.mps.is_available()
              else 'cuda' if torch.cuda.is_available()
              else 'cpu')


def to_device(x, device=def_device, non_blocking: bool = False):
    """Move every tensor in `x` (a tensor, or lists, tuples and dicts of them) to `device`; other values pass through."""
    return map_tensors(lambda t: t.to(device, non_blocking=non_blocking), x)


def to_cpu(x):
    """Detach and copy every tensor in `x` to the CPU (note: a host-device sync for tensors on an accelerator)."""
    return map_tensors(lambda t: t.detach().cpu(), x)


class TensorLoader:
    """Batches in-memory tensors by index slices: each batch is a list `[t[idx] for t in tensors]`.

    Several times cheaper than `DataLoader(TensorDataset(...))`, which indexes sample by sample and collates.
    With `device`, the tensors are moved there once and batches are cut on the device. The shuffle order is a
    permutation drawn from the loader's own seeded generator, so a run can be reproduced and resumed: `state_dict()`
    holds the generator state, `order` the current epoch's permutation.
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

    def __len__(self) -> int:
        return self.n // self.bs if self.drop_last else (self.n + self.bs - 1) // self.bs

    def __iter__(self):
        ts, bs = self.tensors, self.bs
        stop = len(self) * bs
        if not self.shuffle:
            self.order = None
            for i in range(0, stop, bs): yield [t[i:i + bs] for t in ts]  # views, no copy
            return
        self.order = torch.randperm(self.n, generator=self.generator).to(ts[0].device)
        for i in range(0, stop, bs):
            j = self.order[i:i + bs]
            yield [t[j] for t in ts]

    def state_dict(self) -> dict: return {'generator': self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None: self.generator.set_state(state['generator'])


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
