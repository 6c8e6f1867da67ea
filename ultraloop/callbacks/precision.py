"""Mixed precision: autocast around predict and loss, and for float16 a gradient scaler; through events only
(MixedPrecisionCB, composes with any step provider) or as the course's step provider (MixedPrecision)."""
from __future__ import annotations

import torch

from ..learner import Callback, CancelStepException
from .core import TrainCB

__all__ = ['MixedPrecisionCB', 'MixedTrainingCB', 'MixedPrecision']

_DTYPES = (torch.bfloat16, torch.float16)


class MixedPrecisionCB(Callback):
    """Runs predict and get_loss under `torch.autocast(device_type, dtype)` (device_type: the model's device by default).

    float16 also scales the loss with `torch.amp.GradScaler` so small gradients survive: the loss is scaled in
    `after_loss` (backward only; metrics see the true loss), gradients are unscaled before any other `after_backward`
    callback (so GradientClippingCB clips true gradients), and a step whose gradients hold inf/NaN is skipped with
    `CancelStepException` (so schedulers stepping in `after_step` do not advance) and counted in `skipped`.
    Reading whether the scaler found inf/NaN is one host-device sync per optimiser step (GradScaler.step makes the
    same one). bfloat16 needs no scaler and makes no sync. Works with any provider of the step methods (TrainCB,
    TrainLearner, MomentumLearner, whose kept gradients are brought back to the scale after each step) and with
    GradientAccumulationCB (it unscales once per real step). `state_dict()` holds the scaler's state."""
    order = -20  # after GradientAccumulationCB (-30), before GradientClippingCB (-10)

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16, device_type: str | None = None):
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f'{type(self).__name__} dtype must be torch.bfloat16 or torch.float16 (or None: float16 '
                             f'on CUDA, bfloat16 elsewhere), got {dtype!r}')
        if device_type is not None and not isinstance(device_type, str):
            raise TypeError(f"device_type must be a string such as 'cuda' or 'cpu' (or None: the model's), got {device_type!r}")
        self.dtype, self.device_type = dtype, device_type
        self.scaler: torch.amp.GradScaler | None = None
        self.skipped = 0  # optimiser steps skipped because the scaled gradients overflowed
        self._autocast, self._on, self._unscaled, self._first_param, self._pending = None, False, False, None, None

    @property
    def cuda_graph_safe(self) -> bool: return self.dtype == torch.bfloat16  # float16's inf check is a host sync

    def before_epoch(self, learn):
        # after DeviceCB's before_fit has moved the model, so its device is the one autocast must target
        p = next(learn.model.parameters(), None)
        dt = self.device_type or (p.device.type if p is not None else 'cpu')
        dtype = self.dtype or (torch.float16 if dt == 'cuda' else torch.bfloat16)
        self._autocast = torch.autocast(dt, dtype=dtype)  # one context reused per batch: entering is ~1.5 us
        if dtype == torch.float16 and (self.scaler is None or self.scaler._device != dt):
            self.scaler = torch.amp.GradScaler(dt)
            if self._pending is not None: self.scaler.load_state_dict(self._pending)
            self._pending = None
        if self.scaler is not None and learn.training:
            if learn.opt is None:
                raise ValueError(f'{self!r} needs learn.opt to unscale gradients: pass an opt_func to the Learner '
                                 f'or set learn.opt before fit')
            self._first_param = next((p for g in learn.opt.param_groups for p in g['params'] if p.requires_grad), None)

    def before_batch(self, learn):
        self._autocast.__enter__()
        self._on = True

    def after_loss(self, learn):
        self._exit()
        if self.scaler is not None and learn.training: learn.loss = self.scaler.scale(learn.loss)  # for backward only

    def after_backward(self, learn):
        if self.scaler is None: return
        self.scaler.unscale_(learn.opt)
        self._unscaled = True
        if sum(v.item() for v in self.scaler._found_inf_per_device(learn.opt).values()):  # host sync, once per step
            learn.opt.zero_grad()
            self.skipped += 1
            raise CancelStepException()

    def cleanup_batch(self, learn):
        self._exit()  # a cancel or an error between before_batch and after_loss must not leave autocast on
        if self._unscaled:  # once per optimiser step, whether it was taken, skipped or cancelled by another callback
            self._unscaled = False
            self.scaler.update()
            p = self._first_param
            if p is not None and p.grad is not None:
                # the provider keeps gradients across steps (MomentumLearner decays them), and they are unscaled now:
                # bring them back to the scaled space that the next backward adds to
                grads = [q.grad for g in learn.opt.param_groups for q in g['params'] if q.grad is not None]
                torch._foreach_mul_(grads, self.scaler._get_scale_async())

    def _exit(self) -> None:
        if self._on:
            self._on = False
            self._autocast.__exit__(None, None, None)

    def resume_settings(self) -> dict:
        return {'dtype': str(self.dtype).replace('torch.', '') if self.dtype else None}  # a resumed run keeps its precision

    def state_dict(self) -> dict:
        return {'scaler': None if self.scaler is None else self.scaler.state_dict(), 'skipped': self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state['skipped']
        if state['scaler'] is None: return
        if self.scaler is None: self._pending = state['scaler']  # applied once the scaler exists (its device is known)
        else: self.scaler.load_state_dict(state['scaler'])

    def __repr__(self) -> str:
        return f'{self.name}({str(self.dtype).replace("torch.", "") if self.dtype else "float16 on CUDA, else bfloat16"})'


class MixedTrainingCB(MixedPrecisionCB):
    """The seed's name for mixed precision: `MixedPrecisionCB` with the seed's float16 and gradient scaler on CUDA.
    Elsewhere it defaults to bfloat16, the CPU's autocast type: CPU float16 kernels (convolutions above all) can be
    many times slower than float32. Pass `dtype` to choose."""
    def __init__(self, dtype: torch.dtype | None = None, device_type: str | None = None):
        super().__init__(dtype, device_type)


class MixedPrecision(TrainCB, MixedPrecisionCB):
    """The course's (miniai's) mixed precision: a `TrainCB` that also autocasts, so `Learner(model, dls, loss,
    cbs=[DeviceCB(), MixedPrecision()])` trains with no other step provider. The autocast and the float16 gradient
    scaler are MixedPrecisionCB's, through the same events: the step methods are TrainCB's (`n_inp` as there), the
    loss is scaled after get_loss for backward only, and a step whose gradients overflowed is skipped. Default dtype:
    float16 with the scaler on CUDA (miniai's), bfloat16 elsewhere (CPU float16 kernels are many times slower).
    Unlike miniai's (order 10), it runs at MixedPrecisionCB's order -20, so GradientClippingCB clips true gradients."""

    def __init__(self, n_inp: int = 1, dtype: torch.dtype | None = None, device_type: str | None = None):
        TrainCB.__init__(self, n_inp)
        MixedPrecisionCB.__init__(self, dtype, device_type)
