"""Dict batches (a Hugging Face dataset with as_tuple=False) split by key; DataLoaders(train) without validation;
learn.metrics from the moment MetricsCB is added; the built-in accuracies against a hand count."""
import pytest
import torch
from conftest import assert_same
from torch import nn
from torch.nn import functional as F

from ultraloop import (BalancedAccuracy, Callback, ChannelsLastCB, CheckpointCB, DataLoaders, EarlyStoppingCB, Learner,
                       MetricsCB, MicroAccuracy, TensorLoader, TrainCB, TrainLearner)


def rows(n: int, seed: int) -> list[dict]:
    """A datasets-like split: a list of dicts, one per sample, as a Hugging Face Dataset indexes them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return [{'image': x[i], 'label': int(y[i])} for i in range(n)]


DD = {'train': rows(40, 0), 'validation': rows(20, 1), 'test': rows(12, 2)}


class Quiet(MetricsCB):
    def _log(self, d): pass


def run(make) -> tuple:
    """Train a fresh model with the learner `make(model, dls_tuple, dls_dict)` builds; the same shuffles every time."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    tup = DataLoaders.from_dd(DD, 8, valid='validation')
    dic = DataLoaders.from_dd(DD, 8, as_tuple=False, valid='validation')
    learn = make(model, tup, dic)
    learn.fit(2)
    hist = learn.metrics.history
    preds, targs = learn.capture_preds()
    return list(learn.model.parameters()), hist, preds, targs


def test_dict_batches_train_exactly_as_tuple_batches():
    def quiet(): return Quiet(acc=MicroAccuracy())
    ref = run(lambda m, tup, dic: TrainLearner(m, tup, F.cross_entropy, cbs=[quiet()]))
    assert len(ref[1]) == 4 and ref[3].tolist() == [r['label'] for r in DD['validation']]  # valid='validation' chose it
    makers = {
        'named': lambda m, tup, dic: TrainLearner(m, dic, F.cross_entropy, cbs=[quiet()], inputs='image', target='label'),
        'key order': lambda m, tup, dic: Learner(m, dic, F.cross_entropy, cbs=[TrainCB(), quiet()]),  # predict: KeyError 0 once
        'target only': lambda m, tup, dic: Learner(m, dic, F.cross_entropy, cbs=[TrainCB(target='label'), quiet()]),
        'inputs list': lambda m, tup, dic: Learner(m, dic, F.cross_entropy, cbs=[TrainCB(inputs=['image']), quiet()]),
    }
    for name, make in makers.items():
        params, hist, preds, targs = run(make)
        assert_same(params, ref[0], name)
        assert hist == ref[1], name
        assert torch.equal(preds, ref[2]) and torch.equal(targs, ref[3]), name


def test_two_inputs_by_key_equal_n_inp_2():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)
        def forward(self, x, t): return self.lin(x) * t[:, None]

    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(24, 6, generator=g), torch.rand(24, generator=g), torch.randint(0, 3, (24,), generator=g)
    tup = [[x[i:i + 8], t[i:i + 8], y[i:i + 8]] for i in range(0, 24, 8)]
    dic = [{'y': y[i:i + 8], 't': t[i:i + 8], 'x': x[i:i + 8]} for i in range(0, 24, 8)]  # keys not in call order
    out = []
    for dls, cb in ((DataLoaders(tup, tup), TrainCB(n_inp=2)), (DataLoaders(dic, dic), TrainCB(inputs=['x', 't'], target='y'))):
        torch.manual_seed(0)
        learn = Learner(TwoInputs(), dls, F.cross_entropy, cbs=[cb, Quiet()])
        learn.fit(2)
        out.append((list(learn.model.parameters()), learn.metrics.history))
    assert_same(out[0][0], out[1][0])
    assert out[0][1] == out[1][1]


