"""The course's own (miniai) names run as the course uses them: each name's signature and defaults, a small fit through
each, written from miniai's documented behaviour. Data is made here; nothing touches the network."""
import copy
import inspect
import math
import random
from functools import partial

import fastcore.all as fc
import numpy as np
import pytest
import torch
from conftest import toy_data, toy_model
from torch import nn, optim
from torch.nn import functional as F
from torch.optim import lr_scheduler

import ultraloop
from ultraloop import (AccelerateCB, ActivationStats, BaseSchedCB, BatchSchedCB, BatchTransformCB,
                       Callback, CancelBatchException, CancelFitException, CapturePreds, DataLoaders, HasLearnCB, Hooks,
                       HooksCallback, Learner, LRFinderCB, MetricsCB, MixedPrecision, MixedPrecisionCB, MomentumLearner,
                       ProgressCB, RecorderCB, SingleBatchCB, TrainCB, TrainLearner, append_stats, collate_dict, get_dls,
                       get_hist, get_min, run_cbs, set_seed, with_cbs)

BS = 16


def dls(n_train=64, n_valid=40, shuffle=False):
    return DataLoaders.from_tensors(*toy_data(n_train, n_valid), bs=BS, shuffle=shuffle)


def params(model): return [p.detach().clone() for p in model.parameters()]


def assert_same(ps, qs):
    assert len(ps) == len(qs) and all(torch.equal(p, q) for p, q in zip(ps, qs))


def defaults(f) -> dict:
    return {k: (p.default if p.default is not p.empty else p.kind.name) for k, p in inspect.signature(f).parameters.items()}


# ---- signatures -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('f, expected', [
    (TrainCB, {'n_inp': 1}),
    (MixedPrecision, {'n_inp': 1, 'dtype': None, 'device_type': None}),
    (AccelerateCB, {'n_inp': 1, 'mixed_precision': 'fp16', 'accelerator_kwargs': 'VAR_KEYWORD'}),
    (BatchTransformCB, {'tfm': 'POSITIONAL_OR_KEYWORD', 'on_train': True, 'on_val': True}),
    (CapturePreds, {}),
    (Learner.capture_preds, {'learn': 'POSITIONAL_OR_KEYWORD', 'cbs': None, 'inps': False}),
    (Learner.show_image_batch, {'learn': 'POSITIONAL_OR_KEYWORD', 'max_n': 9, 'cbs': None}),
    (HooksCallback, {'hookfunc': 'POSITIONAL_OR_KEYWORD', 'mod_filter': None, 'on_train': True, 'on_valid': False,
                     'mods': None}),
    (Learner.lr_find, {'learn': 'POSITIONAL_OR_KEYWORD', 'gamma': 1.3, 'max_mult': 3, 'start_lr': 1e-5, 'max_epochs': 10}),
    (LRFinderCB, {'gamma': 1.3, 'max_mult': 3}),
    (RecorderCB, {'d': 'VAR_KEYWORD'}),
    (HasLearnCB, {}),
    (run_cbs, {'cbs': 'POSITIONAL_OR_KEYWORD', 'method_nm': 'POSITIONAL_OR_KEYWORD', 'learn': None}),
    (with_cbs, {'nm': 'POSITIONAL_OR_KEYWORD'}),
    (set_seed, {'seed': 'POSITIONAL_OR_KEYWORD', 'deterministic': False}),
    (DataLoaders.from_dd, {'dd': 'POSITIONAL_OR_KEYWORD', 'batch_size': 'POSITIONAL_OR_KEYWORD', 'as_tuple': True,
                           'kwargs': 'VAR_KEYWORD'}),
    (collate_dict, {'ds': 'POSITIONAL_OR_KEYWORD'}),
    (get_dls, {'train_ds': 'POSITIONAL_OR_KEYWORD', 'valid_ds': 'POSITIONAL_OR_KEYWORD', 'bs': 'POSITIONAL_OR_KEYWORD',
               'kwargs': 'VAR_KEYWORD'}),
    (append_stats, {'hook': 'POSITIONAL_OR_KEYWORD', 'mod': 'POSITIONAL_OR_KEYWORD', 'inp': 'POSITIONAL_OR_KEYWORD',
                    'outp': 'POSITIONAL_OR_KEYWORD'}),
])
def test_signature_starts_as_in_miniai(f, expected):
    got = defaults(f)
    if not expected: assert got == {}
    assert list(got)[:len(expected)] == list(expected) and {k: got[k] for k in expected} == expected


