"""GradientAccumulationCB equals one big batch per window (uneven batches, short last windows, no leaks across epochs);
GradientClippingCB clips once per real step, on the accumulated gradient."""
import math

import pytest
import torch
from torch import nn, optim
from torch.nn import functional as F

from ultraloop import (Callback, CancelEpochException, CancelFitException, DataLoaders, GradientAccumulationCB,
                       GradientClippingCB, MixedPrecisionCB, MomentumLearner, TrainLearner)

SIZES = [5, 3, 7, 2, 6, 4, 8, 1, 5, 3]  # 10 uneven micro-batches


class ListLoader:
    """The given batches, in order, every epoch."""
    def __init__(self, batches): self.batches = batches
    def __iter__(self): return iter(self.batches)
    def __len__(self): return len(self.batches)


class NoLenLoader(ListLoader):
    """The same, without a length (like a streaming loader)."""
    __len__ = None

    def __iter__(self): yield from self.batches


def make_batches(sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
        out.append([x, (x @ torch.ones(4, 2, dtype=torch.float64)).sin() + 0.1 * noise])
    return out


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def params(model): return [p.detach().clone() for p in model.parameters()]


class Record(Callback):
    """Parameters after each optimiser step, and the loss every after_batch sees."""
    order = 50

    def __init__(self): self.steps, self.losses = [], []
    def after_step(self, learn): self.steps.append(params(learn.model))
    def after_batch(self, learn):
        if learn.training: self.losses.append(learn.loss.detach().clone())


def windows(n_batches, n):
    return [list(range(i, min(i + n, n_batches))) for i in range(0, n_batches, n)]


def reference(batches, n, n_epochs, lr=0.1, max_norm=None):
    """Plain SGD on the concatenated micro-batches of each window; parameters after each step, and each
    micro-batch's loss at the parameters its window started from."""
    model = make_model()
    opt = optim.SGD(model.parameters(), lr=lr)
    steps, losses = [], []
    for _ in range(n_epochs):
        for w in windows(len(batches), n):
            with torch.no_grad(): losses += [F.mse_loss(model(batches[i][0]), batches[i][1]) for i in w]
            x = torch.cat([batches[i][0] for i in w]); y = torch.cat([batches[i][1] for i in w])
            F.mse_loss(model(x), y).backward()
            if max_norm is not None: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step(); opt.zero_grad()
            steps.append(params(model))
    return steps, losses


def run(n, loader_cls=ListLoader, extra=(), n_epochs=2, learner=TrainLearner, **kw):
    rec = Record()
    learn = learner(make_model(), DataLoaders(loader_cls(make_batches()), []), F.mse_loss, lr=0.1,
                    cbs=[GradientAccumulationCB(n), rec, *extra], **kw)
    learn.fit(n_epochs, valid=False)
    return learn, rec


def assert_params_equal(got, want, atol=1e-6):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for a, b in zip(g, w): torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize('n', [2, 3, 4])
def test_accumulation_equals_one_big_batch_each_step(n):
    _, rec = run(n)
    want_steps, want_losses = reference(make_batches(), n, n_epochs=2)
    assert len(rec.steps) == 2 * math.ceil(len(SIZES) / n)
    assert_params_equal(rec.steps, want_steps)
    # metrics see each micro-batch's own loss, not the weighted one backward used
    torch.testing.assert_close(torch.stack(rec.losses), torch.stack(want_losses), atol=1e-10, rtol=0)


@pytest.mark.parametrize('n', [3, 4])
def test_loader_without_length_steps_its_last_window_at_epoch_end(n):
    clip = GradientClippingCB(max_norm=0.05)
    _, rec = run(n, NoLenLoader, extra=[clip])
    want_steps, _ = reference(make_batches(), n, n_epochs=2, max_norm=0.05)
    assert len(rec.steps) == 2 * math.ceil(len(SIZES) / n)
    assert_params_equal(rec.steps, want_steps)


def test_clipping_runs_once_per_real_step_on_the_accumulated_gradient():
    clip = GradientClippingCB(max_norm=0.05)
    calls = []

    class CountClip(Callback):
        order = -5  # right after clipping
        def after_backward(self, learn): calls.append(learn.iter)

    _, rec = run(3, extra=[clip, CountClip()], n_epochs=1)
    assert calls == [2, 5, 8, 9]  # the last batch of each window
    want_steps, _ = reference(make_batches(), 3, n_epochs=1, max_norm=0.05)
    assert_params_equal(rec.steps, want_steps)
    assert float(clip.norm) > 0.05  # the clip was active, so clipping per micro-batch would have differed


def test_clipping_alone_matches_clip_grad_norm():
    clip = GradientClippingCB(max_norm=0.1, norm_type=1)
    _, rec = run(1, extra=[clip], n_epochs=1)
    model = make_model()
    opt = optim.SGD(model.parameters(), lr=0.1)
    for (x, y), got in zip(make_batches(), rec.steps):
        F.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1, norm_type=1)
        opt.step(); opt.zero_grad()
        assert_params_equal([got], [params(model)], atol=1e-12)


