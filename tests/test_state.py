"""The learner's state in one place: loaders that go on at batch k, resume in-process, safe and atomic checkpoint files,
CheckpointCB and EarlyStoppingCB, ctrl-C deferred to the batch's end, and lr_find and summary leaving it all as it was."""
import os
import pickle
import random
import signal
import threading
from functools import partial

import numpy as np
import pytest
import torch
from conftest import assert_same
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from ultraloop import (BatchSchedCB, Callback, CheckpointCB, DataLoaders, EarlyStoppingCB, GradientAccumulationCB,
                       MetricsCB, MixedPrecisionCB, TensorLoader, TrainLearner, state)


class Quiet(MetricsCB):
    def _log(self, d): pass


class Counted(Dataset):
    """A map-style dataset that counts the samples read."""
    def __init__(self, x, y): self.x, self.y, self.reads = x, y, 0
    def __len__(self): return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


class SnapAt(Callback):
    """Keeps a copy of the learner's state at the end of its `at`-th training batch, then ends the fit."""
    order = 60
    def __init__(self, at): self.at, self.n, self.sd = at, 0, None

    def cleanup_batch(self, learn):
        if learn.training:
            self.n += 1
            if self.n == self.at:
                self.sd = state.cpu_copy(learn.state_dict())
                raise KeyboardInterrupt  # stands for a kill: nothing after this batch runs


class Jitter(Callback):
    """Augmentation drawing from Python's and numpy's RNGs, which a resume must put back too."""
    def before_batch(self, learn):
        if learn.training: learn.batch[0] = learn.batch[0] + 0.01 * (random.random() + np.random.rand())


def data(n=40):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + 16, 8, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    return x[:n], y[:n], x[n:], y[n:]


def make(dls=None, cbs=(), ckdir=None, every=None, **kw):
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 2))
    cbs = [Quiet(acc=MulticlassAccuracy(num_classes=2)), *cbs]
    if ckdir is not None: cbs.append(CheckpointCB(ckdir, every_batches=every, **kw))
    dls = dls or DataLoaders.from_tensors(*data(), bs=6, seed=2)
    return TrainLearner(model, dls, F.cross_entropy, lr=0.05, cbs=cbs, opt_func=partial(torch.optim.SGD, momentum=0.9))


def outcome(learn):
    return {'model': learn.model.state_dict(), 'opt': learn.opt.state_dict(), 'history': learn.metrics.history}


# ---- loaders ----------------------------------------------------------------------------------------------------------
def test_tensor_loader_goes_on_at_the_batch_its_state_says():
    t = TensorLoader(torch.arange(20), bs=3, shuffle=True, seed=4)
    next(iter(t))  # an epoch before, so the state is not the seed's
    it = iter(t)
    first = [next(it)[0] for _ in range(3)]
    s = t.state_dict()
    assert s['drawn'] and s['batch'] == 3
    rest = [b[0] for b in it]
    assert t.state_dict()['batch'] is None  # the epoch ran to its end
    after = t.generator.get_state()
    u = TensorLoader(torch.arange(20), bs=3, shuffle=True, seed=99)
    u.load_state_dict(s)
    assert torch.equal(u.order, t.order) and u.state_dict()['batch'] == 3
    assert_same([b[0] for b in u], rest)  # the same order, from batch 3
    assert torch.equal(u.generator.get_state(), after)
    assert_same(torch.cat([*first, *rest]).sort().values, torch.arange(20))
    again = [b[0] for b in u]  # the next epoch is a new one, as for the loader that never stopped
    assert_same(again, [b[0] for b in t])


