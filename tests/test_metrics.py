"""MetricsCB: values equal a hand computation over the same predictions (uneven last batch included), whatever the
chunking; the seed's dict; history; generic metric objects; no host read per batch; learn.plot_metrics."""
import os

import pytest
import torch
from conftest import toy_data, toy_model
from sync_count import SyncCounter
from torch.nn import functional as F
from torcheval.metrics import MulticlassAccuracy as EvalAccuracy
from torchmetrics.classification import MulticlassAccuracy

from ultraloop import Callback, DataLoaders, DeviceCB, Learner, MetricsCB, TrainLearner

os.environ.setdefault('MPLBACKEND', 'Agg')


class RecordCB(Callback):
    """Keeps copies of each batch's predictions, targets and loss, phase by phase (a test may sync)."""
    order = 1

    def before_fit(self, learn): self.phases = []
    def before_epoch(self, learn): self.phases.append([])
    def after_batch(self, learn):
        p = learn.preds[0] if isinstance(learn.preds, tuple) else learn.preds
        self.phases[-1].append((p.detach().clone(), learn.batch[1].clone(), learn.loss.item(), len(learn.batch[1])))


def by_hand(phase):
    n = sum(b[3] for b in phase)
    correct = sum(int((p.argmax(1) == y).sum()) for p, y, _, _ in phase)
    loss = sum(l * k for _, _, l, k in phase) / n
    return correct / n, loss


def fit(metrics_cb, n_train=100, n_valid=50, bs=32, epochs=2, learner=TrainLearner):
    rec = RecordCB()
    dls = DataLoaders.from_tensors(*toy_data(n_train, n_valid), bs=bs, seed=0)
    learn = learner(toy_model(), dls, loss_func=F.cross_entropy, lr=0.1, cbs=[DeviceCB('cpu'), metrics_cb, rec])
    learn.fit(epochs)
    return learn, rec


