"""Handing a run to the tools users pair a loop with: experiment trackers (WandbCB, MLflowCB), Optuna's pruning
(OptunaPruningCB) and Ray Train's reports and checkpoints (RayTrainReportCB, ray_resume_path). Each library is
imported when its callback is made, never at `import ultraloop`.

They read what MetricsCB hands every callback with `log_metrics(learn, row)` once per epoch phase, and the files
CheckpointCB hands every callback with `log_checkpoint(learn, path, best)` once each is written: neither depends on
the order of the callbacks nor reads another callback's attributes."""
from __future__ import annotations

import importlib
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from ..learner import Callback, CancelFitException, main_process
from ..state import epoch_ends
from .logs import _need_metrics
from .metrics import _metrics_cb
from .safety import MonitorCB

__all__ = ['WandbCB', 'MLflowCB', 'OptunaPruningCB', 'RayTrainReportCB', 'ray_resume_path']


def _require(module: str, who: str, pip: str, extra: str):
    """Import an optional library, or an ImportError naming what to install."""
    try: return importlib.import_module(module)
    except ImportError:
        raise ImportError(f'{who} needs {extra}: pip install {pip} (or "ultraloop[{extra}]")') from None


def _phase(row: dict) -> str:
    """'train' or 'valid': the prefix of a row's values, as `monitor` names them ('valid_loss', 'train_accuracy')."""
    return 'train' if row['train'] == 'train' else 'valid'


