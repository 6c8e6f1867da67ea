"""Several processes for real, on CPU with gloo over 127.0.0.1: two launches of 2 processes each run tests/dist_child.py,
whose scenarios write what they saw as JSON; the tests compare it with the same set-ups run here in one process.
- one machine: `accelerate launch` (which runs torchrun's own launcher, torch.distributed.run, in-process) runs the
  DistributedCB scenarios and AccelerateCB's, so one launch covers both launchers' environments;
- two "machines" on loopback: two `torchrun --nnodes 2 --node-rank 0|1` processes, then a rank raising mid-epoch.
The launches start together, once per module: every process spends seconds importing torch, so there are only two."""
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import dist_child as child
from conftest import cpu_child_env
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from ultraloop import DistributedCB, GradientAccumulationCB, Learner, TensorLoader
from ultraloop.data import n_counted, shard

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(child.__file__)
TIMEOUT = 240  # a launch that has not ended by then hangs
LAUNCH = {'one': 'one', 'two': 'three'}  # the (last) launch writing into each folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def env(tmp: Path) -> dict:
    e = cpu_child_env(ROOT, CHILD.parent, MASTER_ADDR='127.0.0.1', OMP_NUM_THREADS='1', HF_HOME=str(tmp / 'hf'),
                      MPLBACKEND='Agg')
    if sys.platform == 'linux': e.setdefault('GLOO_SOCKET_IFNAME', 'lo')  # gloo's own connections on loopback too
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_PORT'): e.pop(k, None)
    return e


def torchrun(*args) -> list[str]: return [sys.executable, '-m', 'torch.distributed.run', '--master-addr', '127.0.0.1', *args]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Both launches' results (`load(folder, scenario)`: one dict per rank), and the one-process reference, computed
    here while the launches run."""
    if not dist.is_available() or not dist.is_gloo_available(): pytest.skip('torch.distributed with gloo is not available')
    tmp = tmp_path_factory.mktemp('dist')
    dirs = {k: tmp / k for k in ('one', 'two')}
    for d in dirs.values(): d.mkdir()
    e, p_one, p_two, p_three = env(tmp), free_port(), free_port(), free_port()
    cmds = {
        'one': [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
                '--num_machines', '1', '--main_process_ip', '127.0.0.1', '--main_process_port', str(p_one),
                '--mixed_precision', 'no', '--dynamo_backend', 'no', str(CHILD), str(dirs['one']),
                'ddp', 'fsdp', 'accumulate', 'dataloader', 'nan', 'cli', 'accelerate'],
        'node0': torchrun('--nnodes', '2', '--node-rank', '0', '--nproc-per-node', '1', '--master-port', str(p_two),
                          str(CHILD), str(dirs['two']), 'machines', 'kill'),
        'node1': torchrun('--nnodes', '2', '--node-rank', '1', '--nproc-per-node', '1', '--master-port', str(p_two),
                          str(CHILD), str(dirs['two']), 'machines', 'kill'),
        # after the two machines' run was killed: new processes resume it, then a rank raises
        'three': torchrun('--nproc-per-node', '2', '--master-port', str(p_three), str(CHILD), str(dirs['two']),
                          'resume', 'fail'),
    }
    logs = {k: tmp / f'{k}.log' for k in cmds}
    procs, ended = {}, {}

    def start(k):
        with open(logs[k], 'w') as f: procs[k] = subprocess.Popen(cmds[k], cwd=tmp, env=e, stdout=f, stderr=subprocess.STDOUT)

    def wait(k):
        procs[k].wait(timeout=TIMEOUT)
        ended[k] = time.time()
    try:
        for k in ('one', 'node0', 'node1'): start(k)
        ref = one_process_reference()
        for k in ('node0', 'node1'): wait(k)
        start('three')
        for k in ('three', 'one'): wait(k)
    finally:
        for p in procs.values():
            if p.poll() is None: p.kill()
    out = {k: f.read_text() for k, f in logs.items()}

    def load(where, name):
        got = [dirs[where] / f'{name}-rank{r}.json' for r in (0, 1)]
        missing = [f.name for f in got if not f.exists()]
        assert not missing, f'no {missing}; the launch printed:\n{out[LAUNCH[where]][-3000:]}'
        return [json.loads(f.read_text()) for f in got]
    return SimpleNamespace(rc={k: p.returncode for k, p in procs.items()}, out=out, ended=ended, dirs=dirs, load=load,
                           ref=ref)


@pytest.fixture(scope='module')
def reference(runs): return runs.ref


def one_process_reference() -> dict:
    """The scenarios' set-ups in this one process, with bs 32: two processes of bs 16 must see the same batches."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes (OMP_NUM_THREADS=1)
    try:
        ref = {}
        learn = child.learner(32, torchmetrics=True)
        with child.captured():
            learn.fit(1, train=False)
            ref['valid_only'] = learn.metrics.history
            learn.fit(2)
        ref['history'], ref['params'] = learn.metrics.history, child.flat_params(learn.model)
        ref['keys'] = list(learn.model.state_dict())
        steps = child.StepCount()
        learn = child.learner(32, cbs=[steps, GradientAccumulationCB(2)])
        with child.captured(): learn.fit(2)
        ref['accumulate'] = {'steps': steps.steps, 'params': child.flat_params(learn.model), 'history': learn.metrics.history}
        learn = child.learner(32, dls=child.torch_loaders(32))
        with child.captured(): learn.fit(1, train=False)
        ref['dataloader_valid'] = learn.metrics.history
        learn = child.learner(32, cbs=[counts := child.count_metrics()])
        with child.captured(): learn.fit(1, train=False)
        ref['counts'] = counts.history
        return ref
    finally: torch.set_num_threads(n)


