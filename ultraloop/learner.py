"""The training loop: one `Learner` whose fit -> epoch -> batch you can read top to bottom; everything else is a callback."""
from __future__ import annotations

import difflib
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn, optim
from torch.nn import functional as F

from . import state
from .utils import check_int, check_number, module_names

__all__ = ['EVENTS', 'STEP_METHODS', 'CancelFitException', 'CancelEpochException', 'CancelBatchException',
           'CancelStepException', 'Preempted', 'EXIT_RESUMABLE', 'Callback', 'Learner', 'TrainLearner', 'MomentumLearner']

# Every event, in the order a fit meets it, with what is true when it fires. The single list the loop,
# the typo check, TraceCB and show_training_loop() read.
EVENTS: dict[str, str] = {
    'before_fit': 'fit starts: learn.opt exists, learn.n_epochs is set, no batch has run',
    'before_epoch': 'a train or valid phase starts: learn.epoch, learn.dl and learn.training are set',
    'before_batch': 'learn.batch holds the next batch (learn.iter its index): move or transform it here',
    'after_predict': 'learn.preds is set',
    'after_loss': 'learn.loss is set; in training, what learn.loss holds now is what backward differentiates',
    'after_backward': 'gradients are in .grad; learn.loss is again the value get_loss set (train only)',
    'after_step': 'the optimiser has stepped (train only)',
    'after_batch': 'the batch is done: in training zero_grad has run',
    'cleanup_batch': 'always, after the batch ends, is cancelled or fails',
    'after_epoch': 'the phase is done (not reached when it was cancelled or failed)',
    'cleanup_epoch': 'always, after the phase ends, is cancelled or fails',
    'after_fit': 'every epoch is done (not reached when fit was cancelled or failed)',
    'cleanup_fit': 'always, last: after fit ends, is cancelled or fails',
}
# The step methods: each comes from exactly one provider, a callback that defines it or else the Learner itself.
STEP_METHODS = ('predict', 'get_loss', 'backward', 'step', 'zero_grad')
# What a callback may provide in the Learner's place: the step methods, and the whole train step (CudaGraphCB).
_PROVIDED = (*STEP_METHODS, 'train_step')
_EVENT_PREFIXES = ('before_', 'after_', 'cleanup_')


class CancelFitException(Exception):
    """Raise in a callback to end `fit` early: `after_fit` is skipped, `cleanup_fit` runs, `fit` returns normally."""


class CancelEpochException(Exception):
    """Raise in a callback to end the current train or valid phase: `after_epoch` is skipped, `cleanup_epoch` runs."""


class CancelBatchException(Exception):
    """Raise in a callback to skip the rest of the current batch and its `after_batch`; `cleanup_batch` runs."""


class CancelStepException(Exception):
    """Raise in `after_backward` to skip this batch's `step()`, `after_step` and `zero_grad()`: the gradients stay,
    so the next backward adds to them (gradient accumulation). `after_batch` still runs, so metrics see the batch."""


# The exit status of a run stopped by SIGTERM or SIGUSR1 at a checkpoint: sysexits.h's EX_TEMPFAIL ("a temporary
# failure: try again later"), which a requeue script, SLURM's RequeueExit or a Kubernetes podFailurePolicy can single out
# from a failure (1) and from a process killed by the signal itself (143 = 128 + 15), which kept no checkpoint.
EXIT_RESUMABLE = 75


class Preempted(SystemExit):
    """`fit` was stopped by SIGTERM or SIGUSR1 (a scheduler ending or preempting the job: SLURM, Kubernetes, a spot
    machine, `docker stop`): the batch it came in ended, CheckpointCB wrote a checkpoint there, and this is raised on
    every process. A SystemExit, so `except Exception` does not swallow the request to stop, and an uncaught one ends
    the script with `code` EXIT_RESUMABLE (75) after fit printed `str(e)`. `signal`: the signal (`signal.Signals`);
    `checkpoint`: the checkpoint to go on from (a Path), or None without CheckpointCB."""

    def __init__(self, sig, checkpoint, message: str):
        super().__init__(EXIT_RESUMABLE)
        self.signal, self.checkpoint, self.message = sig, checkpoint, message

    def __str__(self) -> str: return self.message

    def __reduce__(self): return type(self), (self.signal, self.checkpoint, self.message)  # pickles (to another process)


class Callback:
    """Base class for callbacks. A hook is a method named after an event (see `EVENTS`) taking the learner;
    a step method (`predict`, `get_loss`, `backward`, `step`, `zero_grad`) replaces the Learner's own.
    Callbacks run sorted by `order`, ties in the order they were added. `added(learn)` and `removed(learn)`, where a
    callback defines them, run when `add_cbs`/`rm_cbs` (and so `Learner(cbs=...)` and `fit(cbs=...)`) add or remove it:
    a callback that makes itself an attribute of the learner (MetricsCB's `learn.metrics`) does so in `added`."""
    order = 0

    @property
    def name(self) -> str: return type(self).__name__

    def __repr__(self) -> str: return f'{self.name}()'


