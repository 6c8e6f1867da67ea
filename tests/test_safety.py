"""TerminateOnNaNCB (stop before a NaN loss reaches the weights, or skip its batch), the once-per-fit warning of a
non-finite phase loss, and NaN or inf learning rates refused wherever an lr is given."""
import math
import warnings

import pytest
import torch
from conftest import toy_data, toy_model
from torch.nn import functional as F

from ultraloop import (BatchSchedCB, Callback, CancelBatchException, DataLoaders, MetricsCB, TerminateOnNaNCB,
                       TrainLearner)


def poisoned(bad: set[tuple[int, int]], n_train=64, bs=16):
    """Loaders whose training batches (epoch, index) in `bad` hold a NaN input: the loss of those batches is NaN."""
    xt, yt, xv, yv = toy_data(n_train, 32)

    class Loader:
        def __init__(self): self.epoch = -1
        def __len__(self): return n_train // bs
        def __iter__(self):
            self.epoch += 1
            for i in range(len(self)):
                x = xt[i * bs:(i + 1) * bs].clone()
                if (self.epoch, i) in bad: x[0, 0] = math.nan
                yield x, yt[i * bs:(i + 1) * bs]
    return DataLoaders(Loader(), DataLoaders.from_tensors(xt, yt, xv, yv, bs=bs, shuffle=False).valid)


class CancelAfterLossCB(Callback):
    """The reference for 'skip': cancel the named training batches right after their loss."""
    order = -50

    def __init__(self, bad): self.bad = bad
    def after_loss(self, learn):
        if learn.training and (learn.epoch, learn.iter) in self.bad: raise CancelBatchException()


def test_stop_ends_the_fit_before_the_nan_reaches_the_weights_naming_epoch_and_batch():
    bad = {(1, 2)}
    learn = TrainLearner(toy_model(), poisoned(bad), F.cross_entropy, lr=0.1, cbs=[cb := TerminateOnNaNCB()])
    with pytest.warns(UserWarning) as w: learn.fit(3)
    assert [str(x.message) for x in w] == [
        "TerminateOnNaNCB: the training loss is nan at epoch 1, batch 2 (both counted from 0); the fit stopped before "
        "that batch's step: lower the lr, or look for NaN/inf in the data"]
    assert cb.stopped_at == (1, 2) and learn.epoch == 1
    # the weights are those after batch (1, 1): by hand, SGD over batches 0..3 of epoch 0 and 0..1 of epoch 1
    xt, yt = toy_data(64, 32)[:2]
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in (0, 1, 2, 3, 0, 1):
        F.cross_entropy(model(xt[i * 16:(i + 1) * 16]), yt[i * 16:(i + 1) * 16]).backward(); opt.step(); opt.zero_grad()
    for p, q in zip(learn.model.parameters(), model.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q)


@pytest.mark.parametrize('with_sched', [False, True])
def test_skip_equals_cancelling_those_batches_after_their_loss(with_sched):
    from functools import partial

    from torch.optim.lr_scheduler import StepLR
    bad = {(0, 1), (1, 3), (2, 0)}

    def run(cbs):
        sched = [BatchSchedCB(partial(StepLR, step_size=2, gamma=0.5))] if with_sched else []
        m = MetricsCB()
        m._log = lambda d: None
        learn = TrainLearner(toy_model(), poisoned(bad), F.cross_entropy, lr=0.1, cbs=[*cbs, *sched, m])
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # no phase loss is NaN: the dropped batches are out of the metrics too
            learn.fit(3)
        return learn, m, sched
    skip, ref = TerminateOnNaNCB('skip'), CancelAfterLossCB(bad)
    (a, ma, sa), (b, mb, sb) = run([skip]), run([ref])
    assert skip.skipped == 3
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q)
    assert ma.history == mb.history and all(math.isfinite(r['loss']) for r in ma.history)
    if with_sched: assert sa[0].lrs == sb[0].lrs and len(sa[0].lrs) == 3 * 4 - 3  # not advanced by a dropped batch


def test_bad_action():
    with pytest.raises(ValueError, match=r"TerminateOnNaNCB: action must be 'stop' \(end the fit\) or 'skip' \(drop the "
                                         r"batch\), got 'halt'"):
        TerminateOnNaNCB('halt')


def test_a_non_finite_phase_loss_warns_once_per_fit(capsys):
    learn = TrainLearner(toy_model(), poisoned({(0, 0), (1, 0), (2, 0)}), F.cross_entropy, lr=0.1, cbs=[MetricsCB()])
    for _ in range(2):
        with pytest.warns(UserWarning) as w: learn.fit(3)
        assert [str(x.message) for x in w] == [
            'MetricsCB: the train loss of epoch 0 is nan: training diverged or the data holds NaN/inf; lower the lr or '
            'check the inputs (TerminateOnNaNCB() stops a fit at the first such batch)']


@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
def test_nan_and_inf_learning_rates_are_refused_everywhere(bad):
    dls = DataLoaders.from_tensors(*toy_data(), bs=16)
    msg = rf'^lr must be a finite number >= 0, got {bad}$'
    with pytest.raises(ValueError, match=msg): TrainLearner(toy_model(), dls, F.cross_entropy, lr=bad)
    learn = TrainLearner(toy_model(), dls, F.cross_entropy)
    with pytest.raises(ValueError, match=msg): learn.fit(1, lr=bad)
    learn.lr = bad  # set after construction: caught when fit starts
    with pytest.raises(ValueError, match=msg): learn.fit(1)
    learn.lr = 0.1
    with pytest.raises(ValueError, match=rf'lr_find: start_lr must be a finite number > 0, got {bad}'):
        learn.lr_find(start_lr=bad)
    with pytest.raises(ValueError, match=rf'fit_one_cycle: lr_max must be a finite number > 0, got {bad}'):
        learn.fit_one_cycle(1, bad)
    assert learn.opt is None  # refused before any work