def test_every_course_name_is_exported():
    names = ['MixedPrecision', 'BatchTransformCB', 'CapturePreds', 'ActivationStats', 'RecorderCB', 'BaseSchedCB',
             'HasLearnCB', 'run_cbs', 'with_cbs', 'set_seed', 'collate_dict', 'get_dls', 'append_stats', 'get_hist',
             'get_min', 'AccelerateCB']
    assert [n for n in names if n not in ultraloop.__all__] == []
    assert issubclass(MixedPrecision, TrainCB) and issubclass(AccelerateCB, TrainCB)
    assert issubclass(BatchSchedCB, BaseSchedCB) and issubclass(ActivationStats, HooksCallback)


# ---- n_inp ----------------------------------------------------------------------------------------------------------
class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 3)

    def forward(self, x, t): return self.lin(x) * t[:, None]


def two_input_data():
    x, y, xv, yv = toy_data(48, 16)
    t, tv = torch.linspace(0.5, 1.5, 48), torch.linspace(0.5, 1.5, 16)
    w, wv = torch.rand(3, generator=torch.Generator().manual_seed(1)) + 0.5, None
    return DataLoaders(list(zip(x.split(BS), t.split(BS), y.split(BS), [w] * 3)),
                       list(zip(xv.split(BS), tv.split(BS), yv.split(BS), [w]))), (x, t, y, w), wv


def weighted_ce(preds, y, w): return F.cross_entropy(preds, y, weight=w)


def hand_two_inputs(epochs=2):
    model = TwoInputs()
    opt = optim.SGD(model.parameters(), lr=0.1)
    d, _, _ = two_input_data()
    for _ in range(epochs):
        for x, t, y, w in d.train:
            weighted_ce(model(x, t), y, w).backward(); opt.step(); opt.zero_grad()
    return params(model)


def test_n_inp_feeds_the_first_elements_to_the_model_and_the_rest_to_the_loss():
    ref = hand_two_inputs()
    d, _, _ = two_input_data()
    learn = Learner(TwoInputs(), d, weighted_ce, cbs=[TrainCB(n_inp=2)])
    learn.fit(2)
    assert_same(params(learn.model), ref)

    class TwoInputLearner(TrainLearner): n_inp = 2
    learn = TwoInputLearner(TwoInputs(), d, weighted_ce)
    learn.fit(2)
    assert_same(params(learn.model), ref)
    learn = MomentumLearner(TwoInputs(), d, weighted_ce, mom=0.0)  # momentum 0: the plain step
    learn.n_inp = 2
    learn.fit(2)
    assert_same(params(learn.model), ref)


def test_a_train_cb_subclass_that_skips_train_cb_init_still_steps():
    class OwnInit(TrainCB):
        def __init__(self, scale): self.scale = scale  # no super().__init__(), as some course callbacks do

    learn = Learner(toy_model(), dls(), F.cross_entropy, cbs=[OwnInit(2)])
    learn.fit(1)
    ref = Learner(toy_model(), dls(), F.cross_entropy, cbs=[TrainCB()])
    ref.fit(1)
    assert_same(params(learn.model), params(ref.model))


def test_n_inp_is_checked():
    for bad in (0, 1.5, True, 'x'):
        with pytest.raises(ValueError, match=rf"TrainCB: n_inp \(how many leading batch elements the model takes\) must be "
                                             rf"an int >= 1, got {bad!r}"):
            TrainCB(bad)
    with pytest.raises(ValueError, match=r'MixedPrecision: n_inp \(how many .*\) must be an int >= 1, got 0'):
        MixedPrecision(0)


@pytest.fixture
def fresh_accelerate():
    state = pytest.importorskip('accelerate.state')
    state.AcceleratorState._reset_state(True)
    yield
    state.AcceleratorState._reset_state(True)


