"""Elastic restarts and a changed number of processes, for real: torchrun launches (CPU, gloo, 127.0.0.1) of
tests/elastic_child.py, a float64 MLP trained by `fit_one_cycle` with DistributedCB and a checkpoint every 2 train
batches, resumed from its folder's newest checkpoint when relaunched.
- `torchrun --max-restarts 2`: rank 0 SIGKILLed before a random train batch, then in the relaunched round rank 1
  SIGKILLed inside a checkpoint (its parts handed over, rank 0 writing): the group restarts twice and ends bitwise equal
  to the uninterrupted 2-process run; `--max-restarts 0` (4 processes): a random rank killed ends the job non-zero soon
  after the kill.
- the number of processes changed at an epoch's end, the global batch kept: 2 -> 1, 1 -> 2 and 4 -> 2, with a
  TensorLoader and with a shuffled torch DataLoader, each equal to the uninterrupted run (float64; see `close`).
Three launches start together, once per module; the one-process runs go on here meanwhile, and the 2-process launch
resumes their checkpoints and the 4-process ones once this module has put them in place."""
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import elastic_child as child
import pytest
import torch
import torch.distributed as dist
from conftest import assert_same
from dist_child import captured
from test_distributed import env, free_port, torchrun

from ultraloop.state import _tensors  # every tensor of a nested state, in the order the state keeps

CHILD = Path(child.__file__)
TIMEOUT = 300  # a launch that has not ended by then hangs
BOUND = 60  # seconds from a kill to the end of a job with no restarts left
KINDS = ('tensors', 'torch')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available(): pytest.skip('torch.distributed with gloo is not available')
    tmp = tmp_path_factory.mktemp('elastic')
    rnd = random.Random()
    seed = rnd.randrange(2**32)
    rnd.seed(seed)
    # 'kills' (3 rounds): round 0 loses rank 0 before a random train batch (of 12), round 1 loses rank 1 inside one of
    # its first 3 checkpoints (at least 3 are left: round 0 ended by batch 8), round 2 ends the run. 'four': after its
    # two fits, a random one of the 4 ranks dies in a third, with no restarts left
    plan = {'kills': f'batch:0:{rnd.randint(2, 8)},save:1:{rnd.randint(1, 3)}',
            'four': f'batch:{rnd.randrange(4)}:{24 + rnd.randint(1, 12)}'}
    e = env(tmp)

    def job(name, *args): return [str(tmp / name / a) if i % 4 == 0 else a for i, a in enumerate(args)]
    cmds = {
        # the uninterrupted 2-process runs; then 2 processes of bs 8 resume the 1-process and 4-process runs' epoch-end
        # checkpoints, once this test has put them in place ('@': waited for)
        'ref': torchrun('--nproc-per-node', '2', '--master-port', str(free_port()), str(CHILD), str(tmp / 'ref'),
                        *job('ref', 'tensors2', 'tensors', '2', '8', 'torch2', 'torch', '2', '8')),
        'kills': torchrun('--nproc-per-node', '2', '--max-restarts', '2', '--master-port', str(free_port()), str(CHILD),
                          str(tmp / 'kills'), *job('kills', 'ckpt', 'tensors', '2', '8'), '--kill', plan['kills']),
        'four': torchrun('--nproc-per-node', '4', '--max-restarts', '0', '--master-port', str(free_port()), str(CHILD),
                         str(tmp / 'four'), *job('four', 'tensors4', 'tensors', '2', '4', 'torch4', 'torch', '2', '4',
                                                 'dies', 'tensors', '2', '4'), '--kill', plan['four']),
    }
    for kind in KINDS:
        for n in (1, 4): cmds['ref'] += ['@' + str(tmp / 'ref' / f'{kind}{n}'), kind, '2', '8']
    procs, ended = {}, {}

    def start(k):
        with open(tmp / f'{k}.log', 'w') as f:
            procs[k] = subprocess.Popen(cmds[k], cwd=tmp, env=e, stdout=f, stderr=subprocess.STDOUT)

    def wait(k):
        procs[k].wait(timeout=max(1, TIMEOUT - (time.time() - t0)))
        ended[k] = time.time()
    t0 = time.time()
    try:
        for k in cmds: start(k)
        one = {kind: one_process(tmp / 'one', f'{kind}1', kind, 16) for kind in KINDS}
        for kind in KINDS: epoch_end(tmp / 'one' / f'{kind}1', tmp / 'ref' / f'{kind}1')
        four = [tmp / 'four' / f'{kind}4-rank0.pt' for kind in KINDS]  # written once the fit and its checkpoints are done
        while not all(f.exists() for f in four) and procs['four'].poll() is None and time.time() - t0 < TIMEOUT:
            time.sleep(0.1)
        for kind, f in zip(KINDS, four):
            if f.exists(): epoch_end(tmp / 'four' / f'{kind}4', tmp / 'ref' / f'{kind}4')
        for k in cmds: wait(k)
    finally:
        for p in procs.values():
            if p.poll() is None: p.kill()
    logs = {k: (tmp / f'{k}.log').read_text() for k in cmds}

    def load(where, name, ranks=(0, 1)):
        got = [tmp / where / f'{name}-rank{r}.pt' for r in ranks]
        missing = [f.name for f in got if not f.exists()]
        assert not missing, f'no {missing} (random seed {seed}, {plan}); the launch printed:\n{logs[where][-3000:]}'
        return [torch.load(f) for f in got]
    return SimpleNamespace(tmp=tmp, rc={k: p.returncode for k, p in procs.items()}, ended=ended, logs=logs, load=load,
                           one=one, plan=plan, seed=seed)


