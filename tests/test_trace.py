"""The event contract, checked by exact traces: a full fit, each cancel exception at each event, and errors."""
import pytest
import torch
from conftest import toy_data, toy_model
from torch.nn import functional as F

from ultraloop import (EVENTS, Callback, CancelBatchException, CancelEpochException, CancelFitException,
                       CancelStepException, DataLoaders, TraceCB, TrainLearner)

BATCH_TRAIN = ['before_batch', 'after_predict', 'after_loss', 'after_backward', 'after_step', 'after_batch', 'cleanup_batch']
BATCH_VALID = ['before_batch', 'after_predict', 'after_loss', 'after_batch', 'cleanup_batch']


def phase(batches):
    return ['before_epoch', *batches, 'after_epoch', 'cleanup_epoch']


def learner(*cbs):
    # 2 train batches (bs 4 over 8 samples) and 1 valid batch (4 samples)
    dls = DataLoaders.from_tensors(*toy_data(8, 4), bs=4, shuffle=False)
    trace = TraceCB()
    return TrainLearner(toy_model(), dls, F.cross_entropy, lr=0.1, cbs=[trace, *cbs]), trace


class RaiseAt(Callback):
    """Raises `exc` the first time `event` fires."""
    def __init__(self, event, exc): self.event, self.exc, self.fired = event, exc, False

    def _maybe(self, learn, event):
        if event == self.event and not self.fired:
            self.fired = True
            raise self.exc('raised by test')


for _ev in EVENTS:
    setattr(RaiseAt, _ev, (lambda ev: lambda self, learn: self._maybe(learn, ev))(_ev))


def test_full_trace_two_epochs():
    learn, trace = learner()
    learn.fit(2)
    epoch = [*phase(BATCH_TRAIN * 2), *phase(BATCH_VALID)]
    assert trace.events == ['before_fit', *epoch, *epoch, 'after_fit', 'cleanup_fit']


def test_literal_traces_for_cancels_and_errors():
    learn, trace = learner(RaiseAt('after_predict', CancelBatchException))
    learn.fit(1)
    assert trace.events[:9] == ['before_fit', 'before_epoch', 'before_batch', 'after_predict', 'cleanup_batch',
                                'before_batch', 'after_predict', 'after_loss', 'after_backward']

    learn, trace = learner(RaiseAt('before_batch', CancelEpochException))
    learn.fit(1)
    assert trace.events == ['before_fit', 'before_epoch', 'before_batch', 'cleanup_batch', 'cleanup_epoch',
                            *phase(BATCH_VALID), 'after_fit', 'cleanup_fit']

    learn, trace = learner(RaiseAt('after_backward', CancelFitException))
    learn.fit(2)
    assert trace.events == ['before_fit', 'before_epoch', 'before_batch', 'after_predict', 'after_loss',
                            'after_backward', 'cleanup_batch', 'cleanup_epoch', 'cleanup_fit']

    learn, trace = learner(RaiseAt('after_loss', KeyError))
    with pytest.raises(KeyError, match='raised by test'):
        learn.fit(2)
    assert trace.events == ['before_fit', 'before_epoch', 'before_batch', 'after_predict', 'after_loss',
                            'cleanup_batch', 'cleanup_epoch', 'cleanup_fit']

    learn, trace = learner(RaiseAt('after_backward', CancelStepException))
    learn.fit(1)  # step and zero_grad skipped for that batch, after_batch still runs
    assert trace.events[:9] == ['before_fit', 'before_epoch', 'before_batch', 'after_predict', 'after_loss',
                                'after_backward', 'after_batch', 'cleanup_batch', 'before_batch']


def spec_trace(event, exc, n_epochs=2):
    """The contract written as a tiny interpreter: which events fire, and whether fit raises, when `exc`
    is raised at the first `event`. Independent of the Learner's code."""
    out, state = [], {'fired': False}

    def fire(ev):
        out.append(ev)
        if ev == event and not state['fired']:
            state['fired'] = True
            raise exc()

    def level(names, cancel, body):
        try:
            fire(f'before_{names}'); body(); fire(f'after_{names}')
        except cancel: pass
        finally: fire(f'cleanup_{names}')

    def batch(training):
        def wrapped():
            try:
                fire('before_batch')
                fire('after_predict'); fire('after_loss')
                if training:
                    try: fire('after_backward'); fire('after_step')
                    except CancelStepException: pass
                fire('after_batch')
            except CancelBatchException: pass
            finally: fire('cleanup_batch')
        return wrapped

    def epoch(training, n):
        return lambda: [batch(training)() for _ in range(n)]

    def fit():
        for _ in range(n_epochs):
            level('epoch', CancelEpochException, epoch(True, 2))
            level('epoch', CancelEpochException, epoch(False, 1))

    try:
        level('fit', CancelFitException, fit)
        return out, None
    except Exception as e:  # noqa: BLE001 - the spec says it propagates unchanged
        return out, type(e)


CANCELS = [CancelBatchException, CancelEpochException, CancelFitException, CancelStepException]


@pytest.mark.parametrize('exc', CANCELS + [RuntimeError], ids=lambda e: e.__name__)
@pytest.mark.parametrize('event', list(EVENTS))
def test_exception_at_each_event(event, exc):
    expected, raises = spec_trace(event, exc)
    learn, trace = learner(RaiseAt(event, exc))
    if raises is None:
        learn.fit(2)
    else:
        with pytest.raises(raises):
            learn.fit(2)
    assert trace.events == expected
    # the learner is usable afterwards: a clean fit gives the full trace again
    trace.events.clear()
    learn.fit(1)
    assert trace.events == ['before_fit', *phase(BATCH_TRAIN * 2), *phase(BATCH_VALID), 'after_fit', 'cleanup_fit']


def test_spec_interpreter_agrees_with_literal_full_trace():
    # guards the interpreter above: with nothing raised it must give the literal trace
    out, raises = spec_trace('no_such_event', RuntimeError)
    epoch = [*phase(BATCH_TRAIN * 2), *phase(BATCH_VALID)]
    assert raises is None and out == ['before_fit', *epoch, *epoch, 'after_fit', 'cleanup_fit']


def test_callbacks_run_by_order_then_insertion():
    calls = []

    class Rec(Callback):
        def __init__(self, name, order): self.nm, self.order = name, order
        def before_fit(self, learn): calls.append(self.nm)

    learn, _ = learner(a := Rec('a', 1), Rec('b', 0), Rec('c', 1), Rec('d', -1))
    learn.fit(0)
    assert calls == ['d', 'b', 'a', 'c']
    calls.clear()
    a.order = 2  # changed after it was added: the next fit sees it
    learn.fit(0)
    assert calls == ['d', 'b', 'c', 'a']


def test_valid_phase_runs_without_grad_and_in_eval_mode():
    seen = []

    class Look(Callback):
        def after_predict(self, learn): seen.append((learn.training, torch.is_grad_enabled(), learn.preds.requires_grad))

    learn, _ = learner(Look())
    learn.fit(1)
    assert seen == [(True, True, True), (True, True, True), (False, False, False)]