def _numbers(row: dict) -> dict[str, float]:
    """A MetricsCB row's numbers as '<phase>_<name>' (non-scalar metrics, lists, are left out)."""
    p = _phase(row)
    return {f'{p}_{k}': v for k, v in row.items()
            if k not in ('epoch', 'train') and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _batch_losses(learn, row: dict) -> list[tuple[int, float]]:
    """The training batches' losses of the train phase `row` closes, as (batch, loss) with `batch` counting the fit's
    training batches from 1 (epoch e's batch i is e * n + i + 1 for n batches an epoch). Taken from what MetricsCB
    read once at the phase end (its `batch_losses`, kept against the epochs trained): no read from the device here."""
    m = _metrics_cb(learn)
    if m is None or row['train'] != 'train': return []
    e, new = row['epoch'], []
    for x, v in reversed(m.batch_losses):  # this phase's losses are the last ones, at epochs trained in (e, e + 1]
        if x <= e: break
        new.append(v)
    n = len(new)
    return [(e * n + i + 1, v) for i, v in enumerate(reversed(new))]


def _value(v):
    """A hyper-parameter as a tracker takes it: numbers, strings and booleans as they are, anything else as text."""
    if isinstance(v, (bool, int, float, str)) or v is None: return v
    if isinstance(v, (tuple, list)) and all(isinstance(o, (int, float)) for o in v): return list(v)
    return repr(v)


def hyperparams(learn) -> dict:
    """What a fit starts with: the model's class and parameter count, the optimiser's class and the hyper-parameters of
    its first parameter group (lr as the fit starts; a schedule's own, such as one-cycle's max_lr, too), the loss
    function, batch size, epochs and the callbacks."""
    model, opt, dl = learn.model, getattr(learn, 'opt', None), getattr(getattr(learn, 'dls', None), 'train', None)
    hp = {'model': type(model).__name__, 'n_params': sum(p.numel() for p in model.parameters()),
          'loss_func': getattr(learn.loss_func, '__name__', type(learn.loss_func).__name__),
          'epochs': getattr(learn, 'n_epochs', None), 'bs': getattr(dl, 'bs', getattr(dl, 'batch_size', None))}
    if opt is not None:
        hp['opt'] = type(opt).__name__
        hp.update({f'opt_{k}': _value(v) for k, v in opt.param_groups[0].items() if k != 'params'})
        hp['lr'] = opt.param_groups[0]['lr']
    hp['callbacks'] = [repr(cb) for cb in learn.cbs]
    return hp


def _plot(learn, folder: str) -> Path | None:
    """The run's metrics plot, saved in `folder`; a failure to draw is a warning, as the run itself is done."""
    m = _metrics_cb(learn)
    if m is None or not m.history or importlib.util.find_spec('matplotlib') is None: return None
    try: return learn.plot_metrics(Path(folder) / 'metrics.png')
    except Exception as e:  # a plot must not hide how the fit ended
        warnings.warn(f'the metrics plot could not be drawn for the tracker: {type(e).__name__}: {e}', stacklevel=2)
        return None


def _ended(done: bool) -> str:
    """How a fit ended, seen from cleanup_fit: 'finished' (after_fit ran, or a callback cancelled the fit), 'killed'
    (ctrl-C) or 'failed'. cleanup_fit runs in the loop's `finally`, so an error on its way out is in sys.exc_info()."""
    if done: return 'finished'
    e = sys.exc_info()[1]
    if e is None or isinstance(e, CancelFitException): return 'finished'
    return 'killed' if isinstance(e, KeyboardInterrupt) else 'failed'


class _TrackerCB(Callback):
    """What WandbCB and MLflowCB share: hyper-parameters at fit start, each phase's row, each training batch's loss once
    per train phase, the metrics plot and optionally a checkpoint at fit end; only the main process logs. `where` says
    where the last fit's run went (a URL, a folder, or an MLflow run id and store), for the command to print."""
    order = 60  # after CheckpointCB (50): a checkpoint written as the fit ends is handed over before the run closes
    lr_find_sits_out = True  # a record outside the learner: lr_find's growing lr would land in it

    def __init__(self, log_checkpoints: bool = False):
        if not isinstance(log_checkpoints, bool):
            raise TypeError(f'{self.name}: log_checkpoints must be True or False, got {log_checkpoints!r}')
        self.log_checkpoints = log_checkpoints
        self._on, self._best, self._last, self._done = False, None, None, False
        self.where: str | None = None

    def before_fit(self, learn):
        _need_metrics(self, learn)
        self._best = self._last = None
        self._done, self._on = False, main_process(learn)  # one process logs: the main one
        if self._on: self._start(learn, hyperparams(learn))

    def log_metrics(self, learn, row: dict) -> None:
        if self._on: self._log_row(row, _batch_losses(learn, row))

    def log_checkpoint(self, learn, path: Path, best: bool) -> None:
        self._last = path
        if best: self._best = path

    def after_fit(self, learn): self._done = True

    def cleanup_fit(self, learn):
        if not self._on: return
        self._on, status = False, _ended(self._done)
        try:
            with tempfile.TemporaryDirectory() as d:
                if (png := _plot(learn, d)) is not None: self._log_file(png, None)
                ckpt = self._best or self._last  # the best by CheckpointCB's monitor, else the newest
                if self.log_checkpoints and ckpt is not None and Path(ckpt).is_file(): self._log_file(Path(ckpt), 'checkpoint')
        finally: self._end(status)


class WandbCB(_TrackerCB):
    """Logs a fit to Weights & Biases: the hyper-parameters (model, optimiser and its settings, lr, bs, epochs,
    callbacks; `config` adds or overrides) in the run's config, each epoch phase's MetricsCB row as `train_<name>` /
    `valid_<name>` against `epoch`, each training batch's loss as `train_batch_loss` against `batch` (sent at the
    phase's end, from what MetricsCB read once), the metrics plot at fit end and, with `log_checkpoints=True`, the best
    checkpoint CheckpointCB wrote (the newest where it watches nothing) as a `model` artifact. A fit starts a run with
    `wandb.init(project=, name=, config=, **init_kwargs)` and finishes it, unless a run is already active (then it logs
    there and leaves it open). Only the main process logs. `WANDB_MODE=offline` logs without a network."""

    def __init__(self, project: str | None = None, name: str | None = None, config: dict | None = None,
                 log_checkpoints: bool = False, **init_kwargs):
        super().__init__(log_checkpoints)
        if config is not None and not isinstance(config, dict):
            raise TypeError(f'WandbCB: config must be a dict of hyper-parameters, got {type(config).__name__}')
        self._wandb = _require('wandb', 'WandbCB', 'wandb', 'wandb')
        self.project, self.run_name, self.config, self.init_kwargs = project, name, dict(config or {}), init_kwargs
        self.run = None

    def _start(self, learn, hp: dict) -> None:
        wandb = self._wandb
        self._owned = wandb.run is None
        self.run = (wandb.init(project=self.project, name=self.run_name, config=self.config, **self.init_kwargs)
                    if self._owned else wandb.run)
        self.run.config.update({**hp, **self.config}, allow_val_change=True)
        self.where = self.run.url or self.run.dir  # offline: no url, the run's files
        self.run.define_metric('epoch')
        self.run.define_metric('batch')
        self.run.define_metric('train_batch_loss', step_metric='batch')
        for k in _metrics_cb(learn).all_metrics:
            for p in ('train', 'valid'): self.run.define_metric(f'{p}_{k}', step_metric='epoch')

    def _log_row(self, row: dict, losses: list) -> None:
        for b, v in losses: self.run.log({'train_batch_loss': v, 'batch': b})
        self.run.log({**_numbers(row), 'epoch': row['epoch']})

    def _log_file(self, path: Path, kind: str | None) -> None:
        if kind is None: return self.run.log({'metrics': self._wandb.Image(str(path))})
        art = self._wandb.Artifact(f'model-{self.run.id}', type='model', metadata={'file': path.name})
        art.add_file(str(path))
        self.run.log_artifact(art, aliases=['best' if path == self._best else 'latest'])

    def _end(self, status: str) -> None:
        if self._owned: self.run.finish(exit_code=0 if status == 'finished' else 1)

    def __repr__(self) -> str: return f'WandbCB(project={self.project!r})'


class MLflowCB(_TrackerCB):
    """Logs a fit to MLflow: the hyper-parameters (model, optimiser and its settings, lr, bs, epochs, callbacks) as
    params, each epoch phase's MetricsCB row as `train_<name>` / `valid_<name>` metrics at step `epoch`, each training
    batch's loss as `train_batch_loss` at step `batch` (one `log_batch` per phase, from what MetricsCB read once), the
    metrics plot as an artifact at fit end and, with `log_checkpoints=True`, the best checkpoint CheckpointCB wrote (the
    newest where it watches nothing) under `checkpoints/`; `params` adds or overrides params. A fit makes a run in
    `experiment` (created if missing; MLflow's default one without it) on `tracking_uri` (MLflow's own default without
    it) and ends it with the fit's status (FINISHED, FAILED, KILLED); inside `mlflow.start_run()` with no
    `tracking_uri` given it logs to that run and leaves it open. Only the main process logs."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None,
                 log_checkpoints: bool = False, params: dict | None = None):
        super().__init__(log_checkpoints)
        if params is not None and not isinstance(params, dict):
            raise TypeError(f'MLflowCB: params must be a dict of hyper-parameters, got {type(params).__name__}')
        self._mlflow = _require('mlflow', 'MLflowCB', 'mlflow', 'mlflow')
        self.tracking_uri, self.experiment, self.run_name, self.params = tracking_uri, experiment, run_name, dict(params or {})
        self.run_id = None

    def _start(self, learn, hp: dict) -> None:
        mlflow = self._mlflow
        from mlflow.entities import Param
        self.client = mlflow.MlflowClient(self.tracking_uri)
        active = mlflow.active_run() if self.tracking_uri is None else None
        self._owned = active is None
        if active is not None: self.run_id = active.info.run_id
        else:
            exp = '0'  # MLflow's Default experiment
            if self.experiment is not None:
                found = self.client.get_experiment_by_name(self.experiment)
                exp = found.experiment_id if found is not None else self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(exp, run_name=self.run_name).info.run_id
        self.where = f'run {self.run_id} on {self.tracking_uri or mlflow.get_tracking_uri()}'
        had = self.client.get_run(self.run_id).data.params  # a run's params cannot change: an open run keeps its own
        hp = {**hp, **self.params}
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in hp.items() if k not in had])

    def _log_row(self, row: dict, losses: list) -> None:
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        ms = [Metric('train_batch_loss', v, ts, b) for b, v in losses]
        ms += [Metric(k, v, ts, row['epoch']) for k, v in _numbers(row).items()]
        self.client.log_batch(self.run_id, metrics=ms)

    def _log_file(self, path: Path, kind: str | None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=None if kind is None else 'checkpoints')

    def _end(self, status: str) -> None:
        if self._owned: self.client.set_terminated(self.run_id, status=status.upper())

    def __repr__(self) -> str: return f'MLflowCB(experiment={self.experiment!r})'


class OptunaPruningCB(MonitorCB):
    """Reports `monitor` ('valid_loss', 'valid_accuracy', 'train_loss', ...) of each epoch to an Optuna trial
    (`trial.report(value, step=epoch)`) and, when the trial's pruner says so (`trial.should_prune()`), ends the fit at
    that epoch's end and raises `optuna.TrialPruned` out of `fit`, once every callback has cleaned up (trackers close
    their runs, checkpoints are written), so `study.optimize` records the trial as pruned. Under several processes give
    every process the trial wrapped in optuna-integration's `TorchDistributedTrial`, which agrees on the decision."""
    order = 10_000  # last: its cleanup_fit raises TrialPruned, which would skip the cleanup_fit of any callback after it

    def __init__(self, trial, monitor: str = 'valid_loss'):
        if not all(callable(getattr(trial, a, None)) for a in ('report', 'should_prune')):
            raise TypeError(f'OptunaPruningCB: trial must be the optuna.Trial your objective gets (with report and '
                            f'should_prune), got {type(trial).__name__}')
        if monitor is None: raise ValueError("OptunaPruningCB needs a monitor, such as 'valid_loss'")
        super().__init__(monitor)
        _require('optuna', 'OptunaPruningCB', 'optuna', 'optuna')
        self.trial, self.pruned_epoch, self.pruned_value = trial, None, None

    def before_fit(self, learn):
        super().before_fit(learn)
        self.pruned_epoch = self.pruned_value = None

    def on_value(self, learn, value, improved: bool) -> None:
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        if finite: self.trial.report(float(value), step=learn.epoch)
        # a diverged value (NaN, inf) is not reported (optuna would refuse it) and prunes the trial at once
        if not finite or self.trial.should_prune(): self.pruned_epoch, self.pruned_value = learn.epoch, value

    def after_epoch(self, learn):
        if self.pruned_epoch is not None and epoch_ends(learn): raise CancelFitException()

    def cleanup_fit(self, learn):
        if self.pruned_epoch is not None and sys.exc_info()[1] is None:  # not over another error on its way out
            import optuna
            v = self.pruned_value
            raise optuna.TrialPruned(f'pruned at epoch {self.pruned_epoch}: {self.monitor} '
                                     + (f'{v:.4g}' if isinstance(v, float) else str(v)))

    def __repr__(self) -> str: return f'OptunaPruningCB(monitor={self.monitor!r})'


