"""SIGTERM and SIGUSR1 for real: a child process (tests/signal_child.py) runs the `ultraloop fit` command and a Python fit,
each stopped from outside at a known batch, and 2 torchrun ranks, one of which gets SIGTERM; the stopped runs, resumed in
this process (or by new learners in the ranks), end bitwise equal to the same runs never stopped. resume='auto', the
handlers' lifetime and the finished run are checked here too."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import signal_child as child  # noqa: E402
from conftest import assert_same  # noqa: E402
from test_distributed import env as dist_env, free_port, torchrun  # noqa: E402

from ultraloop import EXIT_RESUMABLE, CheckpointCB, Learner, MetricsCB, TrainCB  # noqa: E402
from ultraloop.callbacks.metrics import format_row  # noqa: E402
from ultraloop.cli import main  # noqa: E402

TIMEOUT = 240
DEFAULTS = {'SIGINT': 'default_int_handler', 'SIGTERM': 'SIG_DFL', 'SIGUSR1': 'SIG_DFL'}


class Signaller(threading.Thread):
    """Sends each run its signal when it announces (OUT/wait-<name>) that it waits at its batch; notes the times."""
    PLAN = {'cli': signal.SIGTERM, 'py': signal.SIGTERM, 'twice': signal.SIGUSR1, 'twice-SIGUSR1': signal.SIGTERM,
            'dist': signal.SIGTERM, 'acc': signal.SIGTERM}

    def __init__(self, folders):
        super().__init__(daemon=True)
        self.folders, self.sent, self.stop = folders, {}, threading.Event()

    def run(self):
        while not self.stop.is_set() and len(self.sent) < len(self.PLAN):
            for d in self.folders:
                for name, sig in self.PLAN.items():
                    f = d / f'wait-{name}'
                    if name not in self.sent and f.exists():
                        os.kill(int(f.read_text()), sig)
                        self.sent[name] = time.monotonic()
            time.sleep(0.02)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The child and the first torchrun launch start together (each spends seconds importing torch); the references
    are computed here meanwhile; new ranks then resume the stopped two-process run."""
    tmp = tmp_path_factory.mktemp('signals')
    single, two = tmp / 'single', tmp / 'two'
    single.mkdir(), two.mkdir()
    signaller = Signaller([single, two])
    signaller.start()
    distributed = dist.is_available() and dist.is_gloo_available()
    e = dist_env(tmp)
    logs = {k: tmp / f'{k}.log' for k in ('single', 'dist')}
    procs = {}

    def start(k, cmd):
        with open(logs[k], 'w') as f: procs[k] = subprocess.Popen(cmd, cwd=tmp, env=e, stdout=f, stderr=subprocess.STDOUT)
    try:
        start('single', [sys.executable, str(HERE / 'signal_child.py'), str(single)])
        if distributed: start('dist', torchrun('--nproc-per-node', '2', '--master-port', str(free_port()),
                                               str(HERE / 'signal_child.py'), str(two), 'dist'))
        ref = references(tmp)
        procs['single'].wait(timeout=TIMEOUT)
        ended = time.monotonic()
        if distributed: procs['dist'].wait(timeout=TIMEOUT)
    finally:
        signaller.stop.set()
        for p in procs.values():
            if p.poll() is None: p.kill()
    out = {k: f.read_text() for k, f in logs.items() if f.exists()}
    got = single / 'single.json'
    assert got.exists(), out['single'][-3000:]

    def load():
        files = [two / f'dist-rank{r}.json' for r in (0, 1)]
        assert all(f.exists() for f in files), out.get('dist', '')[-3000:]
        return [json.loads(f.read_text()) for f in files]
    return SimpleNamespace(single=json.loads(got.read_text()), dir=single, two=two, sent=signaller.sent, ended=ended, ref=ref,
                           rc={k: p.returncode for k, p in procs.items()}, load=load, distributed=distributed, out=out)


def references(tmp: Path) -> dict:
    """The uninterrupted runs, in this process: the command's CSV and the Python run's result."""
    n = torch.get_num_threads()
    try:
        with child.captured():
            assert main([*child.CLI_ARGS, '--out', str(tmp / 'run'), '--csv', str(tmp / 'whole.csv'),
                         '--checkpoint-dir', str(tmp / 'whole')]) == 0
            learn = child.toy_learner(tmp / 'ref')
            learn.fit(3)
    finally: torch.set_num_threads(n)
    return {'csv': (tmp / 'whole.csv').read_text(), 'py': child.result(learn)}