def _order(cb) -> float: return getattr(cb, 'order', 0)


def _check_callback(cb) -> None:
    """Refuse a class passed for an instance, an object with no hook at all (None, a name), and any method that looks
    like an event but is not one (a typo)."""
    if isinstance(cb, type):
        raise TypeError(f'got the class {cb.__name__} as a callback; pass an instance: {cb.__name__}()')
    if not isinstance(cb, Callback) and not any(callable(getattr(cb, nm, None)) for nm in (*EVENTS, *_PROVIDED)):
        raise TypeError(f'got {cb!r} ({type(cb).__name__}) as a callback, but it has no event or step method, so it '
                        f'would do nothing: pass a callback instance such as TrainCB()')
    for nm in dir(cb):
        if nm.startswith(_EVENT_PREFIXES) and nm not in EVENTS and callable(getattr(cb, nm, None)):
            close = difflib.get_close_matches(nm, EVENTS, n=1, cutoff=0.5)
            hint = f'did you mean {close[0]!r}?' if close else f'events are: {", ".join(EVENTS)}.'
            raise ValueError(f'{type(cb).__name__}.{nm} is not an event, so it would never run: {hint} '
                             f'(name helper methods without a before_/after_/cleanup_ prefix)')


def _check_loss_func(f) -> None:
    if isinstance(f, type) and issubclass(f, nn.Module):
        raise TypeError(f'loss_func is the class {f.__name__}; pass an instance, loss_func={f.__name__}()')
    if isinstance(f, str):
        hint = f'F.{f}' if callable(getattr(F, f, None)) else 'F.cross_entropy'
        raise TypeError(f'loss_func is the string {f!r}; pass the function itself, e.g. loss_func={hint}')
    if not callable(f):
        raise TypeError(f'loss_func must be a function of (preds, targets) returning a scalar tensor, got '
                        f'{type(f).__name__} {f!r}: pass e.g. loss_func=F.cross_entropy')


def _check_opt_func(f) -> None:
    if f is None: return
    if isinstance(f, optim.Optimizer):
        raise TypeError(f'opt_func is an optimiser instance ({type(f).__name__}); pass what builds one from (params, lr), '
                        f'opt_func=torch.optim.{type(f).__name__}, or keep yours with opt_func=None and learn.opt = it')
    if isinstance(f, str):
        match = next((nm for nm in dir(optim) if nm.lower() == f.lower() and isinstance(getattr(optim, nm), type)), 'SGD')
        raise TypeError(f'opt_func is the string {f!r}; pass the optimiser class, e.g. opt_func=torch.optim.{match}')
    if not callable(f):
        raise TypeError(f'opt_func must build an optimiser from (params, lr), got {type(f).__name__} {f!r}: pass e.g. '
                        f'torch.optim.SGD or functools.partial(torch.optim.AdamW, weight_decay=0.01)')


def _as_cbs(cbs) -> list:
    if cbs is None: return []
    if isinstance(cbs, (Callback, type, str, bytes, Mapping)) or not isinstance(cbs, Iterable): return [cbs]
    return list(cbs)


