"""PyTorch forward hooks combined with callbacks: Hook, Hooks, HooksCallback, and per-layer activation statistics
(ActivationStatsCB, and the course's ActivationStats, append_stats, get_hist, get_min)."""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..data import to_cpu
from ..learner import Callback
from ..plotting import show_or_save, subplots
from ..utils import check_int, is_number, module_names

__all__ = ['Hook', 'Hooks', 'HooksCallback', 'ActivationStatsCB', 'ActivationStats', 'append_stats', 'get_hist',
           'get_min']


class Hook:
    """A forward hook on `module`: after each forward it calls `fn(hook, module, inp, outp)`, and `fn` keeps what it
    likes on the hook (e.g. `hook.stats`). Remove it with `remove()`, or use it as a context manager.
    `name` and `owner` are set by `HooksCallback` (the module's name in the model, the callback that installed it)."""

    def __init__(self, module: nn.Module, fn: Callable):
        if not isinstance(module, nn.Module):
            raise TypeError(f'Hook needs a torch.nn.Module, got {type(module).__name__}: Hook(model[0], fn)')
        if not callable(fn): raise TypeError(f'fn must be callable as fn(hook, module, inp, outp), got {fn!r}')
        self.module, self.fn, self.name, self.owner = module, fn, None, None
        self.handle = module.register_forward_hook(self._forward)

    def _forward(self, module, inp, outp) -> None: self.fn(self, module, inp, outp)

    @property
    def active(self) -> bool: return self.handle.id in self.module._forward_hooks

    def remove(self) -> None: self.handle.remove()  # idempotent

    def __enter__(self) -> Hook: return self

    def __exit__(self, *exc) -> None: self.remove()

    def __repr__(self) -> str:
        return f'Hook({self.name or type(self.module).__name__}, {"active" if self.active else "removed"})'


def _module_list(modules, name: str) -> list[nn.Module]:
    """`modules` as a list, checked before any hook is installed, so a bad entry leaves no hook behind."""
    if not isinstance(modules, Iterable):  # a Sequential or ModuleList iterates over its children; a Linear does not
        raise TypeError(f'{name} must be an iterable of modules, got a {type(modules).__name__}: '
                        f'pass [module], or list(model.children())')
    mods = list(modules)
    for i, m in enumerate(mods):
        if not isinstance(m, nn.Module): raise TypeError(f'{name}[{i}] is a {type(m).__name__}, not a torch.nn.Module')
    return mods


class Hooks(list):
    """One `Hook(m, fn)` per module in `modules` (a list, or a Sequential's children: `Hooks(model, fn)`);
    a context manager that removes them all on exit."""

    def __init__(self, modules: Iterable[nn.Module], fn: Callable):
        mods = _module_list(modules, 'modules')
        if not callable(fn): raise TypeError(f'fn must be callable as fn(hook, module, inp, outp), got {fn!r}')
        super().__init__(Hook(m, fn) for m in mods)

    def __enter__(self) -> Hooks: return self

    def __exit__(self, *exc) -> None: self.remove()

    def remove(self) -> None:
        for h in self: h.remove()


def _is_leaf(m: nn.Module) -> bool: return next(m.children(), None) is None


def _check_mod_filter(mod_filter) -> None:
    if mod_filter is None or callable(mod_filter): return
    if isinstance(mod_filter, tuple) and mod_filter and all(isinstance(t, type) for t in mod_filter): return
    raise TypeError(f'mod_filter must be None (every leaf module), a module class or tuple of classes (nn.Conv2d), '
                    f'or a function module -> bool; got {mod_filter!r}')


