"""lr_find: records and stops like the seed's finder, suggests an lr on the descent, and leaves the learner exactly as
it found it, so a fit after lr_find equals a fit without it."""
import copy
import math
import random
from functools import partial

import numpy as np
import pytest
import torch
from conftest import assert_same
from torch import nn, optim
from torch.nn import functional as F

from ultraloop import (BatchSchedCB, Callback, CheckpointCB, CSVLoggerCB, DataLoaders, DeviceCB, EarlyStoppingCB,
                       LRFinderCB, MetricsCB, MomentumLearner, TrainLearner, suggest_lr)


def regression_dls(seed=0, n=512, bs=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoaders.from_tensors(x, y, x[:64], y[:64], bs=bs, shuffle=True, seed=seed), x, y


def dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))  # fit draws from the torch RNG


sgd_mom = partial(optim.SGD, momentum=0.9)


class Counter(Callback):
    """A callback with state (saved and restored through state_dict)."""
    def __init__(self): self.n = 0
    def after_batch(self, learn): self.n += 1
    def state_dict(self): return {'n': self.n}
    def load_state_dict(self, s): self.n = s['n']


class Augment(Callback):
    """Draws from python's and numpy's RNGs each batch, as augmentation code does."""
    def before_batch(self, learn): random.random(); np.random.rand()


def snapshot(learn):
    return {'weights': copy.deepcopy(learn.model.state_dict()),
            'grads': [None if p.grad is None else p.grad.clone() for p in learn.model.parameters()],
            'opt': copy.deepcopy(learn.opt.state_dict()) if learn.opt is not None else None,
            'lrs': [g['lr'] for g in learn.opt.param_groups] if learn.opt is not None else None,
            'torch_rng': torch.get_rng_state(), 'py_rng': random.getstate(), 'np_rng': np.random.get_state(),
            'loader': learn.dls.train.state_dict(), 'cbs': [id(cb) for cb in learn.cbs],
            'cb_state': [cb.state_dict() for cb in learn.cbs if hasattr(cb, 'state_dict')],
            'attrs': {k: getattr(learn, k, None) for k in ('epoch', 'n_epochs', 'iter')},
            'training': learn.model.training}


