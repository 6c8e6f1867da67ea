"""Behaviour of Hook, Hooks, HooksCallback and ActivationStatsCB: hooks never outlive a fit, statistics match a hand
computation, figures are written, and show_training_loop lists the hooks installed."""
import math

import pytest
import torch
from conftest import toy_data, toy_model
from sync_count import SyncCounter
from torch import nn
from torch.nn import functional as F

from ultraloop import (ActivationStatsCB, Callback, CancelFitException, DataLoaders, Hook, Hooks, HooksCallback, SingleBatchCB,
                       TrainLearner)


def n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def learner(model=None, n_train=64, n_valid=32, bs=16, **kw):
    d = DataLoaders.from_tensors(*toy_data(n_train, n_valid), bs=bs, shuffle=False)
    return TrainLearner(model or toy_model(), d, F.cross_entropy, lr=0.1, **kw)


def keep_output(hook, module, inp, outp): hook.out = outp


class Boom(Callback):
    def __init__(self, event, exc): self.event, self.exc = event, exc
    def after_batch(self, learn):
        if self.event == 'after_batch': raise self.exc
    def before_fit(self, learn):
        if self.event == 'before_fit': raise self.exc


# ---- Hook and Hooks ------------------------------------------------------------------------------------------------
def test_hook_sees_the_modules_output_and_context_manager_removes_it():
    model = toy_model()
    x = torch.randn(5, 8)
    with Hook(model[0], keep_output) as h:
        model(x)
        assert h.active
        assert torch.equal(h.out, model[0](x))
    assert not h.active and n_hooks(model) == 0


def test_hooks_on_a_sequential_hook_each_child_until_removed():
    model = toy_model()
    hooks = Hooks(model, keep_output)
    model(torch.randn(5, 8))
    assert [tuple(h.out.shape) for h in hooks] == [(5, 16), (5, 16), (5, 3)]
    assert n_hooks(model) == 3
    hooks.remove()
    assert n_hooks(model) == 0


@pytest.mark.parametrize('make, match', [
    (lambda: Hook('layer', keep_output), 'needs a torch.nn.Module'),
    (lambda: Hook(nn.Linear(2, 2), 3), 'fn must be callable'),
    (lambda: Hooks(nn.Linear(2, 2), keep_output), r'pass \[module\]'),
    (lambda: Hooks([nn.Linear(2, 2), 'x'], keep_output), r'modules\[1\] is a str'),
    (lambda: Hooks(5, keep_output), r'modules must be an iterable of modules, got a int'),
])
def test_hook_bad_inputs(make, match):
    with pytest.raises(TypeError, match=match): make()


# ---- HooksCallback: hooks never outlive a fit ----------------------------------------------------------------------
def test_no_hook_remains_after_fit():
    learn = learner(cbs=HooksCallback(keep_output))
    learn.fit(1)
    assert n_hooks(learn.model) == 0


def test_no_hook_remains_after_a_cancelled_fit():
    learn = learner(cbs=HooksCallback(keep_output))
    learn.fit(2, cbs=Boom('after_batch', CancelFitException()))
    assert n_hooks(learn.model) == 0


@pytest.mark.parametrize('event', ['after_batch', 'before_fit'])
def test_no_hook_remains_after_a_fit_that_raised_and_the_learner_still_fits(event):
    hc = HooksCallback(keep_output)
    learn = learner(cbs=hc)
    boom = Boom(event, RuntimeError('boom'))
    boom.order = 1  # after HooksCallback.before_fit: the hooks are in place when it raises
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=boom)
    assert n_hooks(learn.model) == 0
    learn.fit(1)
    assert n_hooks(learn.model) == 0 and hc.hooks[0].out.shape == (16, 16)


@pytest.mark.parametrize('on_train, on_valid, expected', [(True, False, 2 * 4), (False, True, 2 * 2), (True, True, 2 * 6)])
def test_hookfunc_runs_only_in_the_phases_asked_for(on_train, on_valid, expected):
    calls = []
    hc = HooksCallback(lambda h, m, i, o: calls.append(m.training), mods=None, mod_filter=nn.Linear,
                       on_train=on_train, on_valid=on_valid)
    learn = learner(cbs=hc)  # 64 train / 32 valid samples in batches of 16: 4 and 2 batches per epoch
    learn.fit(2)
    assert len(calls) == 2 * expected  # two Linear layers
    assert set(calls) == {x for x, wanted in ((True, on_train), (False, on_valid)) if wanted}


