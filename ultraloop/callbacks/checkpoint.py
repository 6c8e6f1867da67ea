"""Checkpoints a run can be resumed from exactly: the learner's whole state, written atomically (CheckpointCB)."""
from __future__ import annotations

import copy
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from .. import state
from ..utils import check_int, map_tensors, several_processes
from .safety import MonitorCB

__all__ = ['CheckpointCB']


class CheckpointCB(MonitorCB):
    """Writes `learn.state_dict()` (all `fit(resume=...)` needs to go on as if never stopped) to the folder `dir` at
    every epoch's end, with `every_batches=k` every k training batches too, and when a ctrl-C, SIGTERM or SIGUSR1 stops
    the fit, at the end of the batch it came in (`learn.last_checkpoint` names the newest file). Keeps the newest `keep`
    files, plus with `monitor` ('valid_loss', 'valid_accuracy', 'train_loss', ...; `mode` 'min' or 'max') the best
    epoch-end one, `best_path`; `last_path` is the newest. A file is `checkpoint-<n>-epoch<e>-<phase><batch>.pt`, `n`
    counting up, written into a temporary file that is renamed into place (a crash never leaves a half checkpoint), and
    read back with `torch.load(weights_only=True)`. `learn.fit(n, resume=dir)`, or `resume='auto'` (this folder,
    `resume_dir`, and a fresh start while it holds none), continues from the newest. Under several processes every
    process takes part in each save (the state is gathered: see `state.learner_state`) and the main one writes; every
    process resumes from the file, each taking its own parts.

    A write that fails (a full disk, an I/O error, a read-only folder) leaves the previous checkpoint and no temporary
    file; then `on_error='stop'` (the default: a run that cannot be resumed should not go on unnoticed) ends the fit
    with a one-line OSError naming the folder and its free space, `on_error='warn'` warns once and trains on, trying
    again at the next checkpoint. Old files are pruned only once a newer one is complete, so `keep` never removes the
    only complete checkpoint; files of this run that a crash kept from being pruned, and temporary files of crashed
    writes, go at the next write.

    `background=True`: at the batch's end the state is copied (into host buffers kept from one save to the next; from
    a GPU into pinned memory on a side stream) and a thread serialises, fsyncs and renames it while training goes on;
    the next save, and the fit's end, wait for it. It costs a second copy of the state in host memory (hence not the
    default) and a failed write is reported at the next batch that finds it done."""
    order = 50  # after the callbacks that change state in a batch (cleanup_batch included), so it saves what they did

    def __init__(self, dir: str | os.PathLike = 'checkpoints', every_batches: int | None = None, keep: int = 2,
                 monitor: str | None = None, mode: str = 'min', on_error: str = 'stop', background: bool = False):
        super().__init__(monitor, mode)
        self.dir = Path(dir)
        if self.dir.exists() and not self.dir.is_dir(): raise ValueError(f'CheckpointCB: {self.dir} is a file; give a folder')
        if every_batches is not None: check_int('CheckpointCB: every_batches', every_batches, 1)
        if on_error not in ('stop', 'warn'):
            raise ValueError(f"CheckpointCB: on_error must be 'stop' (end the fit when a write fails) or 'warn' (warn "
                             f"once and train on), got {on_error!r}")
        if not isinstance(background, bool):
            raise TypeError(f'CheckpointCB: background must be True or False, got {background!r}')
        self.every_batches, self.keep = every_batches, check_int('CheckpointCB: keep', keep, 1)
        self.on_error, self.background = on_error, background
        self.files: list[str] = []  # this run's checkpoints still on disk, oldest first
        self.best_path: Path | None = None
        self.last_path: Path | None = None
        self._seq = self._first = self._batches = 0
        self._due = self._new_best = self._warned = False
        self._main = True
        self._write: tuple | None = None  # the background write in flight: (future, path, bookkeeping before it)
        self._writer: ThreadPoolExecutor | None = None  # one thread, made at the first background write of a fit
        self._buffers: list[torch.Tensor] = []  # host copies a background write reuses

    def before_fit(self, learn):
        super().before_fit(learn)
        self._main = learn.is_main  # under several processes every one takes part in a save; the main one writes
        if self._main:
            self.dir.mkdir(parents=True, exist_ok=True)
            state.remove_stale_tmp(self.dir, 'checkpoint-*')  # left by a crash during a write
        seqs = [s for p in self.dir.iterdir() if (s := state.checkpoint_seq(p)) is not None] if self.dir.is_dir() else []
        self._seq = self._first = max(seqs, default=-1) + 1  # numbered after what the folder holds: the newest is this run's
        self.files, self.best_path, self.last_path, self._batches, self._due, self._new_best = [], None, None, 0, False, False
        self._warned, self._write = False, None

    def after_batch(self, learn):
        if learn.training and self.every_batches is not None:
            self._batches += 1
            if self._batches % self.every_batches == 0: self._due = True

    def cleanup_batch(self, learn):
        # here, after the other callbacks' cleanup_batch (a gradient scaler's update), the batch is wholly done
        if self._write is not None and self._write[0].done(): self._finish(learn)  # a finished write: one test a batch
        if self._due or learn.interrupted: self._save(learn)
        self._due = False
        # a stop: no process raises before the main one's file is in place, so a resume started at once finds it
        if learn.interrupted and several_processes(): dist.barrier()

    def on_value(self, learn, value, improved: bool) -> None:
        if improved: self._new_best = True

    def after_epoch(self, learn):
        if state.epoch_ends(learn): self._save(learn)

    def cleanup_fit(self, learn):
        try:
            if self._write is not None: self._finish(learn)  # the last write is complete when fit returns
        finally:
            if self._writer is not None: self._writer.shutdown()
            self._writer, self._buffers = None, []

    def _save(self, learn) -> None:
        self._due = False
        if self._write is not None: self._finish(learn)  # one write at a time; its buffers are reused
        path = self.dir / state.checkpoint_name(self._seq, state.position(learn))
        before = list(self.files), self.best_path, self.last_path  # put back if the write fails
        self._seq += 1
        self.files.append(path.name)
        if self._new_best: self.best_path, self._new_best = path, False
        keep = self.files[-self.keep:]
        self.files = [f for f in self.files if f in keep or (self.best_path is not None and f == self.best_path.name)]
        self.last_path = learn.last_checkpoint = path
        sd = learn.state_dict()  # holds this callback's state as it is now, this file counted (every process: a collective)
        if not self._main: return
        # what the file supersedes, pruned once it is complete: this run's files not kept (any a crash left included)
        prune = partial(_prune, self.dir, {*self.files, *([self.best_path.name] if self.best_path else [])}, self._first,
                        self._seq)
        if self.background:
            if self._writer is None: self._writer = ThreadPoolExecutor(1, thread_name_prefix='ultraloop-checkpoint')
            sd, event = self._host_copy(sd)
            self._write = self._writer.submit(_write, sd, event, path, prune), path, before
            return
        try: state.save_file(sd, path)
        except OSError as e: return self._failed(path, before, e)
        self._written(learn, path)
        prune()

    def _finish(self, learn) -> None:
        """Wait for the background write, then treat its outcome as a synchronous write's."""
        (future, path, before), self._write = self._write, None
        try: future.result()
        except OSError as e: return self._failed(path, before, e)
        self._written(learn, path)

    def _failed(self, path: Path, before: tuple, e: OSError) -> None:
        self.files, self.best_path, self.last_path = before  # the file is not there: nothing counts it
        last = 'no earlier checkpoint of this run' if self.last_path is None else f'{self.last_path.name} is kept'
        msg = f'CheckpointCB: {e.strerror}; {last}'
        if self.on_error == 'stop':
            raise OSError(e.errno, f'{msg}: free space or give another dir, then resume (on_error=\'warn\' would train '
                                   f'on without checkpoints)') from None
        if not self._warned:
            self._warned = True
            warnings.warn(f'{msg}; training goes on and each later checkpoint is tried (this warning is not repeated)',
                          stacklevel=2)

    def _host_copy(self, sd: dict):
        """`sd` with every tensor copied into a host buffer (the previous save's, where one of that shape and dtype is
        free: no allocation, no page faults) and other values deep-copied, so training may go on changing the live
        state. From a CUDA device: into pinned memory on a side stream; the returned event marks the copies' end, and
        the training stream waits for it before it changes any tensor."""
        pool: dict[tuple, list[torch.Tensor]] = {}
        for b in self._buffers: pool.setdefault((b.shape, b.dtype), []).append(b)
        used, seen, cuda = [], {}, torch.cuda.is_available() and torch.cuda.is_initialized()
        stream = None
        if cuda:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())  # the copies read what the step wrote

        def copy_one(t: torch.Tensor) -> torch.Tensor:
            if id(t) in seen: return seen[id(t)]  # the same tensor twice (tied weights) stays one
            if t.layout != torch.strided: out = t.detach().to('cpu', copy=True)
            else:
                free = pool.get((t.shape, t.dtype))
                gpu = t.device.type == 'cuda'
                out = free.pop() if free else torch.empty(t.shape, dtype=t.dtype, pin_memory=gpu)
                if gpu and stream is not None and t.device == stream.device:
                    with torch.cuda.stream(stream): out.copy_(t.detach(), non_blocking=True)
                else: out.copy_(t.detach())
                used.append(out)
            seen[id(t)] = out
            return out

        host = map_tensors(copy_one, sd, _copy_leaf)
        self._buffers = used
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
            torch.cuda.current_stream().wait_event(event)  # the next step may not overwrite what is being copied
        return host, event

    @property
    def resume_dir(self) -> Path:
        """The folder `fit(resume='auto')` goes on from."""
        return self.dir

    def _written(self, learn, path: Path) -> None:
        """Hand the file just put in place to every callback with a `log_checkpoint(learn, path, best)` method (the
        trackers, Ray Train's report), in callback order; `best`: it is the new `best_path`. Called once per file, in
        the training thread, in the main process (the one that writes), once the file is complete."""
        best = self.best_path is not None and path == self.best_path
        for cb in sorted(learn.cbs, key=lambda cb: getattr(cb, 'order', 0)):
            if cb is not self and callable(f := getattr(cb, 'log_checkpoint', None)): f(learn, path, best)

    def state_dict(self) -> dict:
        return {'seq': self._seq, 'first': self._first, 'files': list(self.files), 'batches': self._batches,
                'best': self.best, 'best_path': None if self.best_path is None else self.best_path.name,
                'last_path': None if self.last_path is None else self.last_path.name}

    def load_state_dict(self, s: dict) -> None:
        self._seq, self.files, self._batches, self.best = s['seq'], list(s['files']), s['batches'], s['best']
        seqs = [state.checkpoint_seq(Path(f)) for f in self.files]
        self._first = s.get('first', min((q for q in seqs if q is not None), default=self._seq))
        self.best_path = None if s['best_path'] is None else self.dir / s['best_path']
        self.last_path = None if s['last_path'] is None else self.dir / s['last_path']

    def __repr__(self) -> str: return f'{self.name}({str(self.dir)!r})'


def _copy_leaf(v):
    return v if isinstance(v, (int, float, str, bytes, type(None))) else copy.deepcopy(v)  # atoms: nothing to copy


def _write(sd: dict, event, path: Path, prune) -> None:
    """A background write, in the writer thread: wait for the copies to end (a CUDA event), then `state.save_file`
    (temporary file, fsync, rename, folder fsync), then prune."""
    if event is not None: event.synchronize()
    state.save_file(sd, path)
    prune()


def _prune(folder: Path, kept: set[str], first: int, end: int) -> None:
    """Remove the checkpoints numbered `first` to `end - 1` (a run's) that are not `kept`, and the temporary files of
    crashed writes."""
    for p in folder.iterdir():
        seq = state.checkpoint_seq(p)
        if seq is not None and first <= seq < end and p.name not in kept: p.unlink(missing_ok=True)
    state.remove_stale_tmp(folder, 'checkpoint-*')
