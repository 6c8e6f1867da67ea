"""Time to accuracy: two small tasks trained to a fixed test accuracy, a plain hand-written eager loop with the recipe its
authors publish against the fastest ultraloop recipe found for the device, in one process, runs interleaved.

    .venv/bin/python bench/speedrun.py                  # CPU: both tasks, 3 repeats each (a few minutes)
    .venv/bin/python bench/speedrun.py --quick          # every path in well under a minute; no figures worth quoting
    python bench/speedrun.py --device cuda              # on a GPU (bench/gpu_check.sh runs it as its `speedrun` stage)

Tasks:
- `mnist1d`: MNIST-1D as the `mnist1d` package makes it locally (`make_dataset()`, 4,000 train and 1,000 test signals of
  40 steps, no download) with the package authors' CNN (ConvBase: three 1-D convolutions of 25 channels, 5,210
  parameters). The authors' recipe (their train.py): Adam lr 1e-2, bs 100, batches cut in order, 6,000 steps; they
  publish 94 % test accuracy. Target: 90 %.
- `fashion`: FashionMNIST (60,000 train and the 10,000 test images, 28x28, 10 classes), read offline from its IDX files
  (`--fashion-root`, else `data/`, else Debian's dataset-fashion-mnist package at /usr/share/datasets/fashion-mnist),
  with the seed's CNN (`ultraloop.models.get_model()`). The seed's recipe (its MomentumLearner): SGD lr 0.1, bs 64,
  shuffled, gradients decayed by 0.85 instead of zeroed; the seed shows 70.7 to 74.8 % test accuracy after its first
  epoch. Target: 70 %.

Time to accuracy: wall seconds from making the model to the first check at which the test accuracy (the whole test
set, argmax) reaches the target. Both sides check at the same cadence in training samples (`every`: an epoch of
MNIST-1D, a fifth of an epoch of FashionMNIST); the evaluation's own time is left out of both sides, so each figure is
training time only (what a fit with a cheap or rarer validation would take). Data is in memory as tensors on the device
for both sides (the hand loops slice it themselves), so the loaders are not what is compared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ultraloop as U  # noqa: E402
from ultraloop.models import get_model  # noqa: E402

FASHION_ROOTS = ('data', '/usr/share/datasets/fashion-mnist')  # Debian's dataset-fashion-mnist installs the IDX files there
TASKS = ('mnist1d', 'fashion')


def sync(dev: torch.device) -> None:
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def mnist1d_cnn(channels: int = 25) -> nn.Sequential:
    """The MNIST-1D authors' ConvBase (their notebooks/models.py) as a Sequential: signals (N, 40) to 10 logits."""
    return nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, channels, 5, 2, 1), nn.ReLU(),
                         nn.Conv1d(channels, channels, 3, 2, 1), nn.ReLU(), nn.Conv1d(channels, channels, 3, 2, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(channels * 5, 10))


def load_mnist1d(num_samples: int = 5000):
    """MNIST-1D made locally by the package (the default arguments: 5,000 signals, 80 % train), as float32 and int64 tensors."""
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.num_samples = num_samples
    d = make_dataset(args)
    f = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return f(d['x'], torch.float32), f(d['y'], torch.int64), f(d['x_test'], torch.float32), f(d['y_test'], torch.int64)


def load_fashion(root: str | None):
    """FashionMNIST from the first folder holding its four IDX files: `root` if given, else those of FASHION_ROOTS."""
    from ultraloop.datasets import FASHION_MNIST_FILES, fashion_mnist
    roots = [root] if root else [r for r in FASHION_ROOTS if (Path(r) / FASHION_MNIST_FILES[0]).is_file()] or [FASHION_ROOTS[0]]
    return fashion_mnist(roots[0])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 2000) -> float:
    """The share of samples whose argmax is the label, the model in eval mode (its mode is restored)."""
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(x), bs))
    model.train(was)
    return correct / len(x)