class Learner:
    """Fits `model` on `dls` with callbacks.

    Attributes callbacks may read (r) or write (w):
      model (rw), dls (r), loss_func (r), lr (r), opt (rw: created at fit start from opt_func), opt_func (r),
      cbs (r: change it with add_cb / rm_cb), n_epochs, epochs (r), epoch (r), training (r: model.training),
      dl (rw: the phase's loader), iter (r: batch index in the phase), batch (rw), preds (rw), loss (rw),
      interrupted (r: a signal stops the fit at this batch: set at the batch's end, before cleanup_batch, after which
      the loop stops), stop_signal (r: the signal (ctrl-C's SIGINT, SIGTERM, SIGUSR1) that asked this fit to stop, else
      None), stop_requested (rw: the loop stops at the end of the batch in which it is True; fit's signal handler sets
      it, unless hold_signals (rw) is True: then DistributedCB sets it, at a batch every process agrees on),
      last_checkpoint (rw: the newest checkpoint file written in this fit; CheckpointCB sets it, a stop names it),
      sync_grads (rw: whether this batch's backward must reduce gradients across processes; GradientAccumulationCB sets
      it False before non-final micro-batches, DistributedCB reads it before the forward),
      rank, world_size, is_main (r: from the process group, else torchrun's RANK and WORLD_SIZE, else 0, 1, True),
      metrics (r: the MetricsCB last added, from the moment it is added; set by the callback's `added`).
    `dls` is anything with `.train` and `.valid`; a `.valid` of None (`DataLoaders(train)`) means no valid phase.
    The step methods `predict`, `get_loss`, `backward`, `step`, `zero_grad` come from a subclass (TrainLearner)
    or from exactly one callback (TrainCB); callbacks may call them, e.g. `learn.step()`. `train_step()` runs them with
    the events between (a callback may provide its own `train_step`, as CudaGraphCB does).
    Conveniences (`lr_find`, `fit_one_cycle`, `plot_metrics`, `capture_preds`, `summary`) are attached by the modules
    that define them (ARCHITECTURE.md says which); `import ultraloop` attaches them all.
    """

    interrupted = stop_requested = hold_signals = False
    stop_signal = last_checkpoint = None
    _stale_grads = False  # a fit ended with an error: the .grad it left must not leak into the next fit
    _resume = None  # a state.Resume while fit(resume=...) picks a run up
    _no_valid_dl = False  # this fit asked for valid phases but dls.valid is None (DataLoaders(train)), so it runs none
    sync_grads = True  # see above; a class default, so a fit without accumulation or processes never sets it

    def __init__(self, model: nn.Module, dls=(0,), loss_func: Callable = F.mse_loss, lr: float = 0.1,
                 cbs=None, opt_func: Callable | None = optim.SGD):
        _check_loss_func(loss_func); check_number('lr', lr, ge=0, finite=True); _check_opt_func(opt_func)
        self.model, self.dls, self.loss_func, self.lr, self.opt_func = model, dls, loss_func, lr, opt_func
        self.opt = None
        self._opt_params: list[int] = []
        self.cbs: list = []
        self.add_cbs(cbs)

    # ---- callbacks -------------------------------------------------------------------------------------
    def add_cbs(self, cbs) -> Learner:
        cbs = _as_cbs(cbs)
        for cb in cbs: _check_callback(cb)
        for i, cb in enumerate(cbs):
            if any(cb is o for o in [*self.cbs, *cbs[:i]]):
                raise ValueError(f'{cb!r} is already in learn.cbs; pass a new instance to run it twice')
        self.cbs.extend(cbs)
        self._update_cbs()
        for cb in cbs:  # a callback that attaches itself to the learner (learn.metrics) does it now, not at fit start
            if callable(added := getattr(cb, 'added', None)): added(self)
        return self

    def add_cb(self, cb) -> Learner: return self.add_cbs([cb])

    def rm_cbs(self, cbs) -> Learner:
        cbs = _as_cbs(cbs)
        for cb in cbs:  # check them all first: a failed call leaves learn.cbs and its table as they were
            if not any(cb is o for o in self.cbs): raise ValueError(f'{cb!r} is not in learn.cbs, so it cannot be removed')
        self.cbs[:] = [o for o in self.cbs if not any(o is cb for cb in cbs)]
        self._update_cbs()
        for cb in cbs:
            if callable(removed := getattr(cb, 'removed', None)): removed(self)
        return self

    def rm_cb(self, cb) -> Learner: return self.rm_cbs([cb])

    def _update_cbs(self) -> None:
        """Rebuild the sorted table of who handles which event, and bind the callback-provided step methods.
        Runs when the callback list changes and at fit start; never per event."""
        ordered = sorted(self.cbs, key=_order)  # stable: ties keep the order they were added in
        self._handlers = {ev: tuple(m for cb in ordered if (m := getattr(cb, ev, None)) is not None) for ev in EVENTS}
        self._step_conflicts = {}
        for nm in _PROVIDED:
            self.__dict__.pop(nm, None)
            providers = [cb for cb in ordered if callable(getattr(cb, nm, None))]
            if len(providers) > 1: self._step_conflicts[nm] = providers
            elif providers: setattr(self, nm, _BoundStep(getattr(providers[0], nm), self))

    def callback(self, event: str) -> None:
        """Run every callback's handler for `event`, in order."""
        try: handlers = self._handlers[event]
        except KeyError:
            hint = f'call learn.{event}() instead' if event in STEP_METHODS else f'events are: {", ".join(EVENTS)}'
            raise ValueError(f'{event!r} is not an event; {hint}') from None
        for f in handlers: f(self)

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: turns a missing step method into an error that says what to do
        if name in STEP_METHODS: raise self._no_step(name)
        raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')

    # ---- processes: read from torch.distributed each time, so they hold however and whenever the group was made --
    @property
    def rank(self) -> int:
        """This process's rank: in the default process group, else as torchrun's environment gives it (between fits
        under torchrun), else 0."""
        return dist.get_rank() if _distributed() else _launch_env()[0]

    @property
    def world_size(self) -> int:
        """The number of processes: the default process group's size, else torchrun's WORLD_SIZE, else 1."""
        return dist.get_world_size() if _distributed() else _launch_env()[1]

    @property
    def is_main(self) -> bool:
        """True for the one process that prints, draws, logs and writes files: rank 0 (True in a single process)."""
        return self.rank == 0

    # ---- the loop ----------------------------------------------------------------------------------------
    @property
    def training(self) -> bool: return self.model.training

    def fit(self, n_epochs: int = 1, train: bool = True, valid: bool = True, cbs=None, lr: float | None = None,
            resume=None) -> None:
        """Train for `n_epochs` (each a train then a valid phase). `cbs` are added for this call only;
        `lr` (default `self.lr`) is the learning rate every parameter group starts this fit with.
        `resume`: a checkpoint file, a folder (its newest checkpoint) or a `state_dict()`: the fit goes on from the very
        batch after the one the state was captured at, as if the run had never stopped; a state saved with other
        settings (model, optimiser, batch size, lr, schedule, ...) is refused before anything changes. `resume='auto'`:
        the folder of the learner's CheckpointCB: its newest checkpoint, or a fresh start when it holds none (so one
        script, relaunched by SLURM's --requeue or torchrun --max-restarts, starts or goes on). A run resumed after its
        last epoch trains no more: fit says so, and MetricsCB prints the run's table.
        Signals: a ctrl-C (SIGINT), SIGTERM or SIGUSR1 waits for the current batch to end, CheckpointCB writes a
        checkpoint there, then fit raises KeyboardInterrupt (ctrl-C) or `Preempted` (SIGTERM, SIGUSR1: a SystemExit with
        code 75, EXIT_RESUMABLE, after printing one line naming the checkpoint). A second signal acts at once, as it
        would without fit (ctrl-C: KeyboardInterrupt; SIGTERM: the process ends). Under several processes every process
        stops at the same batch (DistributedCB agrees on it). The handlers are installed in the main thread, for the fit
        only, over Python's defaults (a handler of your own stays in charge), and the previous ones come back after."""
        self._check_fit_args(n_epochs, train, valid, lr)
        self._no_valid_dl = valid and getattr(self.dls, 'valid', 0) is None  # DataLoaders(train): no valid phase
        valid = valid and not self._no_valid_dl
        cbs = _as_cbs(cbs)
        self.add_cbs(cbs)  # rebuilds the table even for no cbs: a callback's order may have changed since it was added
        try:
            self._check_steps(train)
            fit_lr = self.lr if lr is None else lr  # a resumed run must keep it (the state records it)
            self._resume = None if resume is None else state.resume(self, resume, n_epochs, fit_lr)  # read and checked first
            self.n_epochs, self.epochs, self._fit_lr = n_epochs, range(n_epochs), fit_lr
            self._fit_phases, self._last_phase, self._in_phase, self.interrupted = (train, valid), None, False, False
            self.last_checkpoint = None
            self._loaded_position = None
            self._prepare_opt(fit_lr)
            if self._stale_grads: self._clear_grads()
            try:
                with _StopOnSignal(self):
                    self._with_events(self._do_fit, 'before_fit', 'after_fit', 'cleanup_fit', CancelFitException, train,
                                      valid)
                    if self.stop_requested: self.interrupted = True; raise self._stopped()  # it came after the last batch
            except BaseException:
                # an error (not a ctrl-C deferred to a batch's end) may leave a half-made step's .grad: it stays for
                # inspection, and the next fit starts without it (a successful fit keeps it, as MomentumLearner needs)
                if not self.interrupted: self._stale_grads = True
                raise
        finally:
            self._resume = None
            if cbs: self.rm_cbs(cbs)

    def _do_fit(self, train: bool, valid: bool) -> None:
        epoch, phase = 0, 'train'
        if self._resume is not None:
            epoch, phase = self._resume.start(self)  # after before_fit made what it makes
            if self._resume.finished and self.is_main:
                print(f'{self._resume.what}: the run is finished (its {self.n_epochs} epochs are done): nothing left to train')
        for self.epoch in self.epochs[epoch:]:
            if train and phase == 'train': self.one_epoch(True)
            phase = 'train'
            if valid:
                with torch.no_grad(): self.one_epoch(False)

    def one_epoch(self, training: bool) -> None:
        self.model.train(training)
        self.dl = self._phase_dl = self.dls.train if training else self.dls.valid
        self._with_events(self._do_epoch, 'before_epoch', 'after_epoch', 'cleanup_epoch', CancelEpochException)

    def _do_epoch(self) -> None:
        start, batches = self._enter_phase()
        self._in_phase, self.iter = True, start - 1
        for self.iter, self.batch in enumerate(batches, start):
            if self.iter == start: self._check_batch()
            self._one_batch()
        if self.iter < 0: raise self._no_batches(self.training, self.dl)  # (a resumed phase starts past batch 0)
        self._in_phase, self._last_phase = False, (self.epoch, self.training)

    def _enter_phase(self) -> tuple[int, Any]:
        """The batch this phase starts at and what to iterate: 0 and learn.dl, or where a resumed run stopped. Records
        the RNG states a DataLoader draws this epoch's order from, which a checkpoint inside the phase needs."""
        if self._resume is not None: return self._resume.enter_phase(self, self._phase_dl, self.dl)
        self._phase_rng = state.phase_start(self._phase_dl)
        return 0, self.dl

    # The per-batch methods run each event's handlers with an inline loop over self._handlers[event]: a call of
    # self.callback per event costs about 1 % of a small CPU step (bench/overhead.py's core case), measurable there.
    def _one_batch(self) -> None:
        h = self._handlers
        try:
            try:
                for f in h['before_batch']: f(self)
                if self.training: self.train_step()
                else:
                    self.predict()
                    for f in h['after_predict']: f(self)
                    self.get_loss()
                    for f in h['after_loss']: f(self)
                for f in h['after_batch']: f(self)
            except CancelBatchException: pass
            self.interrupted = self.stop_requested  # read once, at the batch's end: CheckpointCB's save and the raise agree
        finally:
            for f in h['cleanup_batch']: f(self)
        if self.interrupted: raise self._stopped()

    def _stopped(self) -> BaseException:
        """What a fit stopped by a signal raises: KeyboardInterrupt for a ctrl-C, else Preempted, whose one line the
        main process prints (an uncaught SystemExit prints nothing)."""
        sig = self.stop_signal
        if sig is None or sig == signal.SIGINT: return KeyboardInterrupt()
        ck = self.last_checkpoint
        phase = 'train' if self.training else 'valid'
        where = f'after epoch {self.epoch} {phase} batch {self.iter}' if self._in_phase else 'at the end of the fit'
        msg = f'fit stopped by {sig.name} {where}; ' + (f'checkpoint: {ck}' if ck is not None else
                                                           'no checkpoint written (CheckpointCB would write one here)')
        if self.is_main: print(f'ultraloop: {msg}', file=sys.stderr, flush=True)
        return Preempted(sig, ck, msg)

    def train_step(self) -> None:
        """The train step, from predict to zero_grad, with the events between. The one place it is written: a callback
        may replace it by providing `train_step(learn)` (CudaGraphCB replays it as a CUDA graph)."""
        h = self._handlers
        self.predict()
        for f in h['after_predict']: f(self)
        self.get_loss()
        if self.iter == 0: self._check_loss()
        loss = self.loss
        for f in h['after_loss']: f(self)
        self.backward()
        self.loss = loss  # what after_loss scaled was for backward only; metrics see get_loss's value
        self.apply_step()

    def apply_step(self) -> bool:
        """The step's tail: after_backward, step, after_step, zero_grad. A CancelStepException skips the rest, keeping
        the gradients; returns whether the step ran. GradientAccumulationCB calls it to close a window at an epoch's end."""
        h = self._handlers
        try:
            for f in h['after_backward']: f(self)
            self.step()
            for f in h['after_step']: f(self)
            self.zero_grad()
            return True
        except CancelStepException: return False

    def _with_events(self, f, before: str, after: str, cleanup: str, cancel: type[Exception], *args) -> None:
        try:
            self.callback(before)
            f(*args)
            self.callback(after)
        except cancel: pass
        finally: self.callback(cleanup)

    # ---- checks made before any batch runs ------------------------------------------------------------------
    def _check_fit_args(self, n_epochs, train, valid, lr) -> None:
        check_int('n_epochs', n_epochs, 0)
        check_number('lr', self.lr if lr is None else lr, ge=0, finite=True)  # learn.lr may have been set since
        if not isinstance(self.model, nn.Module):
            raise TypeError(f'model must be a torch.nn.Module, got {type(self.model).__name__}')
        for phase, wanted in (('train', train), ('valid', valid)):
            if wanted and not hasattr(self.dls, phase):
                raise TypeError(f'dls has no .{phase} ({type(self.dls).__name__} given): wrap your loaders as '
                                f'DataLoaders(train_dl, valid_dl), or pass {phase}=False to fit')
            if wanted and n_epochs and _len(dl := getattr(self.dls, phase)) == 0: raise self._no_batches(phase == 'train', dl)

    def _no_batches(self, training: bool, dl) -> ValueError:
        phase = 'train' if training else 'valid'
        if isinstance(dl, Iterator):  # a generator: one pass, then empty
            return ValueError(f'dls.{phase} yielded no batches in epoch {getattr(self, "epoch", 0)}: it is a '
                              f'{type(dl).__name__}, which is used up after one pass; give a loader that can be iterated '
                              f'again (a DataLoader, a list of batches, DataLoaders.from_tensors(...))')
        return ValueError(f'dls.{phase} has no batches (its dataset is empty, or smaller than one batch with '
                          f'drop_last=True): give it data, or pass {phase}=False to fit')

    def _check_steps(self, train: bool) -> None:
        for nm, providers in self._step_conflicts.items():
            names = ' and '.join(repr(cb) for cb in providers)
            raise ValueError(f'{names} both define {nm}(); a step method needs exactly one provider: remove one, '
                             f'or move the other\'s work into an event such as after_loss or after_backward')
        needed = STEP_METHODS if train else ('predict', 'get_loss')
        for nm in needed:
            if not hasattr(self, nm): raise self._no_step(nm)

    def _no_step(self, nm: str) -> AttributeError:
        return AttributeError(f'{type(self).__name__} has no {nm}() and no callback provides one: '
                              f'add TrainCB() to cbs or subclass TrainLearner')

    def _check_batch(self) -> None:
        b = self.batch
        if not isinstance(b, (list, tuple, Mapping)):
            phase = 'train' if self.training else 'valid'
            raise TypeError(f'dls.{phase} yielded a {type(b).__name__}; a batch must be a list or tuple (x, y, ...) '
                            f'or a dict: build loaders with DataLoaders.from_tensors(x, y, ...) or yield (x, y)')

    def _check_loss(self) -> None:
        loss = self.loss
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f'get_loss set learn.loss to a {type(loss).__name__}; it must be a scalar tensor: '
                            f'return loss_func(preds, y) as a tensor, not a Python number')
        if loss.ndim != 0:
            raise ValueError(f'learn.loss has shape {tuple(loss.shape)}; it must be a scalar: use a loss_func that '
                             f"reduces (reduction='mean') or call .mean() on it")

    def _clear_grads(self) -> None:
        for p in self.model.parameters(): p.grad = None
        self._stale_grads = False

    def _prepare_opt(self, lr: float) -> None:
        """Create the optimiser on the first fit (or when the model's parameters changed); later fits keep its state
        (momentum, Adam moments) and start every group at `lr`. With opt_func=None the user owns learn.opt."""
        if not self.opt_func: return
        ids = [id(p) for p in self.model.parameters()]
        if self.opt is None or ids != self._opt_params:
            self.opt = self.opt_func(self.model.parameters(), lr)
            self._opt_params = ids
        else:
            for g in self.opt.param_groups: g['lr'] = lr

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the run holds (see `state.learner_state`): weights, gradients, optimiser, each stateful callback's
        `state_dict()`, the loaders, the RNGs and where the loop is. Tensors are the live ones: save or copy it."""
        return state.learner_state(self)

    def load_state_dict(self, sd: dict, weights_only: bool = False) -> None:
        """Put back a `state_dict()`: weights, gradients, optimiser (made first if this learner has none yet),
        callbacks' states (matched by class and order), loaders and RNGs; all checked first (model, optimiser, loaders,
        callbacks and their settings: a mismatch is a one-line error naming it, and changes nothing). To go on from
        where it was captured, pass it to `fit(resume=sd)` instead. `weights_only=True` loads only the weights and
        buffers: a new run (a fine-tune with another lr, optimiser or data) starts from them."""
        if weights_only: return state.load_weights(self, sd)
        state.load_learner_state(self, sd, create_opt=lambda: self._prepare_opt(self.lr), unshare=True)

    def save_state(self, path: str | os.PathLike) -> None:
        """Write `state_dict()` to `path`, atomically (a crash leaves the previous file whole). Under several processes
        every one must call it (the state is gathered); the main one writes."""
        sd = self.state_dict()
        if self.is_main: state.save_file(sd, path)

    def load_state(self, path: str | os.PathLike, weights_only: bool = False) -> None:
        """Read a state saved by `save_state` or CheckpointCB (with `torch.load(weights_only=True)`: a file holding any
        other pickled object is refused unread; its checksum checked) and `load_state_dict` it (`weights_only`: the
        weights alone, to start a new run from them)."""
        sd = state.load_file(path)
        if weights_only: return state.load_weights(self, sd, str(path))
        state.load_learner_state(self, sd, str(path), create_opt=lambda: self._prepare_opt(self.lr))

    # ---- debugging ------------------------------------------------------------------------------------------
    def show_training_loop(self) -> None:
        """Print the loop's events in order with the callbacks that run at each, and who provides each step."""
        print(self._training_loop_text())

    def _training_loop_text(self) -> str:
        self._update_cbs()
        depth = {'fit': 0, 'epoch': 1, 'batch': 2}

        def indent(ev):
            lvl = ev.split('_', 1)[1]
            return '  ' * (depth[lvl] if lvl in depth else 3)

        def provider(nm):
            if nm in self._step_conflicts: return 'CONFLICT: ' + ', '.join(map(repr, self._step_conflicts[nm]))
            f = self.__dict__.get(nm)
            if isinstance(f, _BoundStep): return repr(f.cb_self)
            return f'{type(self).__name__}.{nm}' if hasattr(type(self), nm) else 'MISSING (add TrainCB())'

        steps_after = {'after_predict': 'predict', 'after_loss': 'get_loss', 'after_backward': 'backward',
                       'after_step': 'step', 'after_batch': 'zero_grad'}
        lines = []
        for ev in EVENTS:
            if ev in steps_after:
                nm = steps_after[ev]
                lines.append(f'      {nm}() -> {provider(nm)}')
            names = ', '.join(repr(getattr(f, '__self__', f)) for f in self._handlers[ev])
            lines.append(f'{indent(ev)}{ev}: {names or "-"}')
        if isinstance(self.__dict__.get('train_step'), _BoundStep):
            lines.append(f'train_step() -> {provider("train_step")} (runs the batch from predict to zero_grad)')
        hooks = _installed_hooks(self.model) if isinstance(self.model, nn.Module) else {}
        if hooks: lines += ['hooks:', *(f'  {who} on {", ".join(where)}' for who, where in hooks.items())]
        return '\n'.join(lines)


