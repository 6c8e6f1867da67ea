"""Several processes on torch.distributed: the process group, DDP or FSDP2 around the model, each its share of the data."""
from __future__ import annotations

import atexit
import copy
import os
import signal
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..data import TensorLoader, shard, to_device
from ..learner import Callback
from ..utils import check_number

__all__ = ['DistributedCB']

_STRATEGIES = ('ddp', 'fsdp')
_BACKENDS = ('gloo', 'nccl', 'mpi', 'xccl', 'ucc')
_LAUNCH_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def launched() -> bool:
    """True in a process started by torchrun (or by `accelerate launch`, which runs it): the environment names its rank."""
    return all(k in os.environ for k in _LAUNCH_ENV)


_rendezvous = None  # (store, rank, world_size): this process's one rendezvous with the others; groups use prefixes of it
_groups = 0  # process groups this process has made: every rank runs the same fits, so their prefixes agree


def _init_group(backend: str, timeout: timedelta) -> None:
    """The process group, over this process's rendezvous store (made once, its waits bounded by `timeout`), under a key
    prefix of its own: see `_prefix`."""
    global _rendezvous, _groups
    if _rendezvous is None: _rendezvous = next(dist.rendezvous('env://', timeout=timeout))
    store, rank, world_size = _rendezvous
    _groups += 1
    dist.init_process_group(backend, store=dist.PrefixStore(_prefix(_groups), store), rank=rank, world_size=world_size,
                            timeout=timeout)


def _prefix(group: int) -> str:
    """The store keys of this process's `group`-th group. A group set up over keys another one left would read that
    group's addresses (gloo's connectFullMesh: 'Connection refused' to a dead process's port) or its counts (a hang in
    set-up): so each group of a process gets its own number, and each round of an elastic job its own namespace, since
    torchrun's agent keeps one store (at MASTER_PORT) for all the rounds it relaunches after a failure."""
    env = os.environ
    return f'ultraloop/{env.get("TORCHELASTIC_RUN_ID", "")}/{env.get("TORCHELASTIC_RESTART_COUNT", "0")}/{group}'


