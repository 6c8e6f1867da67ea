"""Transforming batches (normalisation, augmentation, test-time augmentation: BatchTransformCB), capturing predictions
(CapturePreds, `learn.capture_preds`) and looking at a transformed batch (`learn.show_image_batch`)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch

from ..learner import Callback, CancelFitException, Learner, _as_cbs, batch_split, split_batch
from ..utils import check_int, map_tensors

__all__ = ['BatchTransformCB', 'CapturePreds']  # capture_preds, show_image_batch: use learn.capture_preds(), ...


class BatchTransformCB(Callback):
    """Replaces each batch with `tfm(batch)` before the step, in training phases (`on_train`) and valid phases
    (`on_val`): `BatchTransformCB(partial(tfm_batch, tfm_x=augment), on_val=False)` augments training batches only.
    At order 0 with DeviceCB listed first (the course's order), it sees batches already on the device."""

    def __init__(self, tfm: Callable, on_train: bool = True, on_val: bool = True):
        if not callable(tfm): raise TypeError(f'tfm must be callable as tfm(batch) -> batch, got {tfm!r}')
        if not (on_train or on_val): raise ValueError('on_train and on_val are both False, so tfm would never run')
        self.tfm, self.on_train, self.on_val = tfm, on_train, on_val

    def before_batch(self, learn):
        if self.on_train if learn.training else self.on_val: learn.batch = self.tfm(learn.batch)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """`t` detached on the CPU. From a GPU the copy goes to pinned memory with non_blocking=True, so it waits for
    nothing; its values are valid once the device has passed this point (CapturePreds synchronises before joining)."""
    t = t.detach()
    if t.device.type != 'cuda': return t.cpu()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def _cat(parts: list):
    """Per-batch values joined along the batch: tensors concatenated, tuples, lists and dicts of them element-wise."""
    if not parts: return torch.empty(0)
    first = parts[0]
    if isinstance(first, torch.Tensor): return torch.cat([p.reshape(1) if p.ndim == 0 else p for p in parts])
    if isinstance(first, dict): return {k: _cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)): return type(first)(_cat(list(o)) for o in zip(*parts))
    return parts


class CapturePreds(Callback):
    """Keeps every batch's predictions, targets (`batch[1]`) and inputs (`batch[0]`; of a dict batch, the first target
    and input key as the step splits it, see TrainCB) on the CPU: `all_preds`,
    `all_targs`, `all_inps` are those of the last fit joined along the batch (tensors, or tuples of tensors where a
    batch element is a tuple). Copies from a GPU do not wait for it (pinned memory, non_blocking); the first read
    waits once. Readable after a cancelled fit too (SingleBatchCB)."""

    def __init__(self): self._parts, self._joined, self._split = ([], [], []), None, (1, None, None)

    def before_fit(self, learn): self._parts, self._joined, self._split = ([], [], []), None, batch_split(learn)

    def after_batch(self, learn):
        b = learn.batch
        if isinstance(b, (list, tuple)): x, y = b[0], b[1]
        else: (x, *_), (y, *_) = split_batch(b, *self._split)
        inps, preds, targs = self._parts
        inps.append(map_tensors(_host_copy, x))
        preds.append(map_tensors(_host_copy, learn.preds))
        targs.append(map_tensors(_host_copy, y))

    def _join(self, i: int):
        if self._joined is None:
            if torch.cuda.is_available() and torch.cuda.is_initialized(): torch.cuda.synchronize()  # the copies land
            self._joined = tuple(map(_cat, self._parts))
            self._parts = ([], [], [])  # the joined copy replaces them
        return self._joined[i]

    all_inps = property(lambda self: self._join(0), doc='the inputs, batch[0], of every batch of the last fit')
    all_preds = property(lambda self: self._join(1), doc='the predictions of every batch of the last fit')
    all_targs = property(lambda self: self._join(2), doc='the targets, batch[1], of every batch of the last fit')


def capture_preds(learn: Learner, cbs=None, inps: bool = False) -> tuple:
    """Predictions and targets over `dls.valid` (one valid phase, no training; `cbs` join for this call, e.g. a
    BatchTransformCB for test-time augmentation): `(preds, targs)`, or `(preds, targs, inps)` with `inps=True`."""
    if getattr(learn.dls, 'valid', 0) is None:
        raise ValueError('capture_preds predicts on dls.valid, but these DataLoaders have none (DataLoaders(train)): give '
                         'it one, DataLoaders(train_dl, valid_dl)')
    cp = CapturePreds()
    learn.fit(1, train=False, cbs=[cp, *_as_cbs(cbs)])
    return (cp.all_preds, cp.all_targs, cp.all_inps) if inps else (cp.all_preds, cp.all_targs)


class _FirstBatch(Callback):
    """Ends fit in before_batch once every other before_batch (device, transforms) has run: learn.batch is the batch
    the step would see, and nothing trains."""
    order = 10 ** 9

    def before_batch(self, learn): raise CancelFitException()


def show_image_batch(learn: Learner, max_n: int = 9, cbs=None, nrows: int | None = None, ncols: int | None = None,
                     imsize: float = 3, figsize=None, titles=None, path: str | os.PathLike | None = None) -> Path | None:
    """Shows the first `max_n` images (`batch[0]`) of the first training batch as the step would see them, after the
    callbacks' before_batch (augmentations in learn.cbs and `cbs`). Unlike miniai's, no step is taken (the weights stay
    as they were). A grid of `imsize`-inch images; inline in a notebook, else saved to `path` (default batch.png)."""
    check_int('show_image_batch: max_n', max_n, 1)
    learn.fit(1, valid=False, cbs=[_FirstBatch(), *_as_cbs(cbs)])
    b = learn.batch
    ims = (b[0] if isinstance(b, (list, tuple)) else split_batch(b, *batch_split(learn))[0][0])[:max_n]
    return _show_images(ims, nrows, ncols, imsize, figsize, titles, path)


def _show_images(ims, nrows, ncols, imsize, figsize, titles, path) -> Path | None:
    from ..plotting import show_or_save, subplots
    n = len(ims)
    if nrows is None and ncols is None: nrows = max(1, int(math.sqrt(n)))
    if nrows is None: nrows = math.ceil(n / ncols)
    if ncols is None: ncols = math.ceil(n / nrows)
    fig, axs = subplots(nrows, ncols, figsize=figsize or (ncols * imsize, nrows * imsize), squeeze=False)
    for i, ax in enumerate(axs.flat):
        ax.set_axis_off()
        if i >= n: continue
        im = ims[i].detach().float().cpu()
        if im.ndim == 3 and im.shape[0] < 5: im = im.permute(1, 2, 0)  # C x H x W -> H x W x C
        if im.ndim == 3 and im.shape[-1] == 1: im = im[..., 0]
        ax.imshow(im.numpy())
        if titles is not None and i < len(titles): ax.set_title(str(titles[i]))
    return show_or_save(fig, path, 'batch.png')


Learner.capture_preds = capture_preds
Learner.show_image_batch = show_image_batch
