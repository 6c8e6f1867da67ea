"""Behaviour of learn.summary(): shapes, parameters and MFLOPs of the seed's CNN, the table's two renderings, and a
forward that leaves weights, modes, optimiser, loader and RNG exactly as they were."""
import copy
import random

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ultraloop import DataLoaders, Learner, TraceCB, TrainLearner


def seed_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def image_dls(n=24, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoaders.from_tensors(x[:16], y[:16], x[16:], y[16:], bs=bs, shuffle=True, seed=seed)


def test_summary_of_the_seed_cnn_on_28x28():
    learn = TrainLearner(seed_cnn(), image_dls(), F.cross_entropy)
    s = learn.summary()
    assert [r.name for r in s.rows] == [str(i) for i in range(9)]
    assert [r.type for r in s.rows] == ['Conv2d', 'ReLU'] * 3 + ['AdaptiveAvgPool2d', 'Flatten', 'Linear']
    assert [s.rows[i].out_shape for i in (0, 2, 4)] == [(8, 8, 26, 26), (8, 16, 24, 24), (8, 32, 22, 22)]
    assert s.rows[0].in_shape == (8, 1, 28, 28) and s.rows[8].in_shape == (8, 32) and s.rows[8].out_shape == (8, 10)
    assert [r.params for r in s.rows] == [80, 0, 1168, 0, 4640, 0, 0, 0, 330]
    assert s.total_params == sum(p.numel() for p in learn.model.parameters()) == 6218
    assert s.batch_size == 8
    conv = [2 * 3 * 3 * 1 * 8 * 26 * 26, 2 * 3 * 3 * 8 * 16 * 24 * 24, 2 * 3 * 3 * 16 * 32 * 22 * 22]
    assert [s.rows[i].mflops for i in (0, 2, 4)] == pytest.approx([f / 1e6 for f in conv])
    assert s.rows[8].mflops == pytest.approx(2 * 32 * 10 / 1e6)
    assert s.rows[7].mflops == 0 and s.rows[1].mflops == 0  # torch's counter counts products, not ReLU or Flatten
    assert s.total_mflops == pytest.approx(sum(r.mflops for r in s.rows))


class Attention(nn.Module):
    """Computes in its own forward (two matrix products) besides its layers."""
    def __init__(self, d=32):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out((q @ k.transpose(-1, -2) / 8).softmax(-1) @ v)


def test_summary_counts_what_a_module_computes_in_its_own_forward():
    from torch.utils.flop_counter import FlopCounterMode
    model = nn.Sequential(nn.Linear(16, 32), Attention())
    x = torch.randn(4, 10, 16)
    s = Learner(model).summary(batch=x)
    with FlopCounterMode(display=False) as fc: model(x)
    assert s.total_mflops == pytest.approx(fc.get_total_flops() / 4 / 1e6)
    assert [(r.name, r.type) for r in s.rows] == [('0', 'Linear'), ('1.qkv', 'Linear'), ('1.out', 'Linear'),
                                                  ('1', 'Attention')]
    assert s.rows[3].mflops == pytest.approx(2 * (2 * 10 * 10 * 32) / 1e6)  # q @ k.T and weights @ v, per sample
    assert s.rows[3].params == 0


def test_summary_from_a_given_batch_or_input_shape():
    learn = TrainLearner(seed_cnn(), (0,), F.cross_entropy)  # no loaders needed
    s = learn.summary(input_shape=(1, 1, 28, 28))
    assert s.batch_size == 1 and s.rows[4].out_shape == (1, 32, 22, 22)
    x = torch.randn(3, 1, 12, 12)
    assert learn.summary(batch=x).rows[4].out_shape == (3, 32, 6, 6)
    assert learn.summary(batch=[x, torch.zeros(3)]).rows[8].in_shape == (3, 32)


def test_summary_text_is_aligned_and_markdown_is_a_table():
    s = TrainLearner(seed_cnn(), image_dls(), F.cross_entropy).summary()
    lines = repr(s).splitlines()
    assert repr(s) == str(s) == s.text()
    assert lines[0].split() == ['layer', 'type', 'input', 'output', 'params', 'MFLOPs']
    table = lines[:12]  # header, rule, 9 rows, rule
    assert len({len(line) for line in table}) == 1
    assert lines[4].split() == ['2', 'Conv2d', '8x8x26x26', '8x16x24x24', '1,168', '1.327']
    assert lines[-1].startswith('total: 6,218 parameters (6,218 trainable), 5.886 MFLOPs per sample; batch of 8 on cpu')
    md = s._repr_markdown_().splitlines()
    assert md[0] == '| layer | type | input | output | params | MFLOPs |' and md[1] == '|---|---|---|---|--:|--:|'
    assert md[2] == '| 0 | Conv2d | 8x1x28x28 | 8x8x26x26 | 80 | 0.097 |'


def test_summary_has_no_side_effects():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 26 * 26, 10))
    trace = TraceCB()
    learn = TrainLearner(model, image_dls(), F.cross_entropy, lr=0.1, cbs=trace, opt_func=torch.optim.Adam)
    learn.fit(1)
    model.train()
    model[1].eval()  # mixed modes must come back as they were
    loss = F.cross_entropy(model(torch.randn(2, 1, 28, 28)), torch.tensor([0, 1]))
    loss.backward()  # gradients present, must stay
    before = (copy.deepcopy(model.state_dict()), [m.training for m in model.modules()],
              [p.grad.clone() for p in model.parameters()], copy.deepcopy(learn.opt.state_dict()),
              learn.dls.train.generator.get_state(), list(learn.cbs), len(trace.events), learn.dls.train.order)
    rng = torch.get_rng_state(), random.getstate()
    learn.summary()
    after = (model.state_dict(), [m.training for m in model.modules()], [p.grad for p in model.parameters()],
             learn.opt.state_dict(), learn.dls.train.generator.get_state(), list(learn.cbs), len(trace.events),
             learn.dls.train.order)
    assert torch.get_rng_state().equal(rng[0]) and random.getstate() == rng[1]
    sd0, sd1 = before[0], after[0]
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)  # BatchNorm statistics too
    assert before[1] == after[1]
    assert all(torch.equal(g0, g1) for g0, g1 in zip(before[2], after[2]))
    st0, st1 = before[3]['state'], after[3]['state']
    assert all(torch.equal(st0[i][k], st1[i][k]) for i in st0 for k in st0[i])
    assert before[4].equal(after[4]) and before[7].equal(after[7])  # the loader's shuffle generator and order
    assert before[5] == after[5] and before[6] == after[6]  # no callback added, none ran
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_summary_counts_shared_and_container_parameters_once():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale, self.lin = nn.Parameter(torch.ones(4)), nn.Linear(4, 4)

        def forward(self, x): return self.lin(self.lin(x)) * self.scale  # lin called twice

    learn = Learner(Scaled(), (0,))
    s = learn.summary(input_shape=(2, 4))
    assert [(r.name, r.params) for r in s.rows] == [('lin', 20), ('lin', 0), ('model', 4)]
    assert s.total_params == 24 == sum(r.params for r in s.rows)


