"""The GPU benchmark: an epoch (train + valid) of FashionMNIST-sized synthetic data with the seed's CNN, ultraloop against
a hand-written loop in the same process, epochs interleaved within one fit; then the whole-step CUDA graph floor, and the peers.

Run on a machine with a CUDA GPU, one short call (a few minutes):
    python bench/gpu.py                          # bs 64 and 512, 60,000 train + 12,000 valid, 3 timed epochs each
    python bench/gpu.py --peers ../shared/bench/peers.py   # where the peer harness is not found on its own
    python bench/gpu.py --quick --device cpu     # a smoke test of every path on any machine (no figures)
    python bench/gpu.py --profile DIR            # also profile a few steady-state steps of each side (tables + traces)
Each line printed is one JSON record. Cases (all with TrainLearner + DeviceCB + MetricsCB(accuracy)):
`ultraloop_host` (data on the host, copied per batch through reused pinned buffers; `_alloc`: pinning each batch anew;
`_sync`: DeviceCB(prefetch=False)) against `hand_host`; against `hand` (data on the GPU, a
hand-written loop summing accuracy and loss on the device): `ultraloop` (data on the GPU), `bf16` (+ MixedPrecisionCB),
`bf16_cl` (+ ChannelsLastCB), `compile` (+ CompileCB), `cudagraph` (+ CudaGraphCB), `cudagraph_bf16_cl`. `floor`:
the train step captured whole in one CUDA graph by hand (as graph_floor.py), against CudaGraphCB, train phase only.
`cudagraph_onecycle`: Adam + CudaGraphCB under fit_one_cycle (lr and beta1 cycled every step, read from the device;
`onecycle_lr`: cycle_momentum=False) against the same at a constant lr, train phase only, in alternating fits.

`--bound`: the GPU-bound regime instead, a model large enough that DeviceCB's side-stream copy of the next batch should
hide behind the step: a ResNet-18-like net (written here, no torchvision) on 3 x 64 x 64 images at bs 256. Four sides,
an epoch (train + valid) of each in turn, the order reversed every round: ultraloop fed from a host DataLoader (workers,
pin_memory) and the same learner over the data already on the GPU, and the hand-written loop each way. Its record gives
each side's us per batch and the median ratios; the goal is `host_vs_gpu` (ultraloop host-fed / ultraloop on-GPU)
<= 1.05. With --profile, a torch.profiler table and trace of a few train steps of each ultraloop side.
    python bench/gpu.py --bound --profile DIR    # about a minute on an H200
    python bench/gpu.py --bound --quick --device cpu   # tiny (16 x 16 images, narrow net): checks that the path runs
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ultraloop as U  # noqa: E402
from ultraloop.callbacks.core import _Prefetch  # noqa: E402
from ultraloop.models import get_model  # noqa: E402

LR = 0.05
CASES = ('ultraloop_host', 'ultraloop_host_alloc', 'ultraloop_host_sync', 'ultraloop', 'bf16', 'bf16_cl', 'compile', 'cudagraph',
         'cudagraph_bf16_cl', 'cudagraph_onecycle')
ADAM_LR = 2e-3
# peer: the module it needs
PEERS = {'raw': None, 'seed': 'fastcore', 'ignite': 'ignite', 'lightning': 'pytorch_lightning', 'fastai': 'fastai'}


def make_data(n: int, nv: int, seed: int = 0):
    """Learnable FashionMNIST-shaped data: 1 x 28 x 28 images, 10 classes from a random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + nv, 1, 28, 28, generator=g)
    y = (x.flatten(1) @ torch.randn(784, 10, generator=g)).argmax(1)
    return x[:n], y[:n], x[n:], y[n:]