def test_accelerate_cb_takes_n_inp_first(fresh_accelerate):
    d, _, _ = two_input_data()
    learn = Learner(TwoInputs(), d, weighted_ce, cbs=[cb := AccelerateCB(n_inp=2, mixed_precision='no', cpu=True)])
    learn.fit(2)
    assert_same(params(learn.model), hand_two_inputs())
    assert repr(cb) == "AccelerateCB(n_inp=2, mixed_precision='no')"
    with pytest.raises(TypeError, match=r"the first parameter is n_inp, got 'bf16'; pass the mode by name: "
                                        r"AccelerateCB\(mixed_precision='bf16'\)"):
        AccelerateCB('bf16')


# ---- MixedPrecision -------------------------------------------------------------------------------------------------
class Look(Callback):
    def __init__(self): self.dtypes = []
    def after_predict(self, learn): self.dtypes.append(learn.preds.dtype)


@pytest.mark.parametrize('dtype', [None, torch.float16])
def test_mixed_precision_is_the_step_provider_on_the_events_of_mixed_precision_cb(dtype):
    # the course's Learner(model, dls, loss, cbs=[DeviceCB(), MixedPrecision()]): no TrainCB needed
    look = Look()
    learn = Learner(toy_model(), dls(), F.cross_entropy, cbs=[mp := MixedPrecision(dtype=dtype), look])
    learn.fit(2)
    ref = Learner(toy_model(), dls(), F.cross_entropy, cbs=[TrainCB(), ref_cb := MixedPrecisionCB(dtype)])
    ref.fit(2)
    assert_same(params(learn.model), params(ref.model))
    assert set(look.dtypes) == {dtype or torch.bfloat16}  # CPU default: bfloat16 (CPU float16 kernels are slow)
    assert (mp.scaler is None) == (dtype is None) and mp.skipped == ref_cb.skipped == 0
    assert isinstance(mp, MixedPrecisionCB) and mp.order == MixedPrecisionCB.order
    with pytest.raises(ValueError, match=r'MixedPrecision\(.*\) and TrainCB\(\) both define predict\(\)'):
        Learner(toy_model(), dls(), F.cross_entropy, cbs=[MixedPrecision(), TrainCB()]).fit(1)


def test_mixed_precision_evaluates_without_an_optimiser():
    # miniai's FID notebook: Learner(model, dls, loss, cbs=[DeviceCB(), MixedPrecision()], opt_func=None)
    model = toy_model()
    learn = Learner(model, dls(), F.cross_entropy, cbs=[MixedPrecision(dtype=torch.float16)], opt_func=None)
    preds, targs = learn.capture_preds()
    with torch.autocast('cpu', dtype=torch.float16): ref = by_batch(model, toy_data(64, 40)[2])
    assert preds.dtype == torch.float16 and torch.equal(preds, ref) and learn.opt is None


def by_batch(model, x): return torch.cat([model(b) for b in x.split(BS)]).detach()


# ---- BatchTransformCB -----------------------------------------------------------------------------------------------
class SeenX(Callback):
    def __init__(self): self.seen = []
    def after_predict(self, learn): self.seen.append((learn.training, learn.batch[0].clone()))


@pytest.mark.parametrize('on_train, on_val', [(True, True), (True, False), (False, True)])
def test_batch_transform_applies_in_the_phases_asked_for(on_train, on_val):
    def tfm(b): return (b[0] + 100, b[1])
    seen = SeenX()
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, cbs=[BatchTransformCB(tfm, on_train, on_val), seen])
    learn.fit(1)
    x, _, xv, _ = toy_data(64, 40)
    want = [(True, xb + 100 * on_train) for xb in x.split(BS)] + [(False, xb + 100 * on_val) for xb in xv.split(BS)]
    assert [t for t, _ in seen.seen] == [t for t, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen.seen, want))


def test_batch_transform_bad_arguments():
    with pytest.raises(TypeError, match='tfm must be callable as tfm\\(batch\\) -> batch, got 3'): BatchTransformCB(3)
    with pytest.raises(ValueError, match='on_train and on_val are both False'): BatchTransformCB(fc.noop, False, False)