@pytest.mark.parametrize('fp16', [False, True])
def test_momentum_learner_keeps_its_carried_gradient_unscaled(fp16):
    # MomentumLearner's zero_grad leaves mom * grad; a window must add its mean gradient to that, not rescale it
    extra = [MixedPrecisionCB(torch.float16, device_type='cpu')] if fp16 else []
    _, rec = run(3, learner=MomentumLearner, mom=0.85, extra=extra)
    big = [[torch.cat([b[0] for b in make_batches()[i:i + 3]]), torch.cat([b[1] for b in make_batches()[i:i + 3]])]
           for i in range(0, 10, 3)]
    ref = MomentumLearner(make_model(), DataLoaders(ListLoader(big), []), F.mse_loss, lr=0.1, cbs=[want := Record()], mom=0.85)
    ref.fit(2, valid=False)
    assert_params_equal(rec.steps, want.steps)


def test_no_gradient_leaks_across_epochs():
    class CancelAt2(Callback):
        """Ends the first train epoch after batch 2, inside an open window of 4."""
        def after_batch(self, learn):
            if learn.epoch == 0 and learn.iter == 2: raise CancelEpochException()

    _, rec = run(4, extra=[CancelAt2()], n_epochs=2)
    want_steps, _ = reference(make_batches(), 4, n_epochs=1)
    assert_params_equal(rec.steps, want_steps)  # epoch 0 made no step; epoch 1 is a clean epoch


def test_cancelled_fit_leaves_no_pending_gradient():
    class StopAt4(Callback):
        def after_batch(self, learn):
            if learn.iter == 4: raise CancelFitException()

    learn, _ = run(3, extra=[StopAt4()], n_epochs=1)
    assert all(p.grad is None for p in learn.model.parameters())  # batch 3's and 4's gradients were dropped


def test_bad_arguments_are_refused():
    for bad in (0, -2, 1.5, True, '2'):
        with pytest.raises(ValueError, match='n .* must be an int >= 1'): GradientAccumulationCB(bad)
    with pytest.raises(TypeError, match='bs_func must be callable'): GradientAccumulationCB(2, bs_func=3)
    with pytest.raises(ValueError, match='max_norm must be a number > 0'): GradientClippingCB(max_norm=0)
    with pytest.raises(ValueError, match='norm_type must be a number > 0'): GradientClippingCB(norm_type=-1)


def test_bs_func_weights_micro_batches():
    # weighting every micro-batch equally (bs_func -> 1) gives the mean of the micro-batch means
    rec = Record()
    learn = TrainLearner(make_model(), DataLoaders(ListLoader(make_batches()[:2]), []), F.mse_loss, lr=0.1,
                         cbs=[GradientAccumulationCB(2, bs_func=lambda b: 1), rec])
    learn.fit(1, valid=False)
    model = make_model()
    (sum(F.mse_loss(model(x), y) for x, y in make_batches()[:2]) / 2).backward()
    with torch.no_grad():
        for p in model.parameters(): p -= 0.1 * p.grad
    assert_params_equal(rec.steps, [params(model)], atol=1e-12)


@pytest.mark.parametrize('loader_cls', [ListLoader, NoLenLoader])
def test_composes_with_float16_loss_scaling(loader_cls):
    # a float64 model: autocast leaves it alone and the scaler multiplies by powers of two, so the result stays exact
    mp = MixedPrecisionCB(torch.float16, device_type='cpu')
    _, rec = run(3, loader_cls, extra=[mp, GradientClippingCB(max_norm=0.05)])
    want_steps, _ = reference(make_batches(), 3, n_epochs=2, max_norm=0.05)
    assert_params_equal(rec.steps, want_steps)
    assert mp.skipped == 0 and mp.scaler._growth_tracker.item() == len(want_steps)  # one scaler update per real step
