"""What a resume checks before it changes anything: other settings (model, optimiser, batch size, schedule, accumulation,
precision, lr), weights-only loading, run identity in a shared folder, checksums and the fall-back past a corrupt newest
file; and exact resumes with persistent DataLoader workers and torchdata's StatefulDataLoader with workers."""
import re
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import assert_same, cpu_child_env
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ultraloop import (BatchSchedCB, Callback, CheckpointCB, DataLoaders, GradientAccumulationCB, MetricsCB,
                       MixedPrecisionCB, TrainLearner, state)

HERE = Path(__file__).resolve().parent


class Quiet(MetricsCB):
    def _log(self, d): pass


def data(n=24, nv=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + nv, 8, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    return x[:n], y[:n], x[n:], y[n:]


SGD = partial(torch.optim.SGD, momentum=0.9)


def make(dls=None, cbs=(), width=16, opt_func=SGD, bs=6, lr=0.05):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.Dropout(0.2), nn.ReLU(), nn.Linear(width, 2))
    dls = dls or DataLoaders.from_tensors(*data(), bs=bs, seed=2)
    return TrainLearner(model, dls, F.cross_entropy, lr=lr, cbs=[Quiet(), *cbs], opt_func=opt_func)


def outcome(learn):
    return {'model': learn.model.state_dict(), 'opt': learn.opt.state_dict(), 'history': learn.metrics.history}


def everything(learn):
    """All a learner holds that a refused state must leave as it was: its whole state (weights, gradients, optimiser,
    callbacks, loaders, RNGs, run identity), copied."""
    return state.cpu_copy(learn.state_dict())


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """Checkpoints of a 2-epoch run (4 batches an epoch, one every 3), and of a one-cycle run with accumulation and
    bf16; the uninterrupted 3-epoch run of the first."""
    d = tmp_path_factory.mktemp('saved')
    plain = make(cbs=[CheckpointCB(d / 'plain', every_batches=3, keep=10)])
    plain.fit(2)
    longer = make()
    longer.fit(3)
    cyc = make(cbs=[GradientAccumulationCB(2), MixedPrecisionCB(torch.bfloat16), CheckpointCB(d / 'cyc', every_batches=3)])
    cyc.fit_one_cycle(2, 0.1)
    return {'plain': d / 'plain' / 'checkpoint-000002-epoch1-train2.pt', 'folder': d / 'plain',
            'cyc': state.newest_checkpoint(d / 'cyc'), 'longer': outcome(longer)}


# ---- another setting: a one-line error before anything changes ------------------------------------------------------
NEW_RUN = re.escape('or start a new run, in a new checkpoint folder, from its weights: learn.load_state(path, '
                    'weights_only=True) or ultraloop fit --init-from CHECKPOINT')
CHANGED = {
    'optimiser': (dict(opt_func=torch.optim.Adam), r'was saved with the optimiser SGD, this run has Adam: resume with the '
                                                   r'optimiser SGD, ' + NEW_RUN),
    'hyper-parameter': (dict(opt_func=partial(torch.optim.SGD, momentum=0.9, weight_decay=0.01)),
                        r"the optimiser's weight_decay 0, this run has 0.01: resume with the optimiser's weight_decay 0, "),
    'batch size': (dict(bs=8), r'was saved with a train loader batch size of 6, this run has 8: resume with a train loader '
                               r'batch size of 6, '),
    'dataset': (dict(dls=DataLoaders.from_tensors(*data(n=30), bs=6, seed=2)),
                r'a train loader dataset size of 24, this run has 30'),
    'model': (dict(width=32), r'holds another model: 0.weight is \(16, 8\) float32 there and \(32, 8\) float32 here; '
                              r'build the model as the run did, or train this one as a new run'),
    'lr': (dict(lr=0.1), r"was saved with the fit's lr 0.05, this run has 0.1: resume with the fit's lr 0.05, "),
}


@pytest.mark.parametrize('change', CHANGED)
def test_another_setting_is_refused_naming_it_before_anything_changes(saved, change):
    kw, msg = CHANGED[change]
    learn = make(cbs=[CheckpointCB(saved['folder'].parent / 'unused')], **kw)
    learn.fit(1)  # a learner in use: a refused state must leave its weights, optimiser and callbacks as they are
    before = everything(learn)
    with pytest.raises(ValueError, match=msg) as e: learn.fit(2, resume=saved['plain'])
    assert '\n' not in str(e.value)
    assert_same(everything(learn), before)
    if change != 'lr':  # (load_state takes no lr)
        with pytest.raises(ValueError, match=msg): learn.load_state(saved['plain'])
        assert_same(everything(learn), before)