def test_which_modules_are_hooked():
    model = toy_model()

    def hooked(**kw):
        hc = HooksCallback(keep_output, **kw)
        learner(model, cbs=hc).fit(1, valid=False)
        return [(h.name, type(h.module).__name__) for h in hc.hooks]

    assert hooked() == [('0', 'Linear'), ('1', 'ReLU'), ('2', 'Linear')]  # default: every leaf
    assert hooked(mod_filter=nn.ReLU) == [('1', 'ReLU')]
    assert hooked(mod_filter=(nn.ReLU, nn.Linear)) == [('0', 'Linear'), ('1', 'ReLU'), ('2', 'Linear')]
    assert hooked(mod_filter=lambda m: getattr(m, 'out_features', 0) == 3) == [('2', 'Linear')]
    assert hooked(mods=[model[2], model]) == [('2', 'Linear'), ('model', 'Sequential')]


def test_hooks_callback_bad_inputs():
    with pytest.raises(TypeError, match='hookfunc must be callable'): HooksCallback(None)
    with pytest.raises(TypeError, match='mod_filter must be None'): HooksCallback(keep_output, mod_filter='Conv2d')
    with pytest.raises(ValueError, match='pass mods or mod_filter, not both'):
        HooksCallback(keep_output, mod_filter=nn.Linear, mods=[nn.Linear(1, 1)])
    with pytest.raises(ValueError, match='both False'): HooksCallback(keep_output, on_train=False)
    with pytest.raises(ValueError, match='mods is empty'): HooksCallback(keep_output, mods=[])
    with pytest.raises(TypeError, match=r'mods must be an iterable of modules, got a int: pass \[module\]'):
        HooksCallback(keep_output, mods=5)
    with pytest.raises(TypeError, match=r'mods\[1\] is a str, not a torch.nn.Module'):
        HooksCallback(keep_output, mods=[nn.Linear(1, 1), 'x'])


def test_hooks_callback_fit_start_errors_leave_the_learner_usable():
    learn = learner()
    with pytest.raises(ValueError, match=r'mods\[0\] \(Linear\) is not a module of learn.model'):
        learn.fit(1, cbs=HooksCallback(keep_output, mods=[nn.Linear(8, 16)]))
    assert n_hooks(learn.model) == 0
    learn.fit(1)


def test_a_filter_that_matches_nothing_hooks_nothing_with_a_warning():
    # the course reuses one callback list on models without the filtered layer type
    learn, hc = learner(), HooksCallback(keep_output, mod_filter=nn.Conv2d)
    with pytest.warns(UserWarning, match=r"HooksCallback: mod_filter <class '.*Conv2d'> matched no module of "
                                         r'learn.model, so nothing is hooked this fit'):
        learn.fit(1, cbs=hc)
    assert len(hc) == 0 and list(hc) == [] and bool(hc) and n_hooks(learn.model) == 0


# ---- ActivationStatsCB ---------------------------------------------------------------------------------------------
def identity_net():
    lin = nn.Linear(1, 1)
    with torch.no_grad(): lin.weight.fill_(1.); lin.bias.zero_()
    return nn.Sequential(lin, nn.ReLU())


def stats_learner(cbs):
    x = torch.tensor([[1.], [2.], [-3.], [4.]])
    d = DataLoaders.from_tensors(x, torch.zeros(4, 1), x[:2], torch.zeros(2, 1), bs=2, shuffle=False)
    return TrainLearner(identity_net(), d, F.mse_loss, lr=0.0, cbs=cbs)  # lr 0: the same activations every epoch


def hist(*values):
    h = torch.zeros(40)
    for v in values: h[int(abs(v) / 0.25)] += 1  # 40 bins of 0.25 over 0..10
    return h