# ---- CapturePreds and capture_preds ---------------------------------------------------------------------------------
def test_capture_preds_shapes_values_and_no_training():
    learn = TrainLearner(model := toy_model(), dls(), F.cross_entropy)
    before = params(model)
    preds, targs = learn.capture_preds()
    _, _, xv, yv = toy_data(64, 40)
    assert preds.shape == (40, 3) and targs.shape == (40,)  # 40 = 2 full batches and one of 8
    assert torch.equal(preds, by_batch(model, xv)) and torch.equal(targs, yv)
    p2, t2, inps = learn.capture_preds(inps=True)
    assert inps.shape == (40, 8) and torch.equal(inps, xv) and torch.equal(p2, preds) and torch.equal(t2, targs)
    assert_same(params(model), before)
    # test-time augmentation, the course's way: a valid-phase transform joins for this call only
    flip = BatchTransformCB(lambda b: (-b[0], b[1]), on_train=False)
    tta, _ = learn.capture_preds(cbs=[flip])
    assert torch.equal(tta, by_batch(model, -xv)) and flip not in learn.cbs


def test_capture_preds_of_an_evaluation_only_learner():
    # the FID notebook: a non-scalar "loss" (fc.noop returns the preds) is fine when nothing trains
    x, y = torch.randn(10, 8), torch.arange(10)
    model = toy_model()
    learn = TrainLearner(model, DataLoaders([], [(x, y)]), loss_func=fc.noop, opt_func=None)
    preds, targs = learn.capture_preds()
    assert torch.equal(preds, model(x).detach()) and torch.equal(targs, y)
    assert learn.loss.shape == (10, 3)
    with pytest.raises(ValueError, match=r'learn.loss has shape \(16, 3\); it must be a scalar'):
        TrainLearner(toy_model(), dls(), loss_func=fc.noop).fit(1)  # training still needs a scalar for backward


def test_capture_preds_callback_by_hand_and_after_a_cancel():
    # the course's ensembling: learn.fit(1, train=False, cbs=cp) then cp.all_preds
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy)
    cp = CapturePreds()
    learn.fit(1, train=False, cbs=cp)
    assert cp.all_preds.shape == (40, 3) and cp.all_targs.shape == (40,) and cp.all_inps.shape == (40, 8)
    learn.fit(1, train=False, cbs=[cp, SingleBatchCB()])  # cancelled after one batch: what it saw is readable
    assert cp.all_preds.shape == (16, 3)


def test_capture_preds_of_tuple_inputs():
    d, (x, t, y, w), _ = two_input_data()
    learn = Learner(model := TwoInputs(), d, weighted_ce, cbs=[TrainCB(n_inp=2)])
    preds, targs, inps = learn.capture_preds(inps=True)
    xv = torch.cat([b[0] for b in d.valid])
    assert torch.equal(preds, torch.cat([model(b[0], b[1]) for b in d.valid]).detach()) and torch.equal(inps, xv)
    assert torch.equal(targs, torch.cat([b[1] for b in d.valid]))  # as miniai's: batch[0] and batch[1], whatever n_inp


# ---- ActivationStats, HooksCallback, append_stats, get_hist, get_min --------------------------------------------------
def test_activation_stats_default_hooks_every_module_as_fc_noop_does(tmp_path):
    learn = TrainLearner(model := toy_model(), dls(), F.cross_entropy, cbs=[astats := ActivationStats()])
    learn.fit(1)
    assert [h.module for h in astats] == list(model.modules()) and len(astats) == 4  # the Sequential itself too
    learn2 = TrainLearner(toy_model(), dls(), F.cross_entropy, cbs=[fcs := ActivationStats(fc.noop)])
    learn2.fit(1)
    assert [len(h.stats[0]) for h in fcs] == [len(h.stats[0]) for h in astats] == [4] * 4  # 4 training batches
    for h, k in zip(astats, fcs): assert torch.equal(h.stats[2], k.stats[2])
    for name in ('color_dim', 'dead_chart', 'plot_stats'):
        assert getattr(astats, name)(path=tmp_path / f'{name}.png').read_bytes()[:4] == b'\x89PNG'


def test_activation_stats_with_a_filter_equal_append_stats_by_hand():
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, cbs=[astats := ActivationStats(fc.risinstance(nn.ReLU))])
    learn.fit(1)
    (h,) = astats
    assert isinstance(h.module, nn.ReLU)
    # the same batches through the same weights, with the course's append_stats on a plain Hooks
    ref = TrainLearner(toy_model(), dls(), F.cross_entropy)
    with Hooks([ref.model[1]], append_stats) as hooks: ref.fit(1, valid=False)
    (r,) = hooks
    assert torch.equal(get_hist(h), get_hist(r)) and get_hist(h).shape == (40, 4)
    hist = torch.stack(r.stats[2]).t()
    assert torch.equal(get_min(r), hist[0] / hist.sum(0)) and torch.equal(get_min(h), get_min(r))
    torch.testing.assert_close(h.stats[0], torch.stack(r.stats[0]))
    torch.testing.assert_close(h.stats[1], torch.stack(r.stats[1]))


