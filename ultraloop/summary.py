"""Model summary: each layer's name, type, shapes, parameters and approximate MFLOPs, from one forward without side effects."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .callbacks.hooks import Hooks, _is_leaf
from .data import to_device
from .utils import is_int, module_names
from .learner import Learner
from .state import Snapshot

__all__ = ['LayerInfo', 'ModelSummary', 'model_summary']

@dataclass
class LayerInfo:
    """One row of the summary: a call of a leaf module (or of a module holding parameters itself)."""
    name: str
    type: str
    in_shape: tuple | list | None
    out_shape: tuple | list | None
    params: int
    mflops: float  # per sample, as torch.utils.flop_counter counts them (matrix products and convolutions)


def _shape(x):
    if isinstance(x, torch.Tensor): return tuple(x.shape)
    if isinstance(x, (list, tuple)):
        shapes = [s for s in map(_shape, x) if s is not None]
        return shapes[0] if len(shapes) == 1 else shapes or None
    return None


def _fmt_shape(s) -> str:
    if s is None: return '-'
    if isinstance(s, tuple): return 'x'.join(map(str, s)) if s else 'scalar'
    return '[' + ', '.join(map(_fmt_shape, s)) + ']'


class ModelSummary:
    """The summary's rows (`rows`, a list of `LayerInfo`) and totals. Its repr is an aligned text table; in a
    notebook it shows as a markdown table. `str(s)` / `s.markdown()` give either as a string."""
    headers = ('layer', 'type', 'input', 'output', 'params', 'MFLOPs')

    def __init__(self, rows: list[LayerInfo], total_params: int, trainable_params: int, batch_size: int, device):
        self.rows, self.total_params, self.trainable_params = rows, total_params, trainable_params
        self.batch_size, self.device = batch_size, device
        self.total_mflops = sum(r.mflops for r in rows)

    def _cells(self) -> list[tuple[str, ...]]:
        return [(r.name, r.type, _fmt_shape(r.in_shape), _fmt_shape(r.out_shape), f'{r.params:,}', f'{r.mflops:,.3f}')
                for r in self.rows]

    def _footer(self) -> str:
        return (f'total: {self.total_params:,} parameters ({self.trainable_params:,} trainable), '
                f'{self.total_mflops:,.3f} MFLOPs per sample; batch of {self.batch_size} on {self.device}')

    def text(self) -> str:
        cells = [self.headers, *self._cells()]
        w = [max(len(c[i]) for c in cells) for i in range(len(self.headers))]
        right = (False, False, False, False, True, True)
        fmt = lambda c: '  '.join(s.rjust(n) if r else s.ljust(n) for s, n, r in zip(c, w, right)).rstrip()
        rule = '-' * (sum(w) + 2 * (len(w) - 1))
        return '\n'.join([fmt(cells[0]), rule, *map(fmt, cells[1:]), rule, self._footer()])

    def markdown(self) -> str:
        lines = ['| ' + ' | '.join(self.headers) + ' |', '|---|---|---|---|--:|--:|']
        lines += ['| ' + ' | '.join(c) + ' |' for c in self._cells()]
        return '\n'.join(lines) + '\n\n' + self._footer()

    def __repr__(self) -> str: return self.text()

    def _repr_markdown_(self) -> str: return self.markdown()


def _model_device(model: nn.Module) -> torch.device:
    t = next(model.parameters(), None)
    if t is None: t = next(model.buffers(), None)
    return t.device if t is not None else torch.device('cpu')


def _model_input(learn, batch, input_shape, device: torch.device):
    if batch is not None and input_shape is not None:
        raise ValueError('pass batch or input_shape, not both: batch is a real batch, input_shape makes a random one')
    if input_shape is not None:
        if (not isinstance(input_shape, (tuple, list, torch.Size)) or not input_shape
                or any(not is_int(n) or n < 1 for n in input_shape)):
            raise ValueError(f'input_shape must be a tuple of ints >= 1 including the batch size, e.g. (1, 1, 28, 28); '
                             f'got {input_shape!r}')
        p = next((p for p in learn.model.parameters() if p.is_floating_point()), None)
        dtype = p.dtype if p is not None else torch.float32
        x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0))  # own generator: no global RNG draw
        return x.to(device, dtype)
    if batch is None:
        dl = getattr(learn.dls, 'train', None)
        if dl is None: raise ValueError('learn.dls has no .train to take a batch from: pass batch=... or input_shape=(...)')
        try: batch = next(iter(dl))  # the Snapshot puts the loader's order and position back
        except StopIteration: raise ValueError('dls.train is empty: pass batch=... or input_shape=(...)') from None
    if isinstance(batch, (list, tuple)) and batch: batch = batch[0]  # (x, y, ...): the model sees x
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f'summary feeds the model one tensor; got a {type(batch).__name__}: pass batch=x (a tensor), '
                        f'a list (x, y, ...), or input_shape=(...)')
    return to_device(batch, device)


def _flops_per_module(model: nn.Module, counter: FlopCounterMode) -> dict[int, int]:
    """Each module's FLOPs over the forward (all its calls, its children included), by `id(module)`: torch's counter
    names a module by the root's class name and its path in the model."""
    totals = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__
    return {id(m): totals.get(f'{root}.{n}' if n else root, 0) for n, m in model.named_modules()}