class _Inner(nn.Module):
    """What DDP wraps: the user's module, called through its own forward. The user's module calls DDP in turn (its
    instance `forward` is routed there), so `learn.model(x)` runs DDP's hooks while `learn.model` stays the user's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.fwd = model, None  # fwd: the model's own forward, set when the route is laid

    def forward(self, *args, **kwargs): return self.fwd(*args, **kwargs)


class DistributedCB(Callback):
    """Trains with several processes on torch.distributed, one per device, as started by `torchrun` (one machine or
    several) or `accelerate launch`: `torchrun --nproc-per-node 2 train.py`.

    - The process group: made at fit start from torchrun's environment (`backend`: nccl on CUDA, else gloo) unless one
      exists, with `timeout` (seconds) on every collective; destroyed at the fit's end when it was made here. Each group
      gets its own prefix of one rendezvous store, so fit after fit sets up cleanly. The device is `cuda:LOCAL_RANK`
      with an nccl group (DeviceCB('cuda') then means that one), else the CPU; the model and each batch are moved
      there.
    - `strategy='ddp'`: `DistributedDataParallel` averages the gradients. `learn.model` stays your module (state dicts
      carry no `module.` prefix; hooks, callbacks and checkpoints see your module); for the fit, its forward runs through
      the DDP wrapper (`self.wrapper`) in training phases, and plainly in validation, which runs no collective, so
      ranks may hold different numbers of validation batches. The wrapper is made at each fit, in before_fit, which
      also gives every rank rank 0's weights and buffers (so ranks that seeded their models differently agree, also in
      `fit(train=False)`); its train/eval mode follows the phase.
    - `strategy='fsdp'`: FSDP2's `fully_shard` shards the model in place (its parameters become DTensors; state dict
      keys stay yours) at the first fit, after rank 0's weights are given to all; the optimiser is moved to the
      sharded parameters, keeping its state. A sharded model needs its group, so with fsdp the group lives until the
      process ends. Every forward gathers parameters from all ranks, so validation shards are evened out too. Shard
      blocks yourself (`fully_shard(block)` for each, before fit) for per-layer memory savings; the root is sharded here.
    - Data: each phase's loader is cut into this process's share (`ultraloop.data.shard`): a TensorLoader or torch
      DataLoader as `DistributedSampler` cuts it, rank r taking positions r, r+N, ... of one order, every rank drawing
      the same permutation (rank 0's generator state is given to all before each train phase; a DistributedSampler
      gets `set_epoch`). `bs` is per process: N processes of bs b see the single-process batches of bs N*b, exactly
      when the number of train samples is a multiple of N (else the last positions repeat the first samples, as
      DistributedSampler does: trained on, never counted by MetricsCB). Validation is not padded under ddp: 101 samples
      on 2 ranks are 51 and 50. MetricsCB sums the loss and metric states over processes once per phase.
    - Accumulation: `learn.sync_grads` (GradientAccumulationCB sets it False before non-final micro-batches) is given to
      DDP before each forward (`require_backward_grad_sync`) or to FSDP (`set_requires_gradient_sync`), so gradients
      are reduced once per optimiser step.
    - Checkpoints (CheckpointCB, `learn.save_state`): every process takes part, the main one writes; the file holds
      each process's own parts and loads in any number of processes (see `state.learner_state`).
    - Signals (ctrl-C, SIGTERM, SIGUSR1: see `Learner.fit`): a signal reaching any process stops every process at the
      same batch. The processes agree on it every `signal_every` train batches, at each train phase's last batch and at
      each validation phase's end: one all_reduce of one number (and on a GPU one read of it), so no collective is added per batch
      (bench/signals.py counts them). A signal is acted on within `signal_every` train batches (plus a validation phase).
    - Failure: cleanup runs no collective (it also runs after an error); a process that raises exits, and torchrun ends
      the others.
    Outside torchrun and with no process group, it does nothing, so one script runs under python and torchrun alike.
    """
    order = -25  # before_fit before the writers ask learn.is_main; before_batch after GradientAccumulationCB (-30)
    signal_every = 16  # train batches between agreements on a stop: 1/16 of a tiny all_reduce per batch, a short wait

    def __init__(self, strategy: str = 'ddp', backend: str | None = None, timeout: float = 600.0):
        if strategy not in _STRATEGIES:
            raise ValueError(f"DistributedCB: strategy must be 'ddp' or 'fsdp', got {strategy!r}")
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(f'DistributedCB: backend must be one of {", ".join(map(repr, _BACKENDS))} or None '
                             f'(nccl on CUDA, else gloo), got {backend!r}')
        self.strategy, self.backend = strategy, backend
        self.timeout = timedelta(seconds=check_number('DistributedCB: timeout (seconds)', timeout, gt=0, finite=True))
        self.wrapper = None  # the DDP wrapper during a fit, or the FSDP-sharded model
        self.device = torch.device('cpu')
        self._on = self._made_group = False
        self._shards = self._vote = None

    # ---- fit: group, device, wrapper ----------------------------------------------------------------------------
    def before_fit(self, learn):
        self._on, self._made_group, self._routed, self._shards, self._move, self._vote = False, False, False, None, False, None
        if not dist.is_initialized():
            if not launched(): return  # one process: nothing to do
            if torch.cuda.is_available(): torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
            _init_group(self.backend or ('nccl' if torch.cuda.is_available() else 'gloo'), self.timeout)
            self._made_group = True
        self._on = True
        self.device = torch.device('cpu')
        if torch.cuda.is_available() and 'nccl' in str(dist.get_backend()):  # a gloo group trains on the CPU
            self.device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', torch.cuda.current_device())))
            torch.cuda.set_device(self.device)
        self._move = self.device.type == 'cuda'
        m = learn.model
        m.to(self.device)
        # FSDP gathers parameters in every forward, so its validation shards need equal batch counts too
        self._shards = Shards(even_valid=self.strategy == 'fsdp')
        self._shards.start(learn)
        if self.strategy == 'ddp': self._wrap_ddp(m)
        else: self._shard_fsdp(learn, m)
        self._vote = StopVote(learn, self.signal_every, self.device)

    def _wrap_ddp(self, m: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP
        self._inner = _Inner(m)
        # makes every rank's weights and buffers rank 0's (DDP broadcasts them from rank 0 here)
        self.wrapper = DDP(self._inner, device_ids=[self.device.index] if self.device.type == 'cuda' else None)
        self._sync = True

    def _shard_fsdp(self, learn, m: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard
        from torch.distributed.tensor import DTensor, distribute_tensor
        self.wrapper, self._sync = m, True
        if isinstance(m, FSDPModule): return  # sharded by an earlier fit (or by you): its group lives on
        if self._made_group:  # the sharded parameters need this group for as long as the model lives
            self._made_group = False
            atexit.register(_destroy)
        with torch.no_grad():
            for t in [*m.parameters(), *m.buffers()]:
                if not isinstance(t, DTensor): dist.broadcast(t, 0)  # every rank starts from rank 0's weights
        old = dict(m.named_parameters())
        fully_shard(m)
        new = dict(m.named_parameters())
        opt = learn.opt
        if opt is None: return
        # the optimiser holds the unsharded parameters: move it, and its state, onto the sharded ones in place
        swap = {id(p): new[k] for k, p in old.items()}
        for g in opt.param_groups: g['params'] = [swap.get(id(p), p) for p in g['params']]
        state = defaultdict(dict)
        for p, s in opt.state.items():
            q = swap.get(id(p), p)
            state[q] = {k: distribute_tensor(v, q.device_mesh, q.placements)
                        if q is not p and isinstance(v, torch.Tensor) and v.shape == p.shape else v for k, v in s.items()}
        opt.state = state
        if learn.opt_func: learn._opt_params = [id(p) for p in m.parameters()]  # the next fit keeps this optimiser

    # ---- phases and batches --------------------------------------------------------------------------------------
    def before_epoch(self, learn):
        if not self._on: return
        self._shards.before_epoch(learn)
        self._vote.before_epoch(learn)
        if self.strategy == 'ddp':
            self.wrapper.train(learn.training)
            self._route(learn.training)  # validation runs the module plainly: no collective, so uneven shards are safe

    def _route(self, on: bool) -> None:
        """Lay (or lift) the route from the user's module to the DDP wrapper: the module's instance `forward` calls the
        wrapper, which calls the module's own forward (a compiled one that CompileCB set included)."""
        m = self._inner.model
        if on and not self._routed:
            own = vars(m).get('forward')
            self._own, self._inner.fwd = own, own if own is not None else type(m).forward.__get__(m)
            m.forward = self._call_wrapper  # a bound method, not a Module: nn.Module does not adopt it as a child
            self._routed = True
        elif not on and self._routed: self._unroute()

    def _call_wrapper(self, *args, **kwargs): return self.wrapper(*args, **kwargs)

    def _unroute(self) -> None:
        m, self._routed = self._inner.model, False
        if vars(m).get('forward') != self._call_wrapper: return  # someone else (CompileCB's cleanup) took it off
        if self._own is None: del m.forward
        else: m.forward = self._own

    def cleanup_epoch(self, learn):
        # FSDP's root keeps its gathered parameters after a forward with no backward (validation): put the shards back
        # (a local step, no collective), so the optimiser and the next fit find the parameters they hold
        if self._on and self.strategy == 'fsdp': _reshard(self.wrapper)

    def before_batch(self, learn):
        if not self._on: return
        if self._move: learn.batch = to_device(learn.batch, self.device, non_blocking=True)  # no copy if already there
        if not learn.training: return
        s = learn.sync_grads
        if s is not self._sync:  # decided before the forward: DDP prepares its reduction there
            if self.strategy == 'ddp': self.wrapper.require_backward_grad_sync = s
            else: self.wrapper.set_requires_gradient_sync(s)
            self._sync = s

    def after_batch(self, learn):
        if self._on: self._vote.after_batch(learn)

    def after_backward(self, learn):
        # reached only when the step will be taken: a backward that skipped the reduction (the last window of a loader
        # without a length, closed after the epoch) is averaged here, so no rank steps on its own gradient
        if not self._on or self._sync: return
        if self.strategy == 'fsdp':
            raise ValueError('DistributedCB(strategy=\'fsdp\'): a step came after a backward without gradient sync (the '
                             'accumulation window of a loader without a length); give the train loader a length')
        grads = [p.grad for p in learn.model.parameters() if p.grad is not None]
        for g in grads: dist.all_reduce(g)
        torch._foreach_div_(grads, dist.get_world_size())

    def after_epoch(self, learn):
        if self._on: self._vote.after_epoch(learn)

    # ---- end: no collective here (cleanup also runs after a failure, when the other ranks may be gone) -------------
    def cleanup_fit(self, learn):
        if self._vote is not None: self._vote.end(learn)
        self._vote = None
        if self._on and self.strategy == 'ddp':
            if self._routed: self._unroute()
            self.wrapper = self._inner = None
        if self._on and self._sync is False and self.strategy == 'fsdp': self.wrapper.set_requires_gradient_sync(True)
        if self._shards is not None: self._shards.end(learn)
        self._shards = None
        if self._made_group: _destroy()
        self._on = self._made_group = False

    def __repr__(self) -> str: return f'{self.name}({self.strategy!r})'


