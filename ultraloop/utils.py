"""Small helpers every layer may use: argument checks with one-line errors, walking nested tensors, module names."""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ['is_int', 'is_number', 'check_int', 'check_number', 'map_tensors', 'module_names', 'several_processes',
           'inner_optimizer']


def is_int(v) -> bool:
    """True for an int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """True for an int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(what: str, v, lo: int | None = None) -> int:
    """`v` if it is an int (>= `lo`), else a ValueError naming `what`: "what must be an int >= lo, got v"."""
    if not is_int(v) or (lo is not None and v < lo):
        raise ValueError(f'{what} must be an int{f" >= {lo}" if lo is not None else ""}, got {v!r}')
    return v


def check_number(what: str, v, gt: float | None = None, ge: float | None = None, lt: float | None = None,
                 finite: bool = False, hint: str = '') -> float:
    """`v` if it is a number within the bounds (NaN never is; inf not with `finite`), else a ValueError naming `what`
    and the range: "what must be a number > 0, got v", or "... in [0, 1)" for two bounds; `hint` follows the range."""
    ok = is_number(v) and not math.isnan(v) and not (finite and math.isinf(v))
    ok = ok and (gt is None or v > gt) and (ge is None or v >= ge) and (lt is None or v < lt)
    if not ok:
        lo = f'({gt:g}' if gt is not None else f'[{ge:g}' if ge is not None else None
        if lo is not None and lt is not None: rng = f' in {lo}, {lt:g})'
        elif lo is not None: rng = f' > {gt:g}' if gt is not None else f' >= {ge:g}'
        elif lt is not None: rng = f' < {lt:g}'
        else: rng = ''
        kind = 'a finite number' if finite else 'a number'
        raise ValueError(f'{what} must be {kind}{rng}{hint}, got {v!r}')
    return v


def map_tensors(f: Callable[[torch.Tensor], Any], x, other: Callable[[Any], Any] | None = None):
    """`f` applied to every tensor in `x` (a tensor, or lists, tuples and dicts of them); other values pass through,
    or through `other` when given. An OrderedDict stays one, with its `_metadata` (a state dict's module versions)."""
    if isinstance(x, torch.Tensor): return f(x)
    if isinstance(x, OrderedDict):
        out = OrderedDict((k, map_tensors(f, v, other)) for k, v in x.items())
        if hasattr(x, '_metadata'): out._metadata = copy.deepcopy(x._metadata)
        return out
    if isinstance(x, Mapping): return {k: map_tensors(f, v, other) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        items = [map_tensors(f, o, other) for o in x]
        return type(x)(*items) if hasattr(x, '_fields') else type(x)(items)  # a namedtuple takes its fields one by one
    return x if other is None else other(x)


def module_names(model: nn.Module) -> dict[int, str]:
    """Each module's name in `model` by `id(module)` ('model' for the root), as the model's state dict names them."""
    return {id(m): n or 'model' for n, m in model.named_modules()}


def several_processes() -> bool:
    """True inside a torch.distributed process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def inner_optimizer(opt):
    """The torch optimiser inside wrappers (accelerate's AcceleratedOptimizer holds it as `.optimizer`), else `opt`."""
    while isinstance(getattr(opt, 'optimizer', None), torch.optim.Optimizer): opt = opt.optimizer
    return opt
