"""The everyday callbacks (the plain supervised step, TrainCB; moving model and batches to a device, DeviceCB) and the
seed's own callback plumbing for hand-written learners (run_cbs, with_cbs, HasLearnCB)."""
from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from ..data import def_device, to_device
from ..learner import (Callback, CancelBatchException, CancelEpochException, CancelFitException, _order, check_batch_keys,
                       split_batch)
from ..utils import check_int

__all__ = ['TrainCB', 'DeviceCB', 'HasLearnCB', 'run_cbs', 'with_cbs']


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """True if `t` is on `device` ('cuda' matches the current 'cuda:N')."""
    d = t.device
    if d.type != device.type: return False
    if device.index is None and d.type == 'cuda': return d.index == torch.cuda.current_device()
    return device.index is None or d.index == device.index


class TrainCB(Callback):
    """Provides the step methods for a plain `Learner`: the first `n_inp` elements of the batch are the model's inputs
    and the rest go to the loss: `preds = model(*batch[:n_inp])`, `loss = loss_func(preds, *batch[n_inp:])`. A dict
    batch is split by key: `TrainCB(inputs='image', target='label')` (a key, or a list of keys, each); with only one
    named, the other is every other key; with neither, the first `n_inp` keys in the dict's order are the inputs and
    the rest the targets."""
    n_inp = 1  # also for subclasses whose __init__ does not call TrainCB's (the course's NCACB)
    inputs = target = None

    def __init__(self, n_inp: int = 1, *, inputs=None, target=None):
        self.n_inp = check_int(f'{type(self).__name__}: n_inp (how many leading batch elements the model takes)', n_inp, 1)
        self.inputs, self.target = check_batch_keys(type(self).__name__, inputs, target)

    def predict(self, learn):
        b = learn.batch
        if not isinstance(b, (list, tuple)): learn.preds = learn.model(*split_batch(b, self.n_inp, self.inputs, self.target)[0])
        else: learn.preds = learn.model(b[0]) if self.n_inp == 1 else learn.model(*b[:self.n_inp])  # no slice for one input

    def get_loss(self, learn):
        b = learn.batch
        ys = b[self.n_inp:] if isinstance(b, (list, tuple)) else split_batch(b, self.n_inp, self.inputs, self.target)[1]
        learn.loss = learn.loss_func(learn.preds, *ys)
    def backward(self, learn): learn.loss.backward()
    def step(self, learn): learn.opt.step()
    def zero_grad(self, learn): learn.opt.zero_grad()


class _Prefetch:
    """Iterates loader `dl` for a CUDA `device`: each batch's host tensors are copied into pinned buffers reused from batch
    to batch (unless the loader pinned them), then to the device with non_blocking=True on a side stream, so the copy
    runs while the GPU still works on the previous step. A batch is taken from `dl` only when the loop asks for it, so
    the loader's own position (its `state_dict()`, for a checkpoint) is always the loop's. Yields lists; len() and other
    attributes (`order`, `state_dict`, ...) are those of `dl`."""
    ring = 3  # pinned buffers per batch shape: one being filled, and the copies of up to two batches still running
    reuse_pinned = True  # False: pin each batch anew (tensor.pin_memory()), for the benchmark's comparison

    def __init__(self, dl, device: torch.device):
        self.dl, self.device = dl, device
        self.stream = torch.cuda.Stream(device) if device.type == 'cuda' else None  # None: plain copies (CPU tests)
        self._pinned: dict = {}  # (shape, dtype) -> [next slot, [(pinned buffer, event of the copy that reads it)]]

    def __len__(self) -> int: return len(self.dl)

    def __getattr__(self, name: str):
        if name == 'dl': raise AttributeError(name)
        return getattr(self.dl, name)

    def __iter__(self):
        return self._batches(iter(self.dl))  # the loader's iterator is made now, as iterating the loader itself would

    def _batches(self, it):
        for b in it:
            b = list(b) if isinstance(b, (list, tuple)) else b  # dicts and tensors pass to the loop's own batch check
            if self.stream is None:
                yield to_device(b, self.device)
                continue
            b = self._copy(b)
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.stream)  # the step reads the batch only once its copy is done
            for t in (b.values() if isinstance(b, Mapping) else b if isinstance(b, list) else (b,)):
                # its memory must not be reused while the step on the main stream may still read it
                if isinstance(t, torch.Tensor) and t.is_cuda: t.record_stream(main)
            yield b

    def _copy(self, b):
        with torch.cuda.stream(self.stream):
            if not isinstance(b, list): return to_device(b, self.device, non_blocking=True)
            used, out = [], []
            for t in b:
                if isinstance(t, torch.Tensor) and not t.is_cuda:
                    # pinned already (a DataLoader with pin_memory=True): copied from where it is, sparing the loop's
                    # thread a second host copy of the batch; torch's pinned-memory allocator keeps that memory from
                    # reuse until the copy on this stream is done
                    if not t.is_pinned(): t = self._pin(t, used) if self.reuse_pinned else t.pin_memory()
                    t = t.to(self.device, non_blocking=True)
                out.append(t)
            for ev in used: ev.record(self.stream)  # the pinned buffers may be filled again once their copies are done
            return out

    def _pin(self, t: torch.Tensor, used: list) -> torch.Tensor:
        """`t` copied into the next pinned buffer of its shape, once the copy that last read that buffer is done."""
        key = (t.shape, t.dtype)
        slots = self._pinned.get(key)
        if slots is None: slots = self._pinned[key] = [0, [_pinned_slot(t) for _ in range(self.ring)]]
        i, ring = slots
        if any(ring[i][1] is ev for ev in used): ring.insert(i, _pinned_slot(t))  # more tensors of the shape in a batch
        buf, ev = ring[i]
        slots[0] = (i + 1) % len(ring)
        ev.synchronize()  # returns at once unless that copy, `ring` batches back, still runs (an unrecorded event: at once)
        used.append(ev)
        return buf.copy_(t)