class Block(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm, added to the input (projected where it changes shape)."""
    def __init__(self, ni: int, nf: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(ni, nf, 3, stride, 1, bias=False), nn.BatchNorm2d(nf)
        self.c2, self.b2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=False), nn.BatchNorm2d(nf)
        self.skip = nn.Identity() if stride == 1 and ni == nf else \
            nn.Sequential(nn.Conv2d(ni, nf, 1, stride, bias=False), nn.BatchNorm2d(nf))

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.skip(x))


def resnet18(n_out: int = 10, width: int = 64) -> nn.Sequential:
    """ResNet-18's layout (2 basic blocks at each of 4 widths) for small images: a 3x3 stride-2 stem and no max-pool, so
    64 x 64 inputs meet the first blocks at 32 x 32: 11.2 M weights, 3.3 GFLOPs per image for forward and backward."""
    ws = [width, width * 2, width * 4, width * 8]
    layers, ni = [nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()], width
    for i, w in enumerate(ws):
        layers += [Block(ni, w, 1 if i == 0 else 2), Block(w, w, 1)]
        ni = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ni, n_out))


class Images(Dataset):
    """Map-style, sample by sample, as an image dataset is read by a DataLoader's workers and collated."""
    def __init__(self, x, y): self.x, self.y = x, y
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]


