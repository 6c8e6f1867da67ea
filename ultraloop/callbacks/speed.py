"""Speed without changing the user's code: channels-last memory, torch.compile, and the whole train step as one CUDA graph."""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from ..learner import Callback, _installed_hooks
from ..utils import check_int, inner_optimizer, map_tensors

__all__ = ['ChannelsLastCB', 'ChannelLastCB', 'CompileCB', 'CudaGraphCB']


class ChannelsLastCB(Callback):
    """Keeps the model's 4-D weights and each batch's images (`batch[0]`, N x C x H x W) in channels-last memory
    order, which convolutions on tensor cores run faster in (above all with mixed precision)."""

    def before_fit(self, learn): learn.model = learn.model.to(memory_format=torch.channels_last)

    def before_batch(self, learn):
        b = learn.batch
        if isinstance(b, tuple): learn.batch = b = list(b)
        elif not isinstance(b, list):
            raise TypeError(f'{self.name} puts batch[0] in channels-last order, but the batch is a {type(b).__name__}: '
                            f'yield (x, y) batches (DataLoaders.from_dd(..., as_tuple=True)), or remove {self.name}')
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
# A callback whose after_step may run on the host after each replayed step (a schedule writing the lr) declares
# `cuda_graph_host_after_step = True`.
_STEP_EVENTS = ('after_predict', 'after_loss', 'after_backward', 'after_step')