class StopVote:
    """A stop every process agrees on, for a callback that runs a fit in several processes (DistributedCB,
    AccelerateCB): made at fit start under a process group, it sets `learn.hold_signals`, so fit's signal handler only
    records a signal, and turns a signal that reached any process into `learn.stop_requested` on every process at the
    same batch. The processes vote every `every` train batches, at each train phase's last batch (`after_batch`: every
    process has as many train batches; validation shards may differ by one) and at each validation phase's end
    (`after_epoch`, before MetricsCB's and early stopping's work: a signal in the last one stops the fit on every
    process). A vote is one all_reduce of one number and, on a GPU, one read of it. The largest signal number wins, so
    SIGTERM (15) over SIGUSR1 (10) over ctrl-C (2). The callback's cleanup_fit calls `end`."""

    def __init__(self, learn, every: int, device: torch.device):
        learn.hold_signals = True
        learn.stop_requested = False  # a signal that came before the group existed is voted on like any other
        self.every, self._v, self._n_train = every, torch.zeros(1, dtype=torch.int32, device=device), None

    def before_epoch(self, learn) -> None:
        if learn.training: self._n_train = len(learn.dl) if hasattr(learn.dl, '__len__') else None

    def after_batch(self, learn) -> None:
        if not learn.training: return
        i = learn.iter + 1
        if i % self.every == 0 or i == self._n_train: self.vote(learn)

    def after_epoch(self, learn) -> None:
        if not learn.training: self.vote(learn)

    def end(self, learn) -> None:
        learn.hold_signals = False  # fit's handler turns a signal into a stop itself again

    def vote(self, learn) -> None:
        """Stop every process at this batch if a signal reached any (a collective: every process calls it here)."""
        v = self._v
        v.fill_(int(learn.stop_signal or 0))
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        if sig := int(v.item()):  # on a GPU, a wait for the device once per `every` batches
            learn.stop_signal, learn.stop_requested = signal.Signals(sig), True


