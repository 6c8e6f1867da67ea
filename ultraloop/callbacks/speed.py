"""Speed without changing the user's code: channels-last memory, torch.compile, and the whole train step as one CUDA graph."""
from __future__ import annotations

import torch

from ..learner import Callback, CancelBatchException, _installed_hooks

__all__ = ['ChannelsLastCB', 'ChannelLastCB', 'CompileCB', 'CudaGraphCB']


class ChannelsLastCB(Callback):
    """Keeps the model's 4-D weights and each batch's images (`batch[0]`, N x C x H x W) in channels-last memory
    order, which convolutions on tensor cores run faster in (above all with mixed precision)."""

    def before_fit(self, learn): learn.model = learn.model.to(memory_format=torch.channels_last)

    def before_batch(self, learn):
        b = learn.batch
        if isinstance(b, tuple): learn.batch = b = list(b)
        x = b[0]
        if learn.iter == 0 and (not isinstance(x, torch.Tensor) or x.ndim != 4):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'{self.name} needs image batches N x C x H x W in batch[0], got {shape}: '
                             f'remove {self.name} for this model')
        b[0] = x.contiguous(memory_format=torch.channels_last)


ChannelLastCB = ChannelsLastCB  # the seed's name


class CompileCB(Callback):
    """Compiles the model's forward with `torch.compile(**kwargs)` for the fit: the compiled function is set as the
    model's `forward` at fit start and removed at its end. `learn.model` stays the user's module throughout, so state
    dicts and checkpoints never carry an `_orig_mod.` prefix, and the model pickles after fit. A model the user wrapped
    with `torch.compile` is unwrapped first for the same reason. Later fits reuse the compiled graphs (torch caches them).

    Shapes: torch's default (`dynamic=None`) compiles for the first batch size; a second size (a smaller last batch)
    recompiles once with the batch dimension dynamic, so uneven batches cost one extra compile, not one per size.
    The valid phase (no grad, eval mode) compiles its own graph. With loaders that `drop_last`, `dynamic=False`
    keeps only static graphs.
    """
    def __init__(self, **kwargs):
        self.kwargs, self._model = kwargs, None  # _model: the module whose forward this fit replaced

    def before_fit(self, learn):
        m = learn.model
        if isinstance(m, torch._dynamo.eval_frame.OptimizedModule): learn.model = m = m._orig_mod
        if 'forward' in vars(m):
            raise ValueError(f'{self.name}: the model already has its own forward set on the instance (compiled?); '
                             f'pass the plain module')
        m.forward = torch.compile(m.forward, **self.kwargs)
        self._model = m

    def cleanup_fit(self, learn):
        m = self._model
        if m is not None and 'forward' in vars(m): del m.forward  # back to the class's own forward
        self._model = None

    def __repr__(self) -> str: return f'{self.name}({", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())})'


# Callbacks whose handlers between predict and step may be captured in the graph: they do device work only, with
# no host sync and no Python state that must change per batch. A callback declares it with `cuda_graph_safe = True`.
_STEP_EVENTS = ('after_predict', 'after_loss', 'after_backward', 'after_step')


