"""Speed callbacks: channels-last, compile, whole-step CUDA graphs (their fallback on the CPU), DeviceCB's prefetch."""
import contextlib
import copy
import pickle
import types
from functools import partial

import pytest
import torch
from conftest import toy_data, toy_model
from torch import nn
from torch.nn import functional as F

from ultraloop import (ActivationStatsCB, Callback, ChannelLastCB, ChannelsLastCB, CompileCB, CudaGraphCB, DataLoaders,
                       DeviceCB, Learner, MetricsCB, MixedPrecisionCB, MomentumLearner, RecorderCB, TrainCB, TrainLearner)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def fit_params(cbs, model=None, data=None, epochs=2, bs=16, learner=TrainLearner, device=None, **kw):
    dls = DataLoaders.from_tensors(*(data or toy_data(72, 40)), bs=bs, shuffle=False, device=device)
    learn = learner(model or toy_model(), dls, F.cross_entropy, lr=0.1, cbs=cbs, **kw)
    learn.fit(epochs)
    return learn, [p.detach().cpu().clone() for p in learn.model.parameters()]


def assert_same(ps, qs, **tol):
    assert len(ps) == len(qs)
    for p, q in zip(ps, qs):
        if tol: torch.testing.assert_close(p, q, **tol)
        else: assert torch.equal(p, q)


def conv_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3))


def image_data(n_train=40, n_valid=24):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_valid, 1, 10, 10, generator=g)
    y = x.flatten(1)[:, :3].argmax(1)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# ---- ChannelsLastCB -------------------------------------------------------------------------------------------------
def test_channels_last_trains_images_in_channels_last_order():
    seen = []

    class Look(Callback):
        def after_predict(self, learn):
            seen.append((learn.batch[0].is_contiguous(memory_format=torch.channels_last),
                         learn.model[0].weight.is_contiguous(memory_format=torch.channels_last)))

    _, ps = fit_params([ChannelsLastCB(), Look()], conv_model(), image_data())
    _, ref = fit_params([], conv_model(), image_data())
    assert seen == [(True, True)] * len(seen) and len(seen) == 2 * (3 + 2)
    assert_same(ps, ref, rtol=1e-5, atol=1e-6)  # the same function, another summation order
    assert ChannelLastCB is ChannelsLastCB


def test_channels_last_refuses_batches_that_are_not_images():
    learn = TrainLearner(toy_model(), DataLoaders.from_tensors(*toy_data(), bs=16), F.cross_entropy, cbs=[ChannelsLastCB()])
    with pytest.raises(ValueError, match=r'needs image batches N x C x H x W in batch\[0\], got \(16, 8\)'): learn.fit(1)


# ---- CompileCB ------------------------------------------------------------------------------------------------------
# aot_eager runs torch.compile's capture and autograd paths without a C++ compiler; inductor on this 2-core CPU takes
# about half a minute per graph, so the GPU benchmark covers it.
def test_compile_trains_like_eager_and_its_state_dict_loads_into_a_plain_model():
    learn, ps = fit_params([CompileCB(backend='aot_eager')])
    _, ref = fit_params([])
    assert_same(ps, ref, rtol=1e-6, atol=1e-7)
    sd = learn.model.state_dict()
    assert list(sd) == list(toy_model().state_dict())  # no _orig_mod. prefix
    plain = toy_model(seed=1)
    plain.load_state_dict(sd)
    x = toy_data()[0]
    assert torch.equal(plain(x), learn.model(x))
    pickle.dumps(learn.model)  # back to the class's forward after fit


def test_compile_unwraps_a_model_the_user_compiled():
    learn, _ = fit_params([CompileCB(backend='eager')], model=torch.compile(toy_model(), backend='eager'), epochs=1)
    assert type(learn.model) is nn.Sequential and '0.weight' in learn.model.state_dict()


def test_an_uneven_last_batch_compiles_once_not_per_epoch():
    torch._dynamo.reset()  # graphs cached by earlier tests of this file must not count
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    learn, _ = fit_params([CompileCB(backend=counting_backend)], epochs=1)  # 72 = 4 x 16 + 8; valid 40 = 2 x 16 + 8
    n = len(graphs)
    assert n == 3  # train: static bs 16, then one with a dynamic batch dimension (the 8-sample last batch); valid: its own
    learn.fit(3)
    assert len(graphs) == n