def same_rows(got: list[dict], want: list[dict]) -> None:
    """Metric rows equal: counts and accuracy exactly, the loss to 1e-9."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != 'loss'} == {k: v for k, v in w.items() if k != 'loss'}
        assert g['loss'] == pytest.approx(w['loss'], abs=1e-9)


def same_params(got: list[float], want: list[float], tol: float = 1e-6) -> None:
    assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) < tol


def counted(row: dict) -> int: return int(sum(map(sum, row['cm'])))


# ---- one machine, DDP ----------------------------------------------------------------------------------
def test_ddp_validation_metrics_equal_one_process_on_an_uneven_set(runs, reference):
    # ranks seeded differently: a validation-only fit still starts both from rank 0's weights; 101 samples: 51 + 50
    r0, r1 = runs.load('one', 'ddp')
    for r in (r0, r1):
        same_rows(r['valid_only'], reference['valid_only'])
        assert counted(r['valid_only'][0]) == child.N_VALID


def test_ddp_two_processes_of_bs16_train_as_one_of_bs32(runs, reference):
    r0, r1 = runs.load('one', 'ddp')
    assert r0['params'] == r1['params']  # the ranks hold the same weights, bit for bit
    same_params(r0['params'], reference['params'])
    for r in (r0, r1): same_rows(r['history'], reference['history'])
    assert r0['keys'] == reference['keys'] and r0['world_size'] == 2  # no 'module.' prefix


def test_built_in_accuracies_sum_their_counts_over_processes_exactly(runs, reference):
    for r in runs.load('one', 'ddp'):
        assert r['counted'] == [101, 101]  # each sample once: not left out, not summed twice
        same_rows(r['counts'], reference['counts'])
    assert 0 < reference['counts'][0]['bal'] < 1


def test_only_rank0_prints_and_writes_files(runs):
    r0, r1 = runs.load('one', 'ddp')
    assert r1['printed'] == '' and r1['files'] == [] and not r1['plotted']
    assert r0['files'] == ['history.csv', 'metrics.png'] and r0['plotted']
    assert re.search(r'\bcm +acc +loss +epoch +train +time\n', r0['printed'])  # ProgressCB's table
    rows = (runs.dirs['one'] / 'files-rank0' / 'history.csv').read_text().splitlines()
    assert rows[0] == 'cm,acc,loss,epoch,train' and len(rows) == 1 + 1 + 4  # the validation-only fit, then 2 epochs


def test_a_metric_that_cannot_be_summed_over_processes_is_refused(runs):
    for r in runs.load('one', 'ddp'):
        assert r['own_metric_error'].startswith('MetricsCB: the metric OwnMean has no known way to sum its state over '
                                                'processes')


def test_fsdp_state_saved_by_rank0_loads_back_and_goes_on_exactly(runs):
    r0, r1 = runs.load('one', 'fsdp')
    for r in (r0, r1): assert r['loaded'] == r['params'] and r['on_again'] == r['on'] != r['params']
    learn = child.learner(32)  # and in one process, unsharded
    learn.load_state(runs.dirs['one'] / 'fsdp-state.pt')
    assert child.flat_params(learn.model) == r0['params']


def test_fsdp_matches_one_process(runs, reference):
    r0, r1 = runs.load('one', 'fsdp')
    assert r0['params'] == r1['params'] and r0['keys'] == reference['keys']
    same_params(r0['params'], reference['params'])
    for r in (r0, r1):
        same_rows(r['valid_only'], reference['valid_only'])
        same_rows(r['history'], reference['history'])
        # FSDP evens out validation shards too (51 + 51): the repeated sample is not counted
        assert counted(r['history'][-1]) == child.N_VALID


def test_accumulation_all_reduces_once_per_optimiser_step(runs, reference):
    for r in runs.load('one', 'accumulate'):
        assert r['all_reduces'] == r['steps'] == reference['accumulate']['steps'] == 4  # 8 micro-batches
        same_params(r['params'], reference['accumulate']['params'])
        same_rows(r['history'], reference['accumulate']['history'])


def test_torch_dataloaders_get_distributed_samplers_and_repeats_are_not_counted(runs, reference):
    r0, r1 = runs.load('one', 'dataloader')
    assert r0['params'] == r1['params']
    for r in (r0, r1):
        same_rows(r['valid_only'], reference['dataloader_valid'])
        # 99 train samples: DistributedSampler gives each rank 50, repeating one; the metrics count 99
        assert [counted(h) for h in r['history']] == [child.N_TRAIN - 1, child.N_VALID]


def test_a_loss_not_finite_on_one_rank_skips_the_batch_on_every_rank(runs):
    r0, r1 = runs.load('one', 'nan')
    assert r0['skipped'] == r1['skipped'] == 1 and r0['params'] == r1['params']
    assert all(v == v for v in r0['params'])  # no NaN reached the weights


def test_cli_fit_under_torchrun_trains_with_distributed_cb_and_only_rank0_prints(runs):
    r0, r1 = runs.load('one', 'cli')
    assert r0['rc'] == r1['rc'] == 0
    assert r1['printed'] == '' and r1['files'] is None  # rank 1 made no run folder
    assert r0['files'] == ['config.toml', 'history.csv', 'metrics.png', 'model.pt']  # fit writes its config and weights too
    assert re.search(r'^valid: accuracy 0\.\d{3}, loss \d\.\d{3}$', r0['printed'], re.M)
    assert 'data: digits (1,438 train, 359 valid' in r0['printed']


# ---- two machines on loopback, a kill and a resume, and a failure ---------------------------------------------------
def test_two_machines_on_loopback_give_the_single_process_metrics(runs, reference):
    r0, r1 = runs.load('two', 'machines')
    assert r0['params'] == r1['params']
    same_params(r0['params'], reference['params'])
    for r in (r0, r1): same_rows(r['history'], reference['history'])


def test_a_run_killed_mid_epoch_resumes_in_new_processes_exactly(runs):
    # rank 1 was SIGKILLed before epoch 1's train batch 3; both machines' launches ended with an error
    assert runs.rc['node0'] != 0 and runs.rc['node1'] != 0
    done = runs.load('two', 'machines')
    for r, d in zip(runs.load('two', 'resume'), done):
        assert r['from'] == 'checkpoint-000003-epoch1-train2.pt'  # mid-epoch: partial metric sums, momentum, RNGs
        assert r['params'] == d['params'] and r['history'] == d['history']  # bit for bit, each rank its own parts


def test_a_checkpoint_of_two_processes_loads_in_one(runs, reference):
    from ultraloop import CheckpointCB
    from ultraloop.state import newest_checkpoint
    learn = child.learner(32, cbs=[CheckpointCB(runs.dirs['two'] / 'unused')])  # the stateful callbacks it was saved with
    learn.load_state(newest_checkpoint(runs.dirs['two'] / 'ckpt-full'))
    d0, _ = runs.load('two', 'machines')
    assert child.flat_params(learn.model) == d0['params']
    with child.captured(): learn.fit(1, train=False)
    same_rows(learn.metrics.history, [{**d0['history'][-1], 'epoch': 0}])


def test_a_rank_raising_mid_epoch_ends_the_run_with_an_error_not_a_hang(runs):
    assert runs.rc['three'] != 0
    assert 'RuntimeError: rank 1 fails at batch 2' in runs.out['three']
    failed_at = float((runs.dirs['two'] / 'failed-at').read_text())
    assert runs.ended['three'] - failed_at < 60


# ---- accelerate launch -------------------------------------------------------------------------------------------
def test_accelerate_cb_under_accelerate_launch_matches_one_process(runs, reference):
    assert runs.rc['one'] == 0, runs.out['one'][-3000:]
    r0, r1 = runs.load('one', 'accelerate')
    assert r0['world_size'] == 2 and r0['params'] == r1['params'] and r1['printed'] == ''
    same_params(r0['params'], reference['params'])
    for r in (r0, r1): same_rows(r['history'], reference['history'])


# ---- in one process: the shards' arithmetic, the seam, bad arguments -------------------------------------------------
def test_tensor_loader_shards_take_every_nth_position_of_one_order():
    x = torch.arange(101)
    tl = TensorLoader(x, bs=16, shuffle=True, seed=3)
    order = torch.randperm(101, generator=torch.Generator().manual_seed(3))
    shards = [tl.shard(r, 2, even=False) for r in (0, 1)]
    got = []
    for s in shards:
        s.generator.manual_seed(3)
        got.append(torch.cat([b[0] for b in s]))
    assert got[0].tolist() == order[0::2].tolist() and got[1].tolist() == order[1::2].tolist()
    assert [len(g) for g in got] == [51, 50] and [n_counted(s) for s in shards] == [None, None]
    even = [tl.shard(r, 2) for r in (0, 1)]  # training: 51 each, rank 1's last repeats the order's first sample
    tl.generator.manual_seed(3)
    b1 = torch.cat([b[0] for b in even[1]])
    assert len(b1) == 51 and b1[:-1].tolist() == order[1::2].tolist() and b1[-1] == order[0]
    assert [len(s) for s in even] == [4, 4] and [n_counted(s) for s in even] == [None, 50]
    assert len(tl) == 7 and tl._shard is None  # the original is untouched


def test_two_shards_of_bs_b_make_the_single_process_batches_of_bs_2b():
    x = torch.arange(100)
    one = [b[0].tolist() for b in TensorLoader(x, bs=32, shuffle=True, seed=5)]
    parts = [[b[0].tolist() for b in TensorLoader(x, bs=16, shuffle=True, seed=5).shard(r, 2)] for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*parts)] == [sorted(b) for b in one]


def test_shard_refuses_loaders_it_cannot_cut():
    with pytest.raises(TypeError, match=r"^cannot shard a list across processes; give each process its own share"):
        shard([[torch.zeros(1)]], 0, 2)
    ds = TensorDataset(torch.zeros(4))
    with pytest.raises(TypeError, match=r'cannot shard this DataLoader across processes \(its dataset, sampler or '
                                        r'batch_sampler is its own: TensorDataset, list\)'):
        shard(DataLoader(ds, sampler=[0, 1]), 0, 2)
    with pytest.raises(ValueError, match=r'^shard needs 0 <= rank < world_size, got rank=2, world_size=2$'):
        TensorLoader(torch.zeros(4)).shard(2, 2)


def test_rank_seam_outside_a_process_group(monkeypatch):
    learn = Learner(torch.nn.Linear(1, 1))
    monkeypatch.delenv('RANK', raising=False)
    assert (learn.rank, learn.world_size, learn.is_main) == (0, 1, True)
    monkeypatch.setenv('RANK', '1'); monkeypatch.setenv('WORLD_SIZE', '2')  # under torchrun, between fits
    assert (learn.rank, learn.world_size, learn.is_main) == (1, 2, False)


def test_distributed_cb_checks_its_arguments_and_does_nothing_in_one_process(monkeypatch):
    with pytest.raises(ValueError, match=r"^DistributedCB: strategy must be 'ddp' or 'fsdp', got 'zero'$"):
        DistributedCB('zero')
    with pytest.raises(ValueError, match=r"^DistributedCB: backend must be one of 'gloo', 'nccl'.*got 'tcp'$"):
        DistributedCB(backend='tcp')
    with pytest.raises(ValueError, match=r'^DistributedCB: timeout \(seconds\) must be a finite number > 0, got 0$'):
        DistributedCB(timeout=0)
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'): monkeypatch.delenv(k, raising=False)
    learn = child.learner(32, cbs=[DistributedCB()])
    with child.captured(): learn.fit(1)
    assert not dist.is_initialized() and learn.dls.train._shard is None and 'forward' not in vars(learn.model)


@pytest.fixture
def one_process_group(monkeypatch):
    """A process group of one (gloo on loopback, an in-memory store): DistributedCB's set-up runs in this process."""
    if not dist.is_available() or not dist.is_gloo_available(): pytest.skip('torch.distributed with gloo is not available')
    if sys.platform == 'linux': monkeypatch.setenv('GLOO_SOCKET_IFNAME', 'lo')
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_gloo_group_trains_on_the_cpu_where_cuda_is_available_too(one_process_group, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # a GPU machine, as DistributedCB sees it
    learn = child.learner(32, cbs=[dcb := DistributedCB()])
    with child.captured(): learn.fit(1)
    assert dcb.device == torch.device('cpu') and all(p.device.type == 'cpu' for p in learn.model.parameters())


class PhaseModes(child.Callback):
    """What DistributedCB's wrapper and the user's module look like in each phase."""
    order = 100

    def __init__(self, dcb): self.dcb, self.seen = dcb, []

    def after_batch(self, learn):
        if learn.iter == 0:
            self.seen.append((learn.training, self.dcb.wrapper.training, type(self.dcb.wrapper).__name__,
                              vars(learn.model).get('forward') == self.dcb._call_wrapper))  # routed to the wrapper


def test_ddp_keeps_the_users_module_routes_training_forwards_through_the_wrapper_and_composes_with_compile(
        one_process_group):
    from ultraloop import CompileCB
    dcb = DistributedCB()
    modes = PhaseModes(dcb)
    learn = child.learner(32, cbs=[dcb, CompileCB(backend='eager'), modes])
    model = learn.model
    with child.captured(): learn.fit(1)
    plain = child.learner(32)
    with child.captured(): plain.fit(1)
    assert learn.model is model and type(model) is torch.nn.Sequential
    # the wrapper's mode follows the phase; training forwards go through it, validation runs the module plainly
    assert modes.seen == [(True, True, 'DistributedDataParallel', True), (False, False, 'DistributedDataParallel', False)]
    assert 'forward' not in vars(model) and dcb.wrapper is None  # CompileCB's compiled forward and the route are gone
    assert list(model.state_dict()) == list(plain.model.state_dict())
    same_params(child.flat_params(model), child.flat_params(plain.model), 1e-12)
    same_rows(learn.metrics.history, plain.metrics.history)
    assert dist.is_initialized()  # a group DistributedCB found is not its to destroy
