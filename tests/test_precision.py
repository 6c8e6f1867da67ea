"""MixedPrecisionCB on the CPU: bf16 autocast, fp16 with the CPU GradScaler, composition with every step provider."""
import copy

import pytest
import torch
from conftest import toy_data, toy_model
from torch.nn import functional as F

from ultraloop import (Callback, CancelBatchException, DataLoaders, Learner, MixedPrecisionCB, MixedTrainingCB,
                       MomentumLearner, TrainCB, TrainLearner)

BS, LR, MOM = 16, 0.1, 0.85


def make_learner(provider, cbs, model=None, data=None, loss_func=F.cross_entropy):
    dls = DataLoaders.from_tensors(*(data or toy_data()), bs=BS, shuffle=False)
    model = model or toy_model()
    if provider == 'TrainLearner': return TrainLearner(model, dls, loss_func, lr=LR, cbs=cbs)
    if provider == 'MomentumLearner': return MomentumLearner(model, dls, loss_func, lr=LR, cbs=cbs, mom=MOM)
    return Learner(model, dls, loss_func, lr=LR, cbs=[TrainCB(), *cbs])


def hand_autocast(model, dtype, provider, epochs=2):
    """The reference: the same batches under autocast, backward of the plain loss, no scaler."""
    x, y = toy_data()[:2]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(epochs):
        for i in range(0, len(x), BS):
            with torch.autocast('cpu', dtype=dtype): loss = F.cross_entropy(model(x[i:i + BS]), y[i:i + BS])
            loss.backward(); opt.step()
            if provider == 'MomentumLearner':
                for p in model.parameters(): p.grad.mul_(MOM)
            else: opt.zero_grad()
    return model


class Record(Callback):
    def __init__(self, event, f, order=0):
        self.order, self.seen = order, []
        setattr(self, event, lambda learn: self.seen.append(f(learn)))


PROVIDERS = ['TrainLearner', 'Learner+TrainCB', 'MomentumLearner']


@pytest.mark.parametrize('provider', PROVIDERS)
def test_bf16_equals_a_hand_written_autocast_loop(provider):
    dtypes = Record('after_predict', lambda learn: learn.preds.dtype)
    learn = make_learner(provider, [MixedPrecisionCB(torch.bfloat16), dtypes])
    learn.fit(2)
    ref = hand_autocast(toy_model(), torch.bfloat16, provider)
    assert set(dtypes.seen) == {torch.bfloat16}
    for p, q in zip(learn.model.parameters(), ref.parameters()): assert torch.equal(p, q)


@pytest.mark.parametrize('provider', PROVIDERS)
def test_fp16_with_the_scaler_matches_unscaled_training(provider):
    # the scale is a power of two, so scaled fp16 gradients unscale to the plain ones up to fp16 underflow;
    # MomentumLearner keeps gradients across steps, which must stay consistent with the scale
    cb = MixedPrecisionCB(torch.float16)
    learn = make_learner(provider, [cb])
    learn.fit(2, valid=False)
    ref = hand_autocast(toy_model(), torch.float16, provider)
    assert cb.skipped == 0 and cb.scaler.get_scale() == 2.0 ** 16
    for p, q in zip(learn.model.parameters(), ref.parameters()): torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_metrics_see_the_unscaled_loss_and_backward_the_scaled_one():
    true = Record('after_loss', lambda learn: learn.loss.detach().clone(), order=-25)
    scaled = Record('after_loss', lambda learn: learn.loss.detach().clone(), order=5)
    metrics = Record('after_batch', lambda learn: learn.loss.detach().clone())
    learn = make_learner('TrainLearner', [MixedPrecisionCB(torch.float16), true, scaled, metrics])
    learn.fit(1)
    n_train = 64 // BS
    assert torch.equal(torch.stack(metrics.seen), torch.stack(true.seen))
    assert torch.equal(torch.stack(scaled.seen[:n_train]), torch.stack(true.seen[:n_train]) * 2.0 ** 16)
    assert torch.equal(torch.stack(scaled.seen[n_train:]), torch.stack(true.seen[n_train:]))  # valid: never scaled


class CancelAfterPredict(Callback):
    def __init__(self, exc): self.exc, self.inside = exc, []

    def after_predict(self, learn):
        self.inside.append(torch.is_autocast_enabled('cpu'))
        raise self.exc


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_a_cancel_between_before_batch_and_after_loss_leaves_autocast_off(dtype):
    cancel = CancelAfterPredict(CancelBatchException())
    on_at_start = Record('before_batch', lambda learn: torch.is_autocast_enabled('cpu'), order=-30)
    learn = make_learner('TrainLearner', [MixedPrecisionCB(dtype), cancel, on_at_start])
    learn.fit(1)
    assert cancel.inside == [True] * 6 and on_at_start.seen == [False] * 6  # 4 train + 2 valid batches
    assert not torch.is_autocast_enabled('cpu')


def test_an_error_between_before_batch_and_after_loss_leaves_autocast_off_and_the_learner_usable():
    cb = MixedPrecisionCB(torch.float16)
    learn = make_learner('TrainLearner', [cb])
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=[CancelAfterPredict(RuntimeError('boom'))])
    assert not torch.is_autocast_enabled('cpu')
    learn.fit(1)
    ref = hand_autocast(toy_model(), torch.float16, 'TrainLearner', epochs=1)
    for p, q in zip(learn.model.parameters(), ref.parameters()): torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def big_gradient_data():
    x, _, xv, _ = toy_data(n_train=256)
    return x, x @ torch.full((8, 3), 30.0), xv, xv @ torch.full((8, 3), 30.0)  # regression targets far from the start