# ---- CudaGraphCB ----------------------------------------------------------------------------------------------------
def test_cuda_graph_falls_back_to_eager_on_the_cpu_with_a_one_line_reason(capsys):
    cb = CudaGraphCB()
    _, ps = fit_params([cb])
    _, ref = fit_params([])
    assert capsys.readouterr().out == 'CudaGraphCB: the model is on cpu, not a CUDA device; training eagerly\n'
    assert cb.reason == 'the model is on cpu, not a CUDA device' and cb.replays == 0
    assert_same(ps, ref)


class Observe(Callback):
    def after_backward(self, learn): pass


@pytest.mark.parametrize('other, why', [
    (Observe(), 'Observe() runs Python in after_backward, between predict and step'),
    (MixedPrecisionCB(torch.float16), 'MixedPrecisionCB(float16) runs Python in after_loss, after_backward'),
    (ActivationStatsCB(mod_filter=nn.Linear), 'the model has forward hooks (ActivationStatsCB() on 0 (Linear), 2 (Linear)), '
                                              'which would run only once, at capture, not on replays'),
])
def test_cuda_graph_names_the_callback_that_prevents_capture(other, why, capsys):
    cb = CudaGraphCB()
    fit_params([other, cb], epochs=1)
    assert cb.reason.startswith(why)
    out = capsys.readouterr().out
    assert out.startswith(f'CudaGraphCB: {why}') and out.count('\n') == 1


def test_bf16_mixed_precision_does_not_prevent_capture():
    cb = CudaGraphCB()
    fit_params([MixedPrecisionCB(torch.bfloat16), cb], epochs=1)
    assert cb.reason == 'the model is on cpu, not a CUDA device'


def test_cuda_graph_bad_warmup():
    with pytest.raises(ValueError, match='warmup'): CudaGraphCB(warmup=0)


class FakeGraphs:
    """Stands in for torch.cuda's streams and graphs on the CPU, to check CudaGraphCB's schedule (warm-up, capture,
    replay, eager batches, recapture): capture records the step without its effects, as a real capture does, and each
    replay runs it again on the static inputs, writing the outputs into the tensors capture produced. A replay reads
    the param groups as they were at capture, as a graph does: numbers as they were then, tensors where they were."""
    def __init__(self, learn): self.learn, self.captures, self.capturing, self.streams_set = learn, 0, False, 0

    class Stream:
        def __init__(self, *a, **kw): pass
        def wait_stream(self, other): pass

    def current_stream(self, *a): return self.Stream()
    def set_stream(self, s): self.streams_set += 1
    def stream(self, s): return contextlib.nullcontext()

    def CUDAGraph(self): return types.SimpleNamespace(replay=None)

    @contextlib.contextmanager
    def graph(self, g, stream=None):
        learn, m, opt = self.learn, self.learn.model, self.learn.opt
        state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for p, st in opt.state.items()}
        saved = (copy.deepcopy(m.state_dict()), [None if p.grad is None else p.grad.clone() for p in m.parameters()])
        static, handlers = learn.batch, learn._handlers  # the step as recorded: without the host after_step handlers
        self.capturing = True
        try: yield
        finally: self.capturing = False
        self.captures += 1
        preds, loss, groups = learn.preds, learn.loss, [dict(g) for g in opt.param_groups]
        self.recorded = groups  # the param groups as the recorded step read them
        m.load_state_dict(saved[0])
        for p, gr in zip(m.parameters(), saved[1]): p.grad = gr
        for p in list(opt.state):  # in place: the optimiser's state tensors stay where the recorded step writes
            if p not in state: del opt.state[p]
            else:
                for k, v in state[p].items():
                    if torch.is_tensor(v): opt.state[p][k].copy_(v)
                    else: opt.state[p][k] = v

        def replay():
            real, table, live = learn.batch, learn._handlers, [dict(g) for g in opt.param_groups]
            learn.batch, learn._handlers = static, handlers
            for g, c in zip(opt.param_groups, groups): g.update(c)
            type(learn).train_step(learn)  # what CudaGraphCB captured: the Learner's own train step
            for g, c in zip(opt.param_groups, live): g.update(c)
            with torch.no_grad(): preds.copy_(learn.preds); loss.copy_(learn.loss)
            learn.batch, learn._handlers = real, table
        g.replay = replay


def accuracy_cb():
    torchmetrics = pytest.importorskip('torchmetrics')
    m = MetricsCB(accuracy=torchmetrics.classification.MulticlassAccuracy(num_classes=3, average='micro'))
    m._log = lambda row: None
    return m