def make_images(n: int, nv: int, size: int, seed: int = 0):
    """Learnable 3 x size x size images, 10 classes from a random linear teacher on their 4 x 4 block means."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + nv, 3, size, size, generator=g)
    feats = F.avg_pool2d(x, size // 4).flatten(1)
    y = (feats @ torch.randn(feats.shape[1], 10, generator=g)).argmax(1)
    return x[:n], y[:n], x[n:], y[n:]


def host_loaders(data, bs: int, workers: int, pin: bool) -> U.DataLoaders:
    """DataLoaders over the host tensors: shuffled train, `workers` processes each (kept between epochs), pinned batches."""
    kw = dict(batch_size=bs, num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    return U.DataLoaders(DataLoader(Images(data[0], data[1]), shuffle=True, generator=torch.Generator().manual_seed(0), **kw),
                         DataLoader(Images(data[2], data[3]), **kw))


def sync(dev: torch.device) -> None:
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def hand(data, bs: int, dev: torch.device, host: bool, model_fn=get_model, dls=None):
    """The bar: a careful hand-written loop over the same loaders, accuracy and loss summed on the device."""
    torch.manual_seed(0)
    model = model_fn().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dls = dls or U.DataLoaders.from_tensors(*data, bs=bs, seed=0, device=None if host else dev)

    def epoch():
        for training, dl in ((True, dls.train), (False, dls.valid)):
            model.train(training)
            correct, loss_sum, n = torch.zeros((), device=dev), torch.zeros((), device=dev), 0
            with torch.set_grad_enabled(training):
                for x, y in dl:
                    if host: x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    out = model(x)
                    loss = F.cross_entropy(out, y)
                    if training:
                        loss.backward()
                        opt.step()
                        opt.zero_grad()
                    correct += (out.argmax(1) == y).sum()
                    loss_sum += loss.detach() * len(y)
                    n += len(y)
            (correct / n).item(), (loss_sum / n).item()  # read once per phase, as MetricsCB does
    return epoch


class QuietMetricsCB(U.MetricsCB):
    def _log(self, d): pass  # the benchmark prints its own records


def ultraloop(data, bs: int, dev: torch.device, case: str, model_fn=get_model, dls=None):
    import torchmetrics
    torch.manual_seed(0)
    host = case.startswith('ultraloop_host')
    _Prefetch.reuse_pinned = case != 'ultraloop_host_alloc'  # the learner's fit runs next: it reads this then
    dls = dls or U.DataLoaders.from_tensors(*data, bs=bs, seed=0, device=None if host else dev)
    extra = {'bf16': [U.MixedPrecisionCB(torch.bfloat16)],
             'bf16_cl': [U.ChannelsLastCB(), U.MixedPrecisionCB(torch.bfloat16)],
             'compile': [U.CompileCB()],
             'cudagraph': [U.CudaGraphCB()],
             'cudagraph_bf16_cl': [U.ChannelsLastCB(), U.MixedPrecisionCB(torch.bfloat16), U.CudaGraphCB()]}.get(case, [])
    acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average='micro')
    learn = U.TrainLearner(model_fn(), dls, loss_func=F.cross_entropy, lr=LR,
                           cbs=[U.DeviceCB(dev, prefetch=case != 'ultraloop_host_sync'), QuietMetricsCB(accuracy=acc), *extra])
    return learn


def graph_floor(data, bs: int, dev: torch.device, fast: bool):
    """Train phase only: the hand-written step (forward, loss, backward, SGD step, accuracy sum) as one CUDA graph."""
    from contextlib import nullcontext
    mf = torch.channels_last if fast else torch.contiguous_format
    ac = (lambda: torch.autocast('cuda', dtype=torch.bfloat16)) if fast else nullcontext
    torch.manual_seed(0)
    model = get_model().to(dev).to(memory_format=mf)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = data[0].to(dev).contiguous(memory_format=mf), data[1].to(dev)
    sx, sy, correct = x[:bs].clone(), y[:bs].clone(), torch.zeros((), device=dev)
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):  # warm-up on real batches, as CudaGraphCB does
        for i in range(3):
            with ac(): loss = F.cross_entropy(model(x[i * bs:(i + 1) * bs]), y[i * bs:(i + 1) * bs])
            loss.backward(); opt.step(); opt.zero_grad()
    torch.cuda.current_stream(dev).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        with ac(): out = model(sx); loss = F.cross_entropy(out, sy)
        loss.backward(); opt.step(); opt.zero_grad()
        correct += (out.argmax(1) == sy).sum()
    nb = len(x) // bs

    def epoch():
        idx = torch.randperm(len(x)).to(dev)  # drawn on the host, as the loaders do
        for i in range(nb):
            j = idx[i * bs:(i + 1) * bs]
            sx.copy_(x[j]); sy.copy_(y[j])
            g.replay()
        correct.item()
    return epoch


def interleaved(hand_epoch, learn, epochs: int, dev: torch.device, valid: bool = True):
    """Median seconds of a hand-written epoch, of an ultraloop epoch, and the median ratio ultraloop / hand.
    The epochs run inside one fit (a hand epoch after each ultraloop one), so what a fit does once (compiling,
    capturing the graph) stays out of the steady state measured, and drift hits both sides alike."""
    th, tu = [], []

    class Clock(U.Callback):
        order = -10**9  # its before_epoch first: the epoch's time includes every callback's work

        def before_epoch(self, learn):
            if learn.training: sync(dev); self.t = time.perf_counter()

        def cleanup_epoch(self, learn):
            if learn.training == valid: return  # the epoch ends after the valid phase, or after train with valid=False
            sync(dev); tu.append(time.perf_counter() - self.t)
            t = time.perf_counter(); hand_epoch(); sync(dev); th.append(time.perf_counter() - t)

    learn.fit(epochs + 1, valid=valid, cbs=[Clock()])  # the first epoch of each side is the warm-up
    th, tu = th[1:], tu[1:]
    rs = [u / h for u, h in zip(tu, th)]
    return statistics.median(th), statistics.median(tu), statistics.median(rs), [round(min(rs), 3), round(max(rs), 3)]


class PhaseClock(U.Callback):
    """Seconds of each train phase, the device synchronised at both ends."""
    order = -10**9  # its before_epoch first: the phase's time includes every callback's work

    def __init__(self, dev: torch.device): self.dev, self.times = dev, []

    def before_epoch(self, learn):
        if learn.training: sync(self.dev); self.t = time.perf_counter()

    def cleanup_epoch(self, learn):
        if learn.training: sync(self.dev); self.times.append(time.perf_counter() - self.t)


def onecycle_vs_constant(data, bs: int, dev: torch.device, epochs: int, rounds: int = 2) -> dict:
    """Adam + CudaGraphCB, train phase only: fit_one_cycle (`onecycle`: lr and beta1 cycled every step;
    `onecycle_lr`: lr only) against a constant lr. Each round fits every side once, `epochs` + 1 epochs (the first holds
    the warm-up and capture and is not timed); ratios are per round, to the constant side of the same round."""
    times, rec = {s: [] for s in ('constant', 'onecycle_lr', 'onecycle')}, {}
    for _ in range(rounds):
        for side in times:
            torch.manual_seed(0)
            dls = U.DataLoaders.from_tensors(*data, bs=bs, seed=0, device=dev)
            learn = U.TrainLearner(get_model(), dls, F.cross_entropy, lr=ADAM_LR, opt_func=torch.optim.Adam,
                                   cbs=[U.DeviceCB(dev)])
            cg, clock = U.CudaGraphCB(), PhaseClock(dev)
            if side == 'constant': learn.fit(epochs + 1, cbs=[cg, clock])
            else: learn.fit_one_cycle(epochs + 1, ADAM_LR, cbs=[cg, clock], cycle_momentum=None if side == 'onecycle' else False)
            times[side].append(statistics.median(clock.times[1:]))
            rec[f'{side}_graph'] = {'replays': cg.replays, 'captures': cg.captures, 'eager_because': cg.reason}
    nt = -(-len(data[0]) // bs)
    out = {'case': 'cudagraph_onecycle', 'bs': bs, 'opt': 'Adam'}
    out.update({f'{s}_us_per_step': round(statistics.median(t) / nt * 1e6, 1) for s, t in times.items()})
    for s in ('onecycle', 'onecycle_lr'):
        rs = [t / c for t, c in zip(times[s], times['constant'])]
        out[f'{s}_ratio'], out[f'{s}_ratio_range'] = round(statistics.median(rs), 3), [round(min(rs), 3), round(max(rs), 3)]
    return {**out, **rec, 'goal': 'onecycle_ratio <= 1.05'}


def probe_foreach_beta1(dev: torch.device) -> dict:
    """Whether torch's multi-tensor (foreach) capturable Adam can be captured with a tensor beta1. CudaGraphCB assumes
    not (its `_foreach_lerp_` and `_foreach_pow` take beta1 as a Python number, `.item()`: a host sync) and captures
    such groups with foreach=False; if this says 'captured', that detour costs time for nothing. Run it last in its
    process: a failed capture leaves CUDA state behind."""
    rec = {'probe': 'foreach_adam_tensor_beta1_capture'}
    if dev.type != 'cuda': return {**rec, 'skipped': 'needs CUDA'}
    ps = [torch.zeros(64, device=dev, requires_grad=True) for _ in range(3)]
    for p in ps: p.grad = torch.ones_like(p)
    opt = torch.optim.Adam(ps, lr=1e-3, foreach=True, capturable=True)
    opt.param_groups[0]['betas'] = (torch.tensor(0.9, device=dev), 0.999)
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s): opt.step()  # state created outside the capture, as CudaGraphCB's warm-up does
    torch.cuda.current_stream(dev).wait_stream(s)
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()): opt.step()
        return {**rec, 'result': 'captured'}
    except Exception as e:
        return {**rec, 'result': f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:160]}'}


def _profiled_fit(learn, dev: torch.device, acts: list):
    """Fit two epochs; torch.profiler over the second epoch's train phase (after warm-up and capture)."""
    from torch.profiler import profile as tprof
    holder = {}

    class Prof(U.Callback):
        order = -10**9

        def before_epoch(self, learn):
            if learn.epoch == 1 and learn.training: sync(dev); holder['p'] = tprof(activities=acts).__enter__()

        def cleanup_epoch(self, learn):
            if learn.epoch == 1 and learn.training: sync(dev); holder['p'].__exit__(None, None, None)
    learn.fit(2, cbs=[Prof()])
    return holder['p']