class CudaGraphCB(Callback):
    """Replaces the train step (`learn.train_step`, predict to zero_grad with the graph-safe callbacks between) with one
    CUDA graph replayed for every full-size train batch: on a launch-bound GPU (a small model) this removes nearly all
    per-kernel launch cost. The graph records the Learner's own train step, the function eager batches run, so the two
    cannot diverge. The first `warmup` train batches run eagerly on a side stream (optimiser state and libraries
    initialise there), the next is captured and replayed; a batch of another shape (the last, smaller one) and the
    valid phase run eagerly. learn.preds and learn.loss hold each replay's outputs, so metrics count it.

    Schedules: a graph holds every number the step read at capture. Where the optimiser can read a hyper-parameter
    from the device instead, the graph reads it from a tensor of its own, which takes the value the param group holds
    before each replay; so the schedule (BatchSchedCB, fit_one_cycle, a callback of yours) writes plain floats as in
    eager training, and one graph serves the whole fit. The param groups keep the user's floats outside the capture.
    - Adam and AdamW (made `capturable` for the fit, as a capture needs): the lr always; betas[0] (fit_one_cycle
      cycles it) once it is seen changing, in the warm-up or at a new capture. The graph then holds their
      one-tensor-at-a-time step (captured with `foreach=False`: torch's multi-tensor step reads a tensor beta1 with a
      host sync), more kernels per step than the multi-tensor one. Not with `fused=True` (its kernel takes beta1 as a
      number). betas[1] and weight_decay stay numbers (torch reads them on the host).
    - torch's other optimisers with `capturable` (RMSprop, NAdam, ...) run capturable too, with every number as
      captured (some of their paths read a tensor lr on the host).
    - SGD (and any optimiser without `capturable`): the lr and momentum stay numbers, as torch's SGD reads both on the
      host (`if momentum != 0`, `alpha=-lr`; its fused kernel takes momentum as a number). Under fit_one_cycle it captures
      twice, then trains eagerly and says why. Use Adam/AdamW, or a constant lr and momentum.
    A number the graph holds that changes means a new capture; more than one in an epoch falls back to eager, naming
    what changed.
    Other fallbacks, each with a one-line reason: the model is not on a CUDA device, a callback runs Python between
    predict and step (a handler of after_predict, after_loss, after_backward or after_step without
    `cuda_graph_safe = True`), the model has forward hooks (they would run at capture only), the batch is not a list
    of tensors, or capture fails (a host sync such as `.item()` in the step).
    """
    order = 1_000  # before_batch last: the batch is on the device and in its memory format

    def __init__(self, warmup: int = 3):
        self.warmup = check_int('CudaGraphCB: warmup (eager train batches before capture)', warmup, 1)
        self.reason: str | None = None  # why the last fit ran eagerly; None: it used the graph
        self.replays = 0  # batches the graph ran, over the last fit
        self.captures = 0  # graphs captured, over the last fit
        self._switched = self._saving = self._opt = None  # what cleanup_fit undoes, also after a fit that failed early

    def before_fit(self, learn):
        self.graph, self.replays, self.captures, self._warm, self._switched, self._saving = None, 0, 0, 0, None, None
        self._eager = type(learn).train_step  # the one train step: what eager batches run and what the graph records
        self.reason = _graph_blocker(learn, self)
        self._main = learn.is_main  # one process says why it trains eagerly
        if self.reason:
            if self._main: print(f'CudaGraphCB: {self.reason}; training eagerly')
            return
        self._stream = torch.cuda.Stream()
        self._host = [cb.after_step for cb in sorted(learn.cbs, key=lambda c: getattr(c, 'order', 0))
                      if getattr(cb, 'cuda_graph_host_after_step', False)]
        self._opt = opt = inner_optimizer(learn.opt)
        self._switched = _make_capturable(opt, set())
        # a checkpoint taken during the fit holds the user's flags, not the fit's: resumed without a graph (or on the
        # CPU, which refuses capturable), it must not step as capturable
        self._saving = opt.register_state_dict_post_hook(partial(_as_the_user_had_it, self._switched))
        self._seen, self._moving, self._hypers = _numbers(opt), set(), None

    def before_epoch(self, learn): self._recaptures = 0

    def train_step(self, learn):
        if self.reason is not None: return self._eager(learn)
        if self._warm < self.warmup:  # eager, on the side stream the graph will be captured on
            # a resume loads the optimiser's state after before_fit, with the user's flags and its own param groups
            if self._warm == 0: _make_capturable(self._opt, self._switched)
            self._warm += 1
            self._moving |= _changed(self._seen, _numbers(self._opt))
            learn.preds = learn.loss = None  # the last step's autograd graph, made on another stream, is let go
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream): self._eager(learn)
            return torch.cuda.current_stream().wait_stream(self._stream)
        b = learn.batch
        if self.graph is not None:
            changed = _changed(self._baked, _numbers(self._opt))
            if changed:
                self._recaptures += 1
                if self._recaptures > 1:
                    self._give_up(_baked_reason(self._opt, changed))
                    return self._eager(learn)
                self._moving |= changed
                self.graph = None
        if self.graph is None:
            if not self._capture(learn, b): return self._eager(learn)
        elif len(b) == len(self._static) and all(t.shape == s.shape for t, s in zip(b, self._static)):
            for s, t in zip(self._static, b): s.copy_(t)
        else: return self._eager(learn)  # another shape
        self._hypers.write()
        self.graph.replay()
        self.replays += 1
        learn.preds, learn.loss = self._preds, self._loss
        for f in self._host: f(learn)

    def cleanup_fit(self, learn):
        self.graph = self._static = self._preds = self._loss = self._hypers = None  # frees the graph's memory
        if self._switched is not None: _restore_flags(self._opt, self._switched)  # the user's optimiser as it was
        if self._saving is not None: self._saving.remove()
        self._switched = self._opt = self._saving = None

    def _capture(self, learn, b) -> bool:
        if not (isinstance(b, list) and all(isinstance(t, torch.Tensor) for t in b)):
            return self._give_up(f'the batch is a {type(b).__name__}, not a list of tensors')
        opt = self._opt
        self._moving |= _changed(self._seen, _numbers(opt))
        self._hypers = _DeviceHypers(opt, _readable(opt, self._moving), next(learn.model.parameters()).device)
        self._static = [t.clone() for t in b]  # the graph reads its inputs from these addresses
        learn.batch, graph, main = self._static, torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        learn.preds = learn.loss = None
        table = learn._handlers  # host after_step handlers run after each replay, so not inside the recorded step
        learn._handlers = {**table, 'after_step': tuple(f for f in table['after_step'] if f not in self._host)}
        try:
            with self._hypers.in_groups(), torch.cuda.graph(graph, stream=self._stream): self._eager(learn)
        except Exception as e:  # a host sync, an uncapturable op, a cancel: the loop then runs this batch eagerly
            torch.cuda.set_stream(main)  # a failed capture_end leaves the capture stream current
            _end_rng_capture(b[0].device)
            learn.batch = b
            msg = str(e).strip().splitlines()
            return self._give_up(f'capture failed ({type(e).__name__}: {msg[0][:120] if msg else ""})')
        finally: learn._handlers = table
        # outputs live in the graph's memory and are overwritten by the next replay; detached, they let go of the
        # capture's autograd graph, whose gradient nodes would otherwise meet the eager steps on another stream
        self.graph = graph
        self.captures += 1
        self._preds, self._loss = map_tensors(torch.Tensor.detach, learn.preds), learn.loss.detach()
        self._baked = {k: v for k, v in _numbers(opt).items() if k not in self._hypers.slots}
        return True

    def _give_up(self, reason: str) -> bool:
        self.reason, self.graph = reason, None
        if self._main: print(f'CudaGraphCB: {reason}; training eagerly from here')
        return False