def test_a_filter_that_matches_nothing_hooks_nothing():
    # the course reuses cbs holding ActivationStats(GeneralRelu) on models built with nn.ReLU
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, cbs=[astats := ActivationStats(fc.risinstance(nn.Conv2d))])
    with pytest.warns(UserWarning, match='ActivationStats: mod_filter .* matched no module of learn.model'): learn.fit(1)
    assert len(astats) == 0 and list(astats) == []


def test_hooks_callback_iterates_over_its_hooks():
    hc = HooksCallback(append_stats, mod_filter=nn.Linear)
    TrainLearner(model := toy_model(), dls(), F.cross_entropy, cbs=[hc]).fit(1)
    assert len(hc) == 2 and [h.module for h in hc] == [model[0], model[2]]
    assert all(len(h.stats[0]) == 4 for h in hc)  # training batches only (on_valid=False)


# ---- lr_find and LRFinderCB -----------------------------------------------------------------------------------------
class LRs(Callback):
    order = -1  # before the finder multiplies the lr

    def __init__(self): self.lrs = []

    def after_batch(self, learn):
        if learn.training: self.lrs.append(learn.opt.param_groups[0]['lr'])


def regression_learner():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    torch.manual_seed(0)
    return TrainLearner(nn.Linear(8, 1), DataLoaders.from_tensors(x, y, x[:32], y[:32], bs=16, shuffle=False), F.mse_loss)


@pytest.mark.filterwarnings('ignore:lr_find')
@pytest.mark.parametrize('args, kwargs, gamma', [((1.1,), {}, 1.1), ((), {'gamma': 1.2}, 1.2), ((), {'lr_mult': 1.2}, 1.2),
                                                 ((), {}, 1.3)])
def test_lr_find_first_parameter_is_the_multiplier(args, kwargs, gamma):
    learn = regression_learner()
    learn.add_cb(rec := LRs())
    learn.lr_find(*args, start_lr=1e-4, plot=False, **kwargs)
    assert rec.lrs[0] == 1e-4 and len(rec.lrs) > 5
    assert all(math.isclose(b / a, gamma) for a, b in zip(rec.lrs, rec.lrs[1:]))


@pytest.mark.parametrize('max_mult, n', [(1.5, 4), (3, 6), (10, 8)])
def test_lr_finder_max_mult_is_the_divergence_factor(max_mult, n):
    script = [1.0, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 20.0, 1.0, 1.0]  # exact in float32; a loss equal to the bound goes on

    class Scripted(Callback):
        order = -1  # sets the loss the finder reads (beta=0: raw losses, as miniai compares them)
        def after_batch(self, learn): learn.loss = torch.tensor(script[learn.iter])

    finder = LRFinderCB(1.3, max_mult, beta=0)
    regression_learner().fit(1, valid=False, cbs=[Scripted(), finder], lr=1e-3)
    assert finder.losses == script[:n] and len(finder.lrs) == n  # stopped at the first loss above max_mult * min


@pytest.mark.filterwarnings('ignore:lr_find')
def test_lr_find_hands_its_arguments_to_the_finder():
    seen = []

    class Spy(Callback):
        def before_fit(self, learn):
            seen.extend((cb.gamma, cb.max_mult, learn.opt.param_groups[0]['lr'], learn.n_epochs)
                        for cb in learn.cbs if isinstance(cb, LRFinderCB))

    learn = regression_learner()
    learn.add_cb(Spy())
    learn.lr_find(1.2, 5, 1e-4, 2, plot=False)
    learn.lr_find(plot=False)
    assert seen == [(1.2, 5, 1e-4, 2), (1.3, 3, 1e-5, 10)]