def epoch_end(src: Path, dst: Path) -> Path:
    """A folder `dst` holding `src`'s checkpoint at the end of epoch 0 as its newest (the run's own went on past it),
    put in place whole (a process may be waiting for it)."""
    part = dst.with_name(dst.name + '.part')
    part.mkdir(parents=True)
    (f,) = src.glob('checkpoint-*-epoch1-train0.pt')
    shutil.copy(f, part)
    part.rename(dst)
    return dst / f.name


class one_group:
    """A process group of one (gloo, an in-memory store) in this process: DistributedCB cuts the loaders in it as
    `torchrun --nproc-per-node 1` would (a DistributedSampler for a torch DataLoader)."""

    def __enter__(self): dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    def __exit__(self, *exc): dist.destroy_process_group()


def one_process(folder: Path, name: str, kind: str, bs: int) -> dict:
    """The child's fit in this process, with bs 16 (the global batch of 2 processes of bs 8), from `folder/name`'s
    newest checkpoint when there is one; a torch DataLoader in a group of one, so that it is cut as the others are."""
    with captured():
        if kind == 'torch':
            with one_group(): return child.train(folder / name, kind, 2, bs)
        return child.train(folder / name, kind, 2, bs)


def same_result(got: dict, want: dict, where: str) -> None:
    assert_same({k: v for k, v in got.items() if k != 'resumed'}, {k: v for k, v in want.items() if k != 'resumed'}, where)


TOL = 1e-13  # float64: one process sums a batch's gradient in another order than DDP's average of two halves


def close(got: dict, want: dict, where: str) -> None:
    """Equal but for the order of the gradient's reduction: the schedule and the samples counted exactly, weights,
    optimiser state and losses within TOL."""
    assert got['lrs'] == want['lrs'], where
    for k in ('model', 'opt'):
        a, b = list(_tensors(got[k])), list(_tensors(want[k]))
        assert len(a) == len(b) and all(x.shape == y.shape and (x - y).abs().max() < TOL for x, y in zip(a, b)), (where, k)
    assert len(got['history']) == len(want['history']), where
    for g, w in zip(got['history'], want['history']):
        assert {k: v for k, v in g.items() if k != 'loss'} == {k: v for k, v in w.items() if k != 'loss'}, where
        assert abs(float(g['loss']) - float(w['loss'])) < TOL, where


