"""BatchSchedCB, EpochSchedCB and fit_one_cycle follow torch's schedulers run by hand, skip no-step batches, and
cycle momentum (SGD) or beta1 (Adam) only where the optimiser has it."""
import math
from functools import partial

import pytest
import torch
from torch import nn, optim
from torch.nn import functional as F
from torch.optim import lr_scheduler

from ultraloop import (BatchSchedCB, Callback, CancelStepException, DataLoaders, EpochSchedCB, GradientAccumulationCB,
                       TensorLoader, TrainLearner)

N, BS = 96, 16  # 6 batches an epoch


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g)
    return x, x @ torch.randn(4, 1, generator=g)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def learner(opt_func=optim.SGD, lr=0.1, cbs=()):
    x, y = data()
    return TrainLearner(model(), DataLoaders.from_tensors(x, y, x, y, bs=BS, seed=1), F.mse_loss, lr=lr,
                        opt_func=opt_func, cbs=list(cbs))


def by_hand(opt_func, sched_func, n_epochs, lr=0.1, per_batch=True):
    """The same training as a plain loop; returns the lr and hyper-parameters each step used, and the model."""
    x, y = data()
    m, dl = model(), TensorLoader(x, y, bs=BS, shuffle=True, seed=1)
    opt = opt_func(m.parameters(), lr)
    sched = sched_func(opt)
    lrs, hps = [], []
    for _ in range(n_epochs):
        for xb, yb in dl:
            F.mse_loss(m(xb), yb).backward()
            lrs.append(opt.param_groups[0]['lr'])
            hps.append(opt.param_groups[0].get('betas', opt.param_groups[0].get('momentum')))
            opt.step()
            if per_batch: sched.step()
            opt.zero_grad()
        if not per_batch: sched.step()
    return lrs, hps, m


class RecordHP(Callback):
    """Momentum or betas of the first group at each step."""
    def __init__(self): self.hps = []
    def after_backward(self, learn):
        g = learn.opt.param_groups[0]
        self.hps.append(g.get('betas', g.get('momentum')))


def assert_same_params(a, b):
    for p, q in zip(a.parameters(), b.parameters()): assert torch.equal(p, q)


def test_batch_schedule_equals_torch_by_hand():
    cos = partial(lr_scheduler.CosineAnnealingLR, T_max=12)
    sched = BatchSchedCB(cos)
    learn = learner(cbs=[sched])
    learn.fit(2, valid=False)
    lrs, _, m = by_hand(optim.SGD, cos, 2)
    assert sched.lrs == lrs and len(lrs) == 12
    assert_same_params(learn.model, m)


def test_epoch_schedule_equals_torch_by_hand():
    step = partial(lr_scheduler.StepLR, step_size=1, gamma=0.5)
    sched = EpochSchedCB(step)
    learn = learner(cbs=[sched])
    learn.fit(3)
    lrs, _, m = by_hand(optim.SGD, step, 3, per_batch=False)
    assert sched.lrs == lrs[::6] == [0.1, 0.05, 0.025]
    assert_same_params(learn.model, m)


def test_skipped_step_does_not_advance_the_schedule():
    class SkipOdd(Callback):
        def after_backward(self, learn):
            if learn.iter % 2: raise CancelStepException()

    lin = partial(lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.1, total_iters=10)
    sched = BatchSchedCB(lin)
    learner(cbs=[sched, SkipOdd()]).fit(2, valid=False)
    lrs, _, _ = by_hand(optim.SGD, lin, 1)
    assert len(sched.lrs) == 6 and sched.lrs == lrs[:6]  # 3 real steps an epoch, each advancing once


@pytest.mark.parametrize('opt_func, cycles', [(partial(optim.SGD, momentum=0.9), True), (optim.Adam, True),
                                              (optim.SGD, False)])