def test_activation_stats_equal_a_hand_computation():
    st = ActivationStatsCB()
    stats_learner(st).fit(2)
    lin, relu = st.hooks
    # batches [1, 2] and [-3, 4] (Linear is the identity); ReLU gives [1, 2] and [0, 4]; valid batches not recorded
    assert torch.allclose(lin.means, torch.tensor([1.5, 0.5] * 2))
    assert torch.allclose(lin.stds, torch.tensor([math.sqrt(.5), math.sqrt(24.5)] * 2))
    assert torch.equal(lin.hists, torch.stack([hist(1, 2), hist(-3, 4)] * 2))
    assert torch.allclose(relu.means, torch.tensor([1.5, 2.] * 2))
    assert torch.allclose(relu.stds, torch.tensor([math.sqrt(.5), math.sqrt(8.)] * 2))
    assert torch.equal(relu.hists, torch.stack([hist(1, 2), hist(0, 4)] * 2))
    assert torch.equal(st.dead_fraction(relu), torch.tensor([0., .5] * 2))
    assert relu.stats[0] is relu.means and relu.stats[2] is relu.hists


def test_activation_stats_bins_range_and_valid_phase():
    st = ActivationStatsCB(nn.ReLU, on_train=False, on_valid=True, bins=4, hist_range=(0., 4.))
    stats_learner(st).fit(1)
    (relu,) = st.hooks
    assert relu.hists.tolist() == [[0., 1., 1., 0.]]  # the valid batch [1, 2], bins of width 1


def test_activation_stats_keep_the_batches_of_a_cancelled_fit_and_restart_each_fit():
    st = ActivationStatsCB(nn.ReLU)
    learn = stats_learner(st)
    learn.fit(2)
    assert len(st.hooks[0].means) == 4
    learn.fit(3, cbs=SingleBatchCB())
    assert st.hooks[0].means.tolist() == [1.5]


def test_activation_stats_read_no_value_per_batch():
    st = ActivationStatsCB(on_valid=True)
    learn = learner(n_train=256, bs=8, cbs=st)  # 32 train and 4 valid batches per epoch, 3 hooked layers
    with SyncCounter() as sc: learn.fit(2)
    assert sc.count == 0, sc.reads
    assert [len(h.means) for h in st.hooks] == [2 * 36] * 3


def test_activation_stats_figures_are_saved_as_png(tmp_path):
    st = ActivationStatsCB()
    with pytest.raises(ValueError, match='no activation statistics yet'): st.color_dim(path=tmp_path / 'x.png')
    stats_learner(st).fit(1)
    for name, plot in (('cd.png', st.color_dim), ('dead.png', st.dead_chart), ('stats.png', st.plot_stats)):
        path = plot(path=tmp_path / name)
        assert path == tmp_path / name and path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('kw, match', [({'bins': 0}, 'bins must be an int >= 1'),
                                       ({'hist_range': (1., 1.)}, 'hist_range must be'),
                                       ({'hist_range': 10}, 'hist_range must be'),
                                       ({'hist_range': ('0', '10')}, r"hist_range must be \(low, high\) .* got \('0', '10'\)")])
def test_activation_stats_bad_inputs(kw, match):
    with pytest.raises(ValueError, match=match): ActivationStatsCB(**kw)


# ---- show_training_loop lists the hooks installed ------------------------------------------------------------------
def test_show_training_loop_lists_installed_hooks_during_fit_only():
    seen = []

    class Look(Callback):
        def after_batch(self, learn):
            seen.append(learn._training_loop_text())
            raise CancelFitException()

    model = toy_model()
    hc = HooksCallback(keep_output, mod_filter=nn.Linear)
    learn = learner(model, cbs=[hc, Look()])
    learn.fit(1)
    assert seen[0].endswith('\nhooks:\n  HooksCallback() on 0 (Linear), 2 (Linear)')
    assert 'hooks:' not in learn._training_loop_text()

    def user_hook(m, i, o): pass
    with model[1].register_forward_hook(user_hook):
        assert learn._training_loop_text().endswith('\nhooks:\n  test_show_training_loop_lists_installed_hooks_during_fit_only.'
                                                     '<locals>.user_hook on 1 (ReLU)')
