"""ProgressCB (no per-batch host read, the loss shown at a bounded rate, the epoch table, the plot), CSVLoggerCB
and TensorBoardCB (rows equal MetricsCB's history)."""
import csv
import os
import re
import sys

import pytest
import torch
from conftest import toy_data, toy_model
from sync_count import SyncCounter
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

import ultraloop.callbacks.progress as progress
from ultraloop import (Callback, CSVLoggerCB, DataLoaders, DeviceCB, MetricsCB, ProgressCB, SingleEpochCB, TensorBoardCB,
                       TrainLearner)

os.environ.setdefault('MPLBACKEND', 'Agg')


def learner(n_batches=20, bs=4, cbs=()):
    """n_batches in all: four fifths train, one fifth valid."""
    dls = DataLoaders.from_tensors(*toy_data(n_batches * bs * 4 // 5, n_batches * bs // 5), bs=bs, seed=0)
    metrics = MetricsCB(accuracy=MulticlassAccuracy(num_classes=3, average='micro'))
    return TrainLearner(toy_model(), dls, loss_func=F.cross_entropy, cbs=[DeviceCB('cpu'), metrics, *cbs]), metrics


def reads_in_one_epoch(n_batches):
    learn, _ = learner(n_batches, cbs=[ProgressCB()])
    with SyncCounter() as sc: learn.fit(1)
    return sc


def test_one_loss_read_per_refresh_interval(monkeypatch, capsys):
    looks = iter(range(10**6))
    monkeypatch.setattr(progress, '_clock', lambda: next(looks) * 0.05)  # each look at the clock: 50 ms later
    sc = reads_in_one_epoch(500)  # 400 train + 100 valid batches: 25 s of batches at 1 s refreshes
    shown = [r for r in sc.reads if 'progress.py' in r]
    # a refresh every 20 batches starts a copy that the next refresh reads: 20 + 5 refreshes, less the first of each phase
    assert len(shown) == 20 + 5 - 2 and sc.count == len(shown) + 5, sc.reads  # + accuracy and loss once per phase, the
    # train batches' losses once


def test_host_reads_do_not_grow_with_the_number_of_batches(monkeypatch, capsys):
    monkeypatch.setattr(progress, '_clock', lambda: 0.0)  # time stands still: no refresh falls due
    few, many = reads_in_one_epoch(200), reads_in_one_epoch(500)
    assert few.count == many.count == 5, many.reads  # accuracy and loss once per phase, the train batches' losses once


class RecordLossCB(Callback):
    order = 1

    def before_fit(self, learn): self.losses = []
    def after_batch(self, learn): self.losses.append((learn.epoch, learn.training, learn.iter, learn.loss.item()))


def test_shown_loss_is_an_earlier_batch_loss_read_once_per_refresh(monkeypatch, capsys):
    ticks = iter(range(10**6))
    monkeypatch.setattr(progress, '_clock', lambda: float(next(ticks)))  # one second per look at the clock
    rec, prog = RecordLossCB(), ProgressCB(refresh=10)
    learn, _ = learner(100, cbs=[prog, rec])  # 80 train + 20 valid batches
    with SyncCounter() as sc: learn.fit(2)
    shown = [r for r in sc.reads if 'progress.py' in r]
    elapsed = next(ticks)
    assert 0 < len(shown) <= elapsed / 10 + 1
    assert len(prog.losses) >= 2 * 80 // 10 - 2
    train = {(e, it): l for e, t, it, l in rec.losses if t}
    for x, v in prog.losses:
        epoch, read_at = divmod(round(x * 80) - 1, 80)  # x is epochs done: the batch after which it was read
        assert v in [train[epoch, i] for i in range(read_at)]  # the loss of an earlier batch of that train phase


def test_table_replaces_the_dicts_and_the_print_comes_back_after(capsys):
    learn, m = learner(20, cbs=[])
    learn.fit(2, cbs=[ProgressCB()])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['accuracy', 'loss', 'epoch', 'train', 'time']
    rows = [l.split() for l in lines[1:]]
    assert [r[:4] for r in rows] == [[f"{h['accuracy']:.3f}", f"{h['loss']:.3f}", str(h['epoch']), h['train']]
                                     for h in m.history]
    learn.fit(1)
    assert capsys.readouterr().out.splitlines()[0].startswith("{'accuracy': ")


def test_an_overridden_log_is_left_alone(capsys):
    class ListMetricsCB(MetricsCB):
        def _log(self, d): self.rows.append(d)

    m = ListMetricsCB(accuracy=MulticlassAccuracy(num_classes=3, average='micro'))
    m.rows = []
    dls = DataLoaders.from_tensors(*toy_data(64, 16), bs=8, seed=0)
    TrainLearner(toy_model(), dls, loss_func=F.cross_entropy, cbs=[m, ProgressCB()]).fit(1)
    assert [r['train'] for r in m.rows] == ['train', 'eval']
    assert capsys.readouterr().out == ''


def test_plot_is_saved_after_fit_even_when_cancelled(tmp_path, capsys):
    path = tmp_path / 'loss.png'
    learn, _ = learner(20, cbs=[ProgressCB(plot=True, refresh=0, path=path), SingleEpochCB()])
    learn.fit(3)
    assert path.stat().st_size > 1000


def test_an_error_in_an_earlier_before_fit_propagates_unchanged(tmp_path, capsys):
    class FailCB(Callback):
        order = -10  # its before_fit runs before ProgressCB's
        fail = True
        def before_fit(self, learn):
            if self.fail: raise RuntimeError('bad setup')

    fail, prog, path = FailCB(), ProgressCB(plot=True, path=tmp_path / 'loss.png'), tmp_path / 'loss.png'
    learn, m = learner(20, cbs=[prog, fail])
    with pytest.raises(RuntimeError, match='bad setup'): learn.fit(1)  # in its first fit
    assert not path.exists()
    fail.fail = False
    learn.fit(1)
    fail.fail = True
    with pytest.raises(RuntimeError, match='bad setup'): learn.fit(1)  # in a later fit
    learn.rm_cbs([prog, fail])
    capsys.readouterr()
    learn.fit(1)
    assert capsys.readouterr().out.splitlines()[0].startswith("{'accuracy': ")  # MetricsCB prints its dicts again


def test_epoch_bar_rate_and_eta_count_whole_epochs(monkeypatch, capsys):
    import tqdm.std
    now = [0.0]
    monkeypatch.setattr(tqdm.std, 'time', lambda: now[0])  # the clock tqdm reads: 1 s per train batch, 0.5 s per valid
    prog, shown = ProgressCB(bars=True), []

    class ClockCB(Callback):
        order = 0  # after ProgressCB (-5) has updated the epochs bar
        def after_batch(self, learn): now[0] += 1.0 if learn.training else 0.5
        def before_epoch(self, learn):
            if learn.training and learn.epoch: shown.append(str(prog.mbar))

    learn, _ = learner(20, cbs=[prog, ClockCB()])  # 16 train and 4 valid batches: 18 s an epoch
    learn.fit(3)
    assert [re.search(r'\d/\d \[.*\]$', s).group() for s in shown] == ['1/3 [00:18<00:36, 18.00s/epoch]',
                                                                      '2/3 [00:36<00:18, 18.00s/epoch]']


def test_without_a_terminal_each_phase_is_one_line(capsys):
    dls = DataLoaders.from_tensors(*toy_data(32, 16), bs=8, seed=0)
    learn = TrainLearner(toy_model(), dls, loss_func=F.cross_entropy, cbs=[ProgressCB()])  # no MetricsCB: its own line
    learn.fit(2)
    out, err = capsys.readouterr()
    assert err == ''  # stderr is not a terminal here: no bar
    assert re.fullmatch(r'train epoch 0: 4 batches, loss \d\.\d{4}, 00:00\nvalid epoch 0: 2 batches, loss \d\.\d{4}, 00:00\n'
                        r'train epoch 1: 4 batches, loss \d\.\d{4}, 00:00\nvalid epoch 1: 2 batches, loss \d\.\d{4}, 00:00\n',
                        out)
    learn.fit(1, cbs=[MetricsCB()])
    assert capsys.readouterr().out.splitlines()[0].split() == ['loss', 'epoch', 'train', 'time']  # the table's rows instead


def test_csv_floats_are_written_as_their_float32_value(tmp_path, capsys):
    class Exact:
        """A metric whose value is float32's 1.0000001 (1 + 2**-23), which a float prints as 1.0000001192092896."""
        def reset(self): pass
        def update(self, p, y): pass
        def compute(self): return torch.tensor(1 + 2**-23, dtype=torch.float32)

    dls = DataLoaders.from_tensors(*toy_data(16, 8), bs=8, seed=0)
    m = MetricsCB(exact=Exact())
    learn = TrainLearner(toy_model(), dls, loss_func=F.cross_entropy, cbs=[m, CSVLoggerCB(tmp_path / 'h.csv')])
    learn.fit(1)
    assert m.history[0]['exact'] == 1.0000001192092896
    assert [r[0] for r in read_csv(tmp_path / 'h.csv')[1:]] == ['1.0000001', '1.0000001']


def test_progress_arguments_are_checked():
    with pytest.raises(ValueError, match=r'ProgressCB: refresh \(seconds between loss reads\) must be a number >= 0, got -1'):
        ProgressCB(refresh=-1)


def test_missing_tqdm_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, 'tqdm.auto', None)
    with pytest.raises(ImportError, match='ProgressCB needs tqdm: pip install tqdm'): ProgressCB()


def read_csv(path):
    with open(path, newline='') as f: return list(csv.reader(f))


def test_csv_has_one_row_per_phase_flushed_as_written_and_appends_on_resume(tmp_path, capsys):
    path = tmp_path / 'logs' / 'history.csv'
    seen = []

    class PeekCB(Callback):
        order = 20  # after the logger has written the phase's row
        def after_epoch(self, learn): seen.append(len(read_csv(path)))

    learn, m = learner(20, cbs=[CSVLoggerCB(path), PeekCB()])
    learn.fit(2)
    assert seen == [2, 3, 4, 5]  # header + one row per phase, on disk as each phase ends
    rows = read_csv(path)
    assert rows[0] == ['accuracy', 'loss', 'epoch', 'train']
    f32 = lambda v: torch.tensor(float(v), dtype=torch.float32).item()  # the CSV keeps each float's float32 value
    assert [[f32(r[0]), f32(r[1]), r[2], r[3]] for r in rows[1:]] == [[f32(h['accuracy']), f32(h['loss']), str(h['epoch']),
                                                                      h['train']] for h in m.history]
    learn2, m2 = learner(20, cbs=[CSVLoggerCB(path)])
    learn2.fit(1)
    rows2 = read_csv(path)
    assert rows2[:5] == rows and len(rows2) == 7 and rows2[5][3] == 'train'


def test_csv_with_other_columns_is_refused_before_any_batch(tmp_path, capsys):
    path = tmp_path / 'h.csv'
    path.write_text('acc,loss,epoch,train\n0.5,1.0,0,train\n')
    learn, m = learner(20, cbs=[])
    with pytest.raises(ValueError, match=r"h.csv has the columns \['acc', 'loss', 'epoch', 'train'\], this run logs "
                                         r"\['accuracy', 'loss', 'epoch', 'train'\]: pass another path"):
        learn.fit(1, cbs=[CSVLoggerCB(path)])
    assert m.history == []
    assert path.read_text() == 'acc,loss,epoch,train\n0.5,1.0,0,train\n'
    learn.fit(1, cbs=[CSVLoggerCB(tmp_path / 'new.csv')])
    assert len(read_csv(tmp_path / 'new.csv')) == 3


def test_csv_paths_that_cannot_be_written_are_refused_at_construction(tmp_path):
    (tmp_path / 'notes.txt').write_text('x')
    with pytest.raises(ValueError, match='is a folder; give the path of a .csv file'): CSVLoggerCB(tmp_path)
    with pytest.raises(ValueError, match=r'notes.txt is a file, so .* cannot be written'):
        CSVLoggerCB(tmp_path / 'notes.txt' / 'h.csv')


def test_loggers_need_metrics(tmp_path):
    dls = DataLoaders.from_tensors(*toy_data(16, 8), bs=8, seed=0)
    learn = TrainLearner(toy_model(), dls, loss_func=F.cross_entropy, cbs=[CSVLoggerCB(tmp_path / 'h.csv')])
    with pytest.raises(ValueError, match=r'CSVLoggerCB writes the rows MetricsCB computes; add MetricsCB\(...\) to cbs'):
        learn.fit(1)


def test_tensorboard_event_file_holds_the_history(tmp_path, capsys):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    learn, m = learner(20, cbs=[TensorBoardCB(tmp_path / 'runs')])
    learn.fit(2)
    files = list((tmp_path / 'runs').glob('events.out.tfevents.*'))
    assert len(files) == 1
    ea = EventAccumulator(str(files[0]))
    ea.Reload()
    for key in ('accuracy', 'loss'):
        for phase in ('train', 'eval'):
            got = [(s.step, s.value) for s in ea.Scalars(f'{key}/{phase}')]
            want = [(h['epoch'], h[key]) for h in m.history if h['train'] == phase]
            assert [s for s, _ in got] == [s for s, _ in want]
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_missing_tensorboard_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    with pytest.raises(ImportError, match=r'TensorBoardCB needs tensorboard: pip install tensorboard'): TensorBoardCB()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_shown_loss_on_cuda_comes_from_a_finished_copy(capsys):
    dls = DataLoaders.from_tensors(*toy_data(800, 160), bs=4, seed=0, device='cuda')
    prog, rec = ProgressCB(refresh=0), RecordLossCB()
    TrainLearner(toy_model(), dls, loss_func=F.cross_entropy, cbs=[DeviceCB('cuda'), prog, rec]).fit(1)
    train = {l for e, t, it, l in rec.losses if t}
    assert prog.losses and all(v in train for _, v in prog.losses)
