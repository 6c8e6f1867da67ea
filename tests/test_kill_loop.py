"""The same `ultraloop fit` command line, SIGKILLed at random moments and run again until it finishes (what a cluster's
requeue does): its final weights and every row of its metrics CSV equal those of the run that was never killed,
bitwise. The kills fall wherever they fall: in a batch, in a checkpoint write, between a CSV row and the next
checkpoint."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import assert_same, cpu_child_env  # noqa: E402

from ultraloop.cli import main  # noqa: E402

ARGS = ['fit', '--model', 'cnn', '--bs', '16', '--epochs', '3', '--threads', '1', '--every-batches', '10']
KILLS, TIMEOUT = 3, 240


def _checkpoints(d: Path) -> set:
    return {p.name for p in d.glob('checkpoint-*.pt')} if d.is_dir() else set()


def _launch_until_done(tmp: Path, seed: int = 0) -> list:
    """Run the command again and again; each of the first KILLS launches is SIGKILLed a random moment after it wrote its
    first checkpoint. Returns each launch's return code."""
    rng, codes, ck = random.Random(seed), [], tmp / 'ck'
    cmd = [sys.executable, '-m', 'ultraloop', *ARGS, '--checkpoint-dir', str(ck), '--csv', str(tmp / 'run.csv'),
           '--save', str(tmp / 'weights.pt'), '--out', str(tmp / 'out')]
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and (not codes or codes[-1] != 0):
        assert len(codes) <= KILLS + 1, f'the command did not finish after {KILLS} kills: return codes {codes}'
        before = _checkpoints(ck)
        with open(tmp / f'launch{len(codes)}.log', 'w') as log:
            p = subprocess.Popen(cmd, cwd=tmp, env=cpu_child_env(HERE.parent), stdout=log, stderr=subprocess.STDOUT)
        try:
            if len(codes) < KILLS:
                while p.poll() is None and not (_checkpoints(ck) - before) and time.monotonic() < deadline: time.sleep(0.005)
                time.sleep(rng.uniform(0, 0.3))
                if p.poll() is None: os.kill(p.pid, signal.SIGKILL)
            codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
        finally:
            if p.poll() is None: p.kill()
    return codes


def test_a_command_sigkilled_at_random_moments_and_run_again_until_done_ends_as_the_uninterrupted_run(tmp_path):
    killed = tmp_path / 'killed'
    killed.mkdir()
    codes = _launch_until_done(killed)
    logs = '\n'.join(p.read_text()[-1500:] for p in sorted(killed.glob('launch*.log')))
    assert codes[-1] == 0 and -signal.SIGKILL in codes, (codes, logs)

    whole = tmp_path / 'whole'
    n = torch.get_num_threads()
    try:
        assert main([*ARGS, '--checkpoint-dir', str(whole / 'ck'), '--csv', str(whole / 'run.csv'),
                     '--save', str(whole / 'weights.pt'), '--out', str(whole / 'out')]) == 0
    finally: torch.set_num_threads(n)
    assert (killed / 'run.csv').read_text() == (whole / 'run.csv').read_text(), logs  # every row once, equal
    assert_same(torch.load(killed / 'weights.pt', weights_only=True), torch.load(whole / 'weights.pt', weights_only=True),
                'weights')
    assert not list((killed / 'ck').glob('.*')), 'a crashed write left a temporary file that the next launches kept'