# ---- RecorderCB, BaseSchedCB, HasLearnCB ----------------------------------------------------------------------------
def test_recorder_records_each_training_batch(tmp_path):
    def _lr(cb): return cb.pg['lr']
    def _beta1(cb): return cb.pg['betas'][0]
    rec = RecorderCB(lr=_lr, mom=_beta1)
    sched = BatchSchedCB(partial(lr_scheduler.StepLR, step_size=1, gamma=0.5))
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, lr=0.1, cbs=[sched, rec], opt_func=optim.AdamW)
    learn.fit(2)
    assert rec.recs['lr'] == [0.1 * 0.5 ** (i + 1) for i in range(8)]  # recorded after the step: the next batch's lr
    assert rec.recs['mom'] == [0.9] * 8 and rec.pg is learn.opt.param_groups[0]
    assert rec.plot(path=tmp_path / 'rec.png').read_bytes()[:4] == b'\x89PNG'
    with pytest.raises(TypeError, match=r"RecorderCB: lr=0.1 is not callable"): RecorderCB(lr=0.1)
    with pytest.raises(ValueError, match='RecorderCB needs something to record'): RecorderCB()


def test_base_sched_cb_steps_in_training_only_and_names_the_scheduler_schedo():
    class EveryBatchSchedCB(BaseSchedCB):  # the course's BatchSchedCB: steps in after_batch, training phases only
        def after_batch(self, learn): self._step(learn)

    cb = EveryBatchSchedCB(partial(lr_scheduler.StepLR, step_size=1, gamma=0.5))
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, lr=0.1, cbs=[cb])
    learn.fit(2)  # 4 training and 3 valid batches per epoch
    assert cb.schedo is cb.sched and cb.schedo.last_epoch == 8
    assert cb.lrs == [0.1 * 0.5 ** i for i in range(8)]


def test_has_learn_cb_holds_the_learner_during_fit_only():
    seen = []

    class Peek(HasLearnCB):
        def after_batch(self, learn): seen.append(self.learn)

    class Boom(Callback):
        def after_batch(self, learn): raise RuntimeError('boom')

    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, cbs=[peek := Peek()])
    assert peek.learn is None
    learn.fit(1)
    assert seen and all(s is learn for s in seen) and peek.learn is None
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=[Boom()])
    assert peek.learn is None


# ---- run_cbs and with_cbs: the course's hand-written learner --------------------------------------------------------
class Trace(Callback):
    def __init__(self, order=0, name='t'): self.order, self.nm, self.log = order, name, []

    def __getattr__(self, ev):
        if ev.startswith(('before_', 'after_', 'cleanup_')): return lambda learn: self.log.append(ev)
        raise AttributeError(ev)


def test_run_cbs_calls_each_method_in_order_and_skips_the_others():
    calls = []

    class A(Callback):
        order = 2
        def before_fit(self, learn): calls.append(('A', learn))

    class B(Callback):
        def before_fit(self, learn): calls.append(('B', learn))

    class C: pass  # no order, no method: skipped
    run_cbs([A(), B(), C()], 'before_fit')
    assert calls == [('B', None), ('A', None)]
    run_cbs([A(), B()], 'before_fit', 'L')
    assert calls[2:] == [('B', 'L'), ('A', 'L')]


class HandLearner:
    """The seed's Learner written by hand on run_cbs and with_cbs, with no `training` property (miniai's MetricsCB
    reads learn.model.training)."""
    def __init__(self, model, dls, loss_func, lr, cbs):
        self.model, self.dls, self.loss_func, self.lr, self.cbs = model, dls, loss_func, lr, cbs

    @with_cbs('batch')
    def _one_batch(self):
        self.preds = self.model(self.batch[0])
        self.callback('after_predict')
        self.loss = self.loss_func(self.preds, self.batch[1])
        self.callback('after_loss')
        if self.model.training:
            self.loss.backward(); self.opt.step(); self.opt.zero_grad()

    @with_cbs('epoch')
    def _one_epoch(self):
        for self.iter, self.batch in enumerate(self.dl): self._one_batch()

    def one_epoch(self, training):
        self.model.train(training)
        self.dl = self.dls.train if training else self.dls.valid
        self._one_epoch()

    @with_cbs('fit')
    def _fit(self):
        for self.epoch in range(self.n_epochs):
            self.one_epoch(True)
            with torch.no_grad(): self.one_epoch(False)

    def fit(self, n_epochs):
        self.n_epochs, self.opt = n_epochs, optim.SGD(self.model.parameters(), self.lr)
        self._fit()

    def callback(self, nm): run_cbs(self.cbs, nm, self)