@pytest.mark.parametrize('workers', [0, 2])
def test_dataloader_resume_skips_without_reading_the_skipped_samples(workers):
    x, y, xv, yv = data()

    def dls():
        return DataLoaders(DataLoader(Counted(x, y), batch_size=6, shuffle=True, num_workers=workers),
                           DataLoader(Counted(xv, yv), batch_size=8, num_workers=workers))
    ref = make(dls())
    ref.fit(2)
    learn = make(dls(), cbs=[snap := SnapAt(4)])
    with pytest.raises(KeyboardInterrupt): learn.fit(2)
    resumed = make(d := dls())
    resumed.fit(2, resume=snap.sd)
    assert_same(outcome(resumed), outcome(ref))
    if workers == 0:  # (workers read in their own processes)
        assert d.train.dataset.reads == 2 * 40 - 4 * 6 and d.valid.dataset.reads == 2 * 16  # 4 batches never read


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")  # torchdata calls a torch function being retired
def test_stateful_dataloader_resumes_through_its_own_state():
    sdl = pytest.importorskip('torchdata.stateful_dataloader')
    x, y, xv, yv = data()

    def dls():
        torch.manual_seed(5)  # its RandomSampler seeds its own generator when made
        return DataLoaders(sdl.StatefulDataLoader(Counted(x, y), batch_size=6, shuffle=True),
                           sdl.StatefulDataLoader(Counted(xv, yv), batch_size=8))
    ref = make(dls())
    ref.fit(2)
    learn = make(dls(), cbs=[snap := SnapAt(9)])
    with pytest.raises(KeyboardInterrupt): learn.fit(2)
    assert 'state' in snap.sd['loaders']['train']  # its own state_dict, not a fast-forward
    resumed = make(d := dls())
    resumed.fit(2, resume=snap.sd)
    assert_same(outcome(resumed), outcome(ref))
    assert d.train.dataset.reads == 40 - 2 * 6  # epoch 1 from its batch 2


# ---- the learner's state in-process -----------------------------------------------------------------------------------
def test_resume_from_a_state_inside_an_accumulation_window_with_a_schedule_and_bf16():
    from torch.optim.lr_scheduler import OneCycleLR

    def cbs():
        return [GradientAccumulationCB(3), MixedPrecisionCB(), BatchSchedCB(partial(OneCycleLR, max_lr=0.1, total_steps=6)),
                Jitter()]
    ref = make(cbs=cbs())
    ref.fit(2)
    learn = make(cbs=[*cbs(), snap := SnapAt(8)])  # epoch 1, after its first micro-batch of a window
    with pytest.raises(KeyboardInterrupt): learn.fit(2)
    assert snap.sd['position'] == {**snap.sd['position'], 'epoch': 1, 'phase': 'train', 'batch': 1, 'in_phase': True}
    assert snap.sd['callbacks'][1][1]['window']['count'] == 1
    resumed = make(cbs=cbs())
    resumed.fit(2, resume=snap.sd)
    assert_same(outcome(resumed), outcome(ref))
    assert_same(resumed.cbs[3].lrs, ref.cbs[3].lrs)


def test_save_state_and_load_state_round_trip(tmp_path):
    learn = make(cbs=[EarlyStoppingCB(patience=5)])
    learn.fit(1)
    learn.save_state(tmp_path / 's.pt')
    before = state.cpu_copy(learn.state_dict())
    learn.fit(1)  # moves everything on
    other = make(cbs=[EarlyStoppingCB(patience=5)])
    other.load_state(tmp_path / 's.pt')
    assert_same(state.cpu_copy(other.state_dict()), before)
    assert other.cbs[0].history == before['callbacks'][0][1]['history'] and len(other.cbs[0].history) == 2


def test_resume_with_other_callbacks_names_the_mismatch(tmp_path):
    learn = make(ckdir=tmp_path)
    learn.fit(1)
    with pytest.raises(ValueError, match=r'saved with the stateful callbacks \[Quiet, CheckpointCB\], this learner has '
                                         r'\[Quiet, EarlyStoppingCB, CheckpointCB\]: callback 2 is CheckpointCB there and '
                                         r'EarlyStoppingCB here; resume with the callbacks it was saved with, in the '
                                         r'same order, or start a new run, in a new checkpoint folder, from its weights: '
                                         r'learn.load_state\(path, weights_only=True\) or ultraloop fit --init-from '
                                         r'CHECKPOINT$'):
        make(cbs=[EarlyStoppingCB()], ckdir=tmp_path).fit(2, resume=tmp_path)


