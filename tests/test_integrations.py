"""The integrations with the real libraries: W&B (offline, its run file read back), MLflow (a local SQLite store),
Optuna (an in-memory study), and Ray Train through a stand-in of `ray.train`; CheckpointCB's hand-over of its files;
`ultraloop fit --log`. The libraries are heavy to import, so each test imports what it uses."""
import json
import struct
import sys
import time
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import toy_data, toy_model
from torch.nn import functional as F

from ultraloop import Callback, CheckpointCB, DataLoaders, MetricsCB, TrainLearner, state


def _learner(*cbs, seed=0):
    from torchmetrics.classification import MulticlassAccuracy
    dls = DataLoaders.from_tensors(*toy_data(), bs=16, seed=seed)  # 4 train batches, 2 valid ones an epoch
    return TrainLearner(toy_model(seed=seed), dls, F.cross_entropy, lr=0.3,
                        cbs=[MetricsCB(accuracy=MulticlassAccuracy(num_classes=3, average='micro')), *cbs])


def _expected_rows(history: list[dict]) -> list[dict]:
    """MetricsCB's rows as the trackers name them: `<phase>_<name>` and the epoch."""
    return [{**{f'{"train" if r["train"] == "train" else "valid"}_{k}': v for k, v in r.items() if k not in ('epoch', 'train')},
             'epoch': r['epoch']} for r in history]


def _history_in(path) -> list[dict]:
    """The MetricsCB rows a checkpoint file holds."""
    return next(s for name, s in state.load_file(path)['callbacks'] if name == 'MetricsCB')['history']


class Handed(Callback):
    """Records CheckpointCB's hand-over, and that each file is complete (it loads) when it is handed over."""
    def __init__(self, order): self.order, self.got = order, []

    def log_checkpoint(self, learn, path, best):
        self.got.append((Path(path).name, best, len(_history_in(path))))


def test_checkpoint_hands_each_written_file_over_whatever_the_order(tmp_path):
    first, last = Handed(-100), Handed(100)
    ck = CheckpointCB(tmp_path / 'ck', every_batches=3, keep=1, monitor='valid_loss')
    learn = _learner(first, ck, last)
    names = []
    learn.add_cb(type('Names', (Callback,), {'order': 60, 'after_epoch': lambda self, learn: names.append(ck.last_path.name)})())
    learn.fit(3)
    assert first.got == last.got and len(first.got) == 3 + 4  # 3 epoch ends, every 3rd of 12 train batches
    assert [n for n, _, _ in first.got if 'train0' in n] == names[1::2]  # each epoch end's file, when CheckpointCB wrote it
    vl = [r['loss'] for r in learn.metrics.history if r['train'] == 'eval']
    bests = [all(v < w for w in vl[:i]) for i, v in enumerate(vl)]
    assert [b for n, b, _ in first.got if 'train0' in n] == bests and not any(b for n, b, _ in first.got if 'train0' not in n)
    assert [h for n, _, h in first.got if 'train0' in n] == [2, 4, 6]  # each file whole: it loads, with its rows


def _wandb_records(path: Path) -> list:
    """The records of a W&B run file (.wandb): a 7-byte header, then LevelDB-style log blocks of 32 KiB, each record in
    chunks (4-byte checksum, 2-byte length, 1-byte type: 1 whole, 2 first, 3 middle, 4 last) of wandb's protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, out, buf, pos = path.read_bytes(), [], b'', 7
    assert data[:4] == b':W&B'
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7: pos += left; continue  # a block's tail too short for a chunk header is padding
        _, n, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if kind == 0: pos += left; continue
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r); buf = b''
    return out


def _finished_wandb_records(path: Path, timeout: float = 60) -> list:
    """The run file's records once they end with the run's exit record: wandb's writer process may still be writing the
    file for a moment after `run.finish()` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        try: recs = _wandb_records(path)
        except Exception:  # a record half written  # noqa: BLE001
            if time.monotonic() > deadline: raise
            recs = []
        if any(r.WhichOneof('record_type') == 'exit' for r in recs) or time.monotonic() > deadline: return recs
        time.sleep(0.1)