def _write_profiles(results: dict, title: str, tag: str, dev: torch.device, out: Path) -> None:
    """Each side's table of host time per operator (and of device time on a GPU) into out/profiles.txt, and its Chrome
    trace as out/trace_<tag>_<side>.json."""
    with open(out / 'profiles.txt', 'a') as f:
        for side, p in results.items():
            ka = p.key_averages()
            f.write(f'\n===== {title}: {side} =====\n')
            f.write(ka.table(sort_by='self_cpu_time_total', row_limit=30))
            if dev.type == 'cuda': f.write(ka.table(sort_by='self_device_time_total', row_limit=20))
            p.export_chrome_trace(str(out / f'trace_{tag}_{side}.json'))


def _activities(dev: torch.device) -> list:
    from torch.profiler import ProfilerActivity
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])


def profile(data, bs: int, dev: torch.device, case: str, out: Path, steps: int = 30) -> None:
    """torch.profiler over `steps` steady-state train steps of each side of `case` (hand or floor, then ultraloop), on a
    slice of the data: a table of host time per operator, one of device time, and a Chrome trace of each side."""
    from torch.profiler import profile as tprof
    acts = _activities(dev)
    n = steps * bs
    small = (data[0][:n], data[1][:n], data[2][:bs * 4], data[3][:bs * 4])
    graphed = case.startswith('cudagraph')
    base = graph_floor(small, bs, dev, fast=case.endswith('bf16_cl')) if graphed else \
        hand(small, bs, dev, host=case.startswith('ultraloop_host'))
    base()  # warm-up epoch
    results = {}
    with tprof(activities=acts) as p:
        base(); sync(dev)
    results['floor' if graphed else 'hand'] = p
    results['ultraloop'] = _profiled_fit(ultraloop(small, bs, dev, case), dev, acts)
    _write_profiles(results, f'{case} bs {bs}, {steps} train steps', f'{case}_bs{bs}', dev, out)