def test_resume_refuses_a_position_past_the_fit_and_an_empty_folder(tmp_path):
    learn = make(ckdir=tmp_path / 'a')
    learn.fit(2)
    with pytest.raises(ValueError, match=r'checkpoint-000001-epoch2-train0.pt is at epoch 2 \(train batch 0\), past a fit '
                                         r'of n_epochs=1: resume with at least n_epochs=3'):
        make(ckdir=tmp_path / 'a').fit(1, resume=tmp_path / 'a')
    (tmp_path / 'b').mkdir()
    with pytest.raises(ValueError, match=r"resume='.*b': the folder holds no checkpoint \(checkpoint-\*\.pt\)"):
        learn.fit(1, resume=tmp_path / 'b')
    with pytest.raises(TypeError, match=r"resume must be a checkpoint file, a folder of checkpoints or a "
                                        r"learn.state_dict\(\), got bool True: e.g. resume='checkpoints'"):
        learn.fit(1, resume=True)
    with pytest.raises(FileNotFoundError, match=r'nope.pt: no such checkpoint file'): learn.fit(1, resume=tmp_path / 'nope.pt')
    done = make(ckdir=tmp_path / 'a')
    done.fit(2, resume=tmp_path / 'a')  # at its end already: nothing left to run
    assert_same(outcome(done), outcome(learn))


# ---- files ------------------------------------------------------------------------------------------------------------
class Evil:
    def __init__(self, path): self.path = path
    def __reduce__(self): return (open, (self.path, 'w'))  # unpickling it would create the file


def test_a_pickled_object_is_refused_and_runs_nothing(tmp_path):
    learn = make()
    sd = learn.state_dict()
    sd['extra'] = Evil(str(tmp_path / 'ran'))
    with open(tmp_path / 'evil.pt', 'wb') as f: torch.save(sd, f)
    with pytest.raises(ValueError, match=r'^\S+evil.pt holds pickled Python objects, not just tensors and plain values; it '
                                         r'was not loaded, since unpickling them could run code'):
        learn.load_state(tmp_path / 'evil.pt')
    with pytest.raises(ValueError, match='holds pickled Python objects'): learn.fit(1, resume=tmp_path / 'evil.pt')
    assert not (tmp_path / 'ran').exists()
    pickle.loads(pickle.dumps(Evil(str(tmp_path / 'ran'))))  # the check can fail: unpickling it does run code
    assert (tmp_path / 'ran').exists()