@pytest.mark.filterwarnings('ignore:lr_find')  # a trained model shows no clear descent
def test_lr_find_restores_everything_bitwise():
    dls, _, _ = regression_dls()
    learn = TrainLearner(dropout_model(), dls, F.mse_loss, lr=0.01, opt_func=sgd_mom, cbs=[Counter(), Augment()])
    learn.fit(1)  # now the optimiser holds momentum buffers
    random.random(); np.random.rand()
    before, opt = snapshot(learn), learn.opt
    learn.lr_find(plot=False)
    assert learn.opt is opt
    assert_same(snapshot(learn), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.filterwarnings('ignore:lr_find')
def test_lr_find_on_cuda_restores_weights_optimiser_and_cuda_rng():
    dls, _, _ = regression_dls()
    learn = TrainLearner(dropout_model(), dls, F.mse_loss, lr=0.01, opt_func=sgd_mom, cbs=[DeviceCB('cuda')])
    learn.fit(1)  # dropout on the GPU draws from the CUDA RNG
    before, cuda_rng = snapshot(learn), torch.cuda.get_rng_state()
    learn.lr_find(plot=False)
    assert_same(snapshot(learn), before)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert all(p.is_cuda for p in learn.model.parameters())


@pytest.mark.filterwarnings('ignore:lr_find')
def test_fit_after_lr_find_equals_fit_without():
    def run(with_lr_find, learner=TrainLearner, first_fit=True, opt_func=sgd_mom):
        dls, _, _ = regression_dls()
        learn = learner(dropout_model(), dls, F.mse_loss, lr=0.01, opt_func=opt_func)
        if first_fit: learn.fit(1)
        if with_lr_find: learn.lr_find(plot=False)
        learn.fit(2)
        return snapshot(learn)

    assert_same(run(True), run(False))
    assert_same(run(True, first_fit=False), run(False, first_fit=False))  # lr_find on a learner without an optimiser
    # MomentumLearner: its gradients carry over between fits
    assert_same(run(True, MomentumLearner, opt_func=optim.SGD), run(False, MomentumLearner, opt_func=optim.SGD))
    with pytest.raises(AssertionError): assert_same(run(True), run(False, first_fit=False))  # the check can fail


def test_lr_find_restores_when_it_raises():
    class Boom(Callback):
        armed = False
        def after_batch(self, learn):
            if self.armed and learn.iter == 3: raise RuntimeError('boom')

    dls, _, _ = regression_dls()
    learn = TrainLearner(dropout_model(), dls, F.mse_loss, lr=0.01, opt_func=sgd_mom, cbs=[boom := Boom()])
    learn.fit(1)
    before = snapshot(learn)
    boom.armed = True
    with pytest.raises(RuntimeError, match='boom'): learn.lr_find(plot=False)
    assert_same(snapshot(learn), before)


def finder_curve(seed=0):
    dls, _, _ = regression_dls(seed)
    torch.manual_seed(seed)
    learn = TrainLearner(nn.Linear(8, 1), dls, F.mse_loss)
    finder = LRFinderCB()
    learn.fit(10, valid=False, cbs=[finder], lr=1e-5)
    return finder


@pytest.mark.parametrize('seed', [0, 3])
def test_suggestion_lies_on_the_descent_and_trains_well(seed):
    # linear regression with unit-variance inputs: SGD diverges above lr ~1 and learns nothing below ~1e-2 in the few
    # batches the finder runs; a good lr lies in between
    dls, x, y = regression_dls(seed)
    torch.manual_seed(seed)
    learn = TrainLearner(nn.Linear(8, 1), dls, F.mse_loss)
    lr = learn.lr_find(plot=False)
    f = finder_curve(seed)
    lr_at_min = f.lrs[min(range(len(f.losses)), key=f.losses.__getitem__)]
    assert 1e-2 < lr < lr_at_min
    first = [v for l, v in zip(f.lrs, f.losses) if l < 1e-2]
    assert f.losses[f.lrs.index(lr)] < sum(first) / len(first)  # already falling there
    learn.fit(2, lr=lr, valid=False)
    assert F.mse_loss(learn.model(x), y) < 0.05  # the noise floor is 0.01; the loss started near 10


def test_no_clear_descent_gives_none_and_a_warning():
    x = torch.randn(64, 4)
    model = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(model.weight)  # already optimal for y = 0: the loss is 0 at every lr
    learn = TrainLearner(model, DataLoaders.from_tensors(x, torch.zeros(64, 1), x, torch.zeros(64, 1), bs=16), F.mse_loss)
    with pytest.warns(UserWarning, match='no clear descent'): assert learn.lr_find(max_epochs=5, plot=False) is None
    with pytest.warns(UserWarning, match='too few to suggest'): assert suggest_lr([1e-3, 1e-2], [1.0, 0.5]) is None


def test_plot_is_a_png(tmp_path, monkeypatch):
    dls, _, _ = regression_dls()
    learn = TrainLearner(nn.Linear(8, 1), dls, F.mse_loss)
    learn.lr_find(plot_path=tmp_path / 'lr.png')
    assert (tmp_path / 'lr.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    monkeypatch.chdir(tmp_path)
    learn.lr_find()  # outside a notebook the default is lr_find.png in the working directory
    assert (tmp_path / 'lr_find.png').read_bytes()[:4] == b'\x89PNG'


def test_plot_is_bounded_to_the_loss_before_it_diverges_and_says_when_there_is_no_suggestion():
    from ultraloop.callbacks.lr_finder import _lr_find_figure
    lrs = [1e-5 * 1.3 ** i for i in range(30)]
    losses = [2.3 - 0.05 * i for i in range(20)] + [1.35 + 2.5 * i for i in range(1, 11)]  # min 1.35 at i=19, then 26.35
    ax = _lr_find_figure(lrs, losses, 3e-4).axes[0]
    pad = 0.05 * (2.3 - 1.35)
    assert ax.get_ylim() == pytest.approx((1.35 - pad, 2.3 + pad))  # the spike to 26.35 is cut off: the descent fills it
    assert ax.get_legend().get_texts()[0].get_text() == 'suggested lr 3.00e-04' and not ax.texts
    ax = _lr_find_figure(lrs, losses[:5] + [math.nan] * 25, None).axes[0]
    assert [t.get_text() for t in ax.texts] == ['no suggestion: the loss shows no clear descent']
    assert ax.get_ylim() == pytest.approx((2.1 - 0.01, 2.3 + 0.01))


def test_seed_style_finder_cell():
    # the seed's cell: LRFinderCB passed to fit by hand, the learner starting at lr=1e-4
    dls, _, _ = regression_dls()
    valid_batches = []

    class CountValid(Callback):
        order = -1
        def after_batch(self, learn):
            if not learn.training: valid_batches.append(learn.epoch)

    finder = LRFinderCB()
    learn = TrainLearner(nn.Linear(8, 1), dls, F.mse_loss, lr=1e-4, cbs=[finder, CountValid()])
    learn.fit(3)
    assert finder.lrs[0] == 1e-4
    assert all(math.isclose(b / a, 1.3) for a, b in zip(finder.lrs, finder.lrs[1:]))
    assert len(finder.losses) == len(finder.lrs) and len(finder.lrs) < 3 * len(dls.train)  # it stopped on the blow-up
    assert finder.losses[-1] > 3 * min(finder.losses)
    assert valid_batches == sorted(set(valid_batches))  # one valid batch per epoch, then the phase is cancelled


def test_schedule_callbacks_sit_out_and_stay():
    dls, _, _ = regression_dls()
    sched = BatchSchedCB(partial(optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    learn = TrainLearner(nn.Linear(8, 1), dls, F.mse_loss, cbs=[sched])
    learn.fit(1, valid=False)
    lrs, scheduler = list(sched.lrs), sched.sched
    assert learn.lr_find(plot=False) is not None  # a decaying lr would never have found the blow-up
    assert learn.cbs == [sched] and sched.lrs == lrs and sched.sched is scheduler


def test_checkpoints_loggers_and_monitors_sit_out(tmp_path):
    """lr_find writes no checkpoint (the next fit(resume='auto') would go on from it) and no log row, and stops nothing;
    the run after it equals, file for file, the run without it."""
    def run(name, with_lr_find):
        dls, _, _ = regression_dls()
        cbs = [MetricsCB(), CheckpointCB(tmp_path / name / 'ck', monitor='valid_loss'),
               CSVLoggerCB(tmp_path / name / 'h.csv'), EarlyStoppingCB(patience=1), Counter()]
        learn = TrainLearner(dropout_model(), dls, F.mse_loss, lr=0.01, opt_func=sgd_mom, cbs=cbs)
        if with_lr_find:
            assert learn.lr_find(plot=False) is not None
            assert learn.cbs == cbs and cbs[-1].n == 0 and not (tmp_path / name / 'h.csv').exists()
            assert not (tmp_path / name / 'ck').exists() or list((tmp_path / name / 'ck').iterdir()) == []
        learn.fit(2, resume='auto')
        state = {k: v for k, v in snapshot(learn).items() if k != 'cbs'}  # the callbacks' ids differ between the runs
        return state, (tmp_path / name / 'h.csv').read_text(), sorted(p.name for p in (tmp_path / name / 'ck').iterdir())

    (with_state, with_csv, with_files), (without_state, without_csv, without_files) = run('a', True), run('b', False)
    assert_same(with_state, without_state)
    assert with_csv == without_csv and with_csv.count('\n') == 5  # header, 2 epochs x (train, eval)
    assert with_files == without_files != []


def test_bad_arguments_are_refused_and_change_nothing():
    dls, _, _ = regression_dls()
    learn = TrainLearner(dropout_model(), dls, F.mse_loss, lr=0.01, opt_func=sgd_mom)
    learn.fit(1)
    before = snapshot(learn)
    for kw, msg in (({'start_lr': 0}, 'start_lr must be a finite number > 0'), ({'start_lr': 'a'}, 'start_lr must be'),
                    ({'max_epochs': 0}, 'max_epochs must be an int >= 1'), ({'max_epochs': 1.5}, 'max_epochs must be'),
                    ({'lr_mult': 1}, 'lr_mult must be a finite number > 1'), ({'lr_mult': 0.5}, 'lr_mult must be')):
        with pytest.raises(ValueError, match=msg): learn.lr_find(plot=False, **kw)
    assert_same(snapshot(learn), before)
    learn.model = 'not a model'
    with pytest.raises(TypeError, match='model must be a torch.nn.Module'): learn.lr_find(plot=False)
    with pytest.raises(ValueError, match='beta .* in \\[0, 1\\)'): LRFinderCB(beta=1)
    with pytest.raises(ValueError, match='max_mult must be a finite number > 1'): LRFinderCB(max_mult=0.5)
    with pytest.raises(ValueError, match='gamma must be a finite number > 1, got 0.9'): learn.lr_find(0.9)
    with pytest.raises(ValueError, match=r'gamma=1.1 and lr_mult=1.2 name the same multiplier; pass one'):
        LRFinderCB(1.1, lr_mult=1.2)