def _end_rng_capture(device) -> None:
    """A failed capture ends without closing the CUDA generator's capture mode, so the next random op outside a graph
    (dropout in the eager step that follows) raises 'Offset increment outside graph capture'. One small capture that
    completes closes it; the eager random stream is not advanced by either capture."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=torch.cuda.Stream()): torch.zeros(1, device=device)


# ---- hyper-parameters on the device -----------------------------------------------------------------------------------
# A slot names one number of a param group: (group index, key, index in a tuple such as betas, or None).
def _is_number(v) -> bool: return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(opt) -> dict:
    """Every number the optimiser's step reads from its param groups (the keys of its defaults: lr, betas, momentum,
    weight_decay, eps, ...), by slot. Flags (bool, None) and tensors are left out."""
    out = {}
    for i, g in enumerate(opt.param_groups):
        for k in opt.defaults:
            v = g.get(k)
            if _is_number(v): out[i, k, None] = v
            elif isinstance(v, tuple): out.update({(i, k, j): x for j, x in enumerate(v) if _is_number(x)})
    return out


def _changed(before: dict, now: dict) -> set:
    """The slots whose number differs between two `_numbers` readings."""
    return {s for s, v in now.items() if before.get(s, v) != v}


def _readable(opt, moving: set) -> list:
    """The slots the captured step can read from a device tensor, for Adam and AdamW (capturable): the lr, and beta1
    when it changes (their one-tensor-at-a-time step reads a tensor beta1 without a host sync; the fused kernel takes
    it as a number). torch's other optimisers read a tensor lr on the host in some paths (RMSprop's `value=-lr`)."""
    if not isinstance(opt, torch.optim.Adam): return []
    slots = []
    for i, g in enumerate(opt.param_groups):
        if _is_number(g.get('lr')): slots.append((i, 'lr', None))
        b = g.get('betas')
        if (i, 'betas', 0) in moving and not g.get('fused') and not g.get('differentiable') and isinstance(b, tuple) \
                and _is_number(b[0]):
            slots.append((i, 'betas', 0))
    return slots


def _baked_reason(opt, changed: set) -> str:
    names = sorted({k if j is None else f'{k}[{j}]' for _, k, j in changed})
    one = len(names) == 1
    return (f'{", ".join(names)} change{"s" if one else ""} within an epoch, and {type(opt).__name__} reads '
            f'{"it" if one else "them"} on the host: a graph keeps the value{"" if one else "s"} it was captured with '
            f'(Adam and AdamW, not fused, read lr and betas[0] from the device and keep one graph)')


def _get(g: dict, key: str, j):
    return g[key] if j is None else g[key][j]


def _set(g: dict, key: str, j, v) -> None:
    if j is None: g[key] = v
    else: g[key] = tuple(v if n == j else x for n, x in enumerate(g[key]))


class _DeviceHypers:
    """The hyper-parameters a captured step reads from the device: one persistent 0-d float32 tensor per slot (group
    index, key, tuple index), on `device`. `in_groups()` puts them in the param groups while the step is captured, so
    the graph records their addresses; `write()`, before each replay, copies in place the numbers the groups hold then
    (what the schedule wrote: a float, or a new betas tuple) into the same tensors. Outside the capture the groups
    keep plain floats, so eager steps, schedules, recorders and checkpoints see what they see without a graph.
    A group that reads beta1 from here is captured with `foreach=False` (torch's multi-tensor Adam reads a tensor beta1
    with `.item()`, a host sync); eager steps keep the group's own `foreach`."""

    def __init__(self, opt, slots, device):
        self.groups, self.slots = opt.param_groups, list(slots)
        self.values = [float(_get(self.groups[i], k, j)) for i, k, j in self.slots]  # what each tensor holds
        self.tensors = [torch.tensor(v, dtype=torch.float32, device=device) for v in self.values]

    def write(self) -> None:
        """Copies each slot's number, as the group holds it now, into its tensor: a fill where it changed (no sync)."""
        for n, (i, k, j) in enumerate(self.slots):
            v = _get(self.groups[i], k, j)
            if isinstance(v, torch.Tensor): self.tensors[n].copy_(v); self.values[n] = None
            elif v != self.values[n]: self.tensors[n].fill_(v); self.values[n] = float(v)

    @contextmanager
    def in_groups(self):
        """The groups hold the tensors for the block (the capture), then their own numbers again."""
        keys = {(i, k) for i, k, _ in self.slots} | {(i, 'foreach') for i, k, _ in self.slots if k == 'betas'}
        saved = {(i, k): self.groups[i][k] for i, k in keys}
        for (i, k, j), t in zip(self.slots, self.tensors):
            _set(self.groups[i], k, j, t)
            if k == 'betas': self.groups[i]['foreach'] = False
        try: yield
        finally:
            for (i, k), v in saved.items(): self.groups[i][k] = v