def test_wandb_offline_run_holds_every_row_batch_loss_and_the_hyper_parameters(tmp_path, monkeypatch):
    from ultraloop import WandbCB
    for k, v in {'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true'}.items(): monkeypatch.setenv(k, v)
    ck = CheckpointCB(tmp_path / 'ck', monitor='valid_accuracy', mode='max')
    learn = _learner(ck, WandbCB(project='p', name='r', config={'note': 'x', 'bs': 'sixteen'}, log_checkpoints=True))
    learn.fit(3)
    run_file, = tmp_path.glob('wandb/offline-run-*/run-*.wandb')
    recs = _finished_wandb_records(run_file)
    hist = [{i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in recs if r.WhichOneof('record_type') == 'history']
    m = learn.metrics
    rows = [{k: v for k, v in h.items() if k.startswith(('train_', 'valid_', 'epoch')) and k != 'train_batch_loss'}
            for h in hist if 'epoch' in h]
    assert rows == _expected_rows(m.history) and len(rows) == 6
    assert [(h['batch'], h['train_batch_loss']) for h in hist if 'batch' in h] == \
        [(i + 1, v) for i, (_, v) in enumerate(m.batch_losses)] and len(m.batch_losses) == 12
    image, = [h for h in hist if 'metrics/_type' in h]
    assert image['metrics/_type'] == 'image-file' and (run_file.parent / 'files' / image['metrics/path']).stat().st_size > 1000
    config = {i.key: json.loads(i.value_json) for r in recs for i in
              (r.run.config.update if r.WhichOneof('record_type') == 'run' else
               r.config.update if r.WhichOneof('record_type') == 'config' else [])}
    assert {k: config[k] for k in ('model', 'n_params', 'opt', 'lr', 'opt_momentum', 'bs', 'epochs', 'note')} == \
        {'model': 'Sequential', 'n_params': 8 * 16 + 16 + 16 * 3 + 3, 'opt': 'SGD', 'lr': 0.3, 'opt_momentum': 0, 'bs': 'sixteen',
         'epochs': 3, 'note': 'x'}  # the user's config wins over the learner's
    assert config['callbacks'] == [repr(cb) for cb in learn.cbs]
    art, = [r.artifact for r in recs if r.WhichOneof('record_type') == 'artifact' and r.artifact.type == 'model']
    assert [e.path for e in art.manifest.contents] == [ck.best_path.name] and 'best' in art.aliases
    assert [r.exit.exit_code for r in recs if r.WhichOneof('record_type') == 'exit'] == [0]


@pytest.fixture(scope='module')
def mlflow_db(tmp_path_factory):
    """One SQLite tracking store for the module's tests: making its tables takes seconds."""
    return f'sqlite:///{tmp_path_factory.mktemp("mlflow")}/mlflow.db'


def _mlflow_runs(uri: str, experiment: str):
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id], order_by=['start_time'])


def test_mlflow_sqlite_store_holds_every_row_batch_loss_params_artifacts_and_the_status(tmp_path, monkeypatch, mlflow_db):
    from ultraloop import MLflowCB
    monkeypatch.chdir(tmp_path)  # the artifacts' default root
    ck = CheckpointCB(tmp_path / 'ck', monitor='valid_loss')
    learn = _learner(ck, MLflowCB(tracking_uri=mlflow_db, experiment='exp', run_name='r', log_checkpoints=True))
    learn.fit(3)
    client, (run,) = _mlflow_runs(mlflow_db, 'exp')
    m = learn.metrics
    for row in _expected_rows(m.history):
        for k, v in row.items():
            if k != 'epoch': assert [(h.step, h.value) for h in client.get_metric_history(run.info.run_id, k)
                                     if h.step == row['epoch']] == [(row['epoch'], v)]
    assert set(run.data.metrics) == {k for r in _expected_rows(m.history) for k in r if k != 'epoch'} | {'train_batch_loss'}
    assert [(h.step, h.value) for h in sorted(client.get_metric_history(run.info.run_id, 'train_batch_loss'),
                                               key=lambda h: h.step)] == [(i + 1, v) for i, (_, v) in enumerate(m.batch_losses)]
    p = run.data.params
    assert (p['opt'], p['lr'], p['bs'], p['epochs'], p['model'], p['callbacks']) == \
        ('SGD', '0.3', '16', '3', 'Sequential', str([repr(cb) for cb in learn.cbs]))
    assert run.info.status == 'FINISHED' and run.info.run_name == 'r'
    arts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for a in client.list_artifacts(run.info.run_id, 'checkpoints')}
    assert arts == {'metrics.png', 'checkpoints', f'checkpoints/{ck.best_path.name}'}

    class Boom(Callback):
        def after_batch(self, learn):
            if learn.epoch == 1: raise RuntimeError('boom')
    with pytest.raises(RuntimeError, match='boom'): learn.fit(3, cbs=[Boom()])
    _, (_, failed) = _mlflow_runs(mlflow_db, 'exp')
    assert failed.info.status == 'FAILED'  # with the rows of the epoch that finished
    assert {k: v for k, v in failed.data.metrics.items() if k != 'train_batch_loss'} == \
        {k: v for r in _expected_rows(learn.metrics.history) for k, v in r.items() if k != 'epoch'}


