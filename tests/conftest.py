"""Shared test helpers: tiny learnable data and models, made in the test, no downloads; bitwise comparison."""
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn


def cpu_child_env(*paths, **extra) -> dict:
    """The environment for a child process of a CPU test: `paths` ahead of the inherited PYTHONPATH, and no GPU in
    sight (on a machine with one, a forked child could not use CUDA once its parent had, and two ranks on one GPU
    would pick nccl)."""
    inherited = [q for q in os.environ.get('PYTHONPATH', '').split(os.pathsep) if q]
    return {**os.environ, 'PYTHONPATH': os.pathsep.join([*map(str, paths), *inherited]), 'CUDA_VISIBLE_DEVICES': '',
            **extra}


def toy_data(n_train=64, n_valid=32, n_in=8, n_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_valid, n_in, generator=g)
    y = (x @ torch.randn(n_in, n_out, generator=g)).argmax(1)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def toy_model(n_in=8, n_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, n_out))


@pytest.fixture(autouse=True)
def _one_thread():
    # small models: threads only add noise; keeps CI on 2 cores steady
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # accelerate keeps one AcceleratorState per process and refuses an Accelerator of other settings once it exists:
    # tests that share a worker process (pytest-xdist) must not see each other's
    yield
    state = sys.modules.get('accelerate.state')
    if state is not None:
        state.AcceleratorState._reset_state(True)


def assert_same(a, b, where: str = '') -> None:
    """Bitwise equality of nested tensors, dicts, lists, tuples, numpy arrays and plain values; `where` names the spot."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a: assert_same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)): assert_same(x, y, f'{where}[{i}]')
    elif isinstance(a, np.ndarray): assert np.array_equal(a, b), where
    else: assert a == b, f'{where}: {a!r} != {b!r}'
