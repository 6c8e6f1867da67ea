"""Checkpoint writes you can trust: a full disk or a read-only folder keeps the previous checkpoint and says so in one
line; crashed writes' temporary files and unpruned files go at the next write; background writes killed at any moment
leave a complete checkpoint; a resumed run's plot and logs hold every batch's loss and every row exactly once."""
import errno
import io
import json
import os
import random
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from ultraloop import CheckpointCB, DataLoaders, MetricsCB, TrainLearner, state

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import resume_child  # noqa: E402
import writes_child  # noqa: E402
from conftest import assert_same, cpu_child_env, toy_data, toy_model  # noqa: E402


class Quiet(MetricsCB):
    def _log(self, d): pass


def make(ckdir, **kw):
    xt, yt, xv, yv = toy_data()
    cb = CheckpointCB(ckdir, every_batches=3, **kw)
    return TrainLearner(toy_model(), DataLoaders.from_tensors(xt, yt, xv, yv, bs=8, seed=1), F.cross_entropy, lr=0.1,
                        cbs=[Quiet(), cb]), cb  # 8 train batches an epoch: saves at batches 3, 6 and the epoch's end


class _Full(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does."""
    def __init__(self, f, room): self.f, self.room = f, room
    def writable(self): return True

    def write(self, b):
        if len(b) > self.room: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)


def full_disk_at(monkeypatch, writes: set[int]):
    """The checkpoint writes numbered in `writes` (from 1) find the disk full after 100 bytes (torch's writer then
    raises its 'unexpected pos' RuntimeError with the OSError as its context, as on a real full disk)."""
    save, n = torch.save, [0]

    def save_on(obj, f):
        n[0] += 1
        return save(obj, _Full(f, 100) if n[0] in writes else f)
    monkeypatch.setattr(state.torch, 'save', save_on)


def listing(d: Path) -> list[str]: return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize('background', [False, True])
def test_a_full_disk_stops_the_run_in_one_line_keeping_the_previous_checkpoint(tmp_path, monkeypatch, background):
    full_disk_at(monkeypatch, {3})
    learn, cb = make(tmp_path, background=background)
    with pytest.raises(OSError) as e: learn.fit(2)
    msg = (rf"\[Errno 28\] CheckpointCB: cannot write checkpoint-000002-epoch1-train0.pt in {tmp_path} \(No space left "
           rf"on device; [\d.]+ (bytes|KB|MB|GB) free there\); checkpoint-000001-epoch0-train6.pt is kept: free space or "
           rf"give another dir, then resume \(on_error='warn' would train on without checkpoints\)")
    assert re.fullmatch(msg, str(e.value)), str(e.value)
    assert e.value.__suppress_context__  # no 44-line chained RuntimeError from torch's writer
    assert listing(tmp_path) == ['checkpoint-000000-epoch0-train3.pt', 'checkpoint-000001-epoch0-train6.pt']
    assert cb.last_path.name == 'checkpoint-000001-epoch0-train6.pt'
    if not background:  # learn.save_state on a full disk: the same one line, no temporary file left
        full_disk_at(monkeypatch, {1})
        with pytest.raises(OSError, match=rf'^\[Errno 28\] cannot write s.pt in {tmp_path} \(No space left on device; '
                                          rf'[\d.]+ (bytes|KB|MB|GB) free there\)$'):
            learn.save_state(tmp_path / 's.pt')
        assert listing(tmp_path) == ['checkpoint-000000-epoch0-train3.pt', 'checkpoint-000001-epoch0-train6.pt']
    monkeypatch.undo()  # space freed: the run goes on from the kept checkpoint and ends as the uninterrupted one
    learn.fit(2, resume=tmp_path)
    ref, _ = make(tmp_path / 'ref')
    ref.fit(2)
    assert_same(learn.model.state_dict(), ref.model.state_dict())
    assert_same(learn.metrics.history, ref.metrics.history)


@pytest.mark.parametrize('background', [False, True])
def test_on_error_warn_warns_once_trains_on_and_keeps_the_only_checkpoint(tmp_path, monkeypatch, background):
    full_disk_at(monkeypatch, {2, 3, 4})
    learn, cb = make(tmp_path, keep=1, on_error='warn', background=background)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn.fit(2)
    msgs = [str(x.message) for x in w if 'CheckpointCB' in str(x.message)]
    assert len(msgs) == 1 and msgs[0].startswith('CheckpointCB: cannot write checkpoint-000001-epoch0-train6.pt in '), msgs
    assert msgs[0].endswith('checkpoint-000000-epoch0-train3.pt is kept; training goes on and each later checkpoint is '
                            'tried (this warning is not repeated)'), msgs
    # writes 2-4 failed (epoch0-train6, the end of epoch 0, epoch1-train1): keep=1 held on to the only complete one
    # until write 5 succeeded; the file numbers the failed writes took are not reused
    assert listing(tmp_path) == ['checkpoint-000006-epoch2-train0.pt']
    ref, _ = make(tmp_path / 'ref')
    ref.fit(2)
    assert_same(learn.model.state_dict(), ref.model.state_dict())


def test_a_read_only_folder_stops_the_run_in_one_line(tmp_path, monkeypatch):
    """A folder that takes no new file. Tests may run as root, whom permission bits do not stop: there the refusal a
    read-only mount gives (EROFS) is patched in at the temporary file's creation."""
    learn, cb = make(tmp_path)
    learn.fit(1)  # three checkpoints written
    if os.geteuid() == 0:
        real_open = open

        def read_only(path, *a, **kw):
            if Path(path).parent == tmp_path: raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, *a, **kw)
        monkeypatch.setattr(state, 'open', read_only, raising=False)
        reason = 'Read-only file system'
    else:
        tmp_path.chmod(0o555)
        reason = 'Permission denied'
    try:
        with pytest.raises(OSError, match=rf'^\[Errno \d+\] CheckpointCB: cannot write checkpoint-000003-epoch1-train1.pt '
                                          rf'in {tmp_path} \({reason}; .+ free there\); '
                                          rf'checkpoint-000002-epoch1-train0.pt is kept: free space or give another dir'):
            learn.fit(2, resume=tmp_path)
    finally: tmp_path.chmod(0o755)
    assert listing(tmp_path) == ['checkpoint-000001-epoch0-train6.pt', 'checkpoint-000002-epoch1-train0.pt']
    assert not learn.interrupted and learn.model(torch.zeros(1, 8)).shape == (1, 3)  # the learner is left usable


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    return p.pid