class Stopwatch:
    """Training seconds until the test accuracy first reaches `target`, checked every `every` training samples (at the
    first step boundary at or past each multiple); the evaluation's time is left out. `limit` caps the samples trained.
    Both sides call `start()` before they make the model and `tick(model, n)` after each optimiser step of `n` samples;
    `tick` says when to stop: the target reached, the limit, or the run `failed`: weights no longer finite, or the
    accuracy the same at two checks in a row and at chance (at most 1 / classes + 1 point): a network whose ReLUs all
    died, which predicts one class for every sample."""

    def __init__(self, x_test, y_test, target: float, every: int, limit: int, dev: torch.device):
        self.x, self.y, self.target, self.every, self.limit, self.dev = x_test, y_test, target, every, limit, dev
        self.seconds, self.seen, self.reached, self.failed, self.checks = 0.0, 0, False, False, []
        self.chance = 1 / (int(y_test.max()) + 1) + 0.01
        self.eval_bs = 2000 if dev.type == 'cuda' else 200  # on the CPU, batches of 2,000 images evaluated 2-3x slower
        self.graph = None  # set by the ultraloop side: CudaGraphCB's replays and why it ran eagerly, if it did

    def start(self) -> None:
        sync(self.dev); self.t0 = time.perf_counter()

    def tick(self, model: nn.Module, n: int) -> bool:
        self.seen += n
        if self.seen < self.every * (len(self.checks) + 1) and self.seen < self.limit: return False
        sync(self.dev); self.seconds += time.perf_counter() - self.t0
        acc = accuracy(model, self.x, self.y, self.eval_bs)
        self.checks.append((self.seen, round(self.seconds, 4), round(acc, 4)))
        self.reached = acc >= self.target
        self.failed = (not all(bool(p.isfinite().all()) for p in model.parameters())
                       or len(self.checks) > 1 and self.checks[-2][2] == self.checks[-1][2] <= self.chance)
        if self.reached or self.failed or self.seen >= self.limit: return True
        self.start()  # the evaluation is not counted
        return False


# ---- the hand-written loops: the authors' recipes -------------------------------------------------------------------------
def hand_mnist1d(data, watch: Stopwatch, dev: torch.device, seed: int) -> None:
    """The MNIST-1D authors' loop: Adam lr 1e-2, bs 100, batch `step` the samples from step * 100 (mod n), in order. (Their
    loop also reads each step's loss with `.item()`, a host sync; this one does not.)"""
    x, y, bs = data[0], data[1], 100
    watch.start()
    torch.manual_seed(seed)
    model = mnist1d_cnn().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(10**9):
        i = step * bs % len(x)
        loss = F.cross_entropy(model(x[i:i + bs]), y[i:i + bs])
        loss.backward(); opt.step(); opt.zero_grad()
        if watch.tick(model, bs): return


def hand_fashion(data, watch: Stopwatch, dev: torch.device, seed: int) -> None:
    """The seed's MomentumLearner recipe: SGD lr 0.1, bs 64, shuffled each epoch, gradients decayed by 0.85 after each
    step instead of zeroed."""
    x, y, bs = data[0], data[1], 64
    watch.start()
    torch.manual_seed(seed)
    model = get_model().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=g).to(dev)
        for i in range(0, len(x), bs):
            j = order[i:i + bs]
            loss = F.cross_entropy(model(x[j]), y[j])
            loss.backward(); opt.step()
            for p in model.parameters(): p.grad *= 0.85
            if watch.tick(model, len(j)): return


# ---- ultraloop ------------------------------------------------------------------------------------------------------------
class WatchCB(U.Callback):
    """Hands each train batch to the Stopwatch; stops the fit when it says so."""
    def __init__(self, watch: Stopwatch): self.watch = watch

    def after_batch(self, learn):
        if learn.training and self.watch.tick(learn.model, len(learn.batch[0])): raise U.CancelFitException()


EXTRAS = {'cl': lambda: U.ChannelsLastCB(), 'bf16': lambda: U.MixedPrecisionCB(torch.bfloat16),
          'cudagraph': lambda: U.CudaGraphCB(), 'compile': lambda: U.CompileCB()}


def ultraloop_run(task: str, data, watch: Stopwatch, dev: torch.device, seed: int, recipe: dict) -> None:
    """TrainLearner + DeviceCB over a TensorLoader of the tensors already on the device, Adam, `fit_one_cycle` over
    `recipe['epochs']` epochs up to `recipe['lr']` (reached after a `recipe['pct']` share of them), bs `recipe['bs']`
    (full batches only, so a CUDA graph replays every step), plus the callbacks named in `recipe['extras']`."""
    watch.start()
    torch.manual_seed(seed)
    model = mnist1d_cnn() if task == 'mnist1d' else get_model()
    dls = U.DataLoaders(U.TensorLoader(data[0], data[1], bs=recipe['bs'], shuffle=True, drop_last=True, device=dev, seed=seed))
    extras = [EXTRAS[e]() for e in recipe['extras']]
    learn = U.TrainLearner(model, dls, loss_func=F.cross_entropy, opt_func=torch.optim.Adam,
                           cbs=[U.DeviceCB(dev), WatchCB(watch), *extras])
    # under CudaGraphCB the graph keeps a device-side lr, but a changing beta1 would be captured anew every step
    cycle = False if 'cudagraph' in recipe['extras'] else None
    learn.fit_one_cycle(recipe['epochs'], recipe['lr'], cycle_momentum=cycle, pct_start=recipe['pct'])
    cg = next((cb for cb in learn.cbs if isinstance(cb, U.CudaGraphCB)), None)
    watch.graph = None if cg is None else {'replays': cg.replays, 'eager_because': cg.reason}