def _pinned_slot(t: torch.Tensor) -> tuple:
    """A pinned host buffer shaped like `t`, with the event that marks the copy reading it done."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True), torch.cuda.Event()


class DeviceCB(Callback):
    """Moves the model to `device` before fit and each batch there before the step (a list, so callbacks may assign
    `learn.batch[0]`). On CUDA, each batch goes through reused pinned buffers (or the loader's own pinned tensors, from
    a DataLoader with pin_memory=True) and is copied with non_blocking=True on a side stream, so its copy overlaps the
    step the GPU is still running (`prefetch=False`: a plain copy in before_batch). A loader whose tensors already live
    on the device is left alone (no per-batch work)."""
    def __init__(self, device=def_device, prefetch: bool = True):
        self.device, self.prefetch, self._resident, self._dl = torch.device(device), prefetch, False, None

    def before_fit(self, learn):
        available = {'cuda': torch.cuda.is_available, 'mps': torch.backends.mps.is_available}.get(self.device.type)
        if available is not None and not available():
            raise ValueError(f"DeviceCB('{self.device}'): {self.device.type.upper()} is not available on this machine; "
                             f"use DeviceCB() (it picks {def_device!r}) or DeviceCB('cpu')")
        learn.model.to(self.device)

    def before_epoch(self, learn):
        # a TensorLoader whose tensors already live on the device yields batches there: skip the per-batch move
        ts = getattr(learn.dl, 'tensors', None)
        self._resident = isinstance(ts, list) and all(isinstance(t, torch.Tensor) and _on(t, self.device) for t in ts)
        if not self._resident and self.prefetch and self.device.type == 'cuda':
            self._dl, learn.dl = learn.dl, _Prefetch(learn.dl, self.device)
            self._resident = True  # the prefetcher hands out batches already on the device

    def before_batch(self, learn):
        if self._resident: return
        b = learn.batch
        if isinstance(b, tuple): b = list(b)
        learn.batch = to_device(b, self.device, non_blocking=self.device.type == 'cuda')

    def cleanup_epoch(self, learn):
        if self._dl is not None: learn.dl, self._dl = self._dl, None


class HasLearnCB(Callback):
    """Keeps the learner in `self.learn` from fit start until fit ends (cleared in cleanup_fit, so also after a cancel
    or an error), for callbacks with helpers that do not take it. Subclasses that define before_fit call super()."""
    learn = None

    def before_fit(self, learn): self.learn = learn

    def cleanup_fit(self, learn): self.learn = None


def run_cbs(cbs, method_nm: str, learn=None) -> None:
    """The seed's dispatcher: call `cb.<method_nm>(learn)` on every callback in `cbs` that has that method, in `order`
    (ties in list order). For hand-written learners; `Learner` itself dispatches through a table built once."""
    for cb in sorted(cbs, key=_order):
        method = getattr(cb, method_nm, None)
        if method is not None: method(learn)


_CANCELS = {'fit': CancelFitException, 'epoch': CancelEpochException, 'batch': CancelBatchException}


class with_cbs:
    """The seed's decorator for a hand-written learner's loop methods: `@with_cbs('batch')` wraps the method in
    `callback('before_batch')` and `callback('after_batch')`; `CancelBatchException` ends it quietly and
    `callback('cleanup_batch')` always runs last. Names: fit, epoch, batch. The exception comes from a table, not from
    building its name: an unknown name is an error here, not at the first cancel."""

    def __init__(self, nm: str):
        if nm not in _CANCELS:
            raise ValueError(f'with_cbs({nm!r}): the name must be one of {", ".join(map(repr, _CANCELS))} (each has its '
                             f'Cancel<Name>Exception and before_/after_/cleanup_ events)')
        self.nm, self.cancel = nm, _CANCELS[nm]
        self.events = tuple(f'{when}_{nm}' for when in ('before', 'after', 'cleanup'))

    def __call__(self, f):
        before, after, cleanup = self.events
        cancel = self.cancel

        @functools.wraps(f)
        def _f(o, *args, **kwargs):
            try:
                o.callback(before)
                f(o, *args, **kwargs)
                o.callback(after)
            except cancel: pass
            finally: o.callback(cleanup)
        return _f