def test_only_the_main_process_logs(tmp_path, monkeypatch, mlflow_db):
    from ultraloop import MLflowCB, WandbCB
    monkeypatch.setenv('WANDB_MODE', 'offline'); monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    monkeypatch.setenv('RANK', '1'); monkeypatch.setenv('WORLD_SIZE', '2')  # as torchrun sets them for a second process
    learn = _learner(WandbCB(), MLflowCB(tracking_uri=mlflow_db, experiment='other'))
    learn.fit(1)
    from mlflow import MlflowClient
    assert list(tmp_path.iterdir()) == [] and MlflowClient(mlflow_db).get_experiment_by_name('other') is None


def test_optuna_prunes_a_diverging_trial_after_cleanup_and_completes_a_good_one():
    import optuna
    from ultraloop import OptunaPruningCB
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    histories, cleaned = {}, []

    class Cleanup(Callback):
        def cleanup_fit(self, learn): cleaned.append(len(learn.metrics.history))

    def objective(trial):
        lr = trial.suggest_float('lr', 1e-3, 1e4, log=True)
        learn = _learner(Cleanup())
        histories[trial.number] = learn.cbs[0]  # its MetricsCB
        learn.fit_one_cycle(4, lr_max=lr, cbs=[OptunaPruningCB(trial)])
        return learn.metrics.history[-1]['loss']

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    study.enqueue_trial({'lr': 0.3}); study.enqueue_trial({'lr': 3e3})
    study.optimize(objective, n_trials=2)
    good, bad = study.trials
    assert good.state == optuna.trial.TrialState.COMPLETE and bad.state == optuna.trial.TrialState.PRUNED
    valid = {n: [r['loss'] for r in histories[n].history if r['train'] == 'eval'] for n in (0, 1)}
    assert good.intermediate_values == dict(enumerate(valid[0])) and len(valid[0]) == 4
    assert bad.intermediate_values == {e: v for e, v in enumerate(valid[1]) if v == v} and len(valid[1]) < 4
    assert cleaned == [8, 2 * len(valid[1])]  # the pruned fit ran every callback's cleanup_fit before TrialPruned


FAKE_RAY = '''
"""A stand-in of ray.train for the tests: report() keeps a copy of the checkpoint's folder, as Ray persists it."""
import contextlib, shutil, tempfile
reports, resume_from, storage = [], None, None

class Checkpoint:
    def __init__(self, path): self.path = str(path)
    @classmethod
    def from_directory(cls, path): return cls(path)
    @contextlib.contextmanager
    def as_directory(self): yield self.path

def report(metrics, checkpoint=None):
    kept = None
    if checkpoint is not None:
        kept = Checkpoint(tempfile.mkdtemp(dir=storage))
        shutil.copytree(checkpoint.path, kept.path, dirs_exist_ok=True)
    reports.append((dict(metrics), kept))

def get_checkpoint(): return resume_from
'''


@pytest.fixture
def fake_ray(tmp_path, monkeypatch):
    (tmp_path / 'fake' / 'ray' / 'train').mkdir(parents=True)
    (tmp_path / 'fake' / 'ray' / '__init__.py').write_text('')
    (tmp_path / 'fake' / 'ray' / 'train' / '__init__.py').write_text(textwrap.dedent(FAKE_RAY))
    for m in ('ray', 'ray.train'): monkeypatch.delitem(sys.modules, m, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / 'fake'))
    import ray.train
    ray.train.storage = tmp_path / 'storage'
    ray.train.storage.mkdir()
    yield ray.train
    for m in ('ray', 'ray.train'): sys.modules.pop(m, None)


def test_ray_reports_each_epoch_with_its_checkpoint_and_resumes_from_ray_exactly(tmp_path, fake_ray):
    from ultraloop import RayTrainReportCB, ray_resume_path
    learn = _learner(RayTrainReportCB(), CheckpointCB(tmp_path / 'ck', every_batches=3))
    learn.fit(3)
    merged = [{**a, **b} for a, b in zip(_expected_rows(learn.metrics.history)[::2], _expected_rows(learn.metrics.history)[1::2])]
    assert [m for m, _ in fake_ray.reports] == merged
    for e, (_, ck) in enumerate(fake_ray.reports):  # each the epoch end's file, alone in its folder
        f, = Path(ck.path).iterdir()
        assert f.name.endswith(f'-epoch{e + 1}-train0.pt') and _history_in(f) == \
            learn.metrics.history[:2 * e + 2]

    assert ray_resume_path(tmp_path / 'ck2') is None  # a first start: Ray has no checkpoint
    given = ray_resume_path(tmp_path / 'ck3', checkpoint=fake_ray.reports[0][1])  # an earlier run's, passed in the config
    assert given.parent == tmp_path / 'ck3' and _history_in(given) == learn.metrics.history[:2]
    fake_ray.resume_from, fake_ray.reports[:] = fake_ray.reports[1][1], []
    again = _learner(RayTrainReportCB(), CheckpointCB(tmp_path / 'ck2', every_batches=3))
    path = ray_resume_path(tmp_path / 'ck2')
    assert path.parent == tmp_path / 'ck2' and path.name.endswith('-epoch2-train0.pt')
    again.fit(3, resume=path)
    assert again.metrics.history == learn.metrics.history and [m for m, _ in fake_ray.reports] == merged[2:]
    for a, b in zip(again.model.parameters(), learn.model.parameters()): assert torch.equal(a, b)


