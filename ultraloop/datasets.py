"""Data that needs no network: scikit-learn's bundled digits, and FashionMNIST read from its standard IDX files."""
from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import torch

from .utils import check_number

__all__ = ['digits', 'fashion_mnist', 'read_idx', 'FASHION_MNIST_FILES']

# The four files of the FashionMNIST distribution (zalandoresearch/fashion-mnist, data/fashion), in the order
# fashion_mnist() returns them: train images, train labels, test images, test labels.
FASHION_MNIST_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
                       't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes; the magic number is 0x0000 <type> <number of dimensions>


def _normalise(x: torch.Tensor, top: float) -> torch.Tensor:
    """Pixels in [0, top] to [-1, 1]: the seed's Normalize((0.5,), (0.5,)) after ToTensor()."""
    return (x.float() / top - 0.5) / 0.5


def digits(valid_pct: float = 0.2, seed: int = 42) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), no download.

    Returns `(x_train, y_train, x_valid, y_valid)`: x float32 of shape (N, 1, 8, 8) scaled to [-1, 1], y int64;
    a `valid_pct` share of a permutation seeded with `seed` is held out. `DataLoaders.from_tensors(*digits())`.
    """
    check_number('valid_pct', valid_pct, gt=0, lt=1, hint=' (the share held out, e.g. 0.2)')
    images, y = _sklearn_digits()
    x = _normalise(images.unsqueeze(1), 16.0)  # pixels are counts 0..16
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_valid = round(len(x) * valid_pct)
    tr, va = idx[n_valid:], idx[:n_valid]
    return x[tr], y[tr], x[va], y[va]


def _sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits' images (N, 8, 8, float64) and labels (int64), read from the file scikit-learn ships
    (sklearn/datasets/data/digits.csv.gz: 64 pixels and the label per line, as its load_digits reads it) without
    importing scikit-learn, whose import (scipy, pandas) costs seconds before the first batch."""
    import importlib.util
    try: spec = importlib.util.find_spec('sklearn')
    except ValueError: spec = None
    if spec is None:
        raise ImportError('digits() needs scikit-learn: pip install scikit-learn (or ultraloop[demo])')
    path = Path(next(iter(spec.submodule_search_locations))) / 'datasets' / 'data' / 'digits.csv.gz'
    if not path.is_file():  # a layout of another version: let scikit-learn find it
        from sklearn.datasets import load_digits
        d = load_digits()
        return torch.from_numpy(d.images), torch.from_numpy(d.target).long()
    with gzip.open(path, 'rt') as f:
        t = torch.tensor([[float(v) for v in line.split(',')] for line in f if line.strip()], dtype=torch.float64)
    return t[:, :64].reshape(-1, 8, 8), t[:, 64].long()


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read one IDX file of unsigned bytes (`.gz` or not) into a uint8 tensor shaped as its header says.
    A wrong magic number or a size that disagrees with the header is a ValueError naming the file."""
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f: data = f.read()
    except (OSError, EOFError) as e:  # gzip raises OSError/EOFError on a damaged or truncated archive
        raise ValueError(f'{path} cannot be read as an IDX file ({e}); download it again') from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or not 1 <= data[3] <= 4:
        raise ValueError(f'{path} is not an IDX file of unsigned bytes (magic number {data[:4].hex() or "missing"}, '
                         f'expected 0000080N); check that the file is the one its name says')
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header: raise ValueError(f'{path} is truncated: its header is incomplete; download it again')
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    n = math.prod(shape)
    if len(data) - header != n:
        raise ValueError(f'{path} holds {len(data) - header} bytes of data but its header says {shape} '
                         f'({n} bytes); the file is damaged or truncated: download it again')
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _find(root: Path, name: str) -> Path | None:
    """The file `name` in root or torchvision's root/FashionMNIST/raw, gzipped or not."""
    plain = name.removesuffix('.gz')
    for folder in (root, root / 'FashionMNIST' / 'raw'):
        for nm in (name, plain):
            if (folder / nm).is_file(): return folder / nm
    return None


def fashion_mnist(root: str | os.PathLike = 'data') -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FashionMNIST from its four standard IDX files in `root` or in torchvision's `root/FashionMNIST/raw`
    (`.gz` or uncompressed). Never downloads.

    Returns `(x_train, y_train, x_valid, y_valid)` (valid is the t10k test set): x float32 of shape (N, 1, 28, 28)
    normalised like the seed, (x / 255 - 0.5) / 0.5, y int64. Missing files are a FileNotFoundError saying which
    files to put where; damaged ones a ValueError.
    """
    root = Path(root)
    found = [_find(root, nm) for nm in FASHION_MNIST_FILES]
    missing = [nm for nm, p in zip(FASHION_MNIST_FILES, found) if p is None]
    if missing:
        raise FileNotFoundError(f'FashionMNIST files not found: {", ".join(missing)}; put the four IDX files '
                                f'({", ".join(FASHION_MNIST_FILES)}, from github.com/zalandoresearch/fashion-mnist, '
                                f'data/fashion) in {root}/ or {root / "FashionMNIST" / "raw"}/')
    out = []
    for (img_path, lbl_path) in ((found[0], found[1]), (found[2], found[3])):
        imgs, lbls = read_idx(img_path), read_idx(lbl_path)
        if imgs.ndim == 1:
            raise ValueError(f'{img_path} holds {len(imgs)} labels (a 1-dimensional IDX file), not images: it is a '
                             f'labels file under an images file\'s name; put the images ({img_path.name}, 3-dimensional, '
                             f'N x 28 x 28) there')
        if lbls.ndim != 1:
            raise ValueError(f'{lbl_path} holds images of shape {tuple(lbls.shape[1:])}, not labels: it is an images '
                             f'file under a labels file\'s name; put the labels ({lbl_path.name}, 1-dimensional) there')
        if imgs.ndim != 3 or imgs.shape[1:] != (28, 28):
            raise ValueError(f'{img_path} holds images of shape {tuple(imgs.shape[1:])}, expected 28x28: '
                             f'it is not a FashionMNIST image file')
        if len(lbls) != len(imgs):
            raise ValueError(f'{lbl_path} holds {len(lbls)} labels for the {len(imgs)} images of {img_path}; '
                             f'each split needs one label per image: use files from the same release')
        if len(lbls) and int(lbls.max()) > 9:
            raise ValueError(f'{lbl_path} has label {int(lbls.max())}; FashionMNIST labels are 0..9')
        out += [_normalise(imgs.unsqueeze(1), 255.0), lbls.long()]
    return tuple(out)