def with_fake_graphs(monkeypatch, learn) -> FakeGraphs:
    from ultraloop.callbacks import speed
    fake = FakeGraphs(learn)
    for nm in ('Stream', 'current_stream', 'set_stream', 'stream', 'CUDAGraph', 'graph'):
        monkeypatch.setattr(torch.cuda, nm, getattr(fake, nm))
    monkeypatch.setattr(speed, '_graph_blocker', lambda learn, cb: None)
    return fake


def test_cuda_graph_schedule_with_a_stand_in_for_cuda(monkeypatch):
    learn = TrainLearner(toy_model(), DataLoaders.from_tensors(*toy_data(200, 40), bs=16, shuffle=False),
                         F.cross_entropy, lr=0.1)
    fake = with_fake_graphs(monkeypatch, learn)
    class Losses(Callback):
        def __init__(self): self.seen = []
        def after_batch(self, learn):
            if learn.training: self.seen.append(learn.loss.item())

    class HalveLR(Callback):  # an epoch schedule: the graph must be captured anew
        def after_epoch(self, learn):
            if learn.training:
                for g in learn.opt.param_groups: g['lr'] /= 2

    cb, losses, ref_losses, metrics, ref_metrics = CudaGraphCB(), Losses(), Losses(), accuracy_cb(), accuracy_cb()
    learn.fit(2, cbs=[cb, losses, HalveLR(), metrics])
    ref = TrainLearner(toy_model(), DataLoaders.from_tensors(*toy_data(200, 40), bs=16, shuffle=False), F.cross_entropy, lr=0.1)
    ref.fit(2, cbs=[ref_losses, HalveLR(), ref_metrics])
    # 13 train batches an epoch: 3 warm-up, 9 replayed, the last (8 samples) eager; epoch 2: 12 replayed after recapture
    assert (cb.reason, cb.replays, fake.captures) == (None, 9 + 12, 2)
    assert losses.seen == pytest.approx(ref_losses.seen, abs=0, rel=1e-6) and len(losses.seen) == 26
    # MetricsCB keeps outputs until the phase ends: replays overwrite them, so it must have copied them
    assert [r['accuracy'] for r in metrics.history] == [r['accuracy'] for r in ref_metrics.history]
    assert_same([p.detach() for p in learn.model.parameters()], [p.detach() for p in ref.model.parameters()],
                rtol=1e-6, atol=1e-7)


def test_device_hypers_copy_the_schedules_numbers_into_the_same_tensors():
    from ultraloop.callbacks.speed import _DeviceHypers
    m = toy_model()
    opt = torch.optim.Adam([{'params': m[0].parameters()}, {'params': m[2].parameters(), 'lr': 0.5}], lr=0.1, foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.1, 0.5], total_steps=10)  # writes floats, new betas tuples
    slots = [(0, 'lr', None), (0, 'betas', 0), (1, 'lr', None)]
    hy = _DeviceHypers(opt, slots, torch.device('cpu'))
    tensors = list(hy.tensors)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()
    g0, g1 = opt.param_groups
    with hy.in_groups():  # what a capture records: these tensors, and the one-tensor-at-a-time Adam for group 0
        assert g0['lr'] is tensors[0] and g0['betas'][0] is tensors[1] and g1['lr'] is tensors[2] and g0['foreach'] is False
        assert g0['betas'][1] == 0.999 and type(g1['betas'][0]) is float and g1['foreach'] is True
    assert (g0['foreach'], type(g0['lr']), type(g0['betas'][0])) == (True, float, float)  # the groups' own numbers again
    for _ in range(6):
        opt.step()  # (no gradients: nothing moves)
        sched.step()
        versions = [t._version for t in tensors]
        hy.write()
        assert len(hy.tensors) == 3 and all(a is b for a, b in zip(hy.tensors, tensors))  # the addresses a graph holds
        assert [t.item() for t in tensors] == [f32(g0['lr']), f32(g0['betas'][0]), f32(g1['lr'])]
        assert [t._version for t in tensors] == [v + 1 for v in versions]  # one in-place fill each
        hy.write()  # nothing changed: nothing written
        assert [t._version for t in tensors] == [v + 1 for v in versions]