def test_a_wider_model_in_a_fresh_learner_is_refused_before_any_weight_is_loaded(saved):
    learn = make(width=32, cbs=[CheckpointCB(saved['folder'].parent / 'unused')])
    before = everything(learn)
    assert before['opt'] is None
    with pytest.raises(ValueError, match=r'0.weight is \(16, 8\) float32 there'): learn.fit(2, resume=saved['plain'])
    assert learn.opt is None
    assert_same(everything(learn), before)


def test_more_epochs_under_one_cycle_a_changed_accumulation_and_precision_are_refused_up_front(saved):
    def cyc(n=2, dtype=torch.bfloat16):
        return make(cbs=[GradientAccumulationCB(n), MixedPrecisionCB(dtype), CheckpointCB(saved['folder'].parent / 'u2')])
    learn = cyc()
    before = everything(learn)
    with pytest.raises(ValueError, match=r"saved with BatchSchedCB's epochs 2, this run has 3: resume with "
                                         r"BatchSchedCB's epochs 2, " + NEW_RUN):
        learn.fit_one_cycle(3, 0.1, resume=saved['cyc'])
    with pytest.raises(ValueError, match=r"saved with BatchSchedCB's max_lr 0.1, this run has 0.2"):
        learn.fit_one_cycle(2, 0.2, resume=saved['cyc'])
    assert_same(everything(learn), before)
    with pytest.raises(ValueError, match=r"saved with GradientAccumulationCB's n 2, this run has 3"):
        cyc(n=3).fit_one_cycle(2, 0.1, resume=saved['cyc'])
    with pytest.raises(ValueError, match=r"saved with MixedPrecisionCB's dtype bfloat16, this run has float16"):
        cyc(dtype=torch.float16).fit_one_cycle(2, 0.1, resume=saved['cyc'])
    sched = cyc().fit_one_cycle(2, 0.1, resume=saved['cyc'])  # the same settings go on
    assert sched.sched.last_epoch == 4


def test_a_callback_refusing_its_state_leaves_the_weights_and_optimiser_as_they_were(tmp_path):
    sched = partial(torch.optim.lr_scheduler.StepLR, step_size=2)
    learn = make(cbs=[BatchSchedCB(sched)])
    learn.fit(1)
    learn.save_state(tmp_path / 's.pt')
    other = make(cbs=[BatchSchedCB(sched)])  # no fit yet: no scheduler to load into
    before = everything(other)
    with pytest.raises(ValueError, match=r'^BatchSchedCB: a schedule state loads into a fit in progress'):
        other.load_state(tmp_path / 's.pt')
    after = everything(other)
    assert_same({k: after[k] for k in ('model', 'grads', 'opt', 'loaders', 'rng')},
                {k: before[k] for k in ('model', 'grads', 'opt', 'loaders', 'rng')})


def test_more_epochs_at_a_constant_lr_go_on_as_the_longer_run(saved):
    learn = make(cbs=[CheckpointCB(saved['folder'].parent / 'u3')])
    learn.fit(3, resume=saved['plain'])
    assert_same(outcome(learn), saved['longer'])


def test_weights_only_starts_a_new_run_from_the_weights(saved, tmp_path):
    sd = state.load_file(saved['plain'])
    learn = make(opt_func=torch.optim.Adam, bs=8, lr=0.01, cbs=[CheckpointCB(tmp_path)])  # another optimiser, batch, lr
    learn.load_state(saved['plain'], weights_only=True)
    assert_same(learn.model.state_dict(), sd['model'])
    assert learn.opt is None and learn.cbs[0].history == []  # nothing else of the run
    learn.fit(1)
    assert state.load_file(state.newest_checkpoint(tmp_path))['run'] != sd['run']  # a new run
    with pytest.raises(ValueError, match=r'holds another model: 0.weight is \(16, 8\) float32 there and \(32, 8\)'):
        make(width=32).load_state(saved['plain'], weights_only=True)


