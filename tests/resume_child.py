"""The runs test_resume.py kills and resumes, built the same way in every process.

`python resume_child.py CONFIGS.json OUT_DIR` forks, for each configuration, a process that trains with CheckpointCB
and SIGKILLs itself mid-epoch (or inside a checkpoint write); then, for each, a new process forked from this one
(which never trained: nothing of the killed run is in its memory) that resumes from the folder the killed run left
and saves its result in OUT_DIR/<name>.pt. It prints each killed run's fate as JSON. Forking saves starting Python
and importing torch per run. test_resume.py runs the same builds uninterrupted in its own process.

`python resume_child.py CONFIGS.json OUT_DIR NAME STEP` runs one step of configuration NAME in this process, which
started afresh: `kill` (the run that SIGKILLs itself), `resume` (imports what a fit needs, waits for a line on its
stdin, the caller's word that the killed run is dead, then resumes and saves OUT_DIR/NAME.pt) or `whole` (the run never
interrupted; saves OUT_DIR/NAME-whole.pt). The caller starts them together. A run on a GPU needs these: a process
forked after its parent asked the driver anything (importing ultraloop asks whether CUDA is available) cannot use
CUDA."""
import io
import json
import os
import random
import signal
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ultraloop import (Callback, CheckpointCB, DataLoaders, DeviceCB, EarlyStoppingCB, GradientAccumulationCB,
                       MetricsCB, MixedPrecisionCB, TrainLearner, state)


class Pairs(Dataset):
    """A map-style dataset read sample by sample, as a DataLoader's workers read it."""
    def __init__(self, x, y): self.x, self.y = x, y
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]


class Quiet(MetricsCB):
    def _log(self, d): pass


class KillAt(Callback):
    """SIGKILLs this process at the end of its `at`-th training batch (after CheckpointCB's cleanup_batch)."""
    order = 60
    def __init__(self, at): self.at, self.n = at, 0

    def cleanup_batch(self, learn):
        if learn.training:
            self.n += 1
            if self.n == self.at: os.kill(os.getpid(), signal.SIGKILL)


def build(cfg: dict, ckdir=None):
    """The learner of configuration `cfg` and the call that fits it (taking fit's keyword arguments)."""
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g) * cfg.get('x_scale', 1)  # x 30: float16 gradients overflow at first, scaled
    y = (x[:, :3].sum(1) > 0).long()
    xt, yt, xv, yv = x[:64], y[:64], x[64:], y[64:]
    if cfg['loader'] == 'tensor': dls = DataLoaders.from_tensors(xt, yt, xv, yv, bs=6, seed=3)  # 11 batches, the last short
    else:
        workers = 2 if cfg['loader'] == 'workers' else 0
        pin = cfg.get('pin', False)  # on CUDA: DeviceCB copies the pinned batches straight to the GPU
        dls = DataLoaders(DataLoader(Pairs(xt, yt), batch_size=6, shuffle=True, num_workers=workers, pin_memory=pin),
                          DataLoader(Pairs(xv, yv), batch_size=8, num_workers=workers, pin_memory=pin))
    layers = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)]
    if cfg.get('dropout'): layers.insert(2, nn.Dropout(0.3))  # draws from the torch RNG every training batch
    cbs = [Quiet(acc=_accuracy())]
    if cfg.get('device'): cbs.append(DeviceCB(cfg['device']))  # on CUDA: batches through its side-stream prefetch
    if cfg.get('accum'): cbs.append(GradientAccumulationCB(cfg['accum']))
    if cfg.get('bf16'): cbs.append(MixedPrecisionCB(torch.bfloat16))
    if cfg.get('fp16'): cbs.append(MixedPrecisionCB(torch.float16))  # with a GradScaler (CPU or CUDA)
    if cfg.get('patience'): cbs.append(EarlyStoppingCB('train_loss', patience=cfg['patience'], mode='max'))
    if ckdir is not None: cbs.append(CheckpointCB(ckdir, every_batches=cfg.get('every'), background=cfg.get('background', False)))
    opt = partial(torch.optim.SGD, momentum=0.9) if cfg.get('sgd') else partial(torch.optim.AdamW, weight_decay=0.01)
    learn = TrainLearner(nn.Sequential(*layers), dls, F.cross_entropy, lr=0.03, cbs=cbs, opt_func=opt)
    n = cfg.get('epochs', 3)
    if cfg.get('one_cycle'): return learn, partial(learn.fit_one_cycle, n, 0.05)
    return learn, partial(learn.fit, n)