def test_sigterm_stops_the_command_at_the_batch_with_a_checkpoint_and_exit_75_and_the_same_command_goes_on(runs, capsys):
    r, ck = runs.single['cli'], runs.dir / 'cli'
    newest = ck / 'checkpoint-000003-epoch1-train7.pt'  # every 10 batches, the epoch end, then the stop after batch 30
    assert r['rc'] == EXIT_RESUMABLE == 75 and newest.name in r['files']
    argv = [*child.CLI_ARGS, '--out', str(runs.dir / 'run'), '--csv', str(runs.dir / 'parts.csv'), '--checkpoint-dir', str(ck)]
    assert r['err'].splitlines() == [
        f'ultraloop: fit stopped by SIGTERM after epoch 1 train batch 6; checkpoint: {newest}',
        f'ultraloop: stopped by SIGTERM, exit code 75: the same command, {shlex.join(["ultraloop", *argv])}, goes on from '
        f'the checkpoint']
    assert 'interrupted: the plot of the 2 finished phases is in' in r['out']
    try:
        capsys.readouterr()
        assert main(argv) == 0  # the same command line, in another process: it resumes by itself
        assert f'resuming from {newest}\n' in capsys.readouterr().out
        assert (runs.dir / 'parts.csv').read_text() == runs.ref['csv']  # every number, to the last bit
        assert main(argv) == 0  # once more: the run is finished, and says so with its table
        out = capsys.readouterr().out
    finally: torch.set_num_threads(1)
    newest = ck / 'checkpoint-000005-epoch2-train0.pt'
    assert f'resuming from {newest}\n{newest}: the run is finished (its 2 epochs are done): nothing left to train\n' in out
    rows = [line.split()[:4] for line in out.splitlines() if re.match(r'0\.\d{3} ', line)]
    csv = [line.split(',') for line in runs.ref['csv'].splitlines()[1:]]
    assert rows == [[f'{float(a):.3f}', f'{float(b):.3f}', c, d] for a, b, c, d in csv] and len(rows) == 4


def test_sigterm_stops_a_python_fit_with_preempted_restores_the_handlers_and_resume_auto_goes_on_exactly(runs, capsys):
    r, folder = runs.single['py'], runs.dir / 'py'
    newest = folder / 'checkpoint-000005-epoch1-train7.pt'  # every 4 batches, the epoch end (11 a epoch), the stop after 18
    assert (r['code'], r['system_exit'], r['signal'], r['checkpoint']) == (75, True, 'SIGTERM', str(newest))
    assert r['str'] == f'fit stopped by SIGTERM after epoch 1 train batch 6; checkpoint: {newest}'
    assert r['err'] == f'ultraloop: {r["str"]}\n'
    assert r['before'] == r['after'] == DEFAULTS and r['during'] == dict.fromkeys(DEFAULTS, 'fit')
    assert newest.name in r['files']
    learn = child.toy_learner(folder)
    learn.fit(3, resume='auto')  # in a process that never trained
    assert_same(child.result(learn), runs.ref['py'])
    capsys.readouterr()
    learn = child.toy_learner(folder)
    learn.fit(3, resume='auto')
    end = folder / 'checkpoint-000011-epoch3-train0.pt'
    rows = [str(format_row(row)) for row in runs.ref['py']['history']]
    assert capsys.readouterr().out.splitlines() == [
        f'{end}: the run is finished (its 3 epochs are done): nothing left to train', *rows]


def test_a_second_signal_ends_the_process_at_once(runs):
    # SIGUSR1 (SLURM's --signal) came at batch 5, and the batch went on for 120 s: SIGTERM ended it by the signal itself
    assert runs.rc['single'] == -signal.SIGTERM
    assert runs.ended - runs.sent['twice-SIGUSR1'] < 10
    assert sorted(os.listdir(runs.dir / 'twice')) == ['checkpoint-000000-epoch0-train4.pt']  # none at the stop