def one_cycle_lrs(steps: int) -> list[float]:
    """OneCycleLR's lrs, run by hand over `steps` optimiser steps (the child's max_lr 0.1 and SGD with momentum)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step(); sched.step()
    return lrs


# ---- the schedule under several processes -----------------------------------------------------------------------------
def test_fit_one_cycle_under_two_processes_spans_the_steps_each_takes_and_ends_at_its_final_lr(runs):
    assert runs.rc['ref'] == 0, runs.logs['ref'][-3000:]
    steps = 2 * child.N_TRAIN // 16  # 2 epochs of 96 samples in global batches of 16: 6 steps per epoch on each rank
    for kind in KINDS:
        r0, r1 = runs.load('ref', f'{kind}2')
        assert r0['lrs'] == r1['lrs'] == one_cycle_lrs(steps)
        assert r0['lrs'][-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-12)  # max_lr / div_factor / final_div_factor
        same_result(r1, r0, f'{kind}: ranks')
        # one process of the global batch: the same schedule, the same run but for the reduction order
        close(r0, runs.one[kind], f'{kind}: 2 processes of bs 8 against 1 of bs 16')


# ---- elastic restarts -------------------------------------------------------------------------------------------------
def test_ranks_sigkilled_under_max_restarts_restart_and_end_bitwise_equal(runs):
    # round 0: rank 0 killed before a random train batch; round 1: rank 1 killed inside a checkpoint; round 2 finishes
    where = f'{runs.plan["kills"]} (random seed {runs.seed})'
    assert runs.rc['kills'] == 0, f'{where}\n{runs.logs["kills"][-3000:]}'
    d = runs.tmp / 'kills'
    assert all((d / f).exists() for f in ('killed-at-round0', 'killed-at-round1', 'pid-rank0-round2')), where
    ref = runs.load('ref', 'tensors2')
    for r, got in enumerate(runs.load('kills', 'ckpt')):
        assert got['resumed'] is not None, where  # the last round went on from a checkpoint of the one before
        same_result(got, ref[r], f'{where}, rank {r}')
    assert not list((d / 'ckpt').glob('.*')), where  # no temporary file of an interrupted write is left


def test_with_no_restarts_left_a_killed_rank_ends_the_job_non_zero_within_the_bound(runs):
    assert runs.rc['four'] != 0, runs.logs['four'][-3000:]
    killed = float((runs.tmp / 'four' / 'killed-at-round0').read_text())
    assert runs.ended['four'] - killed < BOUND, runs.plan['four']


# ---- another number of processes on resume, the global batch kept -----------------------------------------------------
@pytest.mark.parametrize('kind', KINDS)
def test_two_processes_resumed_on_one_go_on_as_the_run(runs, kind):
    d = runs.tmp / 'down' / kind
    epoch_end(runs.tmp / 'ref' / f'{kind}2', d)
    got = one_process(d.parent, kind, kind, 16)
    assert got['resumed'].endswith('-epoch1-train0.pt')
    run, _ = runs.load('ref', f'{kind}2')
    assert_same(got['history'][:2], run['history'][:2])  # the history before the resume carried over as it was
    close(got, run, f'{kind}: 2 -> 1')


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('n', [1, 4])
def test_one_and_four_processes_resumed_on_two_go_on_as_the_run(runs, kind, n):
    r0, r1 = runs.load('ref', f'{kind}{n}')
    same_result(r1, r0, 'ranks')
    run = runs.one[kind] if n == 1 else runs.load('four', f'{kind}4', range(4))[0]
    assert r0['resumed'].endswith('-epoch1-train0.pt')
    assert_same(r0['history'][:2], run['history'][:2])
    close(r0, run, f'{kind}: {n} -> 2')


def test_another_number_of_processes_is_refused_before_any_work_where_the_run_cannot_go_on(runs, monkeypatch):
    src = runs.tmp / 'ref' / 'tensors2'
    (mid,), (end,) = src.glob('checkpoint-*-epoch1-train2.pt'), src.glob('checkpoint-*-epoch1-train0.pt')
    unused = runs.tmp / 'refused'

    def refused(bs, resume, msg):
        learn = child.learner(unused, 'tensors', bs)
        before = [p.clone() for p in learn.model.parameters()]
        with pytest.raises(ValueError, match=f"^{re.escape(f'{resume} {msg}')}$"): learn.fit_one_cycle(2, 0.1, resume=resume)
        assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters())) and not unused.exists()
    refused(16, mid, "was taken inside a phase (epoch 1, train batch 2) by 2 processes, and 1 would resume it: resume "
                     "it with 2 processes, or from a checkpoint taken at an epoch's end (CheckpointCB writes one at "
                     "every epoch's end)")
    refused(8, end, 'was saved by 2 processes of bs 8 (a global batch of 16); 1 process of bs 8 makes a global batch '
                    'of 8: to go on with the same batches, give each process bs=16')
    monkeypatch.setenv('RANK', '0'); monkeypatch.setenv('WORLD_SIZE', '3')  # as torchrun --nproc-per-node 3 sets them
    refused(5, end, 'was saved by 2 processes of bs 8 (a global batch of 16); 3 processes of bs 5 make a global batch '
                    'of 15: to go on with the same batches, 16 does not divide by 3 processes: resume with a number '
                    'of processes that divides it')


def test_a_dataloader_resumed_where_it_draws_its_order_another_way_is_warned_of(runs):
    d = runs.tmp / 'plain' / 'torch'
    f = epoch_end(runs.tmp / 'ref' / 'torch2', d)
    learn = child.learner(d, 'torch', 16)
    with pytest.warns(UserWarning, match=rf'^{re.escape(str(f))} was saved by 2 processes whose shuffled train DataLoader '
                                         r'drew its order by DistributedSampler \(DistributedCB.s cut\); here it draws it '
                                         r'by its own RandomSampler \(no cut\), so the batches after the resume differ'):
        with captured(): learn.fit_one_cycle(2, 0.1, resume=d)
    assert len(learn.metrics.history) == 4  # and the run went on
