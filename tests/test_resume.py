"""Kill and resume for real: runs SIGKILLed mid-epoch (or inside a checkpoint write) in child processes, resumed in a
fresh process, end bitwise equal to the same runs never interrupted (weights, optimiser, metric history, lrs)."""
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import resume_child  # noqa: E402
from conftest import assert_same, cpu_child_env  # noqa: E402

# Train batches per epoch: 11 (64 samples, bs 6). A checkpoint's name says where a resume from it goes on.
CONFIGS = {
    # TensorLoader, dropout, OneCycleLR, accumulation over 3: the newest checkpoint (global batch 16 = epoch 1, batch 5)
    # falls inside a window of 3
    'tensor_cycle_accum': dict(loader='tensor', dropout=True, one_cycle=True, accum=3, every=4, kill=18,
                               newest='epoch1-train5'),
    # shuffled DataLoader (no workers), dropout, bf16 autocast, SGD with momentum
    'dataloader_bf16': dict(loader='dl', dropout=True, bf16=True, sgd=True, every=5, kill=18, newest='epoch1-train4'),
    # DataLoader with 2 workers, checkpoints only at epoch ends: killed in epoch 2, resumed at its start; early stopping
    # (train_loss must rise to count as better, so it stops after epoch 2 unless its patience was lost on resume)
    'workers_epoch_end_patience': dict(loader='workers', sgd=True, patience=2, epochs=5, kill=26, newest='epoch2-train0'),
    # the 4th write (at the end of epoch 0) dies half-way: the resume takes the 3rd (epoch 0, batch 9)
    'crash_inside_write': dict(loader='tensor', dropout=True, every=3, crash_write=4, newest='epoch0-train9'),
}


def run_child(*args):
    r = subprocess.run([sys.executable, str(HERE / 'resume_child.py'), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env=cpu_child_env(ROOT), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Kill every configuration, then resume each in a process that never trained (resume_child.py forks both)."""
    tmp = tmp_path_factory.mktemp('resume')
    cfgs = {name: {**cfg, 'dir': str(tmp / name)} for name, cfg in CONFIGS.items()}
    (tmp / 'configs.json').write_text(json.dumps(cfgs))
    fate = json.loads(run_child(tmp / 'configs.json', tmp))
    return cfgs, fate, {name: torch.load(tmp / f'{name}.pt', weights_only=True) for name in cfgs}


@pytest.mark.parametrize('name', list(CONFIGS))
def test_killed_run_resumed_in_a_fresh_process_equals_the_uninterrupted_run(runs, name):
    cfgs, fate, resumed = runs
    cfg = cfgs[name]
    assert fate[name]['signal'] == signal.SIGKILL  # the run really died, mid-epoch
    files = fate[name]['files']
    newest = max((f for f in files if re.fullmatch(r'checkpoint-\d+-.*\.pt', f)), key=lambda f: int(f.split('-')[1]))
    assert newest.endswith(f'-{cfg["newest"]}.pt'), files  # where the resume goes on from
    if cfg.get('crash_write'): assert any(f.startswith('.checkpoint-') and f.endswith('.tmp') for f in files), files
    learn, fit = resume_child.build(cfg)
    fit()
    ref = resume_child.result(learn)
    assert len(ref['history']) >= 6
    if cfg.get('patience'): assert ref['stopped'] == 2 and len(ref['history']) == 6  # stopped before its 5 epochs
    assert_same(resumed[name], ref)
