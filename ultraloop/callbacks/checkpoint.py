"""Checkpoints a run can be resumed from exactly: the learner's whole state, written atomically (CheckpointCB)."""
from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from .. import state
from ..utils import check_int, several_processes
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
    process resumes from the file, each taking its own parts."""
    order = 50  # after the callbacks that change state in a batch (cleanup_batch included), so it saves what they did

    def __init__(self, dir: str | os.PathLike = 'checkpoints', every_batches: int | None = None, keep: int = 2,
                 monitor: str | None = None, mode: str = 'min'):
        super().__init__(monitor, mode)
        self.dir = Path(dir)
        if self.dir.exists() and not self.dir.is_dir(): raise ValueError(f'CheckpointCB: {self.dir} is a file; give a folder')
        if every_batches is not None: check_int('CheckpointCB: every_batches', every_batches, 1)
        self.every_batches, self.keep = every_batches, check_int('CheckpointCB: keep', keep, 1)
        self.files: list[str] = []  # this run's checkpoints still on disk, oldest first
        self.best_path: Path | None = None
        self.last_path: Path | None = None
        self._seq = self._batches = 0
        self._due = self._new_best = False
        self._main = True

    def before_fit(self, learn):
        super().before_fit(learn)
        self._main = learn.is_main  # under several processes every one takes part in a save; the main one writes
        if self._main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for tmp in self.dir.glob('.checkpoint-*.tmp'): tmp.unlink(missing_ok=True)  # left by a crash during a write
        seqs = [s for p in self.dir.iterdir() if (s := state.checkpoint_seq(p)) is not None] if self.dir.is_dir() else []
        self._seq = max(seqs, default=-1) + 1  # numbered after what the folder holds, so the newest is this run's
        self.files, self.best_path, self.last_path, self._batches, self._due, self._new_best = [], None, None, 0, False, False

    def after_batch(self, learn):
        if learn.training and self.every_batches is not None:
            self._batches += 1
            if self._batches % self.every_batches == 0: self._due = True

    def cleanup_batch(self, learn):
        # here, after the other callbacks' cleanup_batch (a gradient scaler's update), the batch is wholly done
        if self._due or learn.interrupted: self._save(learn)
        self._due = False
        # a stop: no process raises before the main one's file is in place, so a resume started at once finds it
        if learn.interrupted and several_processes(): dist.barrier()

    def on_value(self, learn, value, improved: bool) -> None:
        if improved: self._new_best = True

    def after_epoch(self, learn):
        if state.epoch_ends(learn): self._save(learn)

    def _save(self, learn) -> None:
        self._due = False
        path = self.dir / state.checkpoint_name(self._seq, state.position(learn))
        self._seq += 1
        self.files.append(path.name)
        if self._new_best: self.best_path, self._new_best = path, False
        keep = self.files[-self.keep:]
        drop = [f for f in self.files if f not in keep and (self.best_path is None or f != self.best_path.name)]
        self.files = [f for f in self.files if f not in drop]
        self.last_path = learn.last_checkpoint = path
        sd = learn.state_dict()  # holds this callback's state as it is now, this file counted (every process: a collective)
        if not self._main: return
        state.save_file(sd, path)
        for f in drop: (self.dir / f).unlink(missing_ok=True)

    @property
    def resume_dir(self) -> Path:
        """The folder `fit(resume='auto')` goes on from."""
        return self.dir

    def state_dict(self) -> dict:
        return {'seq': self._seq, 'files': list(self.files), 'batches': self._batches, 'best': self.best,
                'best_path': None if self.best_path is None else self.best_path.name,
                'last_path': None if self.last_path is None else self.last_path.name}

    def load_state_dict(self, s: dict) -> None:
        self._seq, self.files, self._batches, self.best = s['seq'], list(s['files']), s['batches'], s['best']
        self.best_path = None if s['best_path'] is None else self.dir / s['best_path']
        self.last_path = None if s['last_path'] is None else self.dir / s['last_path']

    def __repr__(self) -> str: return f'{self.name}({str(self.dir)!r})'
