"""Progress bars, the epoch table and live loss curves, none of which waits on the device per batch (ProgressCB)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from ..learner import Callback, main_process
from ..utils import check_number
from ..plotting import in_notebook
from .metrics import _metrics_cb, _plot_phase_means, format_row

__all__ = ['ProgressCB']

_clock = time.monotonic


def _tqdm():
    try: from tqdm.auto import tqdm
    except ImportError: raise ImportError('ProgressCB needs tqdm: pip install tqdm (or ultraloop[progress])') from None
    return tqdm


class ProgressCB(Callback):
    """`tqdm.auto` bars over epochs and batches (terminal and notebook) showing the loss, and MetricsCB's rows as a
    table printed as each phase completes (in place of its dicts). The loss shown is a host copy started `refresh`
    seconds earlier (non_blocking): at most one read per `refresh` seconds, none that waits for the device.
    `plot=True` draws the train loss samples and each phase's mean loss: live in a notebook, saved to `path`
    (default `progress.png`) after fit elsewhere. `bars=None` shows bars only in a notebook or when stderr is a
    terminal: redirected to a file, bars would be kilobytes of carriage returns, so each phase prints one line instead
    (the table row, or without MetricsCB the phase's batch count, last loss and time). Under several processes only the
    main one shows and draws."""
    order = -5  # its after_epoch closes the batch bar before MetricsCB's row is printed
    _mbar = _bar = None  # the epochs and batch bars, made at the first phase

    def __init__(self, plot: bool = False, refresh: float = 1.0, path: str | os.PathLike | None = None,
                 bars: bool | None = None):
        check_number('ProgressCB: refresh (seconds between loss reads)', refresh, ge=0)
        if bars not in (None, True, False): raise ValueError(f'ProgressCB: bars must be True, False or None (auto), got {bars!r}')
        self._tqdm, self.plot, self.refresh, self.path, self.bars = _tqdm(), plot, refresh, path, bars
        if plot:
            from ..plotting import _matplotlib
            _matplotlib()  # a missing matplotlib fails here, not after the first epoch
        self.losses: list[tuple[float, float]] = []  # (epoch + fraction done, train loss) as read for the display
        self._handle = None
        self._started = False  # this fit's before_fit ran here: cleanup_fit has something to undo

    @property
    def mbar(self):
        """The epochs bar (a tqdm bar, where the course's fastprogress has a master_bar), from the first phase on:
        subclasses may attach their own state to it. The batch bar of the current phase is `self.pbar`."""
        return self._mbar

    @property
    def pbar(self): return self._bar

    def before_fit(self, learn):
        self.losses, self._header, self._bar, self._host, self._event, self._handle = [], None, None, None, None, None
        self._t0 = None  # the phase's start: none yet
        self.rows: list[dict] = []  # MetricsCB's rows of this fit, as handed to log_metrics
        self._mbar = None  # made at the first phase, so an error in another callback's before_fit prints no bar
        self._show_bars = self.bars if self.bars is not None else in_notebook() or sys.stderr.isatty()
        self._phase_lines = not self._show_bars and _metrics_cb(learn) is None  # else MetricsCB's rows are the lines
        self._started = True
        self._on = main_process(learn)  # the other processes show nothing

    def before_epoch(self, learn):
        if not self._on: return
        n = len(learn.dl) if hasattr(learn.dl, '__len__') else None
        off = not self._show_bars  # the bars still exist (subclasses read mbar.total), drawing nothing
        # smoothing=0: the rate is epochs done over the time elapsed; tqdm's default, a moving average over the
        # intervals between updates, would take the short valid phase before an update for a whole epoch
        if self._mbar is None:
            self._mbar = self._tqdm(total=learn.n_epochs, desc='epochs', unit='epoch', smoothing=0, disable=off)
        if learn.epoch > self._mbar.n: self._mbar.update(learn.epoch - self._mbar.n)
        self._bar = self._tqdm(total=n, desc='train' if learn.training else 'valid', leave=False, unit='batch', disable=off)
        self._t0, self._next, self._n, self._pending = _clock(), 0.0, n, False  # a copy from the last phase is stale

    def after_batch(self, learn):
        if not self._on: return
        self._bar.update()
        if (t := _clock()) >= self._next:
            self._next = t + self.refresh
            self._show_loss(learn)

    def _show_loss(self, learn) -> None:
        """Show the loss copied at the last refresh if that copy is done, then start copying the current one."""
        if self._pending and (self._event is None or self._event.query()):
            v = self._host.item()  # a host tensor whose copy has finished: no wait on the device
            self._bar.set_postfix_str(f'loss {v:.4f}', refresh=False)
            if learn.training: self.losses.append((learn.epoch + (learn.iter + 1) / (self._n or learn.iter + 1), v))
        loss = learn.loss.detach()
        if self._host is None or self._host.dtype != loss.dtype:
            self._host = torch.empty((), dtype=loss.dtype, pin_memory=loss.is_cuda)
        self._host.copy_(loss, non_blocking=True)
        self._pending, self._event = True, None
        if loss.device.type != 'cpu':  # the copy is done when the device passes this mark
            self._event = torch.Event(device=loss.device)
            self._event.record()

    def after_epoch(self, learn):
        if self._show_bars: self._close_bar()  # before MetricsCB's row is printed

    def _close_bar(self) -> None:
        if self._bar is not None: self._bar.close(); self._bar = None

    def log_metrics(self, learn, row: dict) -> None: self.rows.append(row)  # for the loss plot

    def print_metrics(self, learn, row: dict) -> None:
        """One line of the epoch table (a header first), in place of MetricsCB's printed dict: its row and the time."""
        d = {**format_row(row), 'time': _mmss(_clock() - self._t0) if self._t0 is not None else ''}  # none: a row resumed
        widths = [max(len(k), 7) + 2 for k in d]
        if self._header != list(d):
            self._header = list(d)
            self._tqdm.write(''.join(k.ljust(w) for k, w in zip(d, widths)).rstrip())
        self._tqdm.write(''.join(str(v).ljust(w) for v, w in zip(d.values(), widths)).rstrip())

    def cleanup_epoch(self, learn):
        if self._phase_lines and self._bar is not None: self._write_phase_line(learn)  # no bar: no phase began
        self._close_bar()
        if self.plot and self._on and in_notebook(): self._draw(live=True)

    def _write_phase_line(self, learn) -> None:
        """Without bars and without MetricsCB's table: the phase's batches, last loss (one read) and time."""
        n = learn.__dict__.get('iter', -1) + 1  # a drawn-nothing bar counts nothing
        loss = learn.__dict__.get('loss')
        shown = f', loss {loss.item():.4f}' if n and isinstance(loss, torch.Tensor) else ''
        phase = 'train' if learn.training else 'valid'
        self._tqdm.write(f'{phase} epoch {learn.epoch}: {n} batch{"" if n == 1 else "es"}{shown}, '
                         f'{_mmss(_clock() - self._t0)}')

    def after_fit(self, learn):
        if self._mbar is not None and learn.n_epochs > self._mbar.n: self._mbar.update(learn.n_epochs - self._mbar.n)

    def cleanup_fit(self, learn):
        if not self._started: return  # an earlier callback's before_fit failed: let its error through untouched
        self._started = False
        self._close_bar()
        if self._mbar is not None: self._mbar.close()
        if self.plot and self._on and not in_notebook(): self._draw(live=False)

    def _draw(self, live: bool) -> Path | None:
        from ..plotting import show_or_save
        fig = _loss_figure(self.losses, self.rows)
        if not live: return show_or_save(fig, self.path, 'progress.png')
        from IPython.display import display
        if self._handle is None: self._handle = display(fig, display_id=True)
        else: self._handle.update(fig)
        import matplotlib.pyplot as plt
        plt.close(fig)
        return None


def _loss_figure(samples: list[tuple[float, float]], history: list[dict]):
    """The train loss as sampled for the display, and each phase's mean loss at the end of its epoch."""
    from ..plotting import subplots
    fig, ax = subplots(figsize=(6, 3.5))
    if samples: ax.plot(*zip(*samples), alpha=0.5, label='train (samples)')
    _plot_phase_means(ax, history, 'loss')
    ax.set_ylabel('loss')
    if samples or history: ax.legend()
    return fig


def _mmss(s: float) -> str: return f'{int(s) // 60:02d}:{int(s) % 60:02d}'
