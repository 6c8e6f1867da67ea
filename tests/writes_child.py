"""The runs test_checkpoint_writes.py kills and resumes: resume_child.py's builds, with CSV and TensorBoard logs and
checkpoints written in the background.

`python writes_child.py CONFIGS.json OUT_DIR` forks, for each configuration, a process that trains and is SIGKILLed at
the end of its `kill`-th batch (train and valid batches counted), or inside its `crash_write`-th checkpoint write
(in the background thread, for a background write, wherever the loop is then); then, for each, a fresh fork
of this process (which never trained) resumes from the folder and saves its result in OUT_DIR/<name>.pt. It prints
each killed run's fate as JSON: how it died, the files it left, which of them load."""
import json
import os
import signal
import sys
from functools import partial
from pathlib import Path

import torch

import resume_child
from ultraloop import Callback, CheckpointCB, CSVLoggerCB, TensorBoardCB, state


class KillAtBatch(Callback):
    """SIGKILLs this process at the end of its `at`-th batch, train or valid (after CheckpointCB's cleanup_batch)."""
    order = 60
    def __init__(self, at): self.at, self.n = at, 0

    def cleanup_batch(self, learn):
        self.n += 1
        if self.n == self.at: os.kill(os.getpid(), signal.SIGKILL)


def build(cfg: dict):
    if cfg.get('background'): resume_child.CheckpointCB = partial(CheckpointCB, background=True)
    try: learn, fit = resume_child.build(cfg, cfg['dir'])
    finally: resume_child.CheckpointCB = CheckpointCB
    if cfg.get('csv'): learn.add_cb(CSVLoggerCB(cfg['csv']))
    if cfg.get('tb'): learn.add_cb(TensorBoardCB(cfg['tb']))
    return learn, fit


def result(learn) -> dict:
    return {**resume_child.result(learn), 'batch_losses': learn.metrics.batch_losses}


def _run_killed(cfg: dict) -> None:
    if cfg.get('crash_write'): resume_child._crash_inside_write(cfg['crash_write'])  # half its bytes written
    learn, fit = build(cfg)
    if cfg.get('kill'): learn.add_cb(KillAtBatch(cfg['kill']))
    fit()


def _loads(p: Path) -> bool:
    try: state.load_file(p)
    except ValueError: return False
    return True


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # what making an optimiser imports, once, before forking
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imported once, before forking)
    cfgs, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    fate = {}
    for name, cfg in cfgs.items():
        status = resume_child._in_fork(lambda: _run_killed(cfg))
        files = sorted(p.name for p in Path(cfg['dir']).iterdir())
        fate[name] = {'signal': os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, 'files': files,
                      'load': [f for f in files if state.checkpoint_seq(Path(f)) is not None and _loads(Path(cfg['dir'], f))]}

    def resume(name, cfg):
        learn, fit = build(cfg)
        fit(resume=cfg['dir'])
        torch.save(result(learn), out / f'{name}.pt')

    for name, cfg in cfgs.items():
        status = resume_child._in_fork(lambda: resume(name, cfg))
        if status != 0: raise SystemExit(f'resuming {name} failed (wait status {status})')
        fate[name]['after'] = sorted(p.name for p in Path(cfg['dir']).iterdir())
    print(json.dumps(fate))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
