"""The everyday callbacks: the plain supervised step (TrainCB) and moving model and batches to a device (DeviceCB)."""
from __future__ import annotations

import torch

from ..data import def_device, to_device
from ..learner import Callback

__all__ = ['TrainCB', 'DeviceCB']


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """True if `t` is on `device` ('cuda' matches the current 'cuda:N')."""
    d = t.device
    if d.type != device.type: return False
    if device.index is None and d.type == 'cuda': return d.index == torch.cuda.current_device()
    return device.index is None or d.index == device.index


class TrainCB(Callback):
    """Provides the step methods for a plain `Learner`: batch is (x, y, ...), preds = model(x)."""
    def predict(self, learn): learn.preds = learn.model(learn.batch[0])
    def get_loss(self, learn): learn.loss = learn.loss_func(learn.preds, learn.batch[1])
    def backward(self, learn): learn.loss.backward()
    def step(self, learn): learn.opt.step()
    def zero_grad(self, learn): learn.opt.zero_grad()


class DeviceCB(Callback):
    """Moves the model to `device` before fit and each batch there before the step (a list, so callbacks may
    assign `learn.batch[0]`). Copies from the CPU to CUDA are non_blocking."""
    def __init__(self, device=def_device):
        self.device, self._resident = torch.device(device), False

    def before_fit(self, learn): learn.model.to(self.device)

    def before_epoch(self, learn):
        # a TensorLoader whose tensors already live on the device yields batches there: skip the per-batch move
        ts = getattr(learn.dl, 'tensors', None)
        self._resident = isinstance(ts, list) and all(isinstance(t, torch.Tensor) and _on(t, self.device) for t in ts)

    def before_batch(self, learn):
        if self._resident: return
        b = learn.batch
        if isinstance(b, tuple): b = list(b)
        learn.batch = to_device(b, self.device, non_blocking=self.device.type == 'cuda')