def test_a_hand_written_learner_on_with_cbs_and_run_cbs(capsys):
    class CancelSecond(Callback):
        def after_predict(self, learn):
            if learn.iter == 1: raise CancelBatchException()

    class StopAt(Callback):
        def after_epoch(self, learn):
            if learn.epoch == 1 and not learn.model.training: raise CancelFitException()

    t = Trace()
    learn = HandLearner(toy_model(), dls(32, 32), F.cross_entropy, 0.1, [t, CancelSecond(), StopAt(), MetricsCB()])
    learn.fit(5)
    batch = ['before_batch', 'after_predict', 'after_loss', 'after_batch', 'cleanup_batch']
    cancelled = ['before_batch', 'after_predict', 'cleanup_batch']  # after_batch skipped, cleanup runs
    phase = ['before_epoch', *batch, *cancelled, 'after_epoch', 'cleanup_epoch']
    # StopAt cancels fit in the 4th phase's after_epoch (after Trace's, before MetricsCB's): cleanups run, no after_fit
    assert t.log == ['before_fit', *phase * 4, 'cleanup_fit']
    rows = [eval(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r['epoch'], r['train']) for r in rows] == [(0, 'train'), (0, 'eval'), (1, 'train')]


def test_with_cbs_refuses_an_unknown_name_and_lets_errors_through_after_cleanup():
    with pytest.raises(ValueError, match=r"with_cbs\('predict'\): the name must be one of 'fit', 'epoch', 'batch'"):
        with_cbs('predict')
    t = Trace()

    class Owner:
        cbs = [t]
        def callback(self, nm): run_cbs(self.cbs, nm, self)

        @with_cbs('fit')
        def go(self): raise KeyError('x')

    with pytest.raises(KeyError, match='x'): Owner().go()
    assert t.log == ['before_fit', 'cleanup_fit'] and Owner.go.__name__ == 'go'


# ---- set_seed -------------------------------------------------------------------------------------------------------
@pytest.fixture
def restore_determinism():
    was = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(was)


def test_set_seed_seeds_torch_random_and_numpy(restore_determinism):
    def draw(): return torch.randn(3).tolist(), random.random(), np.random.rand()
    set_seed(42)
    a = draw()
    set_seed(42, deterministic=True)
    assert draw() == a and torch.are_deterministic_algorithms_enabled()
    set_seed(43)
    assert draw() != a and not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ValueError, match="set_seed: seed must be an int, got '1'"): set_seed('1')


# ---- DataLoaders.from_dd over an in-memory DatasetDict-like mapping ---------------------------------------------------
class MemDataset:
    """Stands in for a Hugging Face Dataset: columns of python values, `features`, and `with_transform(f)` where `f`
    takes a batch dict of lists (as the course's transforms do) and indexing returns one transformed row."""
    def __init__(self, cols: dict, tfm=None): self.cols, self.tfm = cols, tfm
    @property
    def features(self): return dict.fromkeys(self.cols)
    def __len__(self): return len(next(iter(self.cols.values())))

    def __getitem__(self, i):
        b = {k: [v[i]] for k, v in self.cols.items()}
        if self.tfm is not None: b = self.tfm(b)
        return {k: v[0] for k, v in b.items()}

    def with_transform(self, f): return MemDataset(self.cols, f)


class MemDatasetDict(dict):
    def with_transform(self, f): return MemDatasetDict({k: v.with_transform(f) for k, v in self.items()})


def mem_dsd():
    g = torch.Generator().manual_seed(0)
    def split(n): return MemDataset({'image': torch.randint(0, 256, (n, 4, 4), generator=g, dtype=torch.uint8).tolist(),
                                     'label': torch.randint(0, 3, (n,), generator=g).tolist()})
    return MemDatasetDict(train=split(40), test=split(20))


def transformi(b):  # the course's: images to float tensors in [0, 1], flattened; done in place on the batch dict
    b['image'] = [torch.tensor(o, dtype=torch.float32).flatten() / 255 for o in b['image']]
    return b