def adam_on_the_cpu_as_on_a_gpu(monkeypatch):
    """capturable=True is refused on the CPU; torch's capturable Adam code runs there all the same."""
    import sys
    monkeypatch.setattr(sys.modules['torch.optim.adam'], '_get_capturable_supported_devices',
                        lambda supports_xla=True: ['cuda', 'cpu'])


@pytest.mark.parametrize('opt_func, cycle_momentum', [(torch.optim.Adam, None),
                                                      (partial(torch.optim.AdamW, foreach=True), None),
                                                      (partial(torch.optim.Adam, foreach=True), False)],
                         ids=['Adam', 'AdamW-foreach', 'Adam-foreach-lr-only'])
def test_cuda_graph_keeps_one_graph_under_fit_one_cycle_with_adam_reading_lr_and_beta1_from_tensors(opt_func, cycle_momentum,
                                                                                                     monkeypatch):
    adam_on_the_cpu_as_on_a_gpu(monkeypatch)
    dls = lambda: DataLoaders.from_tensors(*toy_data(192, 32), bs=16, shuffle=False)
    rec = lambda: RecorderCB(lr=lambda cb: cb.pg['lr'], mom=lambda cb: cb.pg['betas'][0])
    learn, ref = (TrainLearner(toy_model(), dls(), F.cross_entropy, opt_func=opt_func) for _ in range(2))
    learn.fit_one_cycle(1, 0.01)  # an eager fit first: its state (step counts on the CPU) goes on under the graph
    ref.fit_one_cycle(1, 0.01)
    fake, cb, seen, ref_seen = with_fake_graphs(monkeypatch, learn), CudaGraphCB(), rec(), rec()
    sched = learn.fit_one_cycle(2, 0.01, cbs=[cb, seen], cycle_momentum=cycle_momentum)
    ref_sched = ref.fit_one_cycle(2, 0.01, cbs=[ref_seen], cycle_momentum=cycle_momentum)
    # 12 full train batches an epoch: 3 warm-up, then one capture replayed for the other 21, reading lr and betas[0]
    # from the tensors the schedule's values are written into (a fake replay reads the groups as they were at capture)
    assert (cb.reason, cb.replays, fake.captures) == (None, 21, 1)
    assert sched.lrs == ref_sched.lrs and seen.recs == ref_seen.recs
    moms = set(seen.recs['mom'])
    assert (len(moms) == 1) if cycle_momentum is False else (len(moms) > 20)  # betas[0] cycled every step, or not at all
    rec = fake.recorded[0]  # beta1 from a tensor needs the one-tensor-at-a-time step (foreach's reads it with .item())
    assert (type(rec['lr']), type(rec['betas'][0]), type(rec['betas'][1]), rec['capturable'], rec['foreach']) == (
        (torch.Tensor, float, float, True, True) if cycle_momentum is False else
        (torch.Tensor, torch.Tensor, float, True, False))
    # float rounding: the step reads float32 tensors and runs torch's capturable code (a beta1 left as captured: 1e-2)
    assert_same([p.detach() for p in learn.model.parameters()], [p.detach() for p in ref.model.parameters()],
                rtol=1e-5, atol=5e-6)
    g = learn.opt.param_groups[0]  # the user's optimiser as it was: floats, not capturable
    assert (type(g['lr']), type(g['betas'][0]), g['capturable'], g['foreach']) == (float, float, False,
                                                                                   ref.opt.param_groups[0]['foreach'])
    learn.fit(1)
    ref.fit(1)
    assert_same([p.detach() for p in learn.model.parameters()], [p.detach() for p in ref.model.parameters()],
                rtol=1e-5, atol=5e-6)