def main_process(learn) -> bool:
    """`learn.is_main`; True for a learner written by hand without one (the seed's, miniai's), which runs alone."""
    return getattr(learn, 'is_main', True)


def _distributed() -> bool: return dist.is_available() and dist.is_initialized()


def _launch_env() -> tuple[int, int]:
    """(rank, world size) as torchrun (or accelerate launch) sets them in the environment; (0, 1) elsewhere."""
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env: return int(env['RANK']), int(env['WORLD_SIZE'])
    return 0, 1


def _len(dl) -> int | None:
    try: return len(dl)
    except TypeError: return None  # an iterable without a length (an IterableDataset's loader, a generator)


def _installed_hooks(model: nn.Module) -> dict[str, list[str]]:
    """The forward hooks on the model's modules, grouped by who installed them (a Hook's `owner`, else the function)."""
    found: dict[str, list[str]] = {}
    names = module_names(model)
    for m in model.modules():
        for fn in m._forward_hooks.values():
            owner = getattr(getattr(fn, '__self__', None), 'owner', None)
            who = repr(owner) if owner is not None else getattr(fn, '__qualname__', repr(fn))
            found.setdefault(who, []).append(f'{names[id(m)]} ({type(m).__name__})')
    return found


# The signals fit turns into a stop at the batch's end, each with the handler it may replace (Python's default).
_STOP_SIGNALS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL,
                 **({signal.SIGUSR1: signal.SIG_DFL} if hasattr(signal, 'SIGUSR1') else {})}  # no SIGUSR1 on Windows