def test_truncated_corrupt_missing_and_foreign_files_give_one_line_errors(tmp_path):
    learn = make()
    learn.fit(1)
    learn.save_state(tmp_path / 'good.pt')
    data_ = (tmp_path / 'good.pt').read_bytes()
    (tmp_path / 'cut.pt').write_bytes(data_[:len(data_) // 2])
    (tmp_path / 'noise.pt').write_bytes(b'not a checkpoint at all')
    torch.save({'weights': torch.ones(2)}, tmp_path / 'foreign.pt')
    for name, msg in [('cut.pt', r'cut.pt is truncated or corrupt \(.+\): not a complete checkpoint$'),
                      ('noise.pt', r'noise.pt is truncated or corrupt \(.+\): not a complete checkpoint$'),
                      ('foreign.pt', r'foreign.pt is not an ultraloop learner state; save one with learn.save_state')]:
        with pytest.raises(ValueError, match=msg) as e: learn.load_state(tmp_path / name)
        assert '\n' not in str(e.value)
    with pytest.raises(FileNotFoundError, match=r'nope.pt: no such checkpoint file'): learn.load_state(tmp_path / 'nope.pt')
    learn.load_state(tmp_path / 'good.pt')  # the learner is still usable


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    learn = make()
    learn.save_state(tmp_path / 's.pt')
    old = (tmp_path / 's.pt').read_bytes()

    def half_then_fail(obj, f):
        f.write(b'half')
        raise OSError('disk full')
    monkeypatch.setattr(state.torch, 'save', half_then_fail)
    learn.fit(1)
    with pytest.raises(OSError, match='disk full'): learn.save_state(tmp_path / 's.pt')
    assert (tmp_path / 's.pt').read_bytes() == old and os.listdir(tmp_path) == ['s.pt']


# ---- CheckpointCB and EarlyStoppingCB ---------------------------------------------------------------------------------
def test_checkpoint_keeps_the_newest_and_the_best(tmp_path):
    learn = make(ckdir=tmp_path, every=4, keep=2, monitor='valid_loss')
    learn.lr = 0.5  # big steps: the valid loss goes up and down
    learn.fit(4)
    cb = learn.cbs[-1]
    valid = [r['loss'] for r in learn.metrics.history if r['train'] == 'eval']
    best = min(range(4), key=valid.__getitem__)
    assert cb.best == valid[best] and cb.best_path.name.endswith(f'-epoch{best + 1}-train0.pt')
    names = sorted(os.listdir(tmp_path))
    assert names == sorted({*cb.files, cb.best_path.name}) and cb.last_path.name in names
    assert len(cb.files) == 2 + (cb.best_path.name in cb.files[:-2])
    assert cb.last_path.name.endswith('-epoch4-train0.pt')
    assert learn.cbs[-1].state_dict()['files'] == cb.files
    assert state.newest_checkpoint(tmp_path) == cb.last_path


def test_bad_arguments_are_refused_with_the_fix(tmp_path):
    (tmp_path / 'f').write_text('x')
    for make_cb, msg in [
        (lambda: CheckpointCB(tmp_path / 'f'), r'CheckpointCB: \S+f is a file; give a folder'),
        (lambda: CheckpointCB(every_batches=0), r'CheckpointCB: every_batches must be an int >= 1, got 0'),
        (lambda: CheckpointCB(keep=0), r'CheckpointCB: keep must be an int >= 1, got 0'),
        (lambda: CheckpointCB(monitor='loss'), r"CheckpointCB: monitor names a MetricsCB value with its phase, such as "
                                               r"'valid_loss', 'valid_accuracy' or 'train_loss'; got 'loss'"),
        (lambda: EarlyStoppingCB(mode='least'), r"EarlyStoppingCB: mode must be 'min' \(lower is better\) or 'max'"),
        (lambda: EarlyStoppingCB(patience=0), r'EarlyStoppingCB: patience must be an int >= 1, got 0'),
        (lambda: EarlyStoppingCB(min_delta=-1), r'EarlyStoppingCB: min_delta must be a finite number >= 0, got -1'),
    ]:
        with pytest.raises(ValueError, match=msg): make_cb()
    learn = make(cbs=[EarlyStoppingCB('valid_acuracy')])
    with pytest.raises(ValueError, match=r"EarlyStoppingCB: monitor 'valid_acuracy' is not a value of this MetricsCB; it "
                                         r'has valid_acc, valid_loss, train_acc, train_loss'):
        learn.fit(1)
    bare = TrainLearner(nn.Linear(8, 2), DataLoaders.from_tensors(*data()), F.cross_entropy, cbs=[EarlyStoppingCB()])
    with pytest.raises(ValueError, match=r"EarlyStoppingCB watches 'valid_loss', a value MetricsCB computes: add MetricsCB"):
        bare.fit(1)


def test_early_stopping_waits_patience_phases_and_restores_the_best_weights():
    class Weights(Callback):
        order = 100
        def before_fit(self, learn): self.after = []
        def after_epoch(self, learn):
            if not learn.training: self.after.append(state.cpu_copy(learn.model.state_dict()))
    # the train loss falls every epoch, so with mode='max' only epoch 0 is an improvement
    stop = EarlyStoppingCB('train_loss', patience=2, mode='max', restore_best=True)
    learn = make(cbs=[stop, w := Weights()])
    learn.fit(6)
    assert stop.stopped_epoch == 2 and stop.best_epoch == 0 and stop.wait == 2 and len(learn.metrics.history) == 6
    assert stop.best == learn.metrics.history[0]['loss']
    assert_same(dict(learn.model.state_dict()), dict(w.after[0]))  # epoch 0's weights are back
    keep = EarlyStoppingCB('train_loss', patience=2, mode='min')
    make(cbs=[keep]).fit(4)
    assert keep.stopped_epoch is None and keep.wait == 0


# ---- ctrl-C -----------------------------------------------------------------------------------------------------------
class CtrlC(Callback):
    """Sends this process SIGINT between backward and step of its `at`-th training batch, `times` times."""
    def __init__(self, at, times=1): self.at, self.times, self.n, self.steps = at, times, 0, 0

    def after_backward(self, learn):
        self.n += 1
        if self.n == self.at:
            for _ in range(self.times): os.kill(os.getpid(), signal.SIGINT)

    def after_step(self, learn): self.steps += 1


def test_ctrl_c_waits_for_the_batch_writes_a_checkpoint_and_the_resume_is_exact(tmp_path):
    ref = make()
    ref.fit(2)
    handler = signal.getsignal(signal.SIGINT)
    learn = make(cbs=[c := CtrlC(9)], ckdir=tmp_path)
    with pytest.raises(KeyboardInterrupt): learn.fit(2)
    assert c.steps == 9 and learn.interrupted  # the batch stepped, no later one ran
    assert signal.getsignal(signal.SIGINT) is handler
    assert learn.cbs[-1].last_path.name == 'checkpoint-000001-epoch1-train2.pt'  # 7 batches per epoch
    resumed = make(ckdir=tmp_path)
    resumed.fit(2, resume=tmp_path)
    assert_same(outcome(resumed), outcome(ref))


def test_a_second_ctrl_c_interrupts_at_once(tmp_path):
    learn = make(cbs=[c := CtrlC(3, times=2)], ckdir=tmp_path)
    with pytest.raises(KeyboardInterrupt): learn.fit(2)
    assert c.steps == 2 and os.listdir(tmp_path) == []  # the batch stopped before its step; nothing was written
    learn.fit(1)  # and the learner is usable


def test_fit_in_another_thread_leaves_ctrl_c_alone():
    handler, seen = signal.getsignal(signal.SIGINT), []

    class Look(Callback):
        def after_batch(self, learn): seen.append(signal.getsignal(signal.SIGINT))
    t = threading.Thread(target=lambda: make(cbs=[Look()]).fit(1))
    t.start(); t.join()
    assert seen and all(h is handler for h in seen)


# ---- lr_find and summary ----------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings('ignore:lr_find')
def test_lr_find_and_summary_leave_every_piece_of_state_as_it_was():
    x, y, xv, yv = data()
    dls = DataLoaders(TensorLoader(x, y, bs=6, shuffle=True, seed=1),
                      DataLoader(Counted(xv, yv), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)))
    learn = make(dls, cbs=[GradientAccumulationCB(2), MixedPrecisionCB(), EarlyStoppingCB(patience=9)])
    learn.fit(1)
    next(iter(dls.train))  # a loader in the middle of an epoch
    before, order = state.cpu_copy(learn.state_dict()), dls.train.order.clone()
    learn.lr_find(plot=False, max_epochs=2)
    learn.summary()
    assert_same(state.cpu_copy(learn.state_dict()), before)
    assert torch.equal(dls.train.order, order) and learn.metrics.history == before['callbacks'][0][1]['history']


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_resume_on_cuda_with_a_float16_scaler_and_cuda_dropout():
    from ultraloop import DeviceCB

    def cbs(): return [DeviceCB('cuda'), MixedPrecisionCB(torch.float16), GradientAccumulationCB(2)]
    ref = make(cbs=cbs())
    ref.fit(2)
    learn = make(cbs=[*cbs(), snap := SnapAt(9)])
    with pytest.raises(KeyboardInterrupt): learn.fit(2)
    assert 'cuda' in snap.sd['rng'] and snap.sd['callbacks'][1][1]['scaler'] is not None
    resumed = make(cbs=cbs())
    resumed.fit(2, resume=snap.sd)
    assert_same(state.cpu_copy(outcome(resumed)), state.cpu_copy(outcome(ref)))
