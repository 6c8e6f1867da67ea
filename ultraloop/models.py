"""Small models for the demo, the examples and the command line: the seed's CNN and a plain MLP."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .utils import check_int, is_int

__all__ = ['get_model', 'mlp']


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