class HooksCallback(Callback):
    """Installs `Hook(m, hookfunc)` on modules of `learn.model` at fit start and removes them when fit ends, also
    when it is cancelled or fails. `hookfunc(hook, module, inp, outp)` runs in the phases asked for (training by
    default). Modules: `mods`, else those `mod_filter` picks (a class, tuple of classes, or function module -> bool;
    default: every leaf module; a filter that matches no module hooks nothing, with a warning). The hooks of the last
    fit stay readable in `self.hooks`, and the callback iterates over them: `for h in hc`, `len(hc)`."""

    def __init__(self, hookfunc: Callable, mod_filter=None, on_train: bool = True, on_valid: bool = False,
                 mods: Iterable[nn.Module] | None = None):
        if not callable(hookfunc): raise TypeError(f'hookfunc must be callable as f(hook, module, inp, outp), got {hookfunc!r}')
        _check_mod_filter(mod_filter)
        if mods is not None and mod_filter is not None:
            raise ValueError('pass mods or mod_filter, not both: mods lists the modules to hook, mod_filter picks them')
        if not (on_train or on_valid): raise ValueError('on_train and on_valid are both False, so the hooks would never run')
        self.hookfunc, self.mod_filter, self.on_train, self.on_valid = hookfunc, mod_filter, on_train, on_valid
        self.mods = None if mods is None else _module_list(mods, 'mods')
        if self.mods == []: raise ValueError('mods is empty, so nothing would be hooked: pass modules, or mods=None')
        self.hooks = Hooks([], hookfunc)
        self._learn = None

    def _picked(self, model: nn.Module) -> list[nn.Module]:
        if self.mods is not None:
            ids = {id(m) for m in model.modules()}
            for i, m in enumerate(self.mods):
                if id(m) not in ids:
                    raise ValueError(f'mods[{i}] ({type(m).__name__}) is not a module of learn.model, so its hook would never '
                                     f'run: pass modules of the model being fit')
            return self.mods
        f = self.mod_filter
        if f is None: f = _is_leaf
        elif isinstance(f, (type, tuple)): f = (lambda m, t=f: isinstance(m, t))
        mods = [m for m in model.modules() if f(m)]
        # the course reuses one callback list across models, some without the filtered layer type: not an error
        if not mods: warnings.warn(f'{self.name}: mod_filter {self.mod_filter!r} matched no module of learn.model, so '
                                   f'nothing is hooked this fit', stacklevel=2)
        return mods

    def before_fit(self, learn) -> None:
        mods = self._picked(learn.model)
        self._learn = learn
        # the phase check costs one attribute read per call; skipped when both phases are wanted
        fn = self.hookfunc if (self.on_train and self.on_valid) else self._gated
        self.hooks = Hooks(mods, fn)
        names = module_names(learn.model)
        for h in self.hooks: h.name, h.owner = names[id(h.module)], self

    def _gated(self, hook, module, inp, outp) -> None:
        if self.on_train if self._learn.training else self.on_valid: self.hookfunc(hook, module, inp, outp)

    def cleanup_fit(self, learn) -> None:
        self.hooks.remove()
        self._learn = None

    def __iter__(self): return iter(self.hooks)

    def __len__(self) -> int: return len(self.hooks)

    def __bool__(self) -> bool: return True  # a callback is always "there", even when it hooked nothing (len 0)


class ActivationStatsCB(HooksCallback):
    """Per-layer statistics of the activations, one row per batch: `hook.means`, `hook.stds` and `hook.hists`
    (histogram of |activation|, `bins` bins over `hist_range`, 40 over 0..10 as in the course), on the CPU.
    They accumulate on the activations' device and are read once per epoch (no sync per batch). On CUDA the
    histogram (`torch.histc`) adds atomically, so `torch.use_deterministic_algorithms(True)` needs `warn_only=True`.
    Figures: `color_dim()`, `dead_chart()`, `plot_stats()`; inline in a notebook, else saved, returning the PNG's path."""

    def __init__(self, mod_filter=None, on_train: bool = True, on_valid: bool = False,
                 mods: Iterable[nn.Module] | None = None, bins: int = 40, hist_range: tuple[float, float] = (0., 10.)):
        check_int('bins', bins, 1)
        if not (isinstance(hist_range, (tuple, list)) and len(hist_range) == 2 and all(map(is_number, hist_range))
                and hist_range[0] < hist_range[1]):
            raise ValueError(f'hist_range must be (low, high) with low < high, got {hist_range!r}')
        self.bins, self.hist_range = bins, (float(hist_range[0]), float(hist_range[1]))
        super().__init__(self._append, mod_filter, on_train, on_valid, mods)

    def before_fit(self, learn) -> None:
        super().before_fit(learn)
        for h in self.hooks:
            h.pending = []  # (mean, std, hist) device tensors of this epoch's batches
            h.means, h.stds, h.hists = torch.zeros(0), torch.zeros(0), torch.zeros(0, self.bins)
            h.stats = (h.means, h.stds, h.hists)

    def _append(self, hook, module, inp, outp) -> None:
        if not isinstance(outp, torch.Tensor): return  # e.g. an LSTM's (output, state): not an activation map
        a = outp.detach().float()  # histc needs float; a no-op for float32
        std, mean = torch.std_mean(a)
        hook.pending.append((mean, std, a.abs().histc(self.bins, *self.hist_range)))

    def cleanup_epoch(self, learn) -> None:
        for h in self.hooks:
            if not h.pending: continue
            means, stds, hists = (torch.stack(t).cpu() for t in zip(*h.pending))  # the epoch's one sync
            h.pending = []
            h.means, h.stds, h.hists = torch.cat([h.means, means]), torch.cat([h.stds, stds]), torch.cat([h.hists, hists])
            h.stats = (h.means, h.stds, h.hists)

    def dead_fraction(self, hook: Hook) -> torch.Tensor:
        """Per batch, the fraction of the histogram's activations in the first bin (|a| < 0.25 by default: near zero)."""
        return get_min(hook)

    def _hooks_with_stats(self) -> list[Hook]:
        hooks = [h for h in self.hooks if len(getattr(h, 'means', ()))]
        if not hooks: raise ValueError('no activation statistics yet: fit with this callback in cbs first')
        return hooks

    def color_dim(self, figsize=(11, 5), path: str | os.PathLike | None = None) -> Path | None:
        """Per layer, the histogram of |activation| over batches (log scale): x batch, y magnitude."""
        def draw(ax, h): ax.imshow(get_hist(h).numpy(), origin='lower', aspect='auto',
                                   extent=(0, len(h.hists), *self.hist_range))
        return show_or_save(_per_layer_figure(self._hooks_with_stats(), figsize, draw), path, 'color_dim.png')

    def dead_chart(self, figsize=(11, 5), path: str | os.PathLike | None = None) -> Path | None:
        """Per layer, the fraction of near-zero activations (`dead_fraction`) over batches."""
        def draw(ax, h): ax.plot(self.dead_fraction(h).numpy()); ax.set_ylim(0, 1)
        return show_or_save(_per_layer_figure(self._hooks_with_stats(), figsize, draw), path, 'dead_chart.png')

    def plot_stats(self, figsize=(10, 4), path: str | os.PathLike | None = None) -> Path | None:
        """Each layer's activation mean and standard deviation over batches."""
        hooks = self._hooks_with_stats()
        fig, axes = subplots(1, 2, figsize=figsize)
        for h in hooks:
            axes[0].plot(h.means.numpy(), label=h.name)
            axes[1].plot(h.stds.numpy(), label=h.name)
        axes[0].set_title('Means')
        axes[1].set_title('Stdevs')
        axes[1].legend(fontsize=8)
        return show_or_save(fig, path, 'activation_stats.png')


