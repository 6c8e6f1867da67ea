"""Writing MetricsCB's row for each epoch phase to files: a CSV table (CSVLoggerCB) and TensorBoard (TensorBoardCB)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from ..learner import Callback, main_process
from .metrics import MetricsCB, _metrics_cb

__all__ = ['CSVLoggerCB', 'TensorBoardCB']


def _need_metrics(cb, learn) -> MetricsCB:
    m = _metrics_cb(learn)
    if m is None:
        raise ValueError(f'{cb.name} writes the rows MetricsCB computes; add MetricsCB(...) to cbs, e.g. '
                         f'cbs=[MetricsCB(), {cb.name}(...)]')
    return m


class CSVLoggerCB(Callback):
    """Appends one row per epoch phase (MetricsCB's numbers: metrics, loss, epoch, train/eval) to the CSV file at
    `path`, flushed as it is written. A run that finds the file appends to it, header once; a file whose header
    differs is refused before any batch runs. Under several processes only the main one writes."""
    order = 10  # consumers get each row in callback order: after the printed table

    def __init__(self, path: str | os.PathLike = 'history.csv'):
        self.path = Path(path)
        if self.path.is_dir(): raise ValueError(f'CSVLoggerCB: {self.path} is a folder; give the path of a .csv file')
        for parent in self.path.parents:
            if parent.exists() and not parent.is_dir():
                raise ValueError(f'CSVLoggerCB: {parent} is a file, so {self.path} cannot be written; give a path in a folder')
        self._file = None

    def before_fit(self, learn):
        cols = _need_metrics(self, learn).columns
        if not main_process(learn): return  # one writer: the main process
        old = self._header()
        if old is not None and old != cols:
            raise ValueError(f'{self.path} has the columns {old}, this run logs {cols}: pass another path to CSVLoggerCB')
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, 'a', newline='')
        self._writer = csv.DictWriter(self._file, fieldnames=cols)
        if old is None: self._writer.writeheader()

    def _header(self) -> list[str] | None:
        if not self.path.exists() or self.path.stat().st_size == 0: return None
        with open(self.path, newline='') as f: return next(csv.reader(f), None)

    def log_metrics(self, learn, row: dict) -> None:
        if self._file is None: return  # not the main process
        self._writer.writerow(row)
        self._file.flush()

    def cleanup_fit(self, learn):
        if self._file is not None: self._file.close(); self._file = None


class TensorBoardCB(Callback):
    """Writes each epoch phase's metrics and loss to TensorBoard in `log_dir`, as `<name>/train` and `<name>/eval`
    scalars against the epoch (`tensorboard --logdir runs` shows them). Needs the tensorboard package. Under several
    processes only the main one writes."""
    order = 10  # consumers get each row in callback order: after the printed table

    def __init__(self, log_dir: str | os.PathLike = 'runs'):
        try: from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError('TensorBoardCB needs tensorboard: pip install tensorboard (or ultraloop[logs])') from None
        self._writer_cls, self.log_dir, self._writer = SummaryWriter, Path(log_dir), None

    def before_fit(self, learn):
        _need_metrics(self, learn)
        if main_process(learn): self._writer = self._writer_cls(log_dir=str(self.log_dir))  # one writer: the main process

    def log_metrics(self, learn, row: dict) -> None:
        if self._writer is None: return
        for k, v in row.items():
            if k not in ('epoch', 'train') and isinstance(v, (int, float)):
                self._writer.add_scalar(f'{k}/{row["train"]}', v, row['epoch'])
        self._writer.flush()

    def cleanup_fit(self, learn):
        if self._writer is not None: self._writer.close(); self._writer = None