def test_dict_batches_bad_keys_are_one_line_errors_and_the_learner_stays_usable():
    dic = DataLoaders.from_dd(DD, 8, as_tuple=False, valid='validation')
    learn = Learner(nn.Linear(6, 3), dic, F.cross_entropy, cbs=[TrainCB(inputs='img', target='label')])
    with pytest.raises(ValueError, match=r"^the batch is a dict with keys \['image', 'label'\], which has no 'img': name the "
                                         r"model's inputs and the target among those keys, e.g. TrainCB\(inputs='image', "
                                         r"target='label'\) or TrainLearner\(\.\.\., inputs='image', target='label'\)$"):
        learn.fit(1)
    learn = TrainLearner(nn.Linear(6, 3), dic, F.cross_entropy, target=['image', 'label'])
    with pytest.raises(ValueError, match=r"keys \['image', 'label'\], which leaves no key for the model after "
                                         r"target=\['image', 'label'\]"):
        learn.fit(1)
    learn.target = ('label',)
    learn.fit(1)
    with pytest.raises(TypeError, match=r"TrainCB: inputs names the key of a dict batch it takes, or a list of keys "
                                        r"\(e.g. inputs='image'\), got 0"):
        TrainCB(inputs=0)
    with pytest.raises(TypeError, match=r"TrainLearner: target names .* \(e.g. target='label'\), got \[\]"):
        TrainLearner(nn.Linear(6, 3), dic, target=[])
    with pytest.raises(ValueError, match=r"TrainCB: 'a' is named in inputs and in target; a key goes to the model or to "
                                         r"the loss"):
        TrainCB(inputs=['a', 'b'], target='a')
    only_x = [{'image': torch.randn(4, 6)}]
    learn = Learner(nn.Linear(6, 3), DataLoaders(only_x, only_x), lambda p: p.sum(), cbs=[TrainCB(), MetricsCB()])
    with pytest.raises(TypeError, match=r"^MetricsCB reads the targets as the first key after the model's inputs, but the "
                                        r"dict batch has none: name it, TrainCB\(target=\.\.\.\)$"):
        learn.fit(1)
    learn = Learner(nn.Linear(6, 3), dic, F.cross_entropy, cbs=[TrainCB(), ChannelsLastCB()])
    with pytest.raises(TypeError, match=r'ChannelsLastCB puts batch\[0\] in channels-last order, but the batch is a dict: '
                                        r'yield \(x, y\) batches'):
        learn.fit(1)


def test_from_dd_picks_the_valid_split_by_name():
    assert len(DataLoaders.from_dd(DD, 8, valid='test').valid.dataset) == 12
    with pytest.raises(ValueError, match=r"from_dd: valid='valid' is not a split besides train; the splits are "
                                         r"\['train', 'validation', 'test'\]"):
        DataLoaders.from_dd(DD, 8, valid='valid')
    with pytest.raises(ValueError, match=r"got \['train', 'validation', 'test'\]: name the valid one, e.g. "
                                         r"from_dd\(dd, 8, valid='validation'\)"):
        DataLoaders.from_dd(DD, 8)
    d = DataLoaders.from_dd({'train': DD['train']}, 8, as_tuple=False)  # a train split alone: no validation
    assert d.valid is None and set(next(iter(d.train))) == {'image', 'label'}


# ---- training without validation -------------------------------------------------------------------------------------
def tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g)
    return x, (x[:, :3].sum(1) > 0).long()