def rounds(sides: dict, n: int, dev: torch.device) -> dict:
    """Seconds of each side's epochs: `n` + 1 rounds of one epoch of each side in turn, the order reversed every round
    (no side always runs first), the first round a warm-up left out."""
    times, order = {k: [] for k in sides}, list(sides)
    for r in range(n + 1):
        for k in (order if r % 2 == 0 else order[::-1]):
            sync(dev); t = time.perf_counter()
            sides[k]()
            sync(dev); times[k].append(time.perf_counter() - t)
    return {k: v[1:] for k, v in times.items()}


def bound(a, dev: torch.device, emit) -> None:
    """The GPU-bound regime (--bound): ResNet-18-like on 3 x 64 x 64 images, ultraloop and the hand-written loop, each
    fed from a host DataLoader (workers, pinned batches) and from the data already on the GPU."""
    from functools import partial
    cuda = dev.type == 'cuda'
    size, width, bs, n = (16, 8, 32, 256) if a.quick else (64, 64, a.bound_bs, a.bound_n)
    data = make_images(n, n // 5, size)
    model_fn = partial(resnet18, width=width)

    def host_dls(d=data): return host_loaders(d, bs, a.workers, pin=cuda)
    ul_host, ul_gpu = (ultraloop(data, bs, dev, 'resnet', model_fn, dls) for dls in
                       (host_dls(), U.DataLoaders.from_tensors(*data, bs=bs, seed=0, device=dev)))
    sides = {'ultraloop_host': lambda: ul_host.fit(1), 'ultraloop_gpu': lambda: ul_gpu.fit(1),
             'hand_host': hand(data, bs, dev, True, model_fn, host_dls()), 'hand_gpu': hand(data, bs, dev, False, model_fn)}
    ts = rounds(sides, a.epochs, dev)
    nb = -(-n // bs) + -(-(n // 5) // bs)

    def ratio(u, v):
        rs = [x / y for x, y in zip(ts[u], ts[v])]
        return round(statistics.median(rs), 3), [round(min(rs), 3), round(max(rs), 3)]
    rec = {'case': 'gpu_bound', 'model': f'resnet18 width {width}', 'image': f'3x{size}x{size}', 'bs': bs, 'n': n,
           'workers': a.workers, 'pin_memory': cuda, 'epochs': a.epochs,
           **{f'{k}_us_per_batch': round(statistics.median(v) / nb * 1e6, 1) for k, v in ts.items()}}
    for name, (u, v) in {'host_vs_gpu': ('ultraloop_host', 'ultraloop_gpu'), 'hand_host_vs_gpu': ('hand_host', 'hand_gpu'),
                         'host_vs_hand': ('ultraloop_host', 'hand_host'), 'gpu_vs_hand': ('ultraloop_gpu', 'hand_gpu')}.items():
        rec[f'{name}_median_ratio'], rec[f'{name}_ratio_range'] = ratio(u, v)
    emit(rec)
    if a.profile:  # a slice of `steps` train batches, fresh learners: the table and trace of each ultraloop side
        out, steps = Path(a.profile), 3 if a.quick else 20
        out.mkdir(parents=True, exist_ok=True)
        small = (data[0][:steps * bs], data[1][:steps * bs], data[2][:bs * 2], data[3][:bs * 2])
        acts = _activities(dev)
        results = {'ultraloop_host': _profiled_fit(ultraloop(small, bs, dev, 'resnet', model_fn, host_dls(small)), dev, acts),
                   'ultraloop_gpu': _profiled_fit(ultraloop(small, bs, dev, 'resnet', model_fn, U.DataLoaders.from_tensors(
                       *small, bs=bs, seed=0, device=dev)), dev, acts)}
        _write_profiles(results, f'gpu_bound resnet18 bs {bs}, {steps} train steps', f'gpu_bound_bs{bs}', dev, out)
        emit({'profiled': 'gpu_bound', 'bs': bs, 'to': str(out)})


def find_peers(arg: str | None) -> Path | None:
    cands = [arg, os.environ.get('ULTRALOOP_PEERS'), ROOT.parent / 'shared/bench/peers.py', ROOT / 'shared/bench/peers.py']
    return next((Path(c) for c in cands if c and Path(c).is_file()), None)


def run_peers(path: Path | None, a, bs: int, emit) -> None:
    if a.peers == 'none': return
    if path is None: return emit({'peers': 'skipped', 'why': 'peers.py not found: pass --peers PATH'})
    for fw, module in PEERS.items():
        if module and importlib.util.find_spec(module) is None:
            emit({'peer': fw, 'bs': bs, 'skipped': f'{module} is not installed'}); continue
        cmd = [sys.executable, str(path), fw, '--device', a.device, '--model', 'cnn', '--n', str(a.n),
               '--loader', 'gpu' if a.device == 'cuda' else 'slices', '--bs', str(bs), '--epochs', str(a.epochs)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.peer_timeout)
            line = next((ln for ln in reversed(r.stdout.splitlines()) if ln.startswith('{')), None)
            emit({'peer': fw, 'bs': bs, **json.loads(line)} if line else
                 {'peer': fw, 'bs': bs, 'failed': (r.stderr.strip().splitlines() or ['no output'])[-1][:200]})
        except subprocess.TimeoutExpired:
            emit({'peer': fw, 'bs': bs, 'failed': f'timed out after {a.peer_timeout} s'})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--n', type=int, default=60000, help='train samples; valid: n / 5')
    p.add_argument('--bs', default='64,512')
    p.add_argument('--epochs', type=int, default=3, help='timed epochs per side, after one warm-up')
    p.add_argument('--cases', default=','.join(CASES))
    p.add_argument('--peers', default=None, help="path to the peer harness peers.py, or 'none'")
    p.add_argument('--peer-timeout', type=int, default=150)
    p.add_argument('--quick', action='store_true', help='tiny data, one timed epoch: checks that every path runs')
    p.add_argument('--profile', default=None, help='folder: profile a few steps of ultraloop, cudagraph (bs 64 first)')
    p.add_argument('--profile-cases', default='ultraloop_host,ultraloop_host_sync,ultraloop')  # cudagraph: see README
    p.add_argument('--profile-bs', type=int, default=64)
    p.add_argument('--probe', action='store_true', help="only: can torch's foreach Adam capture a tensor beta1?")
    p.add_argument('--bound', action='store_true', help='the GPU-bound case only (ResNet-18-like, 64 x 64, host loader)')
    p.add_argument('--bound-n', type=int, default=20480, help='--bound: train samples; valid: n / 5')
    p.add_argument('--bound-bs', type=int, default=256)
    p.add_argument('--workers', type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)),
                   help="--bound: each host DataLoader's worker processes")
    a = p.parse_args(argv)
    if a.quick: a.n, a.epochs = 1280, 1
    dev = torch.device(a.device)
    cuda = dev.type == 'cuda'
    gpu = torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine()
    stamp = {'device': gpu, 'torch': torch.__version__, 'date': date.today().isoformat()}

    def emit(rec): print(json.dumps({**rec, **stamp}), flush=True)
    if a.probe: return emit(probe_foreach_beta1(dev))
    if a.bound: return bound(a, dev, emit)
    data = make_data(a.n, a.n // 5)
    peers = None if a.peers == 'none' else find_peers(a.peers)
    for bs in map(int, a.bs.split(',')):
        nb = -(-a.n // bs) + -(-(a.n // 5) // bs)
        for case in a.cases.split(','):
            if case == 'cudagraph_onecycle':
                emit(onecycle_vs_constant(data, bs, dev, a.epochs)); continue
            if case == 'compile' and not cuda and not a.quick:
                emit({'case': case, 'bs': bs, 'skipped': 'CompileCB on the CPU: run with --quick or on a GPU'}); continue
            learn = ultraloop(data, bs, dev, case)
            base = 'hand_host' if case.startswith('ultraloop_host') else 'hand'
            th, tu, r, spread = interleaved(hand(data, bs, dev, host=base == 'hand_host'), learn, a.epochs, dev)
            rec = {'case': case, 'bs': bs, 'baseline': base, f'{base}_us_per_batch': round(th / nb * 1e6, 1),
                   'ultraloop_us_per_batch': round(tu / nb * 1e6, 1), 'median_ratio': round(r, 3), 'ratio_range': spread}
            cg = next((cb for cb in learn.cbs if isinstance(cb, U.CudaGraphCB)), None)
            if cg is not None: rec.update(graph_replays=cg.replays, eager_because=cg.reason)
            emit(rec)
            if cg is not None:  # against the floor: train phase only, as graph_floor.py measures it
                if not cuda: emit({'case': f'{case}_vs_floor', 'bs': bs, 'skipped': 'the floor needs CUDA'}); continue
                nt = a.n // bs
                tf, tg, r, spread = interleaved(graph_floor(data, bs, dev, fast=case.endswith('bf16_cl')), learn, a.epochs, dev,
                                        valid=False)
                emit({'case': f'{case}_vs_floor', 'bs': bs, 'floor_us_per_step': round(tf / nt * 1e6, 1),
                      'ultraloop_us_per_step': round(tg / -(-a.n // bs) * 1e6, 1),
                      'median_ratio_per_step': round(r * nt / -(-a.n // bs), 3),  # the floor drops the last batch
                      'ratio_range_per_step': [round(x * nt / -(-a.n // bs), 3) for x in spread],
                      'graph_replays': cg.replays, 'eager_because': cg.reason})
        run_peers(peers, a, bs, emit)
    if a.profile:  # last: the figures above are printed whatever happens here
        out = Path(a.profile); out.mkdir(parents=True, exist_ok=True)
        for case in a.profile_cases.split(','):
            if case.startswith('cudagraph') and not cuda: continue
            try: profile(data, a.profile_bs, dev, case, out)
            except Exception as e: emit({'profile': case, 'failed': f'{type(e).__name__}: {e}'[:300]}); break
        emit({'profiled': a.profile_cases, 'bs': a.profile_bs, 'to': str(out)})


if __name__ == '__main__':
    main()