def test_a_checkpoint_taken_under_the_graph_holds_the_users_optimiser_flags(monkeypatch, tmp_path):
    """CudaGraphCB runs Adam capturable for the fit; a checkpoint written meanwhile holds the user's flag (not capturable,
    step counts on the CPU), so it resumes without a graph, on a CPU (which refuses capturable), exactly as the eager
    run goes on, and the live optimiser keeps running capturable until the fit ends. Resumed under the graph, the
    loaded flags are switched again (the state is loaded after before_fit) and one graph serves the rest."""
    from ultraloop import CheckpointCB
    adam_on_the_cpu_as_on_a_gpu(monkeypatch)
    dls = lambda: DataLoaders.from_tensors(*toy_data(192, 32), bs=16, shuffle=False)
    learn = TrainLearner(toy_model(), dls(), F.cross_entropy, lr=0.01, opt_func=torch.optim.Adam)
    live = []

    class Flags(Callback):
        def after_batch(self, learn):
            if learn.training: live.append(learn.opt.param_groups[0]['capturable'])

    fake, cb = with_fake_graphs(monkeypatch, learn), CudaGraphCB()
    learn.fit(1, cbs=[cb, Flags(), CheckpointCB(tmp_path / 'ck', every_batches=6, keep=20)])
    assert (cb.replays, fake.captures, set(live)) == (9, 1, {True})
    sd = torch.load(tmp_path / 'ck' / 'checkpoint-000000-epoch0-train6.pt', weights_only=False)['opt']
    assert [g['capturable'] for g in sd['param_groups']] == [False]
    assert {st['step'].device.type for st in sd['state'].values()} == {'cpu'}
    ref = TrainLearner(toy_model(), dls(), F.cross_entropy, lr=0.01, opt_func=torch.optim.Adam)
    ref.fit(1)
    graph = TrainLearner(toy_model(), dls(), F.cross_entropy, lr=0.01, opt_func=torch.optim.Adam)
    live.clear()
    fake, cb = with_fake_graphs(monkeypatch, graph), CudaGraphCB()
    graph.fit(1, cbs=[cb, Flags(), CheckpointCB(tmp_path / 'ck2')], resume=tmp_path / 'ck' / 'checkpoint-000000-epoch0-train6.pt')
    assert (cb.reason, cb.replays, fake.captures, set(live)) == (None, 3, 1, {True})  # batches 7-9 warm-up, 10-12 replayed
    assert graph.opt.param_groups[0]['capturable'] is False
    assert_same([p.detach() for p in graph.model.parameters()], [p.detach() for p in ref.model.parameters()],
                rtol=1e-5, atol=5e-6)
    monkeypatch.undo()  # a plain CPU machine again: capturable=True would refuse to step here
    again = TrainLearner(toy_model(), dls(), F.cross_entropy, lr=0.01, opt_func=torch.optim.Adam,
                         cbs=[CheckpointCB(tmp_path / 'ck')])
    again.fit(1, resume=tmp_path / 'ck' / 'checkpoint-000000-epoch0-train6.pt')
    assert again.opt.param_groups[0]['capturable'] is False
    assert_same([p.detach() for p in again.model.parameters()], [p.detach() for p in ref.model.parameters()],
                rtol=1e-5, atol=5e-6)


def test_an_sgd_whose_lr_and_momentum_cycle_gives_the_graph_up_naming_them(monkeypatch, capsys):
    opt_func = lambda ps, lr: torch.optim.SGD(ps, lr, momentum=0.9)
    dls = lambda: DataLoaders.from_tensors(*toy_data(192, 32), bs=16, shuffle=False)
    learn, ref = (TrainLearner(toy_model(), dls(), F.cross_entropy, opt_func=opt_func) for _ in range(2))
    fake, cb = with_fake_graphs(monkeypatch, learn), CudaGraphCB()
    learn.fit_one_cycle(1, 0.1, cbs=[cb])
    ref.fit_one_cycle(1, 0.1)
    why = ('lr, momentum change within an epoch, and SGD reads them on the host: a graph keeps the values it was '
           'captured with (Adam and AdamW, not fused, read lr and betas[0] from the device and keep one graph)')
    assert (cb.reason, cb.replays, fake.captures) == (why, 2, 2)  # captured, captured anew, then eager
    assert capsys.readouterr().out == f'CudaGraphCB: {why}; training eagerly from here\n'
    assert_same([p.detach() for p in learn.model.parameters()], [p.detach() for p in ref.model.parameters()])


def test_a_weight_decay_changed_every_step_under_adam_is_not_left_as_captured(monkeypatch, capsys):
    adam_on_the_cpu_as_on_a_gpu(monkeypatch)

    class DecaySched(Callback):  # a schedule of weight_decay, which torch's Adam reads as a number
        cuda_graph_host_after_step = True
        def after_step(self, learn):
            for g in learn.opt.param_groups: g['weight_decay'] += 1e-3

    dls = lambda: DataLoaders.from_tensors(*toy_data(192, 32), bs=16, shuffle=False)
    learn, ref = (TrainLearner(toy_model(), dls(), F.cross_entropy, lr=0.01, opt_func=torch.optim.Adam) for _ in range(2))
    fake, cb = with_fake_graphs(monkeypatch, learn), CudaGraphCB()
    learn.fit(1, cbs=[cb, DecaySched()])
    ref.fit(1, cbs=[DecaySched()])
    why = ('weight_decay changes within an epoch, and Adam reads it on the host: a graph keeps the value it was captured '
           'with (Adam and AdamW, not fused, read lr and betas[0] from the device and keep one graph)')
    assert (cb.reason, cb.replays, fake.captures) == (why, 2, 2)
    assert capsys.readouterr().out == f'CudaGraphCB: {why}; training eagerly from here\n'
    assert_same([p.detach() for p in learn.model.parameters()], [p.detach() for p in ref.model.parameters()],
                rtol=1e-5, atol=5e-6)


