"""Everything a run holds (model, optimiser, callbacks' states, loaders, RNGs, where the loop is) captured and put back
in one place, and the checkpoint files that carry it: written atomically, read without unpickling any object."""
from __future__ import annotations

import copy
import glob
import os
import pickle
import random
import re
import shutil
import sys
import time
import uuid
import warnings
import zipfile
import zlib
from pathlib import Path

import torch

from .utils import inner_optimizer, map_tensors, several_processes

__all__ = ['learner_state', 'load_learner_state', 'load_weights', 'rng_state', 'set_rng_state', 'save_file', 'load_file',
           'checkpoint_name', 'newest_checkpoint', 'checkpoints', 'run_id', 'cpu_copy', 'Snapshot']

FORMAT = 'ultraloop.state'  # every state dict says what it is, so a stray file is refused by name
VERSION = 1
_CHECKPOINT = re.compile(r'checkpoint-(\d+)(?:-[\w-]*)?\.pt')  # what CheckpointCB writes; temporary files start with '.'


# ---- random number generators ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    """The state of every RNG a run draws from: Python's, numpy's global one (if numpy is imported), torch's CPU one,
    every CUDA device's (once CUDA is initialised: before that nothing has drawn from them) and MPS's."""
    s = {'python': random.getstate(), 'torch': torch.get_rng_state()}
    np = sys.modules.get('numpy')
    if np is not None:
        _, key, pos, has_gauss, gauss = np.random.get_state()
        s['numpy'] = {'key': torch.from_numpy(key.astype('int64')), 'pos': int(pos), 'has_gauss': int(has_gauss),
                      'gauss': float(gauss)}  # tensors and numbers, so the file loads with weights_only
    if torch.cuda.is_available() and torch.cuda.is_initialized(): s['cuda'] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available(): s['mps'] = torch.mps.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    """Put back the RNG states `rng_state()` returned."""
    random.setstate(_as_tuples(s['python']))
    torch.set_rng_state(s['torch'])
    if 'numpy' in s:
        import numpy as np
        n = s['numpy']
        np.random.set_state(('MT19937', n['key'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    if 'cuda' in s and torch.cuda.is_available():
        for i, st in enumerate(s['cuda'][:torch.cuda.device_count()]): torch.cuda.set_rng_state(st, i)
    if 'mps' in s and torch.backends.mps.is_available(): torch.mps.set_rng_state(s['mps'])


def _as_tuples(x):
    """random.setstate wants the tuples getstate gave; a saved state comes back from a file with lists in places."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---- loaders --------------------------------------------------------------------------------------------------------
def _stateful(o) -> bool:
    return callable(getattr(o, 'state_dict', None)) and callable(getattr(o, 'load_state_dict', None))


def _generators(dl) -> list[torch.Generator]:
    """The torch generators a loader draws its order from (a DataLoader's and its samplers'), each once."""
    sampler = getattr(dl, 'sampler', None)
    found = [getattr(dl, 'generator', None), getattr(sampler, 'generator', None),
             getattr(getattr(getattr(dl, 'batch_sampler', None), 'sampler', None), 'generator', None)]
    return list({id(g): g for g in found if isinstance(g, torch.Generator)}.values())


def loader_state(dl) -> dict | None:
    """What a loader needs to go on as it would have: its own `state_dict()` (TensorLoader, torchdata's
    StatefulDataLoader), else the states of the generators it draws its order from (a torch DataLoader)."""
    if dl is None: return None
    if _stateful(dl): return {'state': _unobserved_state(dl)}
    s = {'generators': [g.get_state() for g in _generators(dl)]}
    if _persistent(dl): s['iterated'] = _iterated(dl)
    return s


def _finished_iterator(dl) -> None:
    """A StatefulDataLoader loaded from the state of an epoch it had finished gets that finished iterator back now,
    the RNGs left as they were, as the run held it. Else its next iteration would make it from the state (drawing a
    base seed), see it finished and make another (drawing again): one draw more than the run made."""
    g = getattr(dl, 'generator', None)  # the base seed's (the sampler's is the loaded state's)
    rng, gen = torch.get_rng_state(), g.get_state() if isinstance(g, torch.Generator) else None
    try: dl._iterator = dl._get_iterator()
    finally:
        torch.set_rng_state(rng)
        if gen is not None: g.set_state(gen)


def _unobserved_state(dl) -> dict:
    """`dl.state_dict()`, leaving the loader and the RNGs as they were. torchdata's StatefulDataLoader makes an iterator
    to say where a loader not yet iterated is (drawing its workers' base seed from torch's RNG), and its next iteration
    takes that iterator without drawing: a checkpoint would change the run it saves (the dropout after a valid loader's
    first state, say), which a resumed run could not repeat."""
    if getattr(dl, '_iterator', False) is not None: return dl.state_dict()
    rng, gens = torch.get_rng_state(), [(g, g.get_state()) for g in _generators(dl)]
    try: return dl.state_dict()
    finally:
        torch.set_rng_state(rng)
        for g, st in gens: g.set_state(st)
        dl.load_state_dict({})  # its way to forget that iterator: the next iteration makes one, as it would have


def load_loader_state(dl, s: dict | None) -> None:
    if s is None or dl is None: return
    if 'state' in s:
        dl.load_state_dict(s['state'])
        if isinstance(s['state'], dict) and s['state'].get('_iterator_finished') and hasattr(dl, '_get_iterator'):
            _finished_iterator(dl)
        return
    for g, st in zip(_generators(dl), s['generators']): g.set_state(st)
    if _persistent(dl) and s.get('iterated') and dl._iterator is None: dl._ultraloop_iterated = True