def grad_norm(learn):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in learn.model.parameters()])).item()


def test_fp16_clipping_clips_the_true_gradient():
    from ultraloop import GradientClippingCB
    before = Record('after_backward', grad_norm, order=-15)  # between unscaling (-20) and clipping (-10)
    after = Record('after_backward', grad_norm, order=0)
    learn = make_learner('TrainLearner', [MixedPrecisionCB(torch.float16), GradientClippingCB(1.0), before, after],
                         data=big_gradient_data(), loss_func=F.mse_loss)
    learn.fit(1, valid=False)
    # the first steps overflow in fp16 until the scale has halved enough; every step taken was clipped
    assert len(before.seen) == len(after.seen) >= 8
    assert min(before.seen) > 10  # true norms (scaled ones would be 2**12 times larger or more)
    assert after.seen == pytest.approx([1.0] * len(after.seen), abs=1e-4)


class StepLRCB(Callback):
    """Halves the lr after every optimiser step, as a scheduler stepped in after_step does."""
    def before_fit(self, learn): self.sched = torch.optim.lr_scheduler.StepLR(learn.opt, step_size=1, gamma=0.5)
    def after_step(self, learn): self.sched.step()


class PoisonGrad(Callback):
    order = -25  # after backward, before MixedPrecisionCB unscales

    def after_backward(self, learn):
        if learn.iter == 1: next(learn.model.parameters()).grad[0, 0] = float('inf')


def test_an_inf_gradient_skips_the_step_and_the_scheduler():
    cb, sched = MixedPrecisionCB(torch.float16), StepLRCB()
    params = Record('after_batch', lambda learn: [p.detach().clone() for p in learn.model.parameters()])
    learn = make_learner('TrainLearner', [cb, sched, PoisonGrad(), params])
    learn.fit(1, valid=False)
    assert cb.skipped == 1 and cb.scaler.get_scale() == 2.0 ** 15
    assert sched.sched.last_epoch == 3 and learn.opt.param_groups[0]['lr'] == LR * 0.5 ** 3
    snaps = params.seen
    assert all(torch.equal(a, b) for a, b in zip(snaps[0], snaps[1]))  # batch 1 changed nothing
    assert not any(torch.equal(a, b) for a, b in zip(snaps[1], snaps[2]))  # and training went on
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


def test_accumulation_unscales_once_per_optimiser_step():
    from ultraloop import GradientAccumulationCB
    steps = Record('after_step', lambda learn: learn.iter)
    learn = make_learner('TrainLearner', [MixedPrecisionCB(torch.float16), GradientAccumulationCB(2), steps])
    learn.fit(1, valid=False)
    assert steps.seen == [1, 3]


def test_the_scaler_state_round_trips():
    cb = MixedPrecisionCB(torch.float16)
    make_learner('TrainLearner', [cb, PoisonGrad()]).fit(1, valid=False)
    new = MixedPrecisionCB(torch.float16)
    new.load_state_dict(copy.deepcopy(cb.state_dict()))
    learn = make_learner('TrainLearner', [new])
    learn.fit(1, train=False)  # the scaler comes to exist at the first epoch, with the saved state
    assert new.skipped == 1 and new.scaler.get_scale() == 2.0 ** 15


def test_defaults_and_bad_arguments():
    assert MixedPrecisionCB().dtype == torch.bfloat16 and isinstance(MixedTrainingCB(), MixedPrecisionCB)
    with pytest.raises(ValueError, match='torch.bfloat16 or torch.float16'): MixedPrecisionCB(torch.float32)
    with pytest.raises(TypeError, match="device_type must be a string"): MixedPrecisionCB(device_type=0)
    learn = make_learner('TrainLearner', [MixedPrecisionCB(torch.float16)])
    learn.opt_func = None
    with pytest.raises(ValueError, match='needs learn.opt'): learn.fit(1)


def test_mixed_training_uses_bf16_off_cuda_and_the_dtype_asked_for():
    auto, fp16 = [Record('after_predict', lambda learn: learn.preds.dtype) for _ in range(2)]
    make_learner('MomentumLearner', [MixedTrainingCB(), auto]).fit(1)
    make_learner('MomentumLearner', [MixedTrainingCB(torch.float16), fp16]).fit(1)
    assert set(auto.seen) == {torch.bfloat16} and set(fp16.seen) == {torch.float16}
    assert repr(MixedTrainingCB()) == 'MixedTrainingCB(float16 on CUDA, else bfloat16)'


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA GPU'))])
def test_fp16_equals_torchs_own_amp_recipe_overflow_skips_included(device):
    from ultraloop import DeviceCB
    x, y, xv, yv = big_gradient_data()  # large gradients: the first steps overflow and are skipped
    cb = MixedPrecisionCB(torch.float16)
    learn = make_learner('TrainLearner', [DeviceCB(device), cb], data=(x, y, xv, yv), loss_func=F.mse_loss)
    learn.fit(2, valid=False)
    model = toy_model().to(device)
    opt, scaler = torch.optim.SGD(model.parameters(), lr=LR), torch.amp.GradScaler(device)
    skipped = 0
    for _ in range(2):
        for i in range(0, len(x), BS):
            with torch.autocast(device, dtype=torch.float16):
                loss = F.mse_loss(model(x[i:i + BS].to(device)), y[i:i + BS].to(device))
            scaler.scale(loss).backward()
            scale = scaler.get_scale()
            scaler.step(opt); scaler.update(); opt.zero_grad()
            skipped += scaler.get_scale() < scale
    assert cb.skipped == skipped > 0 and cb.scaler.get_scale() == scaler.get_scale()
    for p, q in zip(learn.model.parameters(), model.parameters()): assert torch.equal(p, q)