def test_temporary_files_of_crashed_writes_go_at_the_next_write_but_not_a_live_writers(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    crashed = [tmp_path / f'.checkpoint-000007-epoch0-train3.pt.{dead}.tmp', tmp_path / f'.state.pt.{dead}.tmp']
    writing = [tmp_path / f'.checkpoint-000009-epoch0-train3.pt.{live}.tmp', tmp_path / f'.state.pt.{live}.tmp']
    old = tmp_path / f'.state.pt.{live + 1}.tmp'  # maybe alive (on another machine): untouched for two hours, so stale
    for p in [*crashed, *writing, old]: p.write_bytes(b'half a checkpoint')
    os.utime(old, (time.time() - 7200,) * 2)
    learn, cb = make(tmp_path)
    learn.fit(1, train=False)  # CheckpointCB's fit start: its own crashed temporary files go
    assert not crashed[0].exists() and crashed[1].exists() and all(p.exists() for p in writing)
    learn.save_state(tmp_path / 'state.pt')  # the next write of the same name: its crashed temporary files go
    assert listing(tmp_path) == sorted([writing[0].name, writing[1].name, 'checkpoint-000000-epoch1-train0.pt',
                                        'state.pt'])


def test_a_file_the_pruning_missed_is_pruned_at_the_next_write(tmp_path, monkeypatch):
    """A kill between a checkpoint's rename and the pruning it allows (here: the process stops in `_written`): the
    resumed run prunes the file at its next write, and ends with the files the uninterrupted run has."""
    calls = [0]
    written = CheckpointCB._written

    def dies_at_the_fourth(self, learn, path):
        calls[0] += 1
        if calls[0] == 4: raise SystemExit('killed')
        written(self, learn, path)
    monkeypatch.setattr(CheckpointCB, '_written', dies_at_the_fourth)
    learn, cb = make(tmp_path / 'run')
    with pytest.raises(SystemExit): learn.fit(2)
    assert listing(tmp_path / 'run') == ['checkpoint-000001-epoch0-train6.pt', 'checkpoint-000002-epoch1-train0.pt',
                                         'checkpoint-000003-epoch1-train1.pt']  # keep=2, one too many
    monkeypatch.undo()
    learn, cb = make(tmp_path / 'run')
    learn.fit(2, resume=tmp_path / 'run')
    ref, _ = make(tmp_path / 'ref')
    ref.fit(2)
    assert listing(tmp_path / 'run') == listing(tmp_path / 'ref') == ['checkpoint-000005-epoch1-train7.pt',
                                                                     'checkpoint-000006-epoch2-train0.pt']


def test_a_mid_epoch_checkpoint_is_as_small_as_an_epoch_end_one(tmp_path):
    """MetricsCB's buffered rows are saved as what they hold, not as the 1 MiB chunk they sit in."""
    xt, yt, xv, yv = toy_data(n_train=256)
    learn = TrainLearner(toy_model(), DataLoaders.from_tensors(xt, yt, xv, yv, bs=16, seed=1), F.cross_entropy,
                         cbs=[Quiet(acc=resume_child._accuracy()), CheckpointCB(tmp_path, every_batches=8, keep=5)])
    learn.fit(1)
    mid, end = [(tmp_path / f'checkpoint-00000{i}-{at}.pt').stat().st_size for i, at in ((0, 'epoch0-train8'),
                                                                                         (2, 'epoch1-train0'))]
    # mid-epoch: 128 rows of predictions and targets (4 KB) and 8 losses more; a slice saved whole would add 1 MiB
    assert mid < end + 8_000, (mid, end)


# ---- killed for real: logs, plot data, background writes -------------------------------------------------------------
_rng = random.Random(19)  # the moments of the background kills: drawn, but the same on every run of the suite
CONFIGS = {
    # killed in epoch 1's valid phase: the train row of epoch 1 was logged after the newest checkpoint (epoch1-train9)
    'logs_kill_in_valid': dict(loader='tensor', dropout=True, every=4, kill=31, csv=True, tb=True,
                               newest=['epoch1-train9']),
    # background writes: a write drawn at random dies half-way, while the loop is wherever it is; the newest complete
    # is the one before it
    'background_dies_in_write': dict(loader='tensor', dropout=True, every=3, background=True,
                                     crash_write=_rng.randrange(2, 10)),
    # killed just after a save handed its write to the thread: that file or the one before it is the newest
    'background_killed_after_save': dict(loader='dl', sgd=True, every=3, background=True, kill=9,
                                         newest=['epoch0-train9', 'epoch0-train6']),
    # a random batch, a write every 2 batches (maybe in flight), logs too
    'background_random': dict(loader='tensor', dropout=True, every=2, background=True, kill=_rng.randrange(12, 40),
                              csv=True),
}


def tb_scalars(d: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(d))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


@pytest.fixture(scope='module')
def killed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('writes')
    cfgs = {}
    for name, cfg in CONFIGS.items():
        cfg = {**cfg, 'dir': str(tmp / name)}
        if cfg.get('csv'): cfg['csv'] = str(tmp / f'{name}.csv')
        if cfg.get('tb'): cfg['tb'] = str(tmp / f'{name}-tb')
        cfgs[name] = cfg
    (tmp / 'configs.json').write_text(json.dumps(cfgs))
    r = subprocess.run([sys.executable, str(HERE / 'writes_child.py'), tmp / 'configs.json', tmp], capture_output=True,
                       text=True, cwd=ROOT, env=cpu_child_env(ROOT, HERE), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, cfgs, json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize('name', list(CONFIGS))
def test_killed_run_leaves_a_complete_checkpoint_and_its_resume_equals_the_uninterrupted_run(killed, name, tmp_path):
    tmp, cfgs, fate = killed
    cfg = cfgs[name]
    f = fate[name]
    assert f['signal'] == 9, f
    cks = [n for n in f['files'] if state.checkpoint_seq(Path(n)) is not None]
    assert cks and f['load'] == cks, f  # every checkpoint file the kill left loads: complete
    if 'newest' in cfg: assert any(cks[-1].endswith(f'-{n}.pt') for n in cfg['newest']), f
    if cfg.get('crash_write'):  # the write really was cut, and the newest complete checkpoint is the one before it
        cut = [Path(n[1:].rsplit('.', 2)[0]) for n in f['files'] if n.endswith('.tmp')]  # .<name>.<pid>.tmp
        assert len(cut) == 1 and state.checkpoint_seq(Path(cks[-1])) + 1 == state.checkpoint_seq(cut[0]), f
    ref_cfg = {**cfg, 'dir': str(tmp_path / 'ref'), 'csv': cfg.get('csv') and str(tmp_path / 'ref.csv'),
               'tb': cfg.get('tb') and str(tmp_path / 'ref-tb')}
    learn, fit = writes_child.build(ref_cfg)
    fit()
    ref = writes_child.result(learn)
    assert len(ref['batch_losses']) == 33  # 3 epochs of 11 batches
    assert_same(torch.load(tmp / f'{name}.pt', weights_only=True), ref)  # weights, optimiser, history, every batch's loss
    assert f['after'] == listing(tmp_path / 'ref'), f  # no temporary file, nothing left unpruned
    if cfg.get('csv'): assert Path(cfg['csv']).read_text() == Path(ref_cfg['csv']).read_text()  # no row twice
    if cfg.get('tb'): assert tb_scalars(Path(cfg['tb'])) == tb_scalars(tmp_path / 'ref-tb')