# A DataLoader with persistent workers draws its workers' base seed from its generator (else torch's global RNG) only
# when it makes its iterator, at its first iteration in the process; later epochs draw only the sampler's seed. A run
# resumed in a new process makes that iterator again, later: its draw must not move the RNGs the sampler and the model
# draw from, or every later epoch's order and dropout differ. So the loader's state says whether the run had iterated
# it, and the first phase iterating it again replays the RNGs over that draw (see phase_start). The workers' own RNGs
# (a dataset drawing random numbers in __getitem__) live in the worker processes and are not restored.
def _persistent(dl) -> bool:
    return bool(getattr(dl, 'persistent_workers', False)) and getattr(dl, 'num_workers', 0) > 0 and hasattr(dl, '_iterator')


def _iterated(dl) -> bool:
    return dl._iterator is not None or dl.__dict__.get('_ultraloop_iterated', False)


def phase_start(dl) -> dict | None:
    """Taken just before a phase iterates `dl`: the RNG states its iterator draws the epoch's order from. A torch
    DataLoader draws a base seed from its generator (else torch's global RNG) when iterated, then its RandomSampler a
    seed; replaying these states redraws that order after a resume. None for a loader that says where it is itself."""
    if dl is None or _stateful(dl): return None
    # a DataLoader with persistent workers draws its base seed only when it makes its iterator, its first epoch
    new_iter = not (_persistent(dl) and _iterated(dl))
    start = {'torch': torch.get_rng_state(), 'generators': [g.get_state() for g in _generators(dl)], 'new_iter': new_iter}
    if _persistent(dl) and dl.__dict__.pop('_ultraloop_iterated', False) and dl._iterator is None:
        _position_dataloader(dl, 0, start, None)  # a resumed run makes the iterator again: replay the RNGs over its draw
    return start


class _SkipBatches:
    """Stands in for a DataLoader's batch sampler (or sampler) for one iteration: the sampler's RNG draws are replayed
    from the epoch's start and its first `k` index lists are skipped, so no skipped sample is loaded; then the RNGs are
    put back as they were at the checkpoint. Later iterations are the sampler's own."""

    def __init__(self, dl, attr: str, k: int, start: dict, now: torch.Tensor | None):
        self.dl, self.attr, self.inner, self.k, self.start, self.now = dl, attr, getattr(dl, attr), k, start, now

    def __len__(self) -> int: return len(self.inner)

    def __getattr__(self, name: str):
        if name == 'inner': raise AttributeError(name)
        return getattr(self.inner, name)

    def __iter__(self):
        object.__setattr__(self.dl, self.attr, self.inner)  # DataLoader refuses to set it; only this iteration skips
        return iter(self.inner) if self.k is None else self._skip()

    def _skip(self):
        # runs when the iterator first asks for indices (a worker iterator makes and drops one sampler iterator before
        # the one it uses): after it drew its base seed, before the sampler draws
        k, self.k = self.k, None
        if k is None: yield from self.inner; return
        torch.set_rng_state(self.start['torch'])
        gens = _generators(self.dl)
        for g, st in zip(gens, self.start['generators']): g.set_state(st)
        if self.start['new_iter']: torch.empty((), dtype=torch.int64).random_(generator=self.dl.generator)
        it = iter(self.inner)
        for _ in range(k): next(it, None)
        if self.now is not None: torch.set_rng_state(self.now)  # (None: the phase starts here, the RNGs go on)
        yield from it


def _position_dataloader(dl, k: int, start: dict, now: torch.Tensor | None) -> None:
    attr = 'batch_sampler' if dl.batch_sampler is not None else 'sampler'
    object.__setattr__(dl, attr, _SkipBatches(dl, attr, k, start, now))


# ---- the learner's state --------------------------------------------------------------------------------------------
def _stateful_cbs(learn) -> list:
    return [cb for cb in learn.cbs if _stateful(cb)]


def _phase_loader(learn, phase: str):
    return getattr(getattr(learn, 'dls', None), 'train' if phase == 'train' else 'valid', None)


def epoch_ends(learn) -> bool:
    """True in the phase that ends an epoch: the valid phase, or the train phase of a fit without valid phases."""
    return not learn.model.training or not learn._fit_phases[1]


def position(learn) -> dict:
    """Where a run resumed from a state captured now goes on. Inside a phase (at a batch's end): its next batch. Between
    phases: the next phase, batch 0, so a state captured at an epoch's end is at (epoch + 1, 'train', 0). Outside a fit,
    after `load_state_dict`: the loaded state's."""
    loaded = getattr(learn, '_loaded_position', None)
    if loaded is not None: return loaded
    if getattr(learn, '_in_phase', False):
        return {'epoch': learn.epoch, 'phase': 'train' if learn.model.training else 'valid', 'batch': learn.iter + 1,
                'in_phase': True, 'phase_start': learn._phase_rng}
    last = getattr(learn, '_last_phase', None)
    if last is None: epoch, phase = 0, 'train'
    else:
        epoch, trained = last
        epoch, phase = (epoch, 'valid') if trained and learn._fit_phases[1] else (epoch + 1, 'train')
    return {'epoch': epoch, 'phase': phase, 'batch': 0, 'in_phase': False, 'phase_start': None}