class RayTrainReportCB(Callback):
    """Inside a Ray Train worker (`TorchTrainer`'s train function), reports each epoch to `ray.train.report`: one dict
    of the epoch's MetricsCB rows merged (`epoch`, `train_loss`, `valid_loss`, `valid_accuracy`, ...) with, when
    `checkpoint=True`, the newest file CheckpointCB wrote since the last report as a `ray.train.Checkpoint` (a folder
    holding that one file). Every process reports at every epoch's end (Ray needs each worker to report as often); only
    the one that writes checkpoints, the main one, attaches them. To go on from Ray's latest checkpoint after a restart,
    pass `resume=ray_resume_path(dir)` to fit."""
    lr_find_sits_out = True  # a record outside the learner: lr_find's growing lr would land in it
    order = 60  # any order works: it reports in cleanup_epoch, after every callback's after_epoch (and checkpoint)

    def __init__(self, checkpoint: bool = True):
        if not isinstance(checkpoint, bool):
            raise TypeError(f'RayTrainReportCB: checkpoint must be True or False, got {checkpoint!r}')
        self.checkpoint, self._train = checkpoint, _require('ray.train', 'RayTrainReportCB', '"ray[train]"', 'ray')
        self.reports = 0
        self._row, self._ready, self._ckpt = {}, False, None

    def before_fit(self, learn):
        _need_metrics(self, learn)
        self._row, self._ready, self._ckpt, self.reports = {}, False, None, 0

    def log_metrics(self, learn, row: dict) -> None:
        if not self._row: self._row['epoch'] = row['epoch']
        self._row.update(_numbers(row))
        self._ready = epoch_ends(learn)  # the epoch's last phase ended: its report is due in cleanup_epoch

    def log_checkpoint(self, learn, path: Path, best: bool) -> None:
        if self.checkpoint: self._ckpt = Path(path)

    def cleanup_epoch(self, learn):
        if not self._ready: return  # a phase that failed or was cancelled before its row: nothing to report
        row, ckpt = self._row, self._ckpt
        self._row, self._ready, self._ckpt = {}, False, None
        if ckpt is None or not ckpt.is_file(): return self._report(row, None)
        with tempfile.TemporaryDirectory(prefix='ultraloop-ray-') as d:  # Ray copies the folder's files to its storage
            _link_or_copy(ckpt, Path(d) / ckpt.name)
            self._report(row, self._train.Checkpoint.from_directory(d))

    def _report(self, metrics: dict, checkpoint) -> None:
        self._train.report(metrics, checkpoint=checkpoint)
        self.reports += 1