class CudaGraphCB(Callback):
    """Captures the whole train step (predict, loss, backward, optimiser step, zero_grad, and the graph-safe callbacks
    between them) in one CUDA graph, and replays it for every full-size train batch: on a launch-bound GPU (a small
    model) this removes nearly all per-kernel launch cost. The first `warmup` train batches run eagerly on a side
    stream (optimiser state and libraries initialise there), the next is captured and replayed; a batch of another
    shape (the last, smaller one), the valid phase, and any batch after the learning rate changed run eagerly (the
    graph is captured anew after an lr change, e.g. from an epoch schedule). A replayed batch fires before_batch,
    after_batch and cleanup_batch: learn.preds and learn.loss hold its outputs, so metrics count it.

    Falls back to the eager loop, with a one-line message saying why, when the model is not on a CUDA device, a
    callback must run Python between predict and step (a handler of after_predict, after_loss, after_backward or
    after_step on a callback without `cuda_graph_safe = True`), the model has forward hooks (Python that would run
    at capture only, e.g. ActivationStatsCB's), the batch is not a list of tensors, capture fails
    (a host sync such as `.item()` inside the step, an optimiser without `capturable=True` where torch needs it), or
    the lr changes within an epoch more than once. Results equal the eager step's: the graph replays its kernels.
    """
    order = 1_000  # before_batch last: the batch is on the device and in its memory format, autocast is entered
    reuses_outputs = True  # learn.preds and learn.loss are the graph's buffers: MetricsCB copies what it keeps

    def __init__(self, warmup: int = 3):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f'CudaGraphCB: warmup (eager train batches before capture) must be an int >= 1, got {warmup!r}')
        self.warmup, self._side = warmup, None
        self.reason: str | None = None  # why the last fit ran eagerly; None: it used the graph
        self.replays = 0  # batches the graph ran, over the last fit

    def before_fit(self, learn):
        self.graph, self.replays, self._warm, self._side = None, 0, 0, None
        self.reason = _graph_blocker(learn, self)
        if self.reason: print(f'CudaGraphCB: {self.reason}; training eagerly')
        else: self._stream = torch.cuda.Stream()

    def before_epoch(self, learn): self._recaptures = 0

    def before_batch(self, learn):
        if self.reason is not None or not learn.training: return
        if self._warm < self.warmup:  # eager, on the side stream the graph will be captured on
            self._warm += 1
            self._stream.wait_stream(torch.cuda.current_stream())
            self._side = torch.cuda.stream(self._stream)
            self._side.__enter__()
            return
        b = learn.batch
        if self.graph is not None and self._lrs != [g['lr'] for g in learn.opt.param_groups]:
            self._recaptures += 1
            if self._recaptures > 1: return self._give_up('the learning rate changes within an epoch')
            self.graph = None
        if self.graph is None:
            if not self._capture(learn, b): return  # capture was impossible: this batch runs eagerly
        elif len(b) == len(self._static) and all(t.shape == s.shape for t, s in zip(b, self._static)):
            for s, t in zip(self._static, b): s.copy_(t)
        else: return  # another shape: this batch runs eagerly
        self.graph.replay()
        self.replays += 1
        learn.preds, learn.loss = self._preds, self._loss
        learn.callback('after_batch')
        raise CancelBatchException()  # the graph did this batch's step: skip the eager one

    def cleanup_batch(self, learn):
        if self._side is not None:
            self._side.__exit__(None, None, None)
            self._side = None
            torch.cuda.current_stream().wait_stream(self._stream)

    def cleanup_fit(self, learn): self.graph = self._static = self._preds = self._loss = None  # frees the graph's memory

    def _capture(self, learn, b) -> bool:
        if not (isinstance(b, list) and all(isinstance(t, torch.Tensor) for t in b)):
            return self._give_up(f'the batch is a {type(b).__name__}, not a list of tensors')
        self._static = [t.clone() for t in b]  # the graph reads its inputs from these addresses
        learn.batch, graph, main = self._static, torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, stream=self._stream): _train_step(learn)
        except Exception as e:  # a host sync, an uncapturable op, a cancel: the loop then runs this batch eagerly
            torch.cuda.set_stream(main)  # a failed capture_end leaves the capture stream current
            learn.batch = b
            msg = str(e).strip().splitlines()
            return self._give_up(f'capture failed ({type(e).__name__}: {msg[0][:120] if msg else ""})')
        # outputs live in the graph's memory and are overwritten by the next replay: copy them to keep them
        self.graph, self._preds, self._loss = graph, learn.preds, learn.loss
        self._lrs = [g['lr'] for g in learn.opt.param_groups]
        return True

    def _give_up(self, reason: str) -> bool:
        self.reason, self.graph = reason, None
        print(f'CudaGraphCB: {reason}; training eagerly from here')
        return False


def _train_step(learn) -> None:
    """The train part of `Learner._one_batch`, from predict to zero_grad, as the graph records it."""
    cb = learn.callback
    learn.predict(); cb('after_predict')
    learn.get_loss(); loss = learn.loss; cb('after_loss')
    learn.backward(); learn.loss = loss; cb('after_backward')
    learn.step(); cb('after_step')
    learn.zero_grad()


def _graph_blocker(learn, graph_cb: CudaGraphCB) -> str | None:
    """Why the train step cannot be captured, known at fit start; None if nothing stands in the way."""
    for cb in learn.cbs:
        if cb is graph_cb or getattr(cb, 'cuda_graph_safe', False): continue
        evs = [ev for ev in _STEP_EVENTS if getattr(cb, ev, None) is not None]
        if evs: return (f'{cb!r} runs Python in {", ".join(evs)}, between predict and step (a callback doing only '
                        f'device work there can say so with cuda_graph_safe = True)')
        if getattr(cb, 'before_batch', None) is not None and getattr(cb, 'order', 0) > graph_cb.order:
            return f'{cb!r} has a before_batch after CudaGraphCB (order {cb.order} > {graph_cb.order})'
    hooks = _installed_hooks(learn.model)
    if hooks:
        where = '; '.join(f'{who} on {", ".join(mods)}' for who, mods in hooks.items())
        return f'the model has forward hooks ({where}), which would run only once, at capture, not on replays'
    p = next(learn.model.parameters(), None)
    if p is None or not p.is_cuda: return f'the model is on {"no device" if p is None else p.device}, not a CUDA device'
    if learn.opt is None: return 'learn.opt is None'
    return None