@pytest.mark.parametrize('buffer_bytes', [0, 3000, MetricsCB.buffer_bytes])  # update per batch, per ~2 batches, per phase
def test_values_equal_hand_computation_with_uneven_last_batch(buffer_bytes, capsys):
    m = MetricsCB(accuracy=MulticlassAccuracy(num_classes=3, average='micro'), seed_acc=EvalAccuracy())
    m.buffer_bytes = buffer_bytes
    learn, rec = fit(m)  # train batches 32, 32, 32, 4; valid 32, 18
    assert [[b[3] for b in ph] for ph in rec.phases[:2]] == [[32, 32, 32, 4], [32, 18]]
    assert len(m.history) == len(rec.phases) == 4
    printed = capsys.readouterr().out.splitlines()
    for i, (row, phase) in enumerate(zip(m.history, rec.phases)):
        acc, loss = by_hand(phase)
        assert row['accuracy'] == pytest.approx(acc, abs=1e-6)
        assert row['seed_acc'] == pytest.approx(acc, abs=1e-6)
        assert row['loss'] == pytest.approx(loss, rel=1e-6)
        expected = {'accuracy': f'{acc:.3f}', 'seed_acc': f'{acc:.3f}', 'loss': f'{loss:.3f}',
                    'epoch': i // 2, 'train': 'train' if i % 2 == 0 else 'eval'}
        assert printed[i] == str(expected)


def test_history_holds_numbers_per_phase_and_restarts_each_fit(capsys):
    m = MetricsCB(accuracy=MulticlassAccuracy(num_classes=3, average='micro'))
    learn, _ = fit(m, epochs=2)
    assert learn.metrics is m
    assert [(r['epoch'], r['train']) for r in m.history] == [(0, 'train'), (0, 'eval'), (1, 'train'), (1, 'eval')]
    assert all(list(r) == ['accuracy', 'loss', 'epoch', 'train'] == m.columns for r in m.history)
    assert all(type(r['accuracy']) is float and type(r['loss']) is float for r in m.history)
    learn.fit(1)
    assert [(r['epoch'], r['train']) for r in m.history] == [(0, 'train'), (0, 'eval')]


def test_positional_metrics_are_named_after_their_class(capsys):
    m = MetricsCB(EvalAccuracy())
    fit(m, epochs=1)
    assert list(m.history[0]) == ['MulticlassAccuracy', 'loss', 'epoch', 'train']


class CountMetric:
    """A plain object with update/compute/reset and no .to: counts the samples and sums the targets it saw."""
    def __init__(self): self.reset()
    def reset(self): self.n, self.total = 0, 0
    def update(self, p, y): self.n += len(y); self.total += sum(len(o) for o in p)
    def compute(self): return float(self.n)


def test_generic_metric_object_and_preds_that_are_not_tensors(capsys):
    class PairLearner(TrainLearner):  # preds a tuple: updated as they come
        def predict(self): self.preds = (self.model(self.batch[0]),)
        def get_loss(self): self.loss = self.loss_func(self.preds[0], self.batch[1])

    m = MetricsCB(n=CountMetric())
    fit(m, n_train=100, n_valid=50, epochs=1, learner=PairLearner)
    assert [r['n'] for r in m.history] == [100.0, 50.0]
    assert capsys.readouterr().out.splitlines()[0] == "{'n': '100.000', 'loss': " + repr(f"{m.history[0]['loss']:.3f}") \
        + ", 'epoch': 0, 'train': 'train'}"


def test_predictions_that_do_not_concatenate_are_updated_one_batch_at_a_time(capsys):
    class VarLenLearner(TrainLearner):  # each batch's preds have their own width, as sequences of varying length
        def predict(self):
            out = self.model(self.batch[0])
            self.preds = out.repeat(1, 1 + self.iter)

    seen = []

    class WidthMetric(CountMetric):
        def update(self, p, y): seen.append(p.shape[1])

    fit(MetricsCB(w=WidthMetric()), n_train=96, n_valid=32, epochs=1, learner=VarLenLearner)
    assert seen == [3, 6, 9, 3]


def test_metrics_follow_the_batch_device():
    moved = []

    class DeviceMetric(CountMetric):
        def to(self, device): moved.append(torch.device(device)); return self

    learn, _ = fit(MetricsCB(d=DeviceMetric()), epochs=2)
    assert moved == [torch.device('cpu')]  # before the first update of the fit
    learn.fit(1)
    assert moved == [torch.device('cpu')] * 2


class StaticBufferLearner(TrainLearner):
    """Writes targets (and valid predictions) into the same tensors every batch, as a CUDA-graph replay does."""
    def predict(self):
        out = self.model(self.batch[0])
        if not hasattr(self, 'y_buf'):
            self.y_buf, self.p_buf = torch.empty_like(self.batch[1]), torch.empty_like(out.detach())
        self.batch[1] = self.y_buf.copy_(self.batch[1])
        self.preds = out if self.training else self.p_buf.copy_(out)  # train preds keep their graph for backward


def test_outputs_written_in_place_are_counted_exactly():
    # each batch is copied into MetricsCB's buffer, so a step that reuses its output tensors loses nothing
    m = MetricsCB(accuracy=MulticlassAccuracy(num_classes=3, average='micro'))
    learn, rec = fit(m, n_train=128, n_valid=64, bs=32, epochs=1, learner=StaticBufferLearner)
    for row, phase in zip(m.history, rec.phases):
        assert row['accuracy'] == pytest.approx(by_hand(phase)[0], abs=1e-6)


def test_no_host_read_per_batch_one_per_metric_per_phase(capsys):
    dls = DataLoaders.from_tensors(*toy_data(2000, 500), bs=10, seed=0)  # 200 + 50 batches
    m = MetricsCB(accuracy=MulticlassAccuracy(num_classes=3, average='micro'), seed_acc=EvalAccuracy())
    learn = TrainLearner(toy_model(), dls, loss_func=F.cross_entropy, cbs=[DeviceCB('cpu'), m])
    with SyncCounter() as sc: learn.fit(1)
    assert sc.count == 7, sc.reads  # accuracy, seed_acc, loss: each read once per phase; the train batches' losses once


def test_bad_metrics_are_refused_at_construction():
    with pytest.raises(TypeError, match="metric 'acc' is a int without update/compute/reset"): MetricsCB(acc=3)
    with pytest.raises(ValueError, match="tracks 'loss' itself"): MetricsCB(loss=EvalAccuracy())
    with pytest.raises(TypeError, match=f"metric 'acc' is the class {EvalAccuracy.__name__}; pass an instance"):
        MetricsCB(acc=EvalAccuracy)


def test_batches_without_targets_are_named():
    class XOnlyLearner(TrainLearner):
        def get_loss(self): self.loss = self.preds.sum()

    dls = DataLoaders([[torch.randn(4, 8)]], [[torch.randn(4, 8)]])
    learn = XOnlyLearner(toy_model(), dls, cbs=[MetricsCB()])
    with pytest.raises(TypeError, match=r'MetricsCB reads the targets as batch\[1\], but the batch is a list without one'):
        learn.fit(1)
    learn.rm_cb(learn.metrics)
    learn.fit(1)  # still usable


def test_plot_metrics_saves_a_png(tmp_path, capsys):
    learn, _ = fit(MetricsCB(accuracy=EvalAccuracy()), epochs=2)
    path = learn.plot_metrics(tmp_path / 'm.png')
    assert path == tmp_path / 'm.png' and path.stat().st_size > 1000


def test_metrics_plot_shows_each_training_batch_loss_on_the_epochs_trained_axis(monkeypatch, capsys):
    import ultraloop.plotting
    from ultraloop.callbacks.progress import _loss_figure
    figs = []
    monkeypatch.setattr(ultraloop.plotting, 'show_or_save', lambda fig, path, name: figs.append(fig))
    learn, rec = fit(MetricsCB(accuracy=EvalAccuracy()), n_train=96, n_valid=32, bs=32, epochs=2)  # 3 train batches
    learn.plot_metrics()
    acc, loss = figs[0].axes
    lines = {ln.get_label(): ln for ln in loss.get_lines()}
    train = [b for ph in rec.phases[::2] for b in ph]
    assert list(lines['train (each batch)'].get_xdata()) == [e + i / 3 for e in (0, 1) for i in (1, 2, 3)]
    assert list(lines['train (each batch)'].get_ydata()) == pytest.approx([b[2] for b in train], abs=1e-6)
    for ph, rows in (('train', learn.metrics.history[::2]), ('eval', learn.metrics.history[1::2])):
        assert list(lines[f'{ph} (phase mean)'].get_xdata()) == [1, 2]  # epoch 0's row where epoch 0 ended
        assert list(lines[f'{ph} (phase mean)'].get_ydata()) == [r['loss'] for r in rows]
    assert [ln.get_label() for ln in acc.get_lines()] == ['train', 'eval'] and list(acc.get_lines()[0].get_xdata()) == [1, 2]
    assert loss.get_xlabel() == acc.get_xlabel() == 'epochs trained'
    prog = _loss_figure([], learn.metrics.history).axes[0]  # ProgressCB's plot numbers epochs the same way
    assert prog.get_xlabel() == 'epochs trained' and list(prog.get_lines()[0].get_xdata()) == [1, 2]


def test_plot_metrics_without_metrics_says_what_to_do():
    learn = Learner(toy_model())
    with pytest.raises(ValueError, match='fit with a MetricsCB first'): learn.plot_metrics()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_no_sync_in_the_batch_loop_on_cuda(capsys):
    class SyncErrorCB(Callback):
        """Makes any host-device sync an error from the first batch to the end of each phase's batches."""
        order = -1000

        def before_batch(self, learn):
            if learn.iter == 0: torch.cuda.set_sync_debug_mode('error')
        def after_epoch(self, learn): torch.cuda.set_sync_debug_mode(0)
        def cleanup_epoch(self, learn): torch.cuda.set_sync_debug_mode(0)

    from ultraloop import ProgressCB
    dls = DataLoaders.from_tensors(*toy_data(2000, 500), bs=10, seed=0, device='cuda')
    m = MetricsCB(accuracy=MulticlassAccuracy(num_classes=3, average='micro'), seed_acc=EvalAccuracy())
    learn = TrainLearner(toy_model(), dls, loss_func=F.cross_entropy, cbs=[DeviceCB('cuda'), m, ProgressCB(), SyncErrorCB()])
    learn.fit(2)
    assert len(m.history) == 4