def test_import_ultraloop_imports_no_integration_library():
    import subprocess
    from conftest import cpu_child_env
    code = 'import sys, ultraloop; print(sorted(m for m in ("wandb", "mlflow", "optuna", "ray") if m in sys.modules))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=cpu_child_env())
    assert out.stdout == '[]\n', out.stderr


def test_missing_library_is_a_one_line_error_naming_the_install(monkeypatch):
    from ultraloop import MLflowCB, WandbCB
    for m in ('wandb', 'mlflow'): monkeypatch.setitem(sys.modules, m, None)  # as if not installed
    with pytest.raises(ImportError, match=r'^WandbCB needs wandb: pip install wandb \(or "ultraloop\[wandb\]"\)$'): WandbCB()
    with pytest.raises(ImportError, match=r'^MLflowCB needs mlflow: pip install mlflow'): MLflowCB()


def test_fit_command_logs_to_csv_tensorboard_wandb_and_mlflow(tmp_path, monkeypatch, mlflow_db, capsys):
    import csv

    from ultraloop.cli import main
    monkeypatch.setenv('WANDB_MODE', 'offline'); monkeypatch.setenv('WANDB_SILENT', 'true')
    monkeypatch.setenv('MLFLOW_TRACKING_URI', mlflow_db)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / 'run'
    assert main(['fit', '--model', 'mlp', '--epochs', '2', '--threads', '1', '--out', str(run),
                 '--log', 'csv,tensorboard,wandb,mlflow']) == 0
    told = capsys.readouterr().out.splitlines()[-2:]  # where each tracker's run went
    with open(run / 'history.csv', newline='') as f: rows = list(csv.DictReader(f))
    assert [(r['epoch'], r['train']) for r in rows] == [('0', 'train'), ('0', 'eval'), ('1', 'train'), ('1', 'eval')]
    assert len(list((run / 'tensorboard').glob('events.out.tfevents.*'))) == 1
    client, found = _mlflow_runs(mlflow_db, 'Default')
    ml, = [r for r in found if r.info.run_name == 'run']
    f32 = lambda v: struct.unpack('f', struct.pack('f', float(v)))[0]  # the CSV holds float32's shortest digits
    for r in rows:
        p = 'train' if r['train'] == 'train' else 'valid'
        for k in ('loss', 'accuracy'):
            v, = [h.value for h in client.get_metric_history(ml.info.run_id, f'{p}_{k}') if h.step == int(r['epoch'])]
            assert f32(v) == f32(r[k])
    p = ml.data.params
    assert (p['model'], p['epochs'], p['opt'], p['n_params']) == ('mlp', '2', 'adamw', str(64 * 128 + 128 + 128 * 10 + 10))
    run_file, = run.glob('wandb/offline-run-*/run-*.wandb')
    last = {i.key or '/'.join(i.nested_key): json.loads(i.value_json)
            for r in _finished_wandb_records(run_file) if r.WhichOneof('record_type') == 'history' for i in r.history.item}
    assert {k: v for k, v in last.items() if k[:6] in ('train_', 'valid_')} == ml.data.metrics  # each one's last value
    assert told == [f'WandbCB: {run_file.parent / "files"}', f'MLflowCB: run {ml.info.run_id} on {mlflow_db}']


@pytest.mark.parametrize('names, error', [('csv,neptune', "unknown logger 'neptune'; choose from csv,tensorboard,wandb,mlflow"),
                                          ('csv,mlflow', 'mlflow needs the mlflow package: pip install mlflow')])
def test_log_option_refuses_an_unknown_name_or_a_missing_library_before_any_work(names, error, capsys, monkeypatch):
    from ultraloop.cli import main
    monkeypatch.setitem(sys.modules, 'mlflow', None)  # as if not installed
    with pytest.raises(SystemExit) as e: main(['fit', '--log', names])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == \
        f'ultraloop fit: error: argument --log: {error} (see ultraloop fit --help)'