@pytest.mark.parametrize('make', [lambda tl: DataLoaders(tl), lambda tl: DataLoaders(tl, None)])
def test_dataloaders_without_valid_fit_and_lr_find(make, tmp_path):
    x, y = tensors()
    out = []
    for d in (make(TensorLoader(x, y, bs=8, shuffle=True, seed=1)),
              DataLoaders(TensorLoader(x, y, bs=8, shuffle=True, seed=1), TensorLoader(x, y, bs=8))):
        torch.manual_seed(0)
        learn = TrainLearner(nn.Linear(6, 2), d, F.cross_entropy, cbs=[m := Quiet()])
        lr = learn.lr_find(plot=False, start_lr=1e-2, max_epochs=5)
        learn.fit(2, valid=d.valid is None)  # the reference skips its valid phases by hand
        out.append((lr, list(learn.model.parameters()), m.history))
    assert out[0][0] == out[1][0] is not None
    assert_same(out[0][1], out[1][1])
    assert out[0][2] == out[1][2] and [r['train'] for r in out[0][2]] == ['train', 'train']
    # what needs a valid phase refuses before any batch, and leaves nothing behind
    for cb in (EarlyStoppingCB(), CheckpointCB(tmp_path / 'ck', monitor='valid_loss')):
        learn = TrainLearner(nn.Linear(6, 2), make(TensorLoader(x, y, bs=8)), F.cross_entropy, cbs=[Quiet(), cb])
        before = [p.clone() for p in learn.model.parameters()]
        with pytest.raises(ValueError, match=rf"^{cb.name} watches 'valid_loss', but dls has no valid loader "
                                             r"\(DataLoaders\(train\)\), so no valid phase runs: give one, "
                                             r"DataLoaders\(train_dl, valid_dl\), or monitor='train_loss'$"):
            learn.fit(1)
        assert_same(list(learn.model.parameters()), before)
        with pytest.raises(ValueError, match=r'capture_preds predicts on dls.valid, but these DataLoaders have none'):
            learn.capture_preds()
    assert not (tmp_path / 'ck').exists()
    learn = TrainLearner(nn.Linear(6, 2), make(TensorLoader(x, y, bs=8)), F.cross_entropy,
                         cbs=[Quiet(), s := EarlyStoppingCB('train_loss', patience=1)])
    learn.fit(3)
    assert s.best == min(r['loss'] for r in learn.metrics.history)


# ---- callbacks attach themselves when added ---------------------------------------------------------------------------
def test_learn_metrics_exists_from_when_the_callback_is_added():
    x, y = tensors()
    d = DataLoaders(TensorLoader(x, y, bs=16))
    first = Quiet()
    learn = TrainLearner(nn.Linear(6, 2), d, F.cross_entropy, cbs=[first])
    assert learn.metrics is first  # before any fit
    learn.add_cb(second := Quiet())
    assert learn.metrics is second
    events = []

    class Watch(Callback):
        order = -100  # before MetricsCB's before_fit
        def added(self, learn): events.append('added')
        def removed(self, learn): events.append('removed')
        def before_fit(self, learn): events.append(learn.metrics)

    learn.fit(1, cbs=[w := Watch(), third := Quiet()])
    assert events == ['added', third, 'removed'] and learn.metrics is third  # kept after fit, for its history
    learn.rm_cb(first)
    learn.add_cb(w)
    assert events[-1] == 'added'


# ---- the built-in accuracies -----------------------------------------------------------------------------------------
def test_micro_and_balanced_accuracy_equal_a_hand_count():
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(150, dtype=torch.long), torch.randint(1, 4, (37,), generator=g)])  # unbalanced
    x = torch.randn(187, 6, generator=g) + F.one_hot(y, 6)[:, :6] * 1.5
    learn = TrainLearner(nn.Linear(6, 4), DataLoaders(TensorLoader(x, y, bs=25)), F.cross_entropy,
                         cbs=[m := Quiet(acc=MicroAccuracy(), bal=BalancedAccuracy(4))])
    m.buffer_bytes = 0  # one update per batch
    learn.fit(1)
    p = learn.model(x).argmax(1)
    learn.fit(1, lr=0)  # the row of these very weights
    row = m.history[-1]
    hits = [int(a == b) for a, b in zip(p.tolist(), y.tolist())]
    recalls = [sum(h for h, c in zip(hits, y.tolist()) if c == k) / y.tolist().count(k) for k in range(4)]
    assert row['acc'] == sum(hits) / 187 and row['bal'] == pytest.approx(sum(recalls) / 4, abs=1e-15)
    assert 0 < row['bal'] < row['acc'] < 1  # the majority class is easiest here: micro accuracy hides the others
    acc, bal = m.metrics['acc'], m.metrics['bal']
    assert acc.total.item() == 187 and acc.correct.item() == int((p == y).sum())
    assert bal.total.tolist() == torch.bincount(y, minlength=4).tolist()
    fresh = BalancedAccuracy(4)
    fresh.load_state_dict(bal.state_dict())
    assert fresh.compute() == bal.compute()
    fresh.update(p[:5], y[:5])  # class indices work as predictions too
    with pytest.raises(ValueError, match=r'MicroAccuracy: predictions of shape \(3,\) do not fit targets of shape \(3,\): '):
        acc.update(torch.rand(3), y[:3])