@pytest.mark.parametrize('kw, exc, match', [
    ({'batch': torch.zeros(1, 1, 28, 28), 'input_shape': (1, 1, 28, 28)}, ValueError, 'pass batch or input_shape, not both'),
    ({'input_shape': (1, 0, 28)}, ValueError, 'input_shape must be a tuple of ints >= 1'),
    ({'input_shape': 28}, ValueError, 'input_shape must be a tuple of ints >= 1'),
    ({'batch': {'x': torch.zeros(1, 1, 28, 28)}}, TypeError, 'summary feeds the model one tensor; got a dict'),
    ({}, ValueError, r'learn.dls has no .train'),
])
def test_summary_bad_inputs(kw, exc, match):
    learn = Learner(seed_cnn(), (0,))
    with pytest.raises(exc, match=match): learn.summary(**kw)
    assert learn.summary(input_shape=(1, 1, 28, 28)).total_params == 6218  # still usable


def test_summary_of_an_empty_loader():
    learn = Learner(seed_cnn(), DataLoaders([], []))
    with pytest.raises(ValueError, match='dls.train is empty'): learn.summary()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_summary_runs_on_the_models_device():
    learn = TrainLearner(seed_cnn().cuda(), image_dls(), F.cross_entropy)  # the loader's batches are on the CPU
    s = learn.summary()
    assert s.device.type == 'cuda' and s.rows[4].out_shape == (8, 32, 22, 22)


def test_summary_leaves_the_global_rng_alone_with_a_torch_dataloader():
    from torch.utils.data import DataLoader, TensorDataset
    ds = TensorDataset(torch.randn(16, 1, 28, 28), torch.zeros(16, dtype=torch.long))
    learn = TrainLearner(seed_cnn(), DataLoaders(DataLoader(ds, 4, shuffle=True), DataLoader(ds, 4)), F.cross_entropy)
    state = torch.get_rng_state()
    assert learn.summary().rows[0].in_shape == (4, 1, 28, 28)
    assert torch.get_rng_state().equal(state)  # the sampler's shuffle seed is drawn from it, then restored


def test_summary_runs_in_eval_mode_so_batchnorm_takes_a_single_sample():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))  # in training mode BatchNorm1d refuses one sample
    s = Learner(model, (0,)).summary(input_shape=(1, 4))
    assert s.rows[1].out_shape == (1, 4) and model.training