def test_fit_one_cycle_equals_one_cycle_by_hand(opt_func, cycles):
    rec = RecordHP()
    learn = learner(opt_func, cbs=[rec])
    learn.fit(1, valid=False)  # the optimiser exists (with state) before fit_one_cycle, as usual
    hp_before = learn.opt.param_groups[0].get('betas', learn.opt.param_groups[0].get('momentum'))
    rec.hps.clear()
    learn2 = learner(opt_func)
    learn2.fit(1, valid=False)

    sched = learn.fit_one_cycle(2, 0.05)
    # by hand: the same first fit, then OneCycleLR on the same optimiser
    m, dl = learn2.model, learn2.dls.train
    opt = learn2.opt
    for g in opt.param_groups: g['lr'] = 0.05
    one = lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12, cycle_momentum=cycles)
    lrs, hps = [], []
    for _ in range(2):
        for xb, yb in dl:
            F.mse_loss(m(xb), yb).backward()
            lrs.append(opt.param_groups[0]['lr'])
            hps.append(opt.param_groups[0].get('betas', opt.param_groups[0].get('momentum')))
            opt.step(); one.step(); opt.zero_grad()
    assert sched.lrs == lrs and rec.hps == hps
    assert_same_params(learn.model, m)
    assert (len(set(map(str, hps))) > 1) == cycles  # momentum or beta1 cycled, or (plain SGD) stayed 0
    assert learn.opt.param_groups[0].get('betas', learn.opt.param_groups[0].get('momentum')) == hp_before  # restored


def test_fit_one_cycle_counts_accumulated_steps():
    sched = learner().fit_one_cycle(2, 0.05, cbs=[GradientAccumulationCB(4)])
    opt = optim.SGD([nn.Parameter(torch.zeros(1))], 0.05)
    one, want = lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=4, cycle_momentum=False), []
    for _ in range(4): want.append(opt.param_groups[0]['lr']); opt.step(); one.step()
    assert len(sched.lrs) == 2 * math.ceil(6 / 4) == 4
    assert sched.lrs == want  # the whole cycle, ending where torch's does


def test_each_fit_starts_its_schedule_from_its_own_lr():
    halve = partial(lr_scheduler.LambdaLR, lr_lambda=lambda step: 0.5 ** step)  # relative to the fit's starting lr
    learn = learner()
    learn.fit(1, valid=False, cbs=[first := BatchSchedCB(halve)])
    learn.fit(1, valid=False, lr=0.01, cbs=[second := BatchSchedCB(halve)])
    assert first.lrs[:3] == [0.1, 0.05, 0.025] and second.lrs[:3] == [0.01, 0.005, 0.0025]


def test_a_fit_that_fails_before_the_schedule_starts_leaves_the_hyper_parameters_alone():
    class FailCB(Callback):
        order = -10  # its before_fit runs before the schedule's
        fail = False
        def before_fit(self, learn):
            if self.fail: raise RuntimeError('bad setup')

    fail = FailCB()
    sgd = partial(optim.SGD, momentum=0.9)
    learn = learner(opt_func=sgd, cbs=[BatchSchedCB(partial(lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=6)), fail])
    learn.fit(1, valid=False)
    assert learn.opt.param_groups[0]['momentum'] == 0.9  # cycled during the fit, put back after it
    learn.opt.param_groups[0]['momentum'] = 0.5  # the user's own change between fits
    fail.fail = True
    with pytest.raises(RuntimeError, match='bad setup'): learn.fit(1)
    assert learn.opt.param_groups[0]['momentum'] == 0.5


def test_bad_schedules_are_refused():
    with pytest.raises(TypeError, match='sched_func must be callable'): BatchSchedCB(lr_scheduler.StepLR(
        optim.SGD([nn.Parameter(torch.zeros(1))], 0.1), 1))
    learn = learner()
    with pytest.raises(TypeError, match='must return a torch.optim.lr_scheduler.LRScheduler'):
        learn.fit(1, cbs=[BatchSchedCB(lambda opt: None)])
    with pytest.raises(TypeError, match='ReduceLROnPlateau needs a metric'):
        learn.fit(1, cbs=[EpochSchedCB(lr_scheduler.ReduceLROnPlateau)])
    assert learn.cbs == []
    learn.fit(1)  # still usable
    for args, msg in (((0, 0.1), 'n_epochs must be an int >= 1'), ((1, 0), 'lr_max must be a finite number > 0'),
                      ((1.5, 0.1), 'n_epochs must be'), ((1, -1), 'lr_max must be')):
        with pytest.raises(ValueError, match=msg): learn.fit_one_cycle(*args)

    class Stream:
        def __iter__(self): yield from learner().dls.train

    learn.dls.train = Stream()
    with pytest.raises(TypeError, match='needs len\\(dls.train\\)'): learn.fit_one_cycle(1, 0.1)