class Shards:
    """This process's share of each loader for a fit: `start(learn)` (at fit start, under a process group: a collective)
    puts a copy of `learn.dls` in its place whose train and valid loaders are cut by `ultraloop.data.shard` (train
    shards even: equal batch counts on every rank; validation shards even only with `even_valid`), so the loop, and the
    state a checkpoint holds, see the loaders the fit iterates; `end(learn)` puts the user's back. Before each train
    phase every rank takes rank 0's shuffle state (a TensorLoader's generator) and a DistributedSampler its epoch, so
    all draw the same permutation. A loader that cannot be cut fails when its phase starts, not in a phase unused."""

    def __init__(self, even_valid: bool = False): self.even_valid, self._dls, self._errors = even_valid, None, {}

    def start(self, learn) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        seed = _from_rank0(int(torch.initial_seed() % 2**63))  # DistributedSampler's seed: one for all ranks
        self._dls, dls = learn.dls, copy.copy(learn.dls)
        for nm, even in (('train', True), ('valid', self.even_valid)):
            dl = getattr(dls, nm, None)
            try: setattr(dls, nm, shard(dl, rank, world, even=even, seed=seed))
            except TypeError as e: self._errors[id(dl)] = e
        learn.dls = dls

    def before_epoch(self, learn) -> None:
        dl = learn.dl
        if id(dl) in self._errors: raise self._errors[id(dl)]
        if not learn.training: return
        if isinstance(dl, TensorLoader) and dl.shuffle: dl.generator.set_state(_from_rank0(dl.generator.get_state()))
        s = getattr(dl, 'sampler', None)
        if callable(getattr(s, 'set_epoch', None)): s.set_epoch(learn.epoch)

    def end(self, learn) -> None:
        if self._dls is not None: learn.dls, self._dls = self._dls, None
        self._errors = {}


def _from_rank0(obj):
    """Rank 0's `obj`, on every rank (a collective: every rank must call it)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _reshard(m: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule
    for mod in m.modules():
        if isinstance(mod, FSDPModule): mod.reshard()


def _destroy() -> None:
    if dist.is_initialized(): dist.destroy_process_group()