def test_cli_init_from_starts_a_new_run_from_a_checkpoints_weights(tmp_path, monkeypatch, capsys):
    from ultraloop import Callback, Learner, cli
    from ultraloop.models import mlp
    torch.manual_seed(3)
    ck = tmp_path / 'trained.pt'
    Learner(mlp(64, 128, 10)).save_state(ck)  # the command's mlp, weights of another seed

    class First(Callback):
        def before_fit(self, learn): self.w = state.cpu_copy(learn.model.state_dict())
    made, metric_cbs = [], cli._metric_cbs
    monkeypatch.setattr(cli, '_metric_cbs', lambda: [*metric_cbs(), made.append(First()) or made[-1]])

    def fit(*extra):
        return cli.main(['fit', '--model', 'mlp', '--epochs', '1', '--bs', '256', '--threads', '1', '--out',
                         str(tmp_path / 'run'), *map(str, extra)])
    assert fit('--opt', 'adamw', '--lr', '0.003', '--init-from', ck) == 0
    assert f'weights from {ck} (a new run)' in capsys.readouterr().out
    assert_same(made[-1].w, state.load_file(ck)['model'])
    assert fit('--init-from', tmp_path / 'nothing.pt') == 2
    assert capsys.readouterr().err.startswith(f'ultraloop: error: {tmp_path / "nothing.pt"}: no such checkpoint file')


# ---- run identity: a folder holding another run's checkpoints --------------------------------------------------------
def test_a_folder_holding_two_runs_is_refused_unless_the_file_is_given(tmp_path):
    a = make(cbs=[CheckpointCB(tmp_path)])
    a.fit(1)
    b = make(cbs=[CheckpointCB(tmp_path)], lr=0.02)  # another run writing to the same folder: its files are the newest
    b.fit(2)
    run_a, run_b = state.run_id(a), state.run_id(b)
    assert run_a != run_b
    newest_a, newest_b = state.newest_checkpoint(tmp_path, run=run_a), state.newest_checkpoint(tmp_path, run=run_b)
    assert state.newest_checkpoint(tmp_path) == newest_b and newest_a.name == 'checkpoint-000000-epoch1-train0.pt'
    fresh = make(cbs=[CheckpointCB(tmp_path)])
    before = everything(fresh)
    with pytest.raises(ValueError, match=rf"resume='{tmp_path}': the folder holds the checkpoints of 2 runs, run {run_b} "
                                         rf"\(newest {newest_b.name}\), run {run_a} \(newest {newest_a.name}\), so its "
                                         rf"newest may be another run's: pass the file to go on from, e.g. "
                                         rf"resume='{newest_b}', and give each run its own folder"):
        fresh.fit(2, resume=tmp_path)
    assert_same(everything(fresh), before)
    fresh.fit(2, resume=newest_a)  # asked for: run a's file
    assert state.run_id(fresh) == run_a  # it goes on as run a
    again = make(cbs=[CheckpointCB(tmp_path)])
    again.fit(2, resume=newest_a)
    a.fit(2, resume=tmp_path)  # the learner of run a, in its process: its own run's newest, not b's newer files
    assert_same(outcome(a), outcome(again))