def recipes(dev: torch.device) -> dict:
    """The ultraloop recipe per task and device: the fastest found on each (see bench/README.md, Time to accuracy)."""
    cuda = dev.type == 'cuda'
    return {'mnist1d': {'bs': 100, 'lr': 3e-2, 'epochs': 15, 'pct': 0.2, 'extras': ['cudagraph'] if cuda else []},
            'fashion': {'bs': 256 if cuda else 64, 'lr': 2e-2 if cuda else 1e-2, 'epochs': 1, 'pct': 0.25 if cuda else 0.3,
                        'extras': ['cl', 'bf16', 'cudagraph'] if cuda else ['cl']}}


def parse_recipe(text: str, base: dict) -> dict:
    """`bs=512,lr=0.01,epochs=2,pct=0.25,extras=cl+bf16` over `base`; a bad key or extra is a one-line ValueError."""
    r = dict(base)
    for part in filter(None, text.split(',')):
        k, _, v = part.partition('=')
        if k not in r:
            raise ValueError(f'recipe key {k!r} is not one of {", ".join(r)}; e.g. bs=512,lr=0.01,epochs=2,extras=cl+bf16')
        if k == 'extras':
            r[k] = [e for e in v.split('+') if e]
            bad = [e for e in r[k] if e not in EXTRAS]
            if bad: raise ValueError(f'extras {bad} unknown; use any of {"+".join(EXTRAS)}')
        else: r[k] = float(v) if k in ('lr', 'pct') else int(v)
    return r


