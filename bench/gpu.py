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
from torch.nn import functional as F

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


def sync(dev: torch.device) -> None:
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def hand(data, bs: int, dev: torch.device, host: bool):
    """The bar: a careful hand-written loop over the same loaders, accuracy and loss summed on the device."""
    torch.manual_seed(0)
    model = get_model().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dls = U.DataLoaders.from_tensors(*data, bs=bs, seed=0, device=None if host else dev)

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


def ultraloop(data, bs: int, dev: torch.device, case: str):
    import torchmetrics
    torch.manual_seed(0)
    host = case.startswith('ultraloop_host')
    _Prefetch.reuse_pinned = case != 'ultraloop_host_alloc'  # the learner's fit runs next: it reads this then
    dls = U.DataLoaders.from_tensors(*data, bs=bs, seed=0, device=None if host else dev)
    extra = {'bf16': [U.MixedPrecisionCB(torch.bfloat16)],
             'bf16_cl': [U.ChannelsLastCB(), U.MixedPrecisionCB(torch.bfloat16)],
             'compile': [U.CompileCB()],
             'cudagraph': [U.CudaGraphCB()],
             'cudagraph_bf16_cl': [U.ChannelsLastCB(), U.MixedPrecisionCB(torch.bfloat16), U.CudaGraphCB()]}.get(case, [])
    acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average='micro')
    learn = U.TrainLearner(get_model(), dls, loss_func=F.cross_entropy, lr=LR,
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


def profile(data, bs: int, dev: torch.device, case: str, out: Path, steps: int = 30) -> None:
    """torch.profiler over `steps` steady-state train steps of each side of `case` (hand or floor, then ultraloop), on a
    slice of the data: a table of host time per operator, one of device time, and a Chrome trace of each side."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
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
    learn, holder = ultraloop(small, bs, dev, case), {}

    class Prof(U.Callback):  # the second epoch's train phase: after warm-up and capture
        order = -10**9

        def before_epoch(self, learn):
            if learn.epoch == 1 and learn.training: sync(dev); holder['p'] = tprof(activities=acts).__enter__()

        def cleanup_epoch(self, learn):
            if learn.epoch == 1 and learn.training: sync(dev); holder['p'].__exit__(None, None, None)
    learn.fit(2, cbs=[Prof()])
    results['ultraloop'] = holder['p']
    with open(out / 'profiles.txt', 'a') as f:
        for side, p in results.items():
            ka = p.key_averages()
            f.write(f'\n===== {case} bs {bs}: {side}, {steps} train steps =====\n')
            f.write(ka.table(sort_by='self_cpu_time_total', row_limit=30))
            if dev.type == 'cuda': f.write(ka.table(sort_by='self_device_time_total', row_limit=20))
            p.export_chrome_trace(str(out / f'trace_{case}_bs{bs}_{side}.json'))


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
    a = p.parse_args(argv)
    if a.quick: a.n, a.epochs = 1280, 1
    dev = torch.device(a.device)
    cuda = dev.type == 'cuda'
    gpu = torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine()
    stamp = {'device': gpu, 'torch': torch.__version__, 'date': date.today().isoformat()}

    def emit(rec): print(json.dumps({**rec, **stamp}), flush=True)
    if a.probe: return emit(probe_foreach_beta1(dev))
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