# ---- checksums, and the fall-back past a corrupt newest file ---------------------------------------------------------
def flip_a_byte(path: Path, tensor: torch.Tensor) -> None:
    raw, data = tensor.numpy().tobytes(), bytearray(path.read_bytes())
    i = data.find(raw)
    assert i > 0 and data.find(raw, i + 1) < 0
    data[i + 5] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_and_resume_falls_back_to_the_newest_good_checkpoint(saved, tmp_path):
    ref = make(cbs=[CheckpointCB(tmp_path / 'ref', every_batches=3, keep=10)])
    ref.fit(2)
    files = state.checkpoints(tmp_path / 'ref')  # newest first: epoch2-train0, epoch1-train2, ...
    for f in files[:2]: (tmp_path / f.name).write_bytes(f.read_bytes())
    newest, previous = tmp_path / files[0].name, tmp_path / files[1].name
    flip_a_byte(newest, state.load_file(newest)['model']['3.weight'])
    with pytest.raises(ValueError, match=rf'^{newest} is corrupt: its tensors do not match the checksum saved with them '
                                         rf'\(a changed byte\); resume from an earlier checkpoint$'):
        state.load_file(newest)
    learn = make(cbs=[CheckpointCB(tmp_path / 'out')])
    with pytest.warns(UserWarning, match=rf"^resume='{tmp_path}': skipped {newest.name}: is corrupt: its tensors do not "
                                         rf"match the checksum .*; resuming from {previous.name}$"):
        learn.fit(2, resume=tmp_path)
    assert_same(outcome(learn), outcome(ref))
    newest.write_bytes(newest.read_bytes()[:-300])  # cut short, as by a crash of something other than save_file
    previous.write_bytes(previous.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"^resume='{tmp_path}': no checkpoint of the folder loads and checks "
                                         rf"\({newest.name}: is truncated or corrupt .*; {previous.name}: is truncated"):
        make(cbs=[CheckpointCB(tmp_path / 'out')]).fit(2, resume=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a good newest file: no warning
        make(cbs=[CheckpointCB(tmp_path / 'out2')]).fit(2, resume=tmp_path / 'ref')


# ---- exact with persistent DataLoader workers and a StatefulDataLoader with workers --------------------------------
class SnapAll(Callback):
    """A copy of the learner's state at every training batch's end and at every epoch's end, where CheckpointCB writes."""
    order = 60
    def __init__(self): self.states = []

    def cleanup_batch(self, learn):
        if learn.training: self.states.append(state.cpu_copy(learn.state_dict()))

    def after_epoch(self, learn):
        if state.epoch_ends(learn): self.states.append(state.cpu_copy(learn.state_dict()))


def worker_dls(loader=DataLoader):
    """Tiny data (2 train batches, 1 valid batch an epoch) read by one persistent worker per loader."""
    x, y, xv, yv = data(n=8, nv=4)
    kw = dict(batch_size=4, num_workers=1, persistent_workers=True)
    return DataLoaders(loader(TensorDataset(x, y), shuffle=True, **kw), loader(TensorDataset(xv, yv), **kw))


def where(sd): return '{epoch}-{phase}{batch}'.format(**sd['position'])


def stop_workers(learn) -> None:
    """Ends the loaders' persistent worker processes now rather than at a garbage collection."""
    for dl in (learn.dls.train, learn.dls.valid): dl._iterator = None  # its __del__ shuts the workers down


def resumed_from_each(states, dls, ref):
    for sd in states:
        learn = make(dls())
        learn.fit(3, resume=sd)
        stop_workers(learn)
        assert_same(outcome(learn), ref, where(sd))


def test_persistent_workers_resume_exactly_from_every_checkpoint_also_in_a_new_process(tmp_path):
    ref = make(worker_dls(), cbs=[snap := SnapAll()])
    ref.fit(3)
    stop_workers(ref)
    assert [where(sd) for sd in snap.states][3:6] == ['1-train1', '1-train2', '2-train0']  # where it drifted
    state.save_file(snap.states[3], tmp_path / 'from.pt')
    resumed_from_each(snap.states, worker_dls, outcome(ref))
    # a new process (the workers' base seed drawn there) from epoch 1, batch 1; its own states, resumed from here
    child = ('import sys, torch; import test_resume_checks as t; from ultraloop import state\n'
             'torch.set_num_threads(1); learn = t.make(t.worker_dls(), cbs=[snap := t.SnapAll()])\n'
             f'learn.fit(3, resume={str(tmp_path / "from.pt")!r})\n'
             f'torch.save({{"outcome": t.outcome(learn), "states": snap.states}}, {str(tmp_path / "out.pt")!r})\n')
    subprocess.run([sys.executable, '-c', child], env=cpu_child_env(HERE), check=True, timeout=300)
    out = torch.load(tmp_path / 'out.pt', weights_only=True)
    assert_same(out['outcome'], outcome(ref))
    assert [where(sd) for sd in out['states']][:3] == ['1-train2', '2-train0', '2-train1']
    resumed_from_each(out['states'][:3], worker_dls, outcome(ref))


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")  # torchdata calls a torch function being retired
def test_stateful_dataloader_with_workers_resumes_exactly():
    sdl = pytest.importorskip('torchdata.stateful_dataloader')

    def dls():
        torch.manual_seed(5)  # its RandomSampler seeds its own generator when made
        return worker_dls(sdl.StatefulDataLoader)
    ref = make(dls(), cbs=[snap := SnapAll()])
    ref.fit(3)
    stop_workers(ref)
    resumed_from_each([snap.states[i] for i in (0, 2, 3, 5)], dls, outcome(ref))  # 0-train1, 1-train0, 1-train1, 2-train0