@pytest.mark.parametrize('launcher', ['dist', 'acc'])
def test_sigterm_to_one_rank_stops_both_at_one_batch_with_one_checkpoint_and_new_ranks_resume_exactly(runs, launcher):
    """Under DistributedCB, and under AccelerateCB (the same runs with accelerate's process group and DDP)."""
    if not runs.distributed: pytest.skip('torch.distributed with gloo is not available')
    ranks = [r[launcher] for r in runs.load()]
    for r in ranks:
        # rank 1 got it after train batch 7; the next agreement (every 5 batches) stops both after batch 10
        assert (r['stop']['code'], r['stop']['signal'], r['stop']['at']) == (75, 'SIGTERM', [0, 9])
        assert r['stop']['checkpoint'] == 'checkpoint-000002-epoch0-train10.pt'
        assert r['resumed']['params'] == r['ref']['params'] and r['resumed']['history'] == r['ref']['history']  # bitwise
    newest = runs.two / f'{launcher}-ck' / 'checkpoint-000002-epoch0-train10.pt'
    assert ranks[0]['stop']['err'] == f'ultraloop: fit stopped by SIGTERM after epoch 0 train batch 9; checkpoint: {newest}\n'
    assert ranks[1]['stop']['err'] == ''  # only the main process prints
    assert ranks[0]['files'] == ['checkpoint-000000-epoch0-train4.pt', 'checkpoint-000001-epoch0-train8.pt', newest.name]


# ---- in this process: no signal sent ---------------------------------------------------------------------------------
def test_resume_auto_needs_a_checkpoint_cb_and_an_empty_folder_keeps_its_error(tmp_path):
    learn = child.toy_learner(tmp_path / 'unused')
    learn.rm_cb(next(cb for cb in learn.cbs if isinstance(cb, CheckpointCB)))
    with pytest.raises(ValueError) as e: learn.fit(1, resume='auto')
    assert str(e.value) == ("resume='auto' goes on from the folder of the learner's CheckpointCB, and it has none: add "
                            "CheckpointCB(dir) to its callbacks (or to fit's cbs), or pass resume=DIR")
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match=r"^resume='.*empty': the folder holds no checkpoint \(checkpoint-\*\.pt\)$"):
        learn.fit(1, resume=tmp_path / 'empty')
    with pytest.raises(ValueError, match=r"^resume='auto': the learner writes checkpoints to 2 folders"):
        learn.fit(1, resume='auto', cbs=[CheckpointCB(tmp_path / 'a'), CheckpointCB(tmp_path / 'b')])
    learn.fit(1, resume='auto', cbs=[CheckpointCB(tmp_path / 'c')])  # nothing there yet: a fresh start, and it works
    assert len(learn.metrics.history) == 2 and len(os.listdir(tmp_path / 'c')) == 1


class Record(TrainCB):
    def before_fit(self, learn): self.during = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}


def test_handlers_only_in_the_main_thread_only_over_the_defaults_and_put_back(tmp_path):
    from conftest import toy_data, toy_model
    from ultraloop import DataLoaders
    rec = Record()
    learn = Learner(toy_model(), DataLoaders.from_tensors(*toy_data(), bs=32), F.cross_entropy, cbs=[rec, MetricsCB()])
    mine = lambda signum, frame: None  # noqa: E731
    old = signal.signal(signal.SIGUSR1, mine)
    try:
        learn.fit(1)
        assert rec.during[signal.SIGUSR1] is mine  # your own handler stays in charge
        assert callable(rec.during[signal.SIGTERM]) and rec.during[signal.SIGINT] is not signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # after the fit: as they were
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and signal.getsignal(signal.SIGUSR1) is mine
        t = threading.Thread(target=learn.fit, args=(1,))
        t.start(); t.join()
        assert rec.during == {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL, signal.SIGUSR1: mine}
    finally: signal.signal(signal.SIGUSR1, old)


def test_command_resumes_by_default_fresh_starts_over_and_the_exit_code_is_the_learners(capsys):
    from ultraloop import cli
    assert cli.EXIT_RESUMABLE == EXIT_RESUMABLE
    for argv, message in ((['--fresh'], '--fresh needs --checkpoint-dir DIR, the folder of the checkpoints'),
                          (['--checkpoint-dir', 'x', '--fresh', '--resume'],
                           '--resume and --fresh contradict each other: give one (or neither: resume)')):
        with pytest.raises(SystemExit) as e: main(['fit', *argv])
        assert e.value.code == 2 and capsys.readouterr().err.startswith(f'ultraloop fit: error: {message}')


def test_preempted_is_a_system_exit_of_code_75_that_pickles_whole():
    import pickle

    from ultraloop import Preempted
    ck = Path('ck/checkpoint-000001-epoch0-train3.pt')
    e = pickle.loads(pickle.dumps(Preempted(signal.SIGUSR1, ck, 'stopped')))
    assert isinstance(e, SystemExit) and not isinstance(e, Exception)
    assert (e.code, e.signal, e.checkpoint, str(e)) == (75, signal.SIGUSR1, ck, 'stopped')