def _link_or_copy(src: Path, dst: Path) -> None:
    try: os.link(src, dst)  # no copy of a large file where the folders share a file system
    except OSError: shutil.copy2(src, dst)


def ray_resume_path(dir: str | os.PathLike = 'checkpoints', checkpoint=None) -> Path | None:
    """Inside a Ray Train worker: the checkpoint file of Ray's latest checkpoint (`ray.train.get_checkpoint()`: after a
    worker restart, or a run relaunched with the same name and storage), else of `checkpoint` (a `ray.train.Checkpoint`
    of an earlier run, e.g. its `Result.checkpoint` passed in `train_loop_config`: Ray Train's way to start from one),
    copied into the folder `dir` (CheckpointCB's, so its next files are numbered after it); None when there is none (a
    first start). `learn.fit(n, resume=ray_resume_path(dir))` then goes on exactly where the reported run was."""
    train = _require('ray.train', 'ray_resume_path', '"ray[train]"', 'ray')
    ckpt = train.get_checkpoint() or checkpoint
    if ckpt is None: return None
    from ..state import checkpoint_seq
    with ckpt.as_directory() as d:
        files = sorted(p for p in Path(d).iterdir() if checkpoint_seq(p) is not None)
        if not files: raise ValueError(f'ray_resume_path: Ray\'s checkpoint {d} holds no ultraloop checkpoint file; '
                                       f'report checkpoints with RayTrainReportCB()')
        dest = Path(dir) / files[-1].name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f'.{dest.name}.{os.getpid()}.tmp')  # each worker copies it whole, then renames: atomic
        shutil.copy2(files[-1], tmp)
        os.replace(tmp, dest)
    return dest