def _make_capturable(opt, switched: set) -> set:
    """Adam and the other optimisers with `capturable` run it for the fit (a capture needs their step count on the
    device, and their step reads a tensor lr or beta1 only then). Adds the indices of the groups it switched to
    `switched` (to switch back at fit end) and returns it."""
    now = [i for i, g in enumerate(opt.param_groups) if g.get('capturable') is False]
    # torch warns once when a capturable step runs without a capture: the eager warm-up steps do, on purpose
    if now: opt._warned_capturable_if_run_uncaptured = True
    for i in now:
        g = opt.param_groups[i]
        g['capturable'] = True
        _move_steps(opt, g, None)  # state from an earlier eager fit: its step counts move to the parameters' device
    switched.update(now)
    return switched


def _as_the_user_had_it(switched: set, opt, sd: dict) -> dict:
    """An optimiser state dict taken while CudaGraphCB ran it capturable, as the user's optimiser has it: the switched
    groups not capturable, their step counts on the CPU (copies: the live state is left alone)."""
    for i, (g, saved) in enumerate(zip(opt.param_groups, sd['param_groups'])):
        if i not in switched: continue
        saved['capturable'] = False
        if g.get('fused'): continue
        for n in saved['params']:
            st = sd['state'].get(n)
            if st and isinstance(st.get('step'), torch.Tensor): sd['state'][n] = {**st, 'step': st['step'].to('cpu')}
    return sd


def _restore_flags(opt, switched: set) -> None:
    for i in switched:
        g = opt.param_groups[i]
        g['capturable'] = False
        if not g.get('fused'): _move_steps(opt, g, 'cpu')  # where torch keeps them when not capturable


def _move_steps(opt, g: dict, device) -> None:
    for p in g['params']:
        st = opt.state.get(p)
        if st and isinstance(st.get('step'), torch.Tensor): st['step'] = st['step'].to(device or p.device)


def _graph_blocker(learn, graph_cb: CudaGraphCB) -> str | None:
    """Why the train step cannot be captured, known at fit start; None if nothing stands in the way."""
    for cb in learn.cbs:
        if cb is graph_cb or getattr(cb, 'cuda_graph_safe', False): continue
        host_step = getattr(cb, 'cuda_graph_host_after_step', False)
        evs = [ev for ev in _STEP_EVENTS if getattr(cb, ev, None) is not None and not (host_step and ev == 'after_step')]
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