class _accuracy:
    """Accuracy with a state_dict, as torcheval's metrics have (torchmetrics' own path is tested in test_state.py;
    importing it would take seconds in each process)."""
    def __init__(self): self.reset()
    def reset(self): self.right, self.n = torch.zeros((), dtype=torch.long), 0
    def update(self, p, y): self.right += (p.argmax(1) == y).sum(); self.n += len(y)
    def compute(self): return self.right / max(self.n, 1)
    def state_dict(self): return {'right': self.right, 'n': self.n}
    def load_state_dict(self, s): self.right, self.n = s['right'].clone(), s['n']


def result(learn) -> dict:
    """What a run ends with, on the CPU (a GPU run's result is compared in a process that may not use the GPU)."""
    sched = next((cb for cb in learn.cbs if hasattr(cb, 'sched')), None)
    stop = next((cb for cb in learn.cbs if isinstance(cb, EarlyStoppingCB)), None)
    mp = next((cb for cb in learn.cbs if isinstance(cb, MixedPrecisionCB)), None)
    return state.cpu_copy({'model': learn.model.state_dict(), 'opt': learn.opt.state_dict(), 'history': learn.metrics.history,
                           'lrs': None if sched is None else sched.lrs, 'stopped': None if stop is None else stop.stopped_epoch,
                           'precision': None if mp is None else mp.state_dict()})


def _crash_inside_write(at: int) -> None:
    """The `at`-th checkpoint write dies half-way: half its bytes reach the temporary file, then SIGKILL."""
    save, n = torch.save, [0]

    def dying_save(obj, f):
        n[0] += 1
        if n[0] < at: return save(obj, f)
        buf = io.BytesIO()
        save(obj, buf)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    state.torch.save = dying_save


def _run_killed(cfg: dict) -> None:
    if cfg.get('crash_write'): _crash_inside_write(cfg['crash_write'])
    learn, fit = build(cfg, cfg['dir'])
    if cfg.get('kill'): learn.add_cb(KillAt(cfg['kill']))
    fit()


def _in_fork(f) -> int:
    """Run `f` in a forked process; its wait status."""
    pid = os.fork()
    if pid == 0:
        try: f()
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def _one_step(cfg: dict, out: Path, name: str, step: str) -> None:
    """One step of a run in this fresh process: kill, resume or whole."""
    if cfg.get('deterministic'): torch.use_deterministic_algorithms(True)  # CUDA: see test_resume.py's spawned test
    if step == 'kill': return _run_killed(cfg)  # returns only if the kill never came
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # what making an optimiser imports (seconds), made meanwhile
    if step == 'resume': sys.stdin.readline()
    learn, fit = build(cfg, cfg['dir'] if step == 'resume' else None)
    if step == 'resume': fit(resume=cfg['dir'])
    elif step == 'whole': fit()
    else: raise SystemExit(f"resume_child.py: unknown step {step!r}; use kill, resume or whole")
    torch.save(result(learn), out / f'{name}{"-whole" if step == "whole" else ""}.pt')


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    cfgs, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    if len(argv) == 4:
        _one_step(cfgs[argv[2]], out, argv[2], argv[3])
        return 0
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # what making an optimiser imports, once, before forking
    fate = {}
    for name, cfg in cfgs.items():
        status = _in_fork(lambda: _run_killed(cfg))
        fate[name] = {'signal': os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      'files': sorted(p.name for p in Path(cfg['dir']).iterdir())}

    def resume(name, cfg):
        learn, fit = build(cfg, cfg['dir'])
        fit(resume=cfg['dir'])
        torch.save(result(learn), out / f'{name}.pt')

    for name, cfg in cfgs.items():
        status = _in_fork(lambda: resume(name, cfg))
        if status != 0: raise SystemExit(f'resuming {name} failed (wait status {status})')
    print(json.dumps(fate))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