def model_summary(learn, batch=None, input_shape: tuple[int, ...] | None = None) -> ModelSummary:
    """Run one forward of `learn.model` (in eval mode, under no_grad, on the model's device) on the first batch of
    `learn.dls.train`, or on `batch` (x or (x, y, ...)), or on a random tensor of `input_shape` (batch size included),
    and tabulate each layer: each call of a leaf module, of a module with parameters of its own, and of a module whose
    own forward computes (an attention block's matrix products), with the FLOPs torch's `FlopCounterMode` counts.
    Weights, buffers, modes, the optimiser, callbacks, the loader's shuffle state and the RNGs are left as they were;
    no step is taken and no callback runs."""
    model = learn.model
    if not isinstance(model, nn.Module): raise TypeError(f'learn.model must be a torch.nn.Module, got {type(model).__name__}')
    device = _model_device(model)
    saved = Snapshot(learn, weights=False)
    try:
        x = _model_input(learn, batch, input_shape, device)
        bs = x.shape[0] if x.ndim else 1
        names = module_names(model)
        calls = []  # (module, input shape, output shape) in the order the calls end

        def record(hook, m, inp, outp): calls.append((m, _shape(inp), _shape(outp)))

        model.eval()  # BatchNorm uses, not updates, its statistics; dropout off
        with Hooks(list(model.modules()), record), torch.no_grad(), FlopCounterMode(display=False) as counter: model(x)
    finally: saved.restore()  # modes, buffers, the loader's order and position, the RNGs
    flops = _flops_per_module(model, counter)
    n_calls = Counter(id(m) for m, _, _ in calls)
    rows, seen = [], set()
    for m, i, o in calls:
        leaf, own = _is_leaf(m), next(m.parameters(False), None) is not None
        f = flops[id(m)] if leaf else flops[id(m)] - sum(flops[id(c)] for c in m.children())  # a container: its own work
        if not (leaf or own or f > 0): continue  # a container whose work its layers show
        params = 0 if id(m) in seen else sum(p.numel() for p in m.parameters(recurse=leaf))
        seen.add(id(m))
        rows.append(LayerInfo(names[id(m)], type(m).__name__, i, o, params, f / n_calls[id(m)] / bs / 1e6))
    params = list(model.parameters())  # each shared (tied) parameter once
    return ModelSummary(rows, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), bs, device)


Learner.summary = model_summary  # learn.summary(batch=None, input_shape=None)