def noop(x=None, *args, **kwargs):
    """Returns its first argument (fastcore's `noop`): as a module filter it picks every module."""
    return x


class ActivationStats(ActivationStatsCB):
    """The course's name and signature for ActivationStatsCB: `ActivationStats(mod_filter)`, where the default, like
    the course's `fc.noop`, returns each module itself and so picks every module (the model included), and a filter
    such as `fc.risinstance(nn.ReLU)` picks those it is true for. Iterate it for the hooks (`for h in astats`), each with
    `h.stats` = (means, stds, histograms) over the training batches; `get_hist(h)`, `get_min(h)` read them."""

    def __init__(self, mod_filter: Callable = noop):
        super().__init__(mod_filter)


def _stacked(x) -> torch.Tensor:
    """Per-batch values as one tensor: ActivationStatsCB keeps a tensor already, append_stats a list of them."""
    return x if isinstance(x, torch.Tensor) else torch.stack(list(x))


def append_stats(hook, mod, inp, outp) -> None:
    """The course's hook function: appends the mean, standard deviation and 40-bin histogram of |activation| over
    0..10 of each forward's output to `hook.stats` = ([means], [stds], [histograms]), on the CPU. Each call copies the
    activations to the host (a sync on an accelerator); `ActivationStatsCB` gathers the same without one per batch."""
    if not isinstance(outp, torch.Tensor): return  # e.g. an LSTM's (output, state): not an activation map
    if not hasattr(hook, 'stats'): hook.stats = ([], [], [])
    a = to_cpu(outp).float()
    hook.stats[0].append(a.mean())
    hook.stats[1].append(a.std())
    hook.stats[2].append(a.abs().histc(40, 0, 10))


def get_hist(h) -> torch.Tensor:
    """A hook's histograms as an image: bins x batches, log(1 + count), from `append_stats` or `ActivationStatsCB`."""
    return _stacked(h.stats[2]).t().float().log1p()


def get_min(h) -> torch.Tensor:
    """Per batch, the fraction of a hook's activations in the histogram's first bin (near zero): the "dead" share."""
    hist = _stacked(h.stats[2]).t().float()
    return hist[0] / hist.sum(0).clamp_min(1)  # a batch with nothing in range counts as 0, not 0/0


def _per_layer_figure(hooks: list[Hook], figsize, draw: Callable):
    """A grid with one panel per hooked layer, titled with its name and type; `draw(ax, hook)` fills each."""
    n = len(hooks)
    rows = max(1, int(math.sqrt(n)))
    fig, axes = subplots(rows, math.ceil(n / rows), figsize=figsize, squeeze=False)
    for ax in axes.flat[n:]: ax.set_axis_off()
    for ax, h in zip(axes.flat, hooks):
        draw(ax, h)
        ax.set_title(f'{h.name} ({type(h.module).__name__})', fontsize=9)
    return fig