class _StopOnSignal:
    """During fit, a ctrl-C (SIGINT), SIGTERM or SIGUSR1 only records `learn.stop_signal` and sets `learn.stop_requested`
    (or, with `learn.hold_signals`, leaves that to DistributedCB); the loop stops once the current batch has ended, so no
    optimiser step is half applied and CheckpointCB can write a last checkpoint. The first signal puts the previous
    handlers back, so a second one acts at once as it would without fit, even inside a long C call. Installed only in
    the main thread, only over Python's default handlers (one of your own stays), and only for the fit."""

    def __init__(self, learn): self.learn, self.prev = learn, {}

    def __enter__(self):
        learn = self.learn
        learn.stop_signal, learn.stop_requested = None, False
        if threading.current_thread() is threading.main_thread():
            for sig, default in _STOP_SIGNALS.items():
                if signal.getsignal(sig) is default: self.prev[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self._restore()
        learn = self.learn
        learn.stop_signal = signal.Signals(signum)
        if not learn.hold_signals: learn.stop_requested = True

    def _restore(self) -> None:
        for sig, h in self.prev.items(): signal.signal(sig, h)
        self.prev = {}

    def __exit__(self, *exc) -> None:
        self._restore()
        self.learn.stop_requested = False


class _BoundStep:
    """A callback's step method bound to the learner, so `learn.step()` calls `cb.step(learn)`."""
    __slots__ = ('f', 'learn')

    def __init__(self, f, learn): self.f, self.learn = f, learn

    def __call__(self): return self.f(self.learn)

    @property
    def cb_self(self): return getattr(self.f, '__self__', self.f)


def _keys(who: str, nm: str, v) -> tuple | None:
    if v is None: return None
    ks = (v,) if isinstance(v, str) else tuple(v) if isinstance(v, (list, tuple)) else ()
    if not ks or not all(isinstance(k, str) for k in ks):
        raise TypeError(f"{who}: {nm} names the key of a dict batch it takes, or a list of keys (e.g. {nm}="
                        f"{'image' if nm == 'inputs' else 'label'!r}), got {v!r}")
    return ks


def check_batch_keys(who: str, inputs, target) -> tuple[tuple | None, tuple | None]:
    """`inputs` and `target` (a dict batch's key, or a list of keys; None: see `split_batch`) as tuples of keys,
    checked: a one-line error names `who` and the bad value."""
    xk, yk = _keys(who, 'inputs', inputs), _keys(who, 'target', target)
    if xk and yk and (both := [k for k in xk if k in yk]):
        raise ValueError(f'{who}: {both[0]!r} is named in inputs and in target; a key goes to the model or to the loss')
    return xk, yk


def split_batch(b, n_inp: int = 1, inputs: tuple | None = None, target: tuple | None = None) -> tuple[tuple, tuple]:
    """The model's inputs and the loss's targets in batch `b`, as two tuples. A list or tuple: its first `n_inp`
    elements, then the rest. A dict (a Hugging Face dataset's batch with `as_tuple=False`): by key. `inputs` and
    `target` (tuples of keys, from `check_batch_keys`) name them; with one named, the other is every other key, in the
    dict's order; with neither, the first `n_inp` keys are the inputs and the rest the targets (the order of
    collate_dict's tuples). A key the dict lacks is a one-line error listing its keys."""
    if isinstance(b, (list, tuple)): return tuple(b[:n_inp]), tuple(b[n_inp:])
    keys = list(b)
    if inputs is None and target is None: xk, yk = keys[:n_inp], keys[n_inp:]
    elif target is None: xk, yk = inputs, [k for k in keys if k not in inputs]
    elif inputs is None: xk, yk = [k for k in keys if k not in target], target
    else: xk, yk = inputs, target
    missing = [k for k in (*xk, *yk) if k not in b]
    if missing or not xk:
        problem = (f"has no {', '.join(map(repr, missing))}" if missing else
                   f'leaves no key for the model after target={list(target)}')
        raise ValueError(f'the batch is a dict with keys {keys}, which {problem}: name the model\'s inputs and the '
                         f'target among those keys, e.g. TrainCB(inputs={keys[0]!r}, target={keys[-1]!r}) or '
                         f'TrainLearner(..., inputs={keys[0]!r}, target={keys[-1]!r})')
    return tuple(b[k] for k in xk), tuple(b[k] for k in yk)


def batch_split(learn) -> tuple[int, tuple | None, tuple | None]:
    """`(n_inp, inputs, target)` of whoever provides `learn.get_loss` (a callback such as TrainCB, else the learner): how
    the step splits a batch (`split_batch`), for callbacks that need the same split (MetricsCB's targets)."""
    f = vars(learn).get('get_loss')
    owner = f.cb_self if isinstance(f, _BoundStep) else learn
    return getattr(owner, 'n_inp', 1), getattr(owner, 'inputs', None), getattr(owner, 'target', None)


class TrainLearner(Learner):
    """A Learner with the plain supervised step: the first `n_inp` batch elements (class attribute, 1 by default; set
    `learn.n_inp = 2` for `model(x, t)`) are the model's inputs and the rest go to the loss, as with `TrainCB(n_inp)`.
    A dict batch is split by key: `inputs` and `target` name the keys (one, or a list) the model and the loss take
    (`TrainLearner(model, dls, F.cross_entropy, inputs='image', target='label')`); see `split_batch` for the rule
    without them."""
    n_inp = 1
    inputs = target = None

    def __init__(self, model: nn.Module, dls=(0,), loss_func: Callable = F.mse_loss, lr: float = 0.1,
                 cbs=None, opt_func: Callable | None = optim.SGD, *, inputs=None, target=None):
        self.inputs, self.target = check_batch_keys(type(self).__name__, inputs, target)
        super().__init__(model, dls, loss_func, lr, cbs, opt_func)

    def predict(self):
        b = self.batch
        if not isinstance(b, (list, tuple)): self.preds = self.model(*split_batch(b, self.n_inp, self.inputs, self.target)[0])
        else: self.preds = self.model(b[0]) if self.n_inp == 1 else self.model(*b[:self.n_inp])  # no slice for one input

    def get_loss(self):
        b = self.batch
        ys = b[self.n_inp:] if isinstance(b, (list, tuple)) else split_batch(b, self.n_inp, self.inputs, self.target)[1]
        self.loss = self.loss_func(self.preds, *ys)

    def backward(self): self.loss.backward()
    def step(self): self.opt.step()
    def zero_grad(self): self.opt.zero_grad()


class MomentumLearner(TrainLearner):
    """The seed's momentum by hand: instead of zeroing, gradients decay by `mom` and keep accumulating."""
    def __init__(self, model: nn.Module, dls=(0,), loss_func: Callable = F.mse_loss, lr: float = 0.1,
                 cbs=None, opt_func: Callable | None = optim.SGD, mom: float = 0.85, *, inputs=None, target=None):
        self.mom = mom
        super().__init__(model, dls, loss_func, lr, cbs, opt_func, inputs=inputs, target=target)

    def zero_grad(self):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads: torch._foreach_mul_(grads, self.mom)