def test_from_dd_builds_tuple_batches_through_the_transform():
    dsd = mem_dsd()
    tds = dsd.with_transform(transformi)
    d = DataLoaders.from_dd(tds, 8)
    xb, yb = next(iter(d.valid))
    assert xb.shape == (16, 16) and xb.dtype == torch.float32 and yb.shape == (16,)  # valid: twice the batch size
    want = torch.tensor(dsd['test'].cols['image'][:16], dtype=torch.float32).flatten(1) / 255
    assert torch.equal(xb, want) and yb.tolist() == dsd['test'].cols['label'][:16]
    assert len(d.train) == 5 and isinstance(d.train.sampler, torch.utils.data.RandomSampler)
    learn = TrainLearner(nn.Linear(16, 3), d, F.cross_entropy, cbs=[m := MetricsCB()])
    m._log = lambda row: None
    learn.fit(1)
    assert [r['train'] for r in m.history] == ['train', 'eval'] and all(math.isfinite(r['loss']) for r in m.history)
    db = next(iter(DataLoaders.from_dd(tds, 8, as_tuple=False).valid))
    assert set(db) == {'image', 'label'} and torch.equal(db['image'], want)


def test_from_dd_bad_inputs_and_collate_dict_without_features():
    tds = mem_dsd()
    with pytest.raises(ValueError, match=r"from_dd needs exactly two splits \('train' and a valid one\), got "
                                         r"\['train', 'test', 'x'\]"):
        DataLoaders.from_dd(MemDatasetDict(tds, x=tds['test']), 8)
    with pytest.raises(TypeError, match=r"from_dd needs a dict of datasets with a 'train' split .* \['a', 'b'\]"):
        DataLoaders.from_dd({'a': tds['train'], 'b': tds['test']}, 8)
    rows = [{'x': torch.tensor([float(i)]), 'y': i} for i in range(4)]  # no .features: the first row's keys
    x, y = collate_dict(rows)(rows)
    assert x.shape == (4, 1) and y.tolist() == [0, 1, 2, 3]
    train, valid = get_dls(rows, rows, 3)
    assert train.batch_size == 3 and valid.batch_size == 6
    with pytest.raises(ValueError, match='get_dls: bs must be an int >= 1, got 0'): get_dls(rows, rows, 0)


# ---- MetricsCB and ProgressCB as course subclasses use them; show_image_batch; the optimiser across fits -----------------
def test_progress_cb_exposes_its_bars(capsys):
    seen = []

    class Peek(ProgressCB):
        def after_batch(self, learn):
            super().after_batch(learn)
            seen.append((self.mbar.total, self.pbar.total))

    assert Peek().mbar is None
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, cbs=[Peek()])
    learn.fit(2)
    assert seen == [(2, 4)] * 4 + [(2, 3)] * 3 + [(2, 4)] * 4 + [(2, 3)] * 3


def test_show_image_batch_shows_the_transformed_batch_without_training(tmp_path):
    x = torch.rand(32, 1, 6, 6)
    d = DataLoaders.from_tensors(x, torch.zeros(32, dtype=torch.long), x, torch.zeros(32, dtype=torch.long), bs=8,
                                 shuffle=False)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    learn = TrainLearner(model, d, F.cross_entropy)
    before = params(model)
    aug = BatchTransformCB(lambda b: (b[0].flip(-1), b[1]), on_val=False)
    png = learn.show_image_batch(max_n=4, cbs=[aug], path=tmp_path / 'b.png')
    assert png.read_bytes()[:4] == b'\x89PNG' and torch.equal(learn.batch[0], x[:8].flip(-1))
    assert_same(params(model), before)


def test_a_fresh_optimiser_each_fit_as_in_miniai_is_one_line():
    sgd = partial(optim.SGD, momentum=0.9)

    def after_one_fit():
        learn = TrainLearner(toy_model(), dls(), F.cross_entropy, opt_func=sgd)
        learn.fit(1)
        return learn, copy.deepcopy(learn.model)

    kept, _ = after_one_fit()
    opt = kept.opt
    kept.fit(1)
    assert kept.opt is opt  # ultraloop keeps it, with its momentum
    learn, weights = after_one_fit()
    learn.opt = None; learn.fit(1)  # the README's line: a new optimiser, as miniai makes every fit
    fresh = TrainLearner(weights, dls(), F.cross_entropy, opt_func=sgd)
    fresh.fit(1)
    assert_same(params(learn.model), params(fresh.model))
    with pytest.raises(AssertionError): assert_same(params(kept.model), params(fresh.model))  # the momentum mattered
