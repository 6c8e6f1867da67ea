"""Writing MetricsCB's row for each epoch phase to files: a CSV table (CSVLoggerCB) and TensorBoard (TensorBoardCB)."""
from __future__ import annotations

import csv
import math
import os
import struct
import tempfile
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


def _file_problem(path: Path, folder: bool = False) -> str | None:
    """Why a file (with `folder`: a folder to write files in) cannot be written at `path`, or None. Tried for real,
    leaving nothing behind: permission bits do not tell root, or a read-only mount, the truth."""
    if path.exists() and path.is_dir() != folder:
        return f'{path} is a {"file" if folder else "folder"}; give the path of a {"folder" if folder else "file"}'
    if path.is_file():
        try: open(path, 'ab').close()  # opening to append changes nothing
        except OSError as e: return f'{path} cannot be written ({e.strerror}); give a file you can write'
        return None
    for d in [path, *path.parents] if folder else path.parents:  # the nearest folder that exists must take a file
        if not d.exists(): continue
        if not d.is_dir(): return f'{d} is a file, so {path} cannot be written; give a path in a folder'
        try: tempfile.TemporaryFile(dir=d).close()
        except OSError as e:
            return f'{path} cannot be written: the folder {d} takes no new files ({e.strerror}); give a path in a ' \
                   f'folder you can write to'
        return None
    return None


def _csv_header(path: Path) -> list[str] | None:
    """The header row of the CSV file at `path`, None for a new or empty file; ValueError naming it if it is no CSV."""
    if not path.is_file() or path.stat().st_size == 0: return None
    try:
        with open(path, newline='', encoding='utf-8') as f: return next(csv.reader(f), None)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f'{path} is not a CSV file ({type(e).__name__}: {e}); give the path of a new .csv file or of '
                         f'one this logger wrote') from None


def _csv_problem(path: Path, columns: list[str] | None = None) -> str | None:
    """Why CSV rows with `columns` cannot be appended to `path`, or None."""
    if (problem := _file_problem(path)) is not None: return problem.replace('path of a file', 'path of a .csv file')
    try: old = _csv_header(path)
    except ValueError as e: return str(e)
    if columns is not None and old is not None and old != columns:
        return f'{path} has the columns {old}, this run logs {columns}: pass another path'
    return None


class CSVLoggerCB(Callback):
    """Appends one row per epoch phase (MetricsCB's numbers: metrics, loss, epoch, train/eval) to the CSV file at
    `path`, flushed as it is written; floats are written with the fewest digits that give back their float32 value
    (1.0000001, not 1.0000001192092896). A run that finds the file appends to it, header once; a file whose header
    differs, or that is not a CSV file, is refused before any batch runs. Under several processes only the main one
    writes. Its state is the file's length after the last row, so a run resumed with `fit(resume=...)` first cuts off
    the rows written after the checkpoint it resumes from (they are written again): no row appears twice."""
    lr_find_sits_out = True  # a record outside the learner: lr_find's growing lr would land in it
    order = 10  # consumers get each row in callback order: after the printed table

    def __init__(self, path: str | os.PathLike = 'history.csv'):
        self.path = Path(path)
        if (problem := _csv_problem(self.path)) is not None: raise ValueError(f'CSVLoggerCB: {problem}')
        self._file, self._size = None, None

    def before_fit(self, learn):
        cols = _need_metrics(self, learn).columns
        if not main_process(learn): return  # one writer: the main process
        if (problem := _csv_problem(self.path, cols)) is not None: raise ValueError(f'CSVLoggerCB: {problem}')
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, 'a', newline='', encoding='utf-8')
        self._writer = csv.DictWriter(self._file, fieldnames=cols)
        if self._file.tell() == 0: self._writer.writeheader()
        self._file.flush()
        self._size = self._file.tell()

    def log_metrics(self, learn, row: dict) -> None:
        if self._file is None: return  # not the main process
        self._writer.writerow({k: _short(v) if isinstance(v, float) else v for k, v in row.items()})
        self._file.flush()
        self._size = self._file.tell()

    def cleanup_fit(self, learn):
        if self._file is not None: self._file.close(); self._file = None

    def state_dict(self) -> dict: return {'size': self._size}

    def load_state_dict(self, s: dict) -> None:
        """Resuming (in a fit, where the file is open since before_fit): cut the file to the length the state recorded
        (never longer: a file cut by hand stays as it is). Outside a fit (learn.load_state) the file is left alone."""
        size = s['size']
        if self._file is None or size is None or size >= self._file.tell(): return
        self._file.flush()
        self._file.truncate(size)
        self._file.seek(size)
        self._size = size


def _short(v: float) -> str:
    """The shortest decimal that reads back as the same float32: metrics are float32, so more digits are noise."""
    try: f32 = struct.unpack('f', struct.pack('f', v))[0]
    except OverflowError: return repr(v)  # beyond float32's range: a float64 value, written whole
    for digits in range(1, 10):
        s = f'{v:.{digits}g}'
        if struct.unpack('f', struct.pack('f', float(s)))[0] == f32 or not math.isfinite(v): return s
    return repr(v)


class TensorBoardCB(Callback):
    """Writes each epoch phase's metrics and loss to TensorBoard in `log_dir`, as `<name>/train` and `<name>/eval`
    scalars against the epoch (`tensorboard --logdir runs` shows them). Needs the tensorboard package. Under several
    processes only the main one writes. Its state is the rows of the last epoch it wrote: a resumed run hides
    (TensorBoard's `purge_step`) what was written from that epoch on, writes those rows again and goes on, so no
    point appears twice."""
    lr_find_sits_out = True  # a record outside the learner: lr_find's growing lr would land in it
    order = 10  # consumers get each row in callback order: after the printed table

    def __init__(self, log_dir: str | os.PathLike = 'runs'):
        try: from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError('TensorBoardCB needs tensorboard: pip install tensorboard (or ultraloop[logs])') from None
        self._writer_cls, self.log_dir, self._writer = SummaryWriter, Path(log_dir), None
        self._tail: list[dict] = []  # the rows written of the newest epoch written
        self._main = False

    def before_fit(self, learn):
        _need_metrics(self, learn)
        self._tail, self._main = [], main_process(learn)
        if self._main: self._writer = self._writer_cls(log_dir=str(self.log_dir))  # one writer: the main process

    def log_metrics(self, learn, row: dict) -> None:
        if self._writer is None: return
        self._write(row)
        self._writer.flush()

    def _write(self, row: dict) -> None:
        for k, v in row.items():
            if k not in ('epoch', 'train') and isinstance(v, (int, float)):
                self._writer.add_scalar(f'{k}/{row["train"]}', v, row['epoch'])
        if self._tail and self._tail[-1]['epoch'] != row['epoch']: self._tail = []
        self._tail.append(dict(row))

    def cleanup_fit(self, learn):
        if self._writer is not None: self._writer.close(); self._writer = None

    def state_dict(self) -> dict: return {'tail': [dict(r) for r in self._tail]}

    def load_state_dict(self, s: dict) -> None:
        self._tail = [dict(r) for r in s['tail']]
        if self._writer is None: return  # not the main process, or not in a fit: nothing to hide
        # a new event file whose marker hides every point from this epoch on (from 0 when none was written), those the
        # killed run wrote after the checkpoint included; the checkpoint's rows of that epoch are written again
        self._writer.close()
        self._writer = self._writer_cls(log_dir=str(self.log_dir), purge_step=self._tail[0]['epoch'] if self._tail else 0)
        tail, self._tail = self._tail, []
        for row in tail: self._write(row)
        self._writer.flush()