def learner_state(learn) -> dict:
    """Everything a run needs to go on exactly as it would have: weights and buffers, gradients (MomentumLearner and an
    open accumulation window keep them), the optimiser, each callback's `state_dict()` (in `learn.cbs` order, with its
    class), the loaders, the RNGs and where the loop is. Its tensors are the live ones, as in torch's own state dicts:
    save it or copy it before training on.

    Under several processes it is a collective (every process calls it, at the same point): what each process holds
    its own of (gradients, callbacks' states such as a phase's partial metric sums, loaders, RNGs) is gathered to the
    main process, which gets it under `ranks` (one entry per rank; the top-level entries are its own); an FSDP model's
    weights and optimiser are gathered whole to the main process, keyed as a plain model's, so the state loads in any
    number of processes."""
    model, opt, fsdp = _own(learn.model), learn.opt, _fsdp(learn.model)
    weights, opt_state = _fsdp_full_state(model, opt) if fsdp else (model.state_dict(), _opt_state(opt))
    sd = {
        'format': FORMAT, 'version': VERSION, 'position': position(learn),
        'model': weights,
        # FSDP keeps a window's accumulated gradients inside its own state, not in .grad: none are saved
        'grads': {} if fsdp else {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        'opt': opt_state,
        'callbacks': [[type(cb).__name__, cb.state_dict()] for cb in _stateful_cbs(learn)],
        'loaders': {nm: loader_state(_phase_loader(learn, nm)) for nm in ('train', 'valid')},
        'rng': rng_state(),
        'run': run_id(learn),
        'settings': settings(learn),
        'processes': processes(learn),
    }
    procs = _processes()
    if procs is not None:
        mine = cpu_copy({**{k: sd[k] for k in _PER_RANK}, 'phase_start': sd['position']['phase_start']})
        got = [None] * procs[1] if procs[0] == 0 else None
        import torch.distributed as dist
        dist.gather_object(mine, got, dst=0)
        if got is not None: sd['ranks'] = got
    return sd


def _opt_state(opt): return opt.state_dict() if opt is not None else None


# ---- several processes ----------------------------------------------------------------------------------------------
_PER_RANK = ('grads', 'callbacks', 'loaders', 'rng')  # what each process holds its own of (and where its phase began)


def _processes() -> tuple[int, int] | None:
    """(rank, world size) in a process group of more than one process, else None."""
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if several_processes() else None


def _batch_size(dl) -> int | None:
    bs = getattr(dl, 'bs', None) if getattr(dl, 'bs', None) is not None else getattr(dl, 'batch_size', None)
    return bs if isinstance(bs, int) else None


def _sampler(dl) -> str | None:
    """How a shuffled train loader draws its order: 'distributed' (a DistributedSampler: from its seed and the epoch,
    whatever the number of processes), 'own' (a torch DataLoader's RandomSampler, drawn its own way), else None (in
    order, or a loader whose order does not depend on the number of processes: a TensorLoader and its shards)."""
    from torch.utils.data import DataLoader, RandomSampler
    from torch.utils.data.distributed import DistributedSampler
    if not isinstance(dl, DataLoader): return None
    if isinstance(dl.sampler, DistributedSampler): return 'distributed' if dl.sampler.shuffle else None
    return 'own' if isinstance(dl.sampler, RandomSampler) else None


def processes(learn) -> dict:
    """How many processes took the state, with what train batch size each and how the train loader drew its order:
    what a resume with another number of processes checks (`check_processes`)."""
    dl = _phase_loader(learn, 'train')
    procs = _processes()
    return {'world_size': 1 if procs is None else procs[1], 'bs': _batch_size(dl), 'sampler': _sampler(dl)}


def check_processes(learn, sd: dict, what: str) -> None:
    """A state taken by N processes resumed by M: the global batch (N times the per-process bs) must be kept, so that M
    processes take the same batches of the same order (each its share of global batch k, as DistributedSampler cuts
    it); and the state must be taken between phases (an epoch's end), since the phase's partial sums and positions
    each process held do not split into another number of shares. Each a one-line error, before any work."""
    saved = sd.get('processes')
    n, m = (saved or {}).get('world_size', 1), learn.world_size
    if saved is None or n == m: return
    pos = sd['position']
    if pos['in_phase']:
        raise ValueError(f'{what} was taken inside a phase (epoch {pos["epoch"]}, {pos["phase"]} batch {pos["batch"]}) '
                         f'by {_procs(n)}, and {m} would resume it: resume it with {_procs(n)}, or from a checkpoint '
                         f"taken at an epoch's end (CheckpointCB writes one at every epoch's end)")
    dl = _phase_loader(learn, 'train')
    old, new = saved['bs'], _batch_size(dl)
    if old is not None and new is not None and old * n != new * m:
        fix = (f'give each process bs={old * n // m}' if old * n % m == 0 else
               f'{old * n} does not divide by {m} processes: resume with a number of processes that divides it')
        raise ValueError(f'{what} was saved by {_procs(n)} of bs {old} (a global batch of {old * n}); {_procs(m)} of bs '
                         f'{new} make{"s" if m == 1 else ""} a global batch of {new * m}: to go on with the same batches, {fix}')
    # a shuffled torch DataLoader draws its order one way when DistributedCB cuts it (a DistributedSampler, also in a
    # torchrun group of one) and another in a plain process (its RandomSampler): the run goes on, in another order
    import torch.distributed as dist
    kind = _sampler(dl)
    if kind == 'own' and (m > 1 or 'RANK' in os.environ or (dist.is_available() and dist.is_initialized())):
        kind = 'distributed'
    if saved.get('sampler') != kind and 'own' in (saved.get('sampler'), kind):
        import warnings
        warnings.warn(f'{what} was saved by {_procs(n)} whose shuffled train DataLoader drew its order '
                      f'{_DRAWN[saved.get("sampler")]}; here it draws it {_DRAWN[kind]}, so the batches after the resume '
                      f'differ from the run\'s: run both under torchrun (--nproc-per-node 1 for one process), or use a '
                      f'TensorLoader (DataLoaders.from_tensors), whose order is the same in any number of processes',
                      stacklevel=3)


def _procs(n: int) -> str: return f'{n} process' if n == 1 else f'{n} processes'


_DRAWN = {'distributed': "by DistributedSampler (DistributedCB's cut)", 'own': 'by its own RandomSampler (no cut)',
          None: 'in no shuffled way'}


def own_parts(sd: dict, rank: int, world_size: int) -> dict:
    """`sd` with process `rank`'s own parts (its entry of `ranks`) in place of the main process's; a state saved by
    another number of processes (or by one) keeps the main process's for every process: `check_processes` lets it
    resume only from between phases, where the processes' parts agree (the metric history; the loaders' shuffle
    state, which each takes from rank 0) but for the RNGs a model draws from (dropout goes on from rank 0's)."""
    ranks = sd.get('ranks')
    if ranks is None or world_size == 1 or len(ranks) != world_size: return sd
    mine = ranks[rank]
    return {**sd, **{k: mine[k] for k in _PER_RANK}, 'position': {**sd['position'], 'phase_start': mine['phase_start']}}


def _own(model):
    """The user's module inside a DDP wrapper (`learn.model` under AccelerateCB in several processes), whose names a
    state holds, so it loads into the model wrapped or not and into any number of processes."""
    ddp = sys.modules.get('torch.nn.parallel.distributed')
    return model.module if ddp is not None and isinstance(model, ddp.DistributedDataParallel) else model


def _opt_name(opt) -> str:
    """The optimiser's class name, the one inside accelerate's AcceleratedOptimizer wrapper where it is wrapped (a run
    resumes with or without the wrapper)."""
    return type(inner_optimizer(opt)).__name__


def _fsdp(model) -> bool:
    fsdp = sys.modules.get('torch.distributed.fsdp')  # imported by whoever sharded the model
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def _fsdp_full_state(model, opt) -> tuple[dict, dict | None]:
    """An FSDP model's weights and its optimiser's state, gathered whole onto the main process's CPU (a collective; the
    other processes get empty dicts), the optimiser's keyed by parameter number as a plain model's is."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if opt is None: return weights, None
    by_name = get_optimizer_state_dict(model, opt, options=options)
    if not by_name: return weights, {}
    ids = {nm: i for i, nm in enumerate(nm for g in by_name['param_groups'] for nm in g['params'])}
    return weights, {'state': {ids[nm]: v for nm, v in by_name['state'].items()},
                     'param_groups': [{**g, 'params': [ids[nm] for nm in g['params']]} for g in by_name['param_groups']]}


def _load_fsdp(model, opt, weights: dict, opt_state: dict | None) -> None:
    """Load whole weights and a plain optimiser state (every process holds them) into an FSDP model and its optimiser:
    each process keeps its shard (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    if opt is None or opt_state is None: return
    name = {id(p): nm for nm, p in model.named_parameters()}
    names = [name[id(p)] for g in opt.param_groups for p in g['params']]
    by_name = {'state': {names[i]: v for i, v in opt_state['state'].items()},
               'param_groups': [{**g, 'params': [names[i] for i in g['params']]} for g in opt_state['param_groups']]}
    set_optimizer_state_dict(model, opt, by_name, options=options)


def check_state(learn, sd, what: str) -> None:
    """Refuse, naming the mismatch, a state that is not an ultraloop state or was saved with other callbacks."""
    check_format(sd, what)
    if sd.get('version', 0) > VERSION:
        raise ValueError(f'{what} was saved by a newer ultraloop (state version {sd["version"]}); upgrade ultraloop')
    saved = [nm for nm, _ in sd['callbacks']]
    here = [type(cb).__name__ for cb in _stateful_cbs(learn)]
    if saved != here:
        i = next((i for i, (a, b) in enumerate(zip(saved, here)) if a != b), min(len(saved), len(here)))
        at = lambda names: names[i] if i < len(names) else 'nothing'
        raise ValueError(f'{what} was saved with the stateful callbacks [{", ".join(saved)}], this learner has '
                         f'[{", ".join(here)}]: callback {i + 1} is {at(saved)} there and {at(here)} here; '
                         f'resume with the callbacks it was saved with, in the same order, {_NEW_RUN}')


# ---- what a resumed run must keep: recorded in each state, checked before a state changes anything -------------------
# an optimiser's hyper-parameters that a schedule changes per batch, or that choose an implementation, not the maths
_NOT_SETTINGS = frozenset({'params', 'lr', 'initial_lr', 'max_lr', 'min_lr', 'momentum', 'betas', 'foreach', 'fused',
                           'capturable', 'differentiable'})
_NEW_RUN = ('or start a new run, in a new checkpoint folder, from its weights: learn.load_state(path, weights_only=True) '
            'or ultraloop fit --init-from CHECKPOINT')


def run_id(learn) -> str:
    """The run's identity, which every state it captures carries: made with the learner's first state, taken from the
    state a run resumes from (a run resumed any number of times keeps one), never from a weights-only load."""
    rid = learn.__dict__.get('_run_id')
    if rid is None: rid = learn._run_id = uuid.uuid4().hex[:12]
    return rid


def settings(learn) -> dict:
    """What a run resumed from this state must keep, beyond the model's keys and shapes and the optimiser's
    hyper-parameters (the state holds both): the optimiser's class, the fit's lr and n_epochs, each loader's batch size
    (global: per process times processes), dataset size and length, and each stateful callback's `resume_settings()`."""
    opt, world = learn.opt, learn.world_size
    return {'opt': None if opt is None else _opt_name(opt), 'lr': learn.__dict__.get('_fit_lr'),
            'n_epochs': learn.__dict__.get('n_epochs'), 'world_size': world,
            'loaders': {nm: _loader_settings(_phase_loader(learn, nm), world) for nm in ('train', 'valid')},
            'callbacks': [_cb_settings(cb) for cb in _stateful_cbs(learn)]}


def _sized(o) -> int | None:
    try: return len(o)
    except (TypeError, NotImplementedError): return None  # an iterable without a length


def _loader_settings(dl, world: int) -> dict | None:
    if dl is None: return None
    bs = getattr(dl, 'batch_size', None) or getattr(dl, 'bs', None)  # a DataLoader's, a TensorLoader's
    if bs is None: bs = getattr(getattr(dl, 'batch_sampler', None), 'batch_size', None)
    n = getattr(dl, 'n', None) if isinstance(getattr(dl, 'n', None), int) else _sized(getattr(dl, 'dataset', None))
    # a process's share of the batches depends on the number of processes (whose change is checked by the global batch)
    return {'batch_size': bs * world if isinstance(bs, int) else None, 'samples': n,
            'batches': _sized(dl) if world == 1 else None}


def _cb_settings(cb) -> dict:
    f = getattr(cb, 'resume_settings', None)
    return dict(f()) if callable(f) else {}


def _changed(what: str, setting: str, old, new) -> ValueError:
    return ValueError(f'{what} was saved with {setting} {old}, this run has {new}: resume with {setting} {old}, {_NEW_RUN}')


def opt_to_be(learn, lr: float):
    """The optimiser a fit starting now would use (learn.opt, or a new one `_prepare_opt` would make, unused), so a
    state can be checked against it before anything is made or changed."""
    if not learn.opt_func: return learn.opt
    if learn.opt is not None and [id(p) for p in learn.model.parameters()] == learn._opt_params: return learn.opt
    return learn.opt_func(learn.model.parameters(), lr)


def validate(learn, sd, what: str, opt, lr: float | None = None) -> None:
    """Every check a state must pass before it changes anything: format and version, the stateful callbacks, the
    model's keys, shapes and dtypes, the optimiser (`opt`: the one it will load into) and its hyper-parameters, the
    loaders, the callbacks' settings and the fit's `lr`. Each mismatch is a one-line error naming the setting, its
    saved and its present value, and the fix."""
    check_state(learn, sd, what)
    check_model(learn, sd, what)
    _check_opt(sd, what, opt)
    saved = sd.get('settings')
    if saved is None: return  # saved before states recorded their settings
    here = settings(learn)
    for nm in ('train', 'valid'):
        a, b = saved['loaders'].get(nm), here['loaders'].get(nm)
        for key, label in (('batch_size', 'batch size'), ('samples', 'dataset size'), ('batches', 'length (batches)')):
            if a and b and a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
                per = saved['world_size']
                world = f' ({a[key] // per} per process)' if key == 'batch_size' and per > 1 else ''
                raise _changed(what, f'a {nm} loader {label} of', f'{a[key]}{world}', b[key])
    for (nm, _), a, cb in zip(sd['callbacks'], saved['callbacks'], _stateful_cbs(learn)):
        b = _cb_settings(cb)
        for k in [*a, *(k for k in b if k not in a)]:
            if a.get(k) != b.get(k): raise _changed(what, f"{nm}'s {k}", a.get(k), b.get(k))
    if lr is not None and saved.get('lr') is not None and saved['lr'] != lr:
        raise _changed(what, "the fit's lr", saved['lr'], lr)


def _desc(t) -> str:
    return f'{tuple(t.shape)} {str(t.dtype).replace("torch.", "")}' if isinstance(t, torch.Tensor) else type(t).__name__


def check_model(learn, sd, what: str) -> None:
    """The saved weights' names, shapes and dtypes are this model's: checked before any is loaded (torch's own
    load_state_dict copies the matching ones before it reports a size mismatch)."""
    if _fsdp(learn.model): return  # its shards are checked by set_model_state_dict, whole
    saved, here = sd['model'], _own(learn.model).state_dict()
    fix = 'build the model as the run did, or train this one as a new run'
    for k, v in saved.items():
        if k not in here: raise ValueError(f'{what} holds another model: its {k} {_desc(v)} is not in this model; {fix}')
        h = here[k]
        if isinstance(v, torch.Tensor) and isinstance(h, torch.Tensor) and (v.shape != h.shape or v.dtype != h.dtype):
            raise ValueError(f'{what} holds another model: {k} is {_desc(v)} there and {_desc(h)} here; {fix}')
    extra = next((k for k in here if k not in saved), None)
    if extra is not None: raise ValueError(f'{what} holds another model: it has no {extra} ({_desc(here[extra])} here); {fix}')


def _plain(v): return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _check_opt(sd, what: str, opt) -> None:
    saved = sd['opt']
    if saved is None: return
    if opt is None:
        raise ValueError(f'{what} holds an optimiser state but learn.opt is None: pass an opt_func to the Learner')
    name = (sd.get('settings') or {}).get('opt')
    if name is not None and name != _opt_name(opt): raise _changed(what, 'the optimiser', name, _opt_name(opt))
    groups = saved.get('param_groups', [])
    if not groups: return  # (an FSDP state of a process that holds none)
    if len(groups) != len(opt.param_groups):
        raise _changed(what, 'optimiser parameter groups:', len(groups), len(opt.param_groups))
    for i, (g, h) in enumerate(zip(groups, opt.param_groups)):
        at = f' (parameter group {i})' if len(groups) > 1 else ''
        if len(g['params']) != len(h['params']):
            raise _changed(what, f'optimised parameters{at}:', len(g['params']), len(h['params']))
        for k in opt.defaults:
            if k in _NOT_SETTINGS or k not in h: continue
            old = g.get(k, 'unset')
            if _plain(old) != _plain(h[k]): raise _changed(what, f"the optimiser's {k}{at}", old, h[k])


def load_model_and_opt(learn, sd: dict, create_opt=None) -> None:
    """Weights, gradients and optimiser, onto the model's devices."""
    model = _own(learn.model)
    if _fsdp(model):
        if sd['opt'] is not None and learn.opt is None and create_opt is not None: create_opt()
        _load_fsdp(model, learn.opt, sd['model'], sd['opt'])
        return
    model.load_state_dict(sd['model'])
    grads = sd['grads']
    for n, p in model.named_parameters():
        g = grads.get(n)
        p.grad = None if g is None else g.to(p.device, copy=True)
    if sd['opt'] is not None:
        if learn.opt is None and create_opt is not None: create_opt()
        if learn.opt is None:
            raise ValueError('the state holds an optimiser state but learn.opt is None: pass an opt_func to the Learner')
        learn.opt.load_state_dict(sd['opt'])


def _unshared(sd):
    """`sd` with the tensors an optimiser or callback would keep (torch's Optimizer.load_state_dict keeps a CPU
    tensor it is given) cloned, so training on does not change a state dict the caller holds (and may resume from
    again); the weights are copied by the model's load_state_dict anyway."""
    if not isinstance(sd, dict): return sd
    return {k: map_tensors(torch.clone, v) if k in ('opt', 'callbacks', 'ranks') else v for k, v in sd.items()}


def load_weights(learn, sd: dict, what: str = 'the state') -> None:
    """Only the weights and buffers of a state, checked against the model first: a new run starts from them (a
    fine-tune with another lr, optimiser or data), with this learner's optimiser, callbacks, RNGs and run identity."""
    check_format(sd, what)
    check_model(learn, sd, what)
    if _fsdp(learn.model): _load_fsdp(learn.model, None, sd['model'], None)
    else: _own(learn.model).load_state_dict(sd['model'])


def load_callbacks(learn, sd: dict) -> None:
    for cb, (_, state) in zip(_stateful_cbs(learn), sd['callbacks']): cb.load_state_dict(state)


def load_loaders(learn, sd: dict) -> None:
    for nm in ('train', 'valid'): load_loader_state(_phase_loader(learn, nm), sd['loaders'].get(nm))


def load_learner_state(learn, sd: dict, what: str = 'the state', create_opt=None, unshare: bool = False) -> None:
    """Put back what `learner_state` captured, outside a fit: weights, gradients, optimiser, callbacks, loaders, RNGs.
    Where the loop was is used only by `fit(resume=...)`. Each process takes its own parts (see `learner_state`).
    Everything is checked (`validate`) before anything is changed; the callbacks load first, so one refusing its state
    (a schedule's, which loads only into a fit) leaves the weights, optimiser, loaders and RNGs as they were."""
    opt = learn.opt if learn.opt is not None or create_opt is None else opt_to_be(learn, learn.lr)
    validate(learn, sd, what, opt)
    sd = own_parts(_unshared(sd) if unshare else sd, learn.rank, learn.world_size)  # a dict the caller keeps
    load_callbacks(learn, sd)
    load_model_and_opt(learn, sd, create_opt)
    load_loaders(learn, sd)
    set_rng_state(sd['rng'])
    learn._run_id = sd.get('run') or run_id(learn)  # the learner goes on as the state's run, with its fit's settings
    if sd.get('settings'): learn._fit_lr, learn.n_epochs = sd['settings']['lr'], sd['settings']['n_epochs']
    learn._loaded_position = sd['position']  # until the next fit, state_dict() says where the loaded run was


def resume(learn, source, n_epochs: int, lr: float | None = None) -> Resume | None:
    """What `fit(resume=source)` goes on from: a `Resume`, or None for a fresh start (`'auto'` finding no checkpoint).
    `'auto'` means the folder of the learner's checkpoint writer (a callback with a `resume_dir`: CheckpointCB)."""
    if isinstance(source, str) and source == 'auto':
        dirs = list(dict.fromkeys(d for cb in learn.cbs if (d := getattr(cb, 'resume_dir', None)) is not None))
        if not dirs:
            raise ValueError("resume='auto' goes on from the folder of the learner's CheckpointCB, and it has none: add "
                             "CheckpointCB(dir) to its callbacks (or to fit's cbs), or pass resume=DIR")
        if len(dirs) > 1:
            raise ValueError(f"resume='auto': the learner writes checkpoints to {len(dirs)} folders "
                             f"({', '.join(map(str, dirs))}); pass resume=DIR, the one to go on from")
        if not Path(dirs[0]).is_dir() or newest_checkpoint(dirs[0]) is None: return None  # nothing yet: a fresh start
        source = dirs[0]
    return Resume(learn, source, n_epochs, lr)


class Resume:
    """A fit picking a run up where a state left it. `start` (after before_fit and the optimiser are made) loads the
    weights, optimiser and loaders, and for a state captured between phases the callbacks and RNGs; a state captured
    inside a phase has its callbacks loaded after that phase's before_epoch (which resets what they hold for the
    phase), and the loader positioned at its next batch with the RNGs as they were then (`enter_phase`)."""

    def __init__(self, learn, source, n_epochs: int, lr: float | None = None):
        if not isinstance(source, (str, os.PathLike, dict)):
            raise TypeError(f'resume must be a checkpoint file, a folder of checkpoints or a learn.state_dict(), got '
                            f'{type(source).__name__} {source!r}: e.g. resume=\'checkpoints\'')
        self.what = 'the state passed as resume' if isinstance(source, dict) else None
        if isinstance(source, dict): sd = _unshared(source)
        else:
            path = Path(source)
            if path.is_dir(): path, sd = resume_from_folder(learn, path)
            else: sd = load_file(path)
            self.what = str(path)
        check_format(sd, self.what)
        check_processes(learn, sd, self.what)  # another number of processes: its own message first
        # everything before anything is made or changed: the optimiser checked is the one the fit will use
        validate(learn, sd, self.what, opt_to_be(learn, learn.lr if lr is None else lr), lr)
        pos = sd['position']
        if pos['epoch'] > n_epochs or (pos['epoch'] == n_epochs and pos['in_phase']):
            raise ValueError(f'{self.what} is at epoch {pos["epoch"]} ({pos["phase"]} batch {pos["batch"]}), past a fit '
                             f'of n_epochs={n_epochs}: resume with at least n_epochs={pos["epoch"] + 1}')
        self.sd, self.pos, self.pending = sd, pos, pos['in_phase']
        self.finished = pos['epoch'] >= n_epochs  # at the end of the last epoch: nothing left to train

    def start(self, learn) -> tuple[int, str]:
        # this process's own parts: known now, after before_fit (DistributedCB) made the process group
        self.sd = sd = own_parts(self.sd, learn.rank, learn.world_size)
        self.pos = sd['position']
        learn._run_id = sd.get('run') or run_id(learn)  # the run goes on under its identity
        load_model_and_opt(learn, sd)
        load_loaders(learn, sd)
        if not self.pending:
            load_callbacks(learn, sd)
            set_rng_state(sd['rng'])
        return self.pos['epoch'], self.pos['phase']

    def enter_phase(self, learn, dl, batches) -> tuple[int, object]:
        """Where the phase about to iterate `dl` (the phase's loader; `batches` what the loop iterates, maybe a wrapper
        of it) starts, and what to iterate. Records the RNG states a later checkpoint in this phase needs."""
        if not self.pending:
            learn._phase_rng = phase_start(dl)
            return 0, batches
        self.pending = False
        load_callbacks(learn, self.sd)
        k, start, rng = self.pos['batch'], self.pos['phase_start'], self.sd['rng']
        learn._phase_rng = start
        set_rng_state(rng)
        if start is None:  # the loader went back to its batch k itself (load_state_dict)
            it = iter(batches)  # a StatefulDataLoader draws a base seed here, which the run did at the epoch's start
            torch.set_rng_state(rng['torch'])
            return k, it
        from torch.utils.data import DataLoader
        # iterating draws from these as it did at the epoch's start (a DataLoader's base seed, for its workers)
        torch.set_rng_state(start['torch'])
        for g, st in zip(_generators(dl), start['generators']): g.set_state(st)
        if isinstance(dl, DataLoader):
            _position_dataloader(dl, k, start, rng['torch'])
            return k, batches
        # any other iterable: skip k batches by loading them
        it = iter(batches)
        for _ in range(k): next(it, None)
        torch.set_rng_state(rng['torch'])
        return k, it


# ---- files ----------------------------------------------------------------------------------------------------------
def save_file(obj, path: str | os.PathLike) -> Path:
    """torch.save `obj` to `path` atomically: into a temporary file in the same folder, flushed and fsynced, renamed
    over `path` (os.replace), then the folder fsynced. A crash at any moment leaves the old file, or the new one,
    whole; the temporary file (`.<name>.<pid>.tmp`) is never taken for a checkpoint, and one a crashed write left is
    removed by the next write of the same name. A failed write (a full disk, an I/O error, a read-only folder) removes
    its temporary file and raises a one-line OSError naming the file, the reason and the space left."""
    path = Path(path)
    obj = with_checksum(obj)
    remove_stale_tmp(path.parent, glob.escape(path.name))
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if (cause := _os_error(e)) is None: raise
        raise write_error(path, cause) from None
    _fsync_dir(path.parent)
    return path


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: `e` itself, or the one torch's writer met (it raises a RuntimeError
    'unexpected pos' with the OSError as its context)."""
    while e is not None:
        if isinstance(e, OSError): return e
        e = e.__context__
    return None


def write_error(path: Path, e: OSError) -> OSError:
    """A one-line OSError for a file that could not be written: the reason and how much space its folder has left."""
    try: free = f'{_size(shutil.disk_usage(path.parent).free)} free there'
    except OSError: free = 'free space unknown'
    return OSError(e.errno, f'cannot write {path.name} in {path.parent} ({e.strerror or e}; {free})')


def _size(n: int) -> str:
    for unit in ('bytes', 'KB', 'MB', 'GB'):
        if n < 1000 or unit == 'GB': return f'{n} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
        n /= 1000
    return f'{n:.1f} TB'


_STALE_AFTER = 3600  # s: a temporary file untouched this long is stale whatever wrote it (another machine's process)


def remove_stale_tmp(folder: Path, pattern: str) -> None:
    """Remove the temporary files `save_file` left in `folder` for files named as `pattern` (a glob) when a crash
    ended their write: those whose process is no longer alive on this machine, or untouched for an hour. A write in
    progress (this process's, another live one's) keeps its file."""
    if not folder.is_dir(): return
    for tmp in folder.glob(f'.{pattern}.*.tmp'):
        pid = tmp.name.rsplit('.', 2)[-2]
        try: stale = (pid.isdigit() and not _alive(int(pid))) or time.time() - tmp.stat().st_mtime > _STALE_AFTER
        except OSError: continue  # gone meanwhile
        if stale: tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == 'nt': return True  # Windows' os.kill(pid, 0) would send a ctrl-C: age decides
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    except OSError: return True  # it exists, owned by another user
    return True


def _fsync_dir(d: Path) -> None:
    try: fd = os.open(d, os.O_RDONLY)
    except OSError: return  # a system that cannot open folders (Windows) makes the rename durable itself
    try: os.fsync(fd)
    except OSError: pass
    finally: os.close(fd)


def load_file(path: str | os.PathLike) -> dict:
    """A state saved by `save_file`, read with `torch.load(weights_only=True)`: tensors and plain containers only, so a
    file holding any other pickled object is refused before any of its code can run. One-line errors for a missing,
    truncated or corrupt file."""
    path = Path(path)
    if not path.is_file(): raise FileNotFoundError(f'{path}: no such checkpoint file')
    try: sd = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'global' in str(e).lower():
            raise ValueError(f'{path} holds pickled Python objects, not just tensors and plain values; it was not loaded, '
                             f'since unpickling them could run code (ultraloop checkpoints hold none)') from None
        raise ValueError(f'{path} is truncated or corrupt ({_first_line(e)}): not a complete checkpoint') from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:  # torch says OSError for a cut zip
        raise ValueError(f'{path} is truncated or corrupt ({_first_line(e)}): not a complete checkpoint') from None
    check_format(sd, str(path))
    check_checksum(sd, path)
    return sd


# ---- checksums: a state's tensors, summed when it is saved, checked when it is loaded -------------------------------
def _tensors(x):
    """Every tensor of a nested state, in a fixed order (a dict's own: the file keeps it)."""
    if isinstance(x, torch.Tensor): yield x
    elif isinstance(x, dict):
        for v in x.values(): yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x: yield from _tensors(v)


def checksum(sd: dict) -> int:
    """CRC-32 of the bytes of every tensor in `sd` (all but its 'checksum'): one pass over them, a fraction of what
    serialising and writing them costs."""
    crc = 0
    for t in _tensors({k: v for k, v in sd.items() if k != 'checksum'}):
        if t.layout != torch.strided or t.is_quantized: continue
        b = t.detach().reshape(-1)
        if b.device.type != 'cpu': b = b.cpu()
        crc = zlib.crc32(b.contiguous().view(torch.uint8).numpy(), crc)  # a view: no copy of a contiguous tensor
    return crc


def with_checksum(obj):
    """A learner state with its tensors' checksum under 'checksum' (a shallow copy: the caller's dict stays as it was);
    anything else as it is."""
    if not (isinstance(obj, dict) and obj.get('format') == FORMAT): return obj
    return {**obj, 'checksum': checksum(obj)}


def check_checksum(sd: dict, path) -> None:
    want = sd.get('checksum')
    if want is None: return  # saved before states carried one
    if checksum(sd) != want:
        raise ValueError(f'{path} is corrupt: its tensors do not match the checksum saved with them (a changed byte); '
                         f'resume from an earlier checkpoint')


def check_format(sd, what: str) -> None:
    if not isinstance(sd, dict) or sd.get('format') != FORMAT:
        raise ValueError(f'{what} is not an ultraloop learner state; save one with learn.save_state(path) or CheckpointCB')


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def checkpoint_name(seq: int, pos: dict) -> str:
    """`checkpoint-<seq>-epoch<e>-<phase><batch>.pt`: `seq` counts a run's checkpoints, so the newest is the highest."""
    return f'checkpoint-{seq:06d}-epoch{pos["epoch"]}-{pos["phase"]}{pos["batch"]}.pt'


def checkpoint_seq(path: Path) -> int | None:
    m = _CHECKPOINT.fullmatch(path.name)
    return int(m.group(1)) if m else None


def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint files in `folder`, newest (highest sequence number) first."""
    found = [(seq, p) for p in Path(folder).iterdir() if (seq := checkpoint_seq(p)) is not None and p.is_file()]
    return [p for _, p in sorted(found, reverse=True)]


def newest_checkpoint(folder: str | os.PathLike, run: str | None = None) -> Path | None:
    """The checkpoint in `folder` with the highest sequence number (complete by construction: temporary files have
    other names), or None; with `run`, the newest of that run's (see `run_id`)."""
    found = checkpoints(folder)
    if run is not None: found = [p for p in found if _peek_run(p) == run]
    return found[0] if found else None


def _peek_run(path: Path) -> str | None:
    """The run identity a checkpoint carries, read without reading its tensors (memory-mapped); None when the file
    cannot be read or carries none."""
    try: sd = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception: return None  # a corrupt file: load_file says why when it is tried
    return sd.get('run') if isinstance(sd, dict) else None


def resume_from_folder(learn, folder: Path) -> tuple[Path, dict]:
    """The checkpoint of `folder` a run goes on from, and its state: the newest that loads and checks (a warning names
    those skipped and why) of the learner's own run when the folder holds it (a fit resumed in the same process), else
    of the one run the folder holds. A folder holding several runs' checkpoints (two runs sharing it, or a re-used
    one) is refused: its newest file may be another run's; a file given as `resume` is always taken."""
    files = checkpoints(folder)
    if not files: raise ValueError(f'resume={str(folder)!r}: the folder holds no checkpoint (checkpoint-*.pt)')
    runs = {p: _peek_run(p) for p in files}
    newest = {}
    for p in files:
        if runs[p] is not None: newest.setdefault(runs[p], p)
    want = learn.__dict__.get('_run_id')
    if want not in newest:
        if len(newest) > 1:
            listed = ', '.join(f'run {r} (newest {p.name})' for r, p in newest.items())
            raise ValueError(f'resume={str(folder)!r}: the folder holds the checkpoints of {len(newest)} runs, {listed}, '
                             f'so its newest may be another run\'s: pass the file to go on from, e.g. '
                             f'resume={str(next(iter(newest.values())))!r}, and give each run its own folder')
        want = next(iter(newest), None)
    skipped = []
    for p in files:
        if runs[p] is not None and runs[p] != want: continue
        try: sd = load_file(p)
        except ValueError as e:
            skipped.append(f'{p.name}: {str(e).removeprefix(str(p)).strip(" :")}')
            continue
        if sd.get('run') not in (None, want): continue
        if skipped: warnings.warn(f'resume={str(folder)!r}: skipped {"; ".join(skipped)}; resuming from {p.name}', stacklevel=4)
        return p, sd
    raise ValueError(f'resume={str(folder)!r}: no checkpoint of the folder loads and checks ({"; ".join(skipped)})')


# ---- in-process snapshots (lr_find, summary) ------------------------------------------------------------------------
def cpu_copy(x):
    """A copy with every tensor cloned to the CPU (keeps a GPU model's snapshot out of GPU memory), other values deep-copied."""
    return map_tensors(lambda t: t.detach().to('cpu', copy=True), x, copy.deepcopy)


class Snapshot:
    """A copy of what a fit or a forward pass changes, to put back bitwise afterwards: the learner's attributes and its
    callback list, every module's train/eval mode, the loaders, the RNGs, and either everything `learner_state` holds
    (weights, gradients, optimiser, callbacks' states: lr_find) or, with `weights=False`, the buffers only (a forward
    changes no weight: summary)."""

    def __init__(self, learn, weights: bool = True):
        self.learn, self.attrs, self.cbs = learn, dict(learn.__dict__), list(learn.cbs)
        model = learn.model
        self.modes = [(m, m.training) for m in model.modules()]
        if weights: self.state = cpu_copy(learner_state(learn))
        else:
            self.state = None
            self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
            self.loaders = cpu_copy({nm: loader_state(_phase_loader(learn, nm)) for nm in ('train', 'valid')})
            self.rng = rng_state()

    def restore(self) -> None:
        learn = self.learn
        learn.__dict__.clear()
        learn.__dict__.update(self.attrs)  # loop state, opt, model, dls and the callback table as they were
        learn.cbs[:] = self.cbs
        for m, mode in self.modes: m.training = mode
        if self.state is not None: return load_learner_state(learn, self.state, 'the snapshot')
        with torch.no_grad():
            for b, saved in self.buffers: b.copy_(saved)
        for nm, s in self.loaders.items(): load_loader_state(_phase_loader(learn, nm), s)
        set_rng_state(self.rng)