def measure(task: str, data, dev: torch.device, repeats: int, target: float, every: int, limit: int, recipe: dict, emit):
    """`repeats` runs of each side, interleaved (hand first in even repeats, ultraloop first in odd ones), after one
    untimed warm-up of each; repeat r seeds both sides with r. Returns the records."""
    hand = hand_mnist1d if task == 'mnist1d' else hand_fashion
    sides = {'hand': lambda w, s: hand(data, w, dev, s), 'ultraloop': lambda w, s: ultraloop_run(task, data, w, dev, s, recipe)}
    x_test, y_test = data[2], data[3]
    for run in sides.values():  # warm-up, an eighth of a check's samples: allocator, kernels, CUDA context, cuDNN, capture
        run(Stopwatch(x_test, y_test, 2.0, every, every // 8, dev), 0)
    recs = []
    for r in range(repeats):
        for side in (('hand', 'ultraloop') if r % 2 == 0 else ('ultraloop', 'hand')):
            w = Stopwatch(x_test, y_test, target, every, limit, dev)
            sides[side](w, r)
            rec = {'task': task, 'side': side, 'repeat': r, 'reached': w.reached, 'failed': w.failed,
                   'seconds': round(w.seconds, 3),
                   'samples': w.seen, 'accuracy': w.checks[-1][2], 'target': target, 'checks': len(w.checks)}
            if w.graph: rec.update(w.graph)
            emit(rec); recs.append(rec)
    return recs


def table(task_recs: dict, recipes_used: dict, targets: dict) -> str:
    """The markdown table of the records: per task and side, the median and range of the seconds to the target over
    the runs that reached it, and the ratio hand / ultraloop of the medians and of each repeat's pair."""
    hand_desc = {'mnist1d': 'hand: Adam 1e-2, bs 100 (authors)', 'fashion': 'hand: SGD 0.1, bs 64, grad *= 0.85 (seed)'}
    rows = ['| task | target | side | recipe | reached | median s | min-max s | median samples | speed-up (median, pairs) |',
            '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for task, recs in task_recs.items():
        rp = recipes_used[task]
        ours = (f"ultraloop: Adam one-cycle {rp['lr']:g} (pct {rp['pct']:g}) over {rp['epochs']} ep, bs {rp['bs']}"
                + ''.join(f' +{e}' for e in rp['extras']))
        desc = {'hand': hand_desc[task], 'ultraloop': ours}
        med = {}
        for side in ('hand', 'ultraloop'):
            ok = [r for r in recs if r['side'] == side and r['reached']]
            n = sum(r['side'] == side for r in recs)
            bad = sum(r['side'] == side and r['failed'] for r in recs)
            s = [r['seconds'] for r in ok]
            med[side] = statistics.median(s) if s else None
            sp = '' if side == 'hand' or not med['hand'] or not med[side] else _speedup(recs, med)
            rows.append(f"| {task} | {targets[task]:.0%} | {side} | {desc[side]} | {len(ok)}/{n}"
                        + (f' ({bad} failed)' if bad else '') + ' | '
                        + (f"{med[side]:.2f} | {min(s):.2f}-{max(s):.2f} | {statistics.median(r['samples'] for r in ok):,.0f}"
                           if s else '- | - | -') + f' | {sp} |')
    return '\n'.join(rows)


def _speedup(recs, med) -> str:
    pairs = {}
    for r in recs:
        if r['reached']: pairs.setdefault(r['repeat'], {})[r['side']] = r['seconds']
    rs = [p['hand'] / p['ultraloop'] for p in pairs.values() if len(p) == 2]
    return f"{med['hand'] / med['ultraloop']:.2f}x" + (f' ({min(rs):.2f}-{max(rs):.2f})' if rs else '')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--tasks', default=','.join(TASKS))
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=1, help='CPU threads (torch.set_num_threads); 0: leave torch\'s default')
    p.add_argument('--fashion-root', default=None, help='folder with the four FashionMNIST IDX files')
    p.add_argument('--mnist1d-target', type=float, default=0.90)
    p.add_argument('--fashion-target', type=float, default=0.70)
    p.add_argument('--mnist1d-recipe', default='', help='ultraloop recipe over the default, e.g. bs=500,lr=0.03,epochs=40')
    p.add_argument('--fashion-recipe', default='', help='e.g. bs=512,lr=0.01,epochs=3,extras=cl+bf16+cudagraph')
    p.add_argument('--quick', action='store_true', help='small data, low targets, one repeat: checks that every path runs')
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        p.error(f'--device {a.device}: this torch ({torch.__version__}) sees no CUDA device; run it on a GPU machine, or '
                f'with --device cpu')
    if dev.type == 'cpu' and a.threads: torch.set_num_threads(a.threads)
    if a.quick: a.repeats = 1
    stamp = {'device': torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or platform.machine(),
             'torch': torch.__version__, 'threads': torch.get_num_threads() if dev.type == 'cpu' else None,
             'date': date.today().isoformat()}

    def emit(rec): print(json.dumps({**rec, **stamp}), flush=True)
    base = recipes(dev)
    used, targets, task_recs = {}, {}, {}
    load_start = os.getloadavg()
    for task in a.tasks.split(','):
        if task not in TASKS: p.error(f'unknown task {task!r}; use {" or ".join(TASKS)}')
        used[task] = parse_recipe(getattr(a, f'{task}_recipe'), base[task])
        if task == 'mnist1d':
            data = load_mnist1d(1000 if a.quick else 5000)
            # checked every epoch of the train set; at most the authors' 6,000 steps of 100
            targets[task], every, limit = (0.3 if a.quick else a.mnist1d_target), len(data[0]), 6000 * 100
        else:
            try: data = load_fashion(a.fashion_root)
            except FileNotFoundError as e:  # the other task's figures still count
                emit({'task': task, 'skipped': str(e)}); continue
            if a.quick: data = (data[0][:6000], data[1][:6000], data[2][:2000], data[3][:2000])
            targets[task], every, limit = (0.3 if a.quick else a.fashion_target), len(data[0]) // 5, 3 * len(data[0])
        if a.quick and task == 'fashion': used[task]['epochs'] = 1
        data = [t.to(dev) for t in data]
        task_recs[task] = measure(task, data, dev, a.repeats, targets[task], every, limit, used[task], emit)
    now = datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    load = ' / '.join(f'{x:.1f}' for x in load_start) + ' at the start, ' + ' / '.join(f'{x:.1f}' for x in os.getloadavg())
    print(f"\n{table(task_recs, used, targets)}\n\n{stamp['device']}, {os.cpu_count()} CPUs, torch {stamp['torch']}"
          + (f", {stamp['threads']} thread(s)" if stamp['threads'] else '') + f", {now}; load average (1/5/15 min) {load} "
          f"at the end; {a.repeats} repeat(s) per side; seconds of training to the target, evaluation excluded")


if __name__ == '__main__':
    main()
