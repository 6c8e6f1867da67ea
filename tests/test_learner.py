"""Behaviour of the Learner, the core callbacks, the loaders and every error the core raises."""
import copy

import pytest
import torch
from conftest import toy_data, toy_model
from torch import nn
from torch.nn import functional as F

from ultraloop import (Callback, CancelFitException, DataLoaders, DeviceCB, Learner, MomentumLearner, SingleBatchCB,
                       SingleEpochCB, TensorLoader, TraceCB, TrainCB, TrainLearner, def_device, to_cpu, to_device)


def dls(n_train=64, n_valid=32, bs=16, **kw):
    return DataLoaders.from_tensors(*toy_data(n_train, n_valid), bs=bs, **kw)


def hand_sgd(model, data, lr, epochs, bs):
    """Plain SGD over the same batches, the reference the loop must match exactly."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = data[0], data[1]
    for _ in range(epochs):
        for i in range(0, len(x), bs):
            F.cross_entropy(model(x[i:i + bs]), y[i:i + bs]).backward()
            opt.step(); opt.zero_grad()
    return model


# ---- training equals a hand-written loop ---------------------------------------------------------------------------
@pytest.mark.parametrize('style', ['TrainLearner', 'Learner+TrainCB'])
def test_fit_equals_hand_written_sgd(style):
    data = toy_data(64, 32)
    d = DataLoaders.from_tensors(*data, bs=16, shuffle=False)
    if style == 'TrainLearner':
        learn = TrainLearner(toy_model(), d, F.cross_entropy, lr=0.2)
    else:
        learn = Learner(toy_model(), d, F.cross_entropy, lr=0.2, cbs=TrainCB())
    learn.fit(3)
    ref = hand_sgd(toy_model(), data, 0.2, 3, 16)
    for p, q in zip(learn.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_momentum_learner_decays_gradients_instead_of_zeroing():
    data = toy_data(32, 16)
    learn = MomentumLearner(toy_model(), DataLoaders.from_tensors(*data, bs=16, shuffle=False), F.cross_entropy,
                            lr=0.1, mom=0.5)
    learn.fit(1, valid=False)
    # by hand: g1 step, grad <- 0.5 g1; g2 adds; step; grad <- 0.5 (0.5 g1 + g2)
    m = toy_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for i in (0, 16):
        F.cross_entropy(m(data[0][i:i + 16]), data[1][i:i + 16]).backward()
        opt.step()
        for p in m.parameters(): p.grad *= 0.5
    for p, q in zip(learn.model.parameters(), m.parameters()):
        assert torch.allclose(p, q) and torch.allclose(p.grad, q.grad)


def test_optimizer_state_kept_across_fits_and_lr_reset_each_fit():
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, lr=0.1,
                         opt_func=lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9))
    learn.fit(1)
    opt = learn.opt
    buf = opt.state[next(learn.model.parameters())]['momentum_buffer'].clone()
    learn.fit(1, lr=0.01)
    assert learn.opt is opt and opt.param_groups[0]['lr'] == 0.01
    assert not torch.equal(buf, opt.state[next(learn.model.parameters())]['momentum_buffer'])
    learn.fit(0)
    assert opt.param_groups[0]['lr'] == 0.1  # each fit starts at learn.lr unless told otherwise


def test_new_optimizer_when_model_replaced():
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy)
    learn.fit(1)
    first = learn.opt
    learn.model = toy_model(seed=1)
    learn.fit(1)
    assert learn.opt is not first
    assert {id(p) for g in learn.opt.param_groups for p in g['params']} == {id(p) for p in learn.model.parameters()}


def test_fit_train_false_only_validates_and_needs_no_backward():
    class PredictOnly(Callback):
        def predict(self, learn): learn.preds = learn.model(learn.batch[0])
        def get_loss(self, learn): learn.loss = learn.loss_func(learn.preds, learn.batch[1])

    trace = TraceCB()
    learn = Learner(toy_model(), dls(n_valid=32, bs=16), F.cross_entropy, cbs=[PredictOnly(), trace])
    before = copy.deepcopy(learn.model.state_dict())
    learn.fit(1, train=False)
    assert trace.events.count('before_batch') == 2 and 'after_backward' not in trace.events
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())


def test_fit_cbs_are_temporary_even_when_fit_fails():
    class Boom(Callback):
        def before_batch(self, learn): raise RuntimeError('boom')

    learn = TrainLearner(toy_model(), dls(), F.cross_entropy)
    tmp = TraceCB()
    learn.fit(1, cbs=[tmp])
    assert learn.cbs == [] and tmp.events[0] == 'before_fit'
    with pytest.raises(RuntimeError, match='boom'):
        learn.fit(1, cbs=Boom())
    assert learn.cbs == []
    learn.fit(1)  # still usable


def test_add_rm_cb_rebuild_the_table():
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy)
    t = TraceCB()
    learn.add_cb(t)
    learn.fit(1)
    n = len(t.events)
    learn.rm_cb(t)
    learn.fit(1)
    assert len(t.events) == n
    with pytest.raises(ValueError, match='not in learn.cbs'):
        learn.rm_cb(t)
    kept = TraceCB()
    learn.add_cb(kept)
    with pytest.raises(ValueError, match='not in learn.cbs'):
        learn.rm_cbs([kept, t])  # one bad entry: nothing is removed
    assert learn.cbs == [kept]
    learn.fit(1)
    assert kept.events[0] == 'before_fit'


def test_callback_step_method_replaces_the_learner_own():
    calls = []

    class CountingStep(Callback):
        def step(self, learn): calls.append(learn.iter); learn.opt.step()

    learn = MomentumLearner(toy_model(), dls(bs=32), F.cross_entropy, cbs=CountingStep())
    learn.fit(1)
    assert calls == [0, 1]


def test_step_methods_callable_from_a_callback():
    # the seed's GradientAccumulationCB calls learn.step() and learn.zero_grad() in after_epoch
    class StepAtEnd(Callback):
        def after_epoch(self, learn):
            if learn.training: learn.step(); learn.zero_grad()

    learn = Learner(toy_model(), dls(), F.cross_entropy, cbs=[TrainCB(), StepAtEnd()])
    learn.fit(1)
    assert all(p.grad is None for p in learn.model.parameters())


# ---- the core callbacks ----------------------------------------------------------------------------------------
def test_device_cb_moves_model_and_batch_as_list():
    seen = []

    class Look(Callback):
        order = 1
        def before_batch(self, learn): seen.append((type(learn.batch), learn.batch[0].device))

    tuples = DataLoaders([(x, y) for x, y in dls().train], [(x, y) for x, y in dls().valid])
    learn = TrainLearner(toy_model(), tuples, F.cross_entropy, cbs=[DeviceCB('cpu'), Look()])
    learn.fit(1)
    assert seen and all(t is list and d == torch.device('cpu') for t, d in seen)
    assert next(learn.model.parameters()).device == torch.device('cpu')


def test_device_cb_refuses_mps_where_there_is_none():
    if torch.backends.mps.is_available(): pytest.skip('this machine has MPS')
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, cbs=[DeviceCB('mps')])
    with pytest.raises(ValueError, match=r"DeviceCB\('mps'\): MPS is not available on this machine; use DeviceCB\(\)"):
        learn.fit(1)
    learn.rm_cb(learn.cbs[0])
    learn.fit(1)  # still usable


def test_single_batch_cb_stops_after_one_batch(capsys):
    t = TraceCB()
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, cbs=[SingleBatchCB(), t])
    learn.fit(3)
    assert t.events.count('before_batch') == 1 and t.events[-1] == 'cleanup_fit'
    assert '[SingleBatchCB] Terminating' in capsys.readouterr().out


def test_single_epoch_cb_stops_after_first_valid_phase(capsys):
    t = TraceCB()
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, cbs=[SingleEpochCB(), t])
    learn.fit(3)
    assert t.events.count('before_epoch') == 2 and 'after_fit' not in t.events
    assert '[SingleEpochCB] Terminating' in capsys.readouterr().out


def test_trace_cb_verbose_prints_indented(capsys):
    learn = TrainLearner(toy_model(), dls(n_train=16, n_valid=16), F.cross_entropy, cbs=TraceCB(verbose=True))
    learn.fit(1)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == 'before_fit' and out[1] == '  before_epoch train' and out[2] == '    before_batch train'


def test_show_training_loop_lists_events_and_providers(capsys):
    class Noisy(Callback):
        def after_loss(self, learn): pass

    learn = Learner(toy_model(), dls(), F.cross_entropy, cbs=[TrainCB(), Noisy()])
    learn.show_training_loop()
    out = capsys.readouterr().out
    assert 'predict() -> TrainCB()' in out and 'after_loss: Noisy()' in out and 'before_fit: -' in out


# ---- loaders and device helpers ---------------------------------------------------------------------------------
def test_from_tensors_batches_cover_data_once_in_seeded_order():
    x = torch.arange(10.).unsqueeze(1); y = torch.arange(10)
    d = DataLoaders.from_tensors(x, y, x, y, bs=4, seed=3)
    batches = list(d.train)
    assert [len(b[0]) for b in batches] == [4, 4, 2] and all(isinstance(b, list) for b in batches)
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10)) and torch.equal(seen, d.train.order)
    assert torch.equal(torch.cat([b[0][:, 0] for b in batches]).long(), seen)  # x and y stay paired
    again = DataLoaders.from_tensors(x, y, x, y, bs=4, seed=3)
    assert torch.equal(torch.cat([b[1] for b in again.train]), seen)
    assert torch.equal(torch.cat([b[1] for b in d.valid]), y)  # valid in order


def test_tensor_loader_state_dict_replays_the_order():
    t = TensorLoader(torch.arange(20), bs=5, shuffle=True, seed=1)
    s = t.state_dict()
    first = torch.cat([b[0] for b in t])
    t.load_state_dict(s)
    assert torch.equal(torch.cat([b[0] for b in t]), first)


def test_to_device_and_to_cpu_keep_structure():
    b = {'x': [torch.ones(2), (torch.zeros(1), 3)]}
    moved = to_device(b, 'cpu')
    assert isinstance(moved['x'], list) and isinstance(moved['x'][1], tuple) and moved['x'][1][1] == 3
    w = torch.ones(2, requires_grad=True) * 2
    assert not to_cpu([w])[0].requires_grad
    assert def_device == ('mps' if torch.backends.mps.is_available() else 'cuda' if torch.cuda.is_available() else 'cpu')


def test_map_tensors_keeps_namedtuples_ordered_dicts_and_state_dict_metadata():
    from collections import OrderedDict, namedtuple

    from ultraloop.utils import map_tensors
    Pair = namedtuple('Pair', 'x y')
    sd = torch.nn.Linear(2, 1).state_dict()
    out = map_tensors(lambda t: t * 2, {'p': Pair(torch.ones(1), 3), 'sd': sd, 'l': [object]}, other=lambda v: ('seen', v))
    assert isinstance(out['p'], Pair) and out['p'].x.item() == 2 and out['p'].y == ('seen', 3)
    assert isinstance(out['sd'], OrderedDict) and out['sd']._metadata == sd._metadata
    assert torch.equal(out['sd']['weight'], sd['weight'] * 2) and out['l'] == [('seen', object)]


# ---- errors: one line, names the problem and the fix, before any batch; the learner stays usable ------------------
def test_misspelt_hook_refused_with_nearest_event():
    class Typo(Callback):
        def after_bach(self, learn): pass

    learn = TrainLearner(toy_model(), dls(), F.cross_entropy)
    with pytest.raises(ValueError, match=r"Typo.after_bach is not an event.*did you mean 'after_batch'"):
        learn.add_cb(Typo())
    with pytest.raises(ValueError, match='after_bach'):
        TrainLearner(toy_model(), dls(), F.cross_entropy, cbs=[Typo()])
    assert learn.cbs == []


def test_callback_class_instead_of_instance():
    with pytest.raises(TypeError, match=r'got the class TrainCB as a callback; pass an instance: TrainCB\(\)'):
        Learner(toy_model(), dls(), F.cross_entropy, cbs=[TrainCB])


def test_object_with_no_hook_refused_as_a_callback():
    for bad, shown in (('TrainCB', "'TrainCB' \\(str\\)"), (None, 'None \\(NoneType\\)')):
        with pytest.raises(TypeError, match=f'got {shown} as a callback, but it has no event or step method'):
            Learner(toy_model(), dls(), F.cross_entropy, cbs=[TrainCB(), bad])
    learn = Learner(toy_model(), dls(), F.cross_entropy, cbs=[TrainCB()])
    with pytest.raises(TypeError, match=r'would do nothing: pass a callback instance such as TrainCB\(\)'):
        learn.fit(1, cbs='TraceCB')
    assert len(learn.cbs) == 1
    learn.fit(1)


def test_same_callback_twice_refused():
    cb = TraceCB()
    with pytest.raises(ValueError, match='already in learn.cbs'):
        TrainLearner(toy_model(), dls(), F.cross_entropy, cbs=[cb, cb])


def test_missing_step_method_named_with_fix_before_any_batch():
    t = TraceCB()
    learn = Learner(toy_model(), dls(), F.cross_entropy, cbs=[t])
    with pytest.raises(AttributeError, match=r'no predict\(\).*add TrainCB\(\) to cbs or subclass TrainLearner'):
        learn.fit(1)
    assert t.events == []
    with pytest.raises(AttributeError, match=r'no step\(\)'):
        learn.step()
    learn.fit(1, cbs=TrainCB())  # fixed as the message says


def test_two_providers_of_a_step_method_named():
    class MyBackward(Callback):
        def backward(self, learn): learn.loss.backward()

    learn = Learner(toy_model(), dls(), F.cross_entropy, cbs=[TrainCB(), MyBackward()])
    with pytest.raises(ValueError, match=r'TrainCB\(\) and MyBackward\(\) both define backward\(\)'):
        learn.fit(1)


def test_batch_that_is_not_a_sequence():
    x, y, xv, yv = toy_data()
    learn = TrainLearner(toy_model(), DataLoaders([x[:16]], [xv[:16]]), F.cross_entropy)
    t = TraceCB()
    with pytest.raises(TypeError, match='dls.train yielded a Tensor; a batch must be a list or tuple'):
        learn.fit(1, cbs=t)
    assert t.events == ['before_fit', 'before_epoch', 'cleanup_epoch', 'cleanup_fit']


def test_loss_that_is_not_a_scalar_tensor():
    learn = TrainLearner(toy_model(), dls(), lambda p, y: F.cross_entropy(p, y, reduction='none'))
    with pytest.raises(ValueError, match=r"learn.loss has shape \(16,\); it must be a scalar.*reduction='mean'"):
        learn.fit(1)
    learn.loss_func = lambda p, y: 1.0
    with pytest.raises(TypeError, match='learn.loss to a float; it must be a scalar tensor'):
        learn.fit(1)
    learn.loss_func = F.cross_entropy
    learn.fit(1)


def test_dls_without_train_valid():
    learn = TrainLearner(toy_model(), [1, 2], F.cross_entropy)
    with pytest.raises(TypeError, match=r'dls has no .train \(list given\): wrap your loaders as DataLoaders'):
        learn.fit(1)
    for bad in ((), (None,), (None, [1])):
        with pytest.raises(TypeError, match=r'DataLoaders needs a train loader: DataLoaders\(train_dl, valid_dl\), or '
                                            r'DataLoaders\(train_dl\) to train without validation'):
            DataLoaders(*bad)


@pytest.mark.parametrize('n, exc, msg', [(-1, ValueError, 'n_epochs must be an int >= 0, got -1'),
                                         (1.5, ValueError, 'n_epochs must be an int >= 0, got 1.5')])
def test_bad_n_epochs(n, exc, msg):
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy)
    with pytest.raises(exc, match=msg):
        learn.fit(n)


def test_bad_lr_and_model():
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy)
    with pytest.raises(ValueError, match='lr must be a finite number >= 0'):
        learn.fit(1, lr=-1)
    with pytest.raises(TypeError, match='model must be a torch.nn.Module'):
        TrainLearner(lambda x: x, dls(), F.cross_entropy).fit(1)


def test_unknown_event_in_callback_call():
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy)
    with pytest.raises(ValueError, match=r"'predict' is not an event; call learn.predict\(\) instead"):
        learn.callback('predict')


def test_bad_loader_arguments():
    with pytest.raises(ValueError, match='tensors differ in length'):
        TensorLoader(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match='bs must be an int >= 1'):
        TensorLoader(torch.zeros(3), bs=0)
    with pytest.raises(TypeError, match='tensor 0 is a list'):
        TensorLoader([1, 2])


def test_cancel_in_before_fit_skips_everything():
    class Stop(Callback):
        def before_fit(self, learn): raise CancelFitException()

    t = TraceCB()
    TrainLearner(nn.Linear(8, 3), dls(), F.cross_entropy, cbs=[t, Stop()]).fit(2)
    assert t.events == ['before_fit', 'cleanup_fit']


def test_device_cb_leaves_resident_loader_batches_alone(monkeypatch):
    import ultraloop.callbacks.core as core
    moved = []
    monkeypatch.setattr(core, 'to_device', lambda b, *a, **k: moved.append(1) or b)
    seen = []

    class Look(Callback):
        order = 1
        def before_batch(self, learn): seen.append(learn.batch[0].data_ptr())

    d = dls(bs=16, shuffle=False)
    ptrs = [b[0].data_ptr() for b in d.train] + [b[0].data_ptr() for b in d.valid]
    TrainLearner(toy_model(), d, F.cross_entropy, cbs=[DeviceCB('cpu'), Look()]).fit(1)
    assert seen == ptrs and moved == []  # the very tensors the loader cut, with no per-batch move
    lists = DataLoaders(list(d.train), list(d.valid))
    TrainLearner(toy_model(), lists, F.cross_entropy, cbs=[DeviceCB('cpu')]).fit(1)
    assert len(moved) == len(ptrs)  # any other loader: every batch goes through to_device


def test_single_iterable_callback_is_one_callback():
    class Iterable(Callback):
        def __iter__(self): return iter([1, 2])
        def before_fit(self, learn): learn.seen = True

    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, cbs=Iterable())
    assert len(learn.cbs) == 1
    learn.fit(0)
    assert learn.seen


# ---- first contact: bad input a new user meets (issue 14) ------------------------------------------------------------
def test_a_phase_with_no_batches_is_an_error_naming_the_fix():
    x, y = torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)
    empty = DataLoaders.from_tensors(x, y, *toy_data(16, 16)[2:], bs=16)
    learn = TrainLearner(toy_model(), empty, F.cross_entropy)
    with pytest.raises(ValueError, match=r'^dls.train has no batches \(its dataset is empty, or smaller than one batch '
                                         r'with drop_last=True\): give it data, or pass train=False to fit$'):
        learn.fit(1)
    assert learn.opt is None  # refused before any work
    # a loader without a length that yields nothing: found when the phase ends
    learn = TrainLearner(toy_model(), DataLoaders(dls().train, iter(())), F.cross_entropy)
    with pytest.raises(ValueError, match=r'^dls.valid yielded no batches in epoch 0: it is a tuple_iterator, which is used '
                                         r'up after one pass; give a loader that can be iterated again'):
        learn.fit(1)


def test_a_generator_used_up_by_the_first_epoch_is_named():
    data = toy_data(32, 16)
    gen = ((data[0][i:i + 16], data[1][i:i + 16]) for i in (0, 16))
    t = TraceCB()
    learn = TrainLearner(toy_model(), DataLoaders(gen, dls().valid), F.cross_entropy, cbs=[t])
    with pytest.raises(ValueError, match=r'^dls.train yielded no batches in epoch 1: it is a generator, which is used up '
                                         r'after one pass; give a loader that can be iterated again \(a DataLoader, a list '
                                         r'of batches, DataLoaders.from_tensors\(...\)\)$'):
        learn.fit(2)
    assert t.events.count('after_batch') == 2 + 2  # epoch 0's two train and two valid batches ran


@pytest.mark.parametrize('event', ['after_backward', 'after_step'])
def test_after_a_failed_fit_the_next_one_starts_from_clean_gradients(event):
    class Boom(Callback):
        def __init__(self): self.armed = True

    def boom(self, learn):
        if self.armed: self.armed = False; raise RuntimeError('boom')
    setattr(Boom, event, boom)
    data = toy_data(32, 16)
    d = DataLoaders.from_tensors(*data, bs=16, shuffle=False)
    learn = TrainLearner(toy_model(), d, F.cross_entropy, lr=0.1, cbs=[Boom()])
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learn.model.parameters())  # kept for inspection
    if event == 'after_step':  # the failed fit stepped once: take that step in the reference too
        ref_model = hand_sgd(toy_model(), (data[0][:16], data[1][:16]), 0.1, 1, 16)
    else: ref_model = toy_model()
    learn.fit(1, valid=False)
    ref = hand_sgd(ref_model, data, 0.1, 1, 16)  # a clean fit from the same weights
    for p, q in zip(learn.model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_momentum_learner_keeps_its_gradients_across_successful_fits():
    data = toy_data(32, 16)
    learn = MomentumLearner(toy_model(), DataLoaders.from_tensors(*data, bs=32, shuffle=False), F.cross_entropy,
                            lr=0.1, mom=0.5)
    learn.fit(1, valid=False)
    kept = [p.grad.clone() for p in learn.model.parameters()]
    seen = []

    class Look(Callback):
        def before_batch(self, learn): seen.extend(p.grad.clone() for p in learn.model.parameters())
    learn.fit(1, valid=False, cbs=[Look()])
    assert all(torch.equal(a, b) for a, b in zip(seen, kept)) and len(seen) == len(kept)


@pytest.mark.parametrize('kw, exc, msg', [
    ({'loss_func': None}, TypeError, r'^loss_func must be a function of \(preds, targets\) returning a scalar tensor, got '
                                     r'NoneType None: pass e.g. loss_func=F.cross_entropy$'),
    ({'loss_func': 'cross_entropy'}, TypeError, r"^loss_func is the string 'cross_entropy'; pass the function itself, e.g. "
                                                r'loss_func=F.cross_entropy$'),
    ({'loss_func': nn.CrossEntropyLoss}, TypeError, r'^loss_func is the class CrossEntropyLoss; pass an instance, '
                                                    r'loss_func=CrossEntropyLoss\(\)$'),
    ({'opt_func': 'adam'}, TypeError, r"^opt_func is the string 'adam'; pass the optimiser class, e.g. "
                                      r'opt_func=torch.optim.Adam$'),
    ({'opt_func': torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)}, TypeError,
     r'^opt_func is an optimiser instance \(SGD\); pass what builds one from \(params, lr\), opt_func=torch.optim.SGD, '
     r'or keep yours with opt_func=None and learn.opt = it$'),
    ({'opt_func': 3}, TypeError, r'^opt_func must build an optimiser from \(params, lr\), got int 3'),
    ({'lr': '0.1'}, ValueError, r"^lr must be a finite number >= 0, got '0.1'$"),
])
def test_bad_constructor_arguments_are_refused_there(kw, exc, msg):
    with pytest.raises(exc, match=msg): TrainLearner(toy_model(), dls(), **{'loss_func': F.cross_entropy, **kw})
