"""Kill and resume for real: runs SIGKILLed mid-epoch (or inside a checkpoint write) in child processes, resumed in a
fresh process, end bitwise equal to the same runs never interrupted (weights, optimiser, metric history, lrs)."""
import json
import os
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


# The same run in three fresh processes: SIGKILLed mid-epoch, resumed, and never interrupted. fp16 with its GradScaler
# (x 30 inputs: the first steps overflow, are skipped and lower the scale, which the resume must carry on from), dropout,
# one-cycle AdamW, a shuffled DataLoader, DeviceCB, a background checkpoint every 4 batches. Killed at global batch 18:
# the newest complete checkpoint is at batch 16 (epoch 1, batch 5), or at 12 if the write of 16 was still in flight.
SPAWNED = dict(loader='dl', dropout=True, one_cycle=True, fp16=True, x_scale=30, every=4, background=True, kill=18)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA GPU'))])
def test_cuda_run_spawned_sigkilled_mid_epoch_and_resumed_in_a_new_process_equals_the_uninterrupted_run(tmp_path, device):
    """On a GPU: CUDA dropout (its RNG state is in the checkpoint), the CUDA GradScaler's state, DeviceCB's side-stream
    prefetch from the DataLoader's pinned batches (the loader's position is the loop's, not one batch ahead; a pinned
    batch reused before its copy ended would differ from run to run) and the background checkpoint's side-stream
    copy into pinned memory, through a real SIGKILL. The killed, the resumed and the uninterrupted run each run in a
    process started afresh (not forked: a process forked after its parent asked the CUDA driver anything cannot use
    CUDA), with `torch.use_deterministic_algorithms(True)` and CUBLAS_WORKSPACE_CONFIG=:4096:8: bitwise equality across
    processes needs every kernel to reduce in a fixed order, and cuBLAS promises that only with a fixed workspace when
    more than one stream is in use (the prefetch and the checkpoint copies run on side streams); the deterministic mode
    also makes an op with no deterministic CUDA kernel an error that names it, instead of a silent difference. This
    process, which may have used the GPU before, could not be given that workspace, so it runs no reference there.
    On the CPU (CPU GradScaler; DeviceCB copies in before_batch, without the prefetch) the killed and resumed runs are
    fresh processes, the reference runs here meanwhile, and the deterministic mode is off: the CPU kernels used are
    deterministic, and turning it on imports torch._inductor (seconds per process)."""
    cfg = {**SPAWNED, 'device': device, 'deterministic': device == 'cuda', 'pin': device == 'cuda', 'dir': str(tmp_path / 'ck')}
    (tmp_path / 'configs.json').write_text(json.dumps({'run': cfg}))
    env = cpu_child_env(ROOT, CUBLAS_WORKSPACE_CONFIG=':4096:8')
    if device == 'cuda':  # the GPU this process sees
        env.pop('CUDA_VISIBLE_DEVICES')
        if 'CUDA_VISIBLE_DEVICES' in os.environ: env['CUDA_VISIBLE_DEVICES'] = os.environ['CUDA_VISIBLE_DEVICES']

    def launch(step):
        with open(tmp_path / f'{step}.log', 'w') as log:
            return subprocess.Popen([sys.executable, str(HERE / 'resume_child.py'), tmp_path / 'configs.json', tmp_path,
                                     'run', step], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.PIPE if step == 'resume' else None)

    def logs(): return '\n'.join(f'--- {p.name}\n{p.read_text()[-3000:]}' for p in sorted(tmp_path.glob('*.log')))
    # together: each spends seconds starting
    procs = {step: launch(step) for step in ('kill', 'resume', *(['whole'] if device == 'cuda' else []))}
    try:
        if device == 'cpu':
            learn, fit = resume_child.build(cfg)
            fit()
            ref = resume_child.result(learn)
        assert procs['kill'].wait(timeout=300) == -signal.SIGKILL, logs()  # the run really died, mid-epoch
        files = sorted(os.listdir(cfg['dir']))
        newest = max((f for f in files if re.fullmatch(r'checkpoint-\d+-.*\.pt', f)), key=lambda f: int(f.split('-')[1]))
        assert newest.endswith(('-epoch1-train5.pt', '-epoch1-train1.pt')), files
        procs['resume'].communicate(b'go\n', timeout=300)  # the resume starts only now
        assert procs['resume'].returncode == 0, logs()
        if device == 'cuda':
            assert procs['whole'].wait(timeout=300) == 0, logs()
            ref = torch.load(tmp_path / 'run-whole.pt', weights_only=True)
    finally:
        for p in procs.values():
            if p.poll() is None: p.kill()
    got = torch.load(tmp_path / 'run.pt', weights_only=True)
    assert ref['precision']['skipped'] > 0 and ref['precision']['scaler']['scale'] < 2.0 ** 16  # the scaler did work
    assert len(ref['history']) == 6
    assert_same(got, ref)