def test_a_failed_capture_runs_that_batch_and_the_rest_eagerly(monkeypatch, capsys):
    def loss_func(preds, y):
        if fake.capturing: raise RuntimeError('CUDA error: operation not permitted when stream is capturing')
        return F.cross_entropy(preds, y)
    dls = lambda: DataLoaders.from_tensors(*toy_data(200, 40), bs=16, shuffle=False)
    learn = TrainLearner(toy_model(), dls(), loss_func, lr=0.1)
    fake, cb = with_fake_graphs(monkeypatch, learn), CudaGraphCB()
    learn.fit(2, cbs=[cb])
    ref = TrainLearner(toy_model(), dls(), F.cross_entropy, lr=0.1)
    ref.fit(2)
    why = 'capture failed (RuntimeError: CUDA error: operation not permitted when stream is capturing)'
    assert cb.reason == why and cb.replays == 0 and fake.streams_set == 1
    assert capsys.readouterr().out == f'CudaGraphCB: {why}; training eagerly from here\n'
    assert_same([p.detach() for p in learn.model.parameters()], [p.detach() for p in ref.model.parameters()])


@cuda
@pytest.mark.parametrize('learner', [TrainLearner, MomentumLearner])
def test_cuda_graph_equals_the_eager_step_on_a_gpu(learner):
    data = toy_data(200, 40)  # 12 full train batches and a last one of 8: warm-up, capture, replays, an eager batch
    cb = CudaGraphCB()
    _, ps = fit_params([DeviceCB('cuda'), cb], data=data, learner=learner, epochs=2)
    _, ref = fit_params([DeviceCB('cuda')], data=data, learner=learner, epochs=2)
    assert cb.reason is None and cb.replays == (12 - 3) + 12  # epoch 1 warms up on 3 batches first
    assert_same(ps, ref, rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize('opt_func, cycle_momentum', [(torch.optim.Adam, None), (torch.optim.AdamW, None),
                                                      (torch.optim.Adam, False)], ids=['Adam', 'AdamW', 'Adam-lr-only'])
def test_fit_one_cycle_with_adam_replays_one_cuda_graph_and_equals_eager_on_a_gpu(opt_func, cycle_momentum):
    dls = lambda: DataLoaders.from_tensors(*toy_data(192, 32), bs=16, shuffle=False)
    learn, ref = (TrainLearner(toy_model(), dls(), F.cross_entropy, opt_func=opt_func, cbs=[DeviceCB('cuda')])
                  for _ in range(2))
    learn.fit_one_cycle(1, 0.01)  # an eager fit first: its state (step counts on the CPU) goes on under the graph
    ref.fit_one_cycle(1, 0.01)
    cb = CudaGraphCB()
    sched = learn.fit_one_cycle(2, 0.01, cbs=[cb], cycle_momentum=cycle_momentum)
    ref_sched = ref.fit_one_cycle(2, 0.01, cycle_momentum=cycle_momentum)
    # 12 full train batches an epoch: 3 warm-up, one capture replayed for the other 21 (lr and beta1 read on the device)
    assert (cb.reason, cb.replays, cb.captures) == (None, 2 * 12 - 3, 1)
    assert sched.lrs == ref_sched.lrs
    assert_same([p.detach().cpu() for p in learn.model.parameters()], [p.detach().cpu() for p in ref.model.parameters()],
                rtol=1e-5, atol=1e-5)  # float rounding (a beta1 left as captured differs by 1e-2)
    g = learn.opt.param_groups[0]  # the user's optimiser as it was
    assert (type(g['lr']), type(g['betas'][0]), g['capturable']) == (float, float, False)
    assert {st['step'].device.type for st in learn.opt.state.values()} == {'cpu'}


@cuda
def test_cuda_graph_with_bf16_and_channels_last_equals_eager_on_a_gpu():
    data = image_data(200, 40)
    cbs = lambda: [DeviceCB('cuda'), ChannelsLastCB(), MixedPrecisionCB(torch.bfloat16)]
    cb = CudaGraphCB()
    _, ps = fit_params([*cbs(), cb], conv_model(), data)
    _, ref = fit_params(cbs(), conv_model(), data)
    assert cb.reason is None and cb.replays > 0
    assert_same(ps, ref, rtol=1e-3, atol=1e-4)


@cuda
def test_a_host_sync_in_the_step_falls_back_with_the_same_results(capsys):
    def syncing_loss(preds, y):
        loss = F.cross_entropy(preds, y)
        loss.item()  # a host sync: not allowed while capturing
        return loss

    def run(cbs):  # dropout on the GPU: the eager steps after the failed capture draw from the CUDA generator
        dls = DataLoaders.from_tensors(*toy_data(200, 40), bs=16, shuffle=False)
        model = nn.Sequential(toy_model(), nn.Dropout(0.2))
        torch.cuda.manual_seed(0)
        learn = Learner(model, dls, syncing_loss, lr=0.1, cbs=[TrainCB(), DeviceCB('cuda'), *cbs])
        learn.fit(1)
        return [p.detach().cpu() for p in learn.model.parameters()]
    cb = CudaGraphCB()
    ps, ref = run([cb]), run([])
    assert cb.reason.startswith('capture failed') and 'training eagerly from here' in capsys.readouterr().out
    assert_same(ps, ref, rtol=1e-5, atol=1e-6)


# ---- DeviceCB ---------------------------------------------------------------------------------------------------------
class Pulls:
    """A loader of (x, y) tuples that records how many batches have been taken from it."""
    def __init__(self, n): self.n, self.pulled = n, 0
    def __len__(self): return self.n

    def __iter__(self):
        for i in range(self.n):
            self.pulled += 1
            yield torch.full((2,), float(i)), torch.tensor([i])


def test_prefetch_hands_out_each_batch_as_a_list_taken_only_when_the_loop_asks():
    # nothing is read ahead, so the loader's position (its state_dict, in a checkpoint) is the loop's
    from ultraloop.callbacks.core import _Prefetch
    dl = Pulls(4)
    pf = _Prefetch(dl, torch.device('cpu'))
    seen = [(b[0][0].item(), dl.pulled, type(b)) for b in pf]
    assert seen == [(0.0, 1, list), (1.0, 2, list), (2.0, 3, list), (3.0, 4, list)]
    assert len(pf) == 4 and pf.n == 4  # the loader's own attributes read through


def test_device_cb_refuses_cuda_where_there_is_none():
    if torch.cuda.is_available(): pytest.skip('this machine has CUDA')
    learn = TrainLearner(toy_model(), DataLoaders.from_tensors(*toy_data(), bs=16), F.cross_entropy, cbs=[DeviceCB('cuda')])
    with pytest.raises(ValueError, match=r"CUDA is not available on this machine; use DeviceCB\(\)"): learn.fit(1)


@cuda
def test_prefetching_to_the_gpu_trains_like_copying_in_before_batch():
    seen = []

    class Look(Callback):
        def before_batch(self, learn): seen.append(learn.batch[0].is_cuda)

    dev = DeviceCB('cuda')
    learn, ps = fit_params([dev, Look()])
    _, ref = fit_params([DeviceCB('cuda', prefetch=False)])
    assert_same(ps, ref)
    assert all(seen) and len(seen) == 2 * (5 + 3)
    assert learn.dl is learn.dls.valid  # the loader is handed back after each phase


@cuda
@pytest.mark.parametrize('reuse', [True, False])
def test_prefetch_hands_out_each_batch_intact_while_the_gpu_is_busy(reuse, monkeypatch):
    from ultraloop.callbacks.core import _Prefetch
    monkeypatch.setattr(_Prefetch, 'reuse_pinned', reuse)
    host = [[torch.full((256, 256), float(10 * i + k)) for k in range(5)] for i in range(12)]  # 5 of one shape per batch
    busy = torch.randn(2048, 2048, device='cuda')
    got = []
    for b in _Prefetch(host, torch.device('cuda')):
        for _ in range(20): busy = busy @ busy / busy.norm()  # the step: keeps the GPU behind the host
        got.append([t.clone() for t in b])
    assert all(t.is_cuda for b in got for t in b)
    assert [[t.unique().item() for t in b] for b in got] == [[10.0 * i + k for k in range(5)] for i in range(12)]


# ---- AccelerateCB ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate():
    state = pytest.importorskip('accelerate.state')
    state.AcceleratorState._reset_state(True)  # accelerate keeps one state per process; each test picks its own
    yield
    state.AcceleratorState._reset_state(True)


def test_accelerate_without_mixed_precision_trains_like_train_cb(fresh_accelerate):
    from ultraloop import AccelerateCB
    cb = AccelerateCB(mixed_precision='no', cpu=True)  # the reference runs on the CPU, on any machine
    learn, ps = fit_params([cb], learner=Learner)
    _, ref = fit_params([TrainCB()], learner=Learner)
    assert_same(ps, ref)
    opt, model = learn.opt, learn.model
    learn.fit(1)  # a second fit reuses what was prepared instead of wrapping it again
    assert learn.opt is opt and learn.model is model and type(opt).__name__ == 'AcceleratedOptimizer'


def test_accelerate_run_resumes_from_its_checkpoint_exactly(fresh_accelerate, tmp_path):
    """A checkpoint taken under AccelerateCB (its optimiser wrapped in AcceleratedOptimizer) resumes into a new learner
    with a new AccelerateCB and ends as the uninterrupted run; the state names the optimiser inside the wrapper."""
    from ultraloop import AccelerateCB, CheckpointCB

    def learner(folder, every=None):
        dls = DataLoaders.from_tensors(*toy_data(72, 40), bs=16, shuffle=True, seed=0)
        return Learner(toy_model(), dls, F.cross_entropy, lr=0.1, opt_func=partial(torch.optim.SGD, momentum=0.9),
                       cbs=[AccelerateCB(mixed_precision='no', cpu=True), CheckpointCB(folder, every_batches=every)])

    whole = learner(tmp_path / 'whole')
    whole.fit(3)
    first = learner(tmp_path / 'ck', every=3)
    first.fit(1)  # 5 train batches: checkpoints after batch 3 and at the epoch's end
    assert torch.load(first.last_checkpoint, weights_only=False)['settings']['opt'] == 'SGD'
    again = learner(tmp_path / 'ck', every=3)
    again.fit(3, resume='auto')
    assert_same([p.detach().clone() for p in again.model.parameters()], [p.detach().clone() for p in whole.model.parameters()])


def test_accelerate_bf16_autocasts_the_forward_on_the_cpu(fresh_accelerate):
    from ultraloop import AccelerateCB
    dtypes = []

    class Look(Callback):
        def after_predict(self, learn): dtypes.append(learn.preds.dtype)

    _, ps = fit_params([AccelerateCB(mixed_precision='bf16'), Look()], learner=Learner)
    _, ref = fit_params([TrainCB(), MixedPrecisionCB(torch.bfloat16)], learner=Learner)
    assert set(dtypes) == {torch.float32}  # accelerate hands back fp32 outputs from a bf16 forward
    assert_same(ps, ref)


def test_accelerate_bad_mode():
    from ultraloop import AccelerateCB
    with pytest.raises(ValueError, match="mixed_precision must be one of 'no', 'fp16', 'bf16', 'fp8', got 'half'"):
        AccelerateCB(mixed_precision='half')


def test_accelerate_missing_says_how_to_install(monkeypatch):
    import builtins

    from ultraloop import AccelerateCB
    real_import = builtins.__import__

    def no_accelerate(name, *a, **kw):
        if name == 'accelerate' or name.startswith('accelerate.'): raise ImportError(name)
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, '__import__', no_accelerate)
    with pytest.raises(ImportError, match='pip install accelerate'): AccelerateCB(mixed_precision='no')


def test_accelerate_leaves_the_users_dataloaders_alone(fresh_accelerate):
    from torch.utils.data import DataLoader, TensorDataset

    from ultraloop import AccelerateCB
    x, y, xv, yv = toy_data()
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(xv, yv), batch_size=16))
    train, valid = dls.train, dls.valid
    learn = Learner(toy_model(), dls, F.cross_entropy, cbs=[AccelerateCB(mixed_precision='no')])
    learn.fit(1)
    assert dls.train is train and dls.valid is valid
    assert learn.dls is not dls and learn.dls.train is not train  # the learner trains on the prepared ones
