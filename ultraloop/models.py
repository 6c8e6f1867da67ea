"""Small models for the demo, the examples and the command line: the seed's CNN, a plain MLP, a 1-D CNN for signals,
the layers that normalise images and rescale regression outputs, and `build_model`, which makes the model a
`--model` name asks for (built-in, `timm:NAME`, or `module:function`) for the data's shape."""
from __future__ import annotations

import importlib
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .utils import check_int, is_int

__all__ = ['get_model', 'mlp', 'cnn1d', 'Normalize', 'Rescale', 'build_model', 'resolve_model']


def _check_sizes(**sizes: int) -> None:
    for nm, v in sizes.items(): check_int(nm, v, 1)


def get_model(n_out: int = 10, widths: Sequence[int] = (8, 16, 32), n_in: int = 1) -> nn.Sequential:
    """The seed's CNN: unpadded 3x3 convolutions with ReLU, global average pooling, one Linear.

    With the defaults it is exactly the seed's `get_model()`. Each convolution trims 2 pixels,
    so images need more than 2 * len(widths) pixels a side: 8x8 digits end at 2x2, 28x28 FashionMNIST at 22x22.
    """
    _check_sizes(n_out=n_out, n_in=n_in)
    widths = list(widths)
    if not widths or any(not is_int(w) or w < 1 for w in widths):
        raise ValueError(f'widths must be a non-empty sequence of ints >= 1 (channels per convolution), got {widths!r}')
    layers, ni = [], n_in
    for nf in widths:
        layers += [nn.Conv2d(ni, nf, 3), nn.ReLU()]
        ni = nf
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ni, n_out))


def mlp(n_in: int = 64, n_hidden: int = 128, n_out: int = 10) -> nn.Sequential:
    """Flatten, one hidden ReLU layer, a Linear out: `mlp(64)` for 8x8 digits, `mlp(784)` for 28x28 images."""
    _check_sizes(n_in=n_in, n_hidden=n_hidden, n_out=n_out)
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))


def cnn1d(n_in: int, length: int, n_out: int = 10, width: int = 32) -> nn.Sequential:
    """A small 1-D CNN for signals of `n_in` channels and `length` steps (MNIST-1D: 1 x 40): three 3-wide convolutions,
    the last two of stride 2, then a Linear over every position (where a pattern sits matters in these signals)."""
    _check_sizes(n_in=n_in, length=length, n_out=n_out, width=width)
    out_len = (length + 3) // 4  # two convolutions of stride 2 and padding 1
    return nn.Sequential(nn.Conv1d(n_in, width, 3, padding=1), nn.ReLU(), nn.Conv1d(width, width, 3, 2, 1), nn.ReLU(),
                         nn.Conv1d(width, width, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(width * out_len, n_out))


class Normalize(nn.Module):
    """uint8 images (N, C, H, W) to floats normalised per channel: (x / 255 - mean) / std. As a model's first layer the
    images stay uint8 in memory (4x less than floats), and the statistics travel with the weights."""
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x): return (x.float() / 255 - self.mean) / self.std


class Rescale(nn.Module):
    """A regression model's last layer: outputs scaled from unit size to the target's, x * std + mean, so the network
    learns numbers near 0 and 1 while its loss and metrics are in the target's own units."""
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer('mean', torch.tensor(float(mean)))
        self.register_buffer('std', torch.tensor(float(std)))

    def forward(self, x): return x * self.std + self.mean


def _factory(spec: str):
    """The function `module:function` names, imported from the current folder or sys.path."""
    mod_name, _, fn_name = spec.partition(':')
    if os.getcwd() not in sys.path and '' not in sys.path: sys.path.insert(0, os.getcwd())  # as `python -m` would
    try: mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f'--model {spec}: cannot import {mod_name} ({e}); put it in the current folder or on '
                         f'PYTHONPATH') from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn): raise ValueError(f'--model {spec}: {mod_name} has no function {fn_name!r}')
    return fn


def _timm(name: str, shape: tuple, n_out: int, pretrained: str | os.PathLike | None) -> nn.Module:
    try: import timm
    except ImportError:
        raise ImportError(f'--model timm:{name} needs timm, which is not installed: pip install timm (with a torchvision '
                          f'built for your torch: on a CPU torch, pip install torchvision --index-url '
                          f'https://download.pytorch.org/whl/cpu first)') from None
    if len(shape) != 3: raise ValueError(f'--model timm:{name} takes images; this data\'s samples are {tuple(shape)}')
    kw = dict(num_classes=n_out, in_chans=shape[0])
    if pretrained is not None:  # only local weights: timm reads the file, and never downloads
        if not Path(pretrained).is_file():
            raise ValueError(f'--pretrained {pretrained}: no such file; give the weights file of timm:{name} on this machine')
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={'file': str(pretrained)}, **kw)
    return timm.create_model(name, pretrained=False, **kw)


def resolve_model(spec: str, input_shape: Sequence[int], kind: str | None = None) -> str:
    """The built-in model 'auto' stands for with samples of `input_shape`: mlp for a table (`kind` 'table', whatever
    its number of columns), cnn for images and for signals of 40 or more steps (MNIST-1D), else mlp (short vectors).
    Other names are returned as they are."""
    if spec != 'auto': return spec
    if kind == 'table': return 'mlp'  # its columns have no order a convolution could use
    shape = tuple(input_shape)
    return 'cnn' if len(shape) == 3 or (len(shape) in (1, 2) and shape[-1] >= 40) else 'mlp'


def build_model(spec: str, input_shape: Sequence[int], n_out: int, normalize: nn.Module | None = None,
                rescale: nn.Module | None = None, pretrained: str | os.PathLike | None = None,
                kind: str | None = None) -> nn.Module:
    """The model `spec` names for samples of `input_shape` and `n_out` outputs: 'auto' (cnn for images and signals
    of 40 or more steps, else mlp), 'cnn' (the seed's CNN for images, `cnn1d` for 1-D data), 'mlp', 'timm:NAME', or
    'module:function' called as function(n_in, n_out) with n_in the channels of images, else the first size of a
    sample. `normalize` goes first and `rescale` last when given (nn.Sequential with names normalize, net, rescale).
    `kind` is the data's ('table', 'images', ...), for 'auto'."""
    shape = tuple(int(s) for s in input_shape)
    spec = resolve_model(spec, shape, kind)
    if spec.startswith('timm:'): net = _timm(spec[5:], shape, n_out, pretrained)
    elif ':' in spec: net = _factory(spec)(shape[0], n_out)
    else:
        if spec == 'mlp': net = mlp(math.prod(shape), 128, n_out)
        elif len(shape) == 3:
            if min(shape[1:]) <= 6:
                raise ValueError(f'images of {shape[1]}x{shape[2]} are too small for the cnn (its three unpadded '
                                 f'convolutions need more than 6 pixels a side); give --size 8 or more, or --model mlp')
            net = get_model(n_out, n_in=shape[0])
        elif len(shape) in (1, 2):
            net = cnn1d(1 if len(shape) == 1 else shape[0], shape[-1], n_out)
            if len(shape) == 1: net = nn.Sequential(nn.Unflatten(1, (1, shape[0])), *net)
        else: raise ValueError(f'--model cnn takes images or 1-D signals; these samples are {shape}: use --model mlp')
    if not isinstance(net, nn.Module):
        raise TypeError(f'--model {spec} gave a {type(net).__name__}, not a torch.nn.Module; return the model')
    if normalize is None and rescale is None: return net
    parts = [('normalize', normalize), ('net', net), ('rescale', rescale)]
    return nn.Sequential(OrderedDict((k, m) for k, m in parts if m is not None))
