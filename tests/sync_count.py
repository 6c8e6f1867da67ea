"""Counts the reads of tensor values by the host (each one a host-device sync on an accelerator), for tests.

    with SyncCounter() as sc:
        learn.fit(1)
    assert sc.count <= 2, sc.reads

Counted: `aten._local_scalar_dense` (`.item()`, `float(t)`, `bool(t)`, formatting or printing a scalar tensor),
copies from a non-CPU device to the CPU (`.cpu()`, `.to('cpu')`, `.tolist()` of a device tensor), ops whose output
size depends on the data (`nonzero`, `unique`, `masked_select`, boolean-mask indexing), and `Tensor.tolist()` /
`Tensor.numpy()`, which read CPU tensors without a dispatched op. On the CPU nothing waits, but the same calls
are syncs on a GPU, so counting them on the CPU finds the code that would stall a GPU.
"""
from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['SyncCounter']

aten = torch.ops.aten
# ops whose output shape depends on the values, so the host must wait for them on a GPU
_DATA_DEPENDENT = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                   aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
                   aten.repeat_interleave.Tensor}
_COPIES = {aten._to_copy.default, aten.copy_.default}
# the Python entry points that read values to the host; counted once each, whatever they dispatch underneath
# (some reads, e.g. .item() of torcheval's inference-mode results, never reach the dispatch mode)
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__float__, torch.Tensor.__int__,
               torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.__complex__, torch.Tensor.__format__,
               torch.Tensor.__repr__}


def _where() -> str:
    """The innermost frame outside torch and this file: who asked for the read."""
    for fr in reversed(traceback.extract_stack()[:-2]):
        if '/torch/' not in fr.filename and not fr.filename.endswith('sync_count.py'):
            return f'{fr.filename}:{fr.lineno} {fr.name}'
    return '?'


def _is_device(t) -> bool: return isinstance(t, torch.Tensor) and t.device.type != 'cpu'


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.counter._inside_read: return out
        if func in _DATA_DEPENDENT: self.counter._record(str(func))
        elif func is aten.index.Tensor and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                               for i in args[1]):
            self.counter._record('aten.index.Tensor(bool mask)')
        elif func in _COPIES:
            src = args[1] if func is aten.copy_.default else args[0]
            if _is_device(src) and isinstance(out, torch.Tensor) and out.device.type == 'cpu':
                self.counter._record(f'{func} to cpu')
        return out


class _Function(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        c = self.counter
        if func not in _HOST_READS or c._inside_read: return func(*args, **(kwargs or {}))
        c._record(f'Tensor.{func.__name__}')
        c._inside_read = True
        try: return func(*args, **(kwargs or {}))
        finally: c._inside_read = False


class SyncCounter:
    """Context manager: `count` is the number of host reads of tensor values inside it; `reads` says what and where."""

    def __init__(self):
        self.reads: list[str] = []
        self._inside_read = False

    @property
    def count(self) -> int: return len(self.reads)

    def _record(self, what: str) -> None: self.reads.append(f'{what} at {_where()}')

    def __enter__(self) -> SyncCounter:
        self._modes = [_Function(self), _Dispatch(self)]
        for m in self._modes: m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes): m.__exit__(*exc)
