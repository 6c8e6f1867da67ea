"""Your data for the command and for Python: a folder of images (one sub-folder per class), a CSV or Parquet table,
an .npz or .pt file of arrays, the MNIST-1D benchmark, or the bundled names. Each loader returns a `Data`: the train
and valid tensors (or datasets), the class names, and `info`, the description (split, statistics, classes) that
`config.toml` keeps so a run can be repeated and its model fed new data the same way. Pillow, pandas, pyarrow and
mnist1d are imported only when their kind of data is read."""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ['Data', 'load_data', 'image_folder', 'table', 'arrays', 'mnist1d', 'load_inputs', 'IMAGE_SUFFIXES',
           'dump_toml', 'read_toml']

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
BUILTIN = ('digits', 'fashion-mnist', 'mnist1d')


@dataclass
class Data:
    """Train and valid inputs and targets (tensors, or for images read from disk, datasets of (x, y)), with what a
    model needs to know: `input_shape` (one sample's), `n_out` (classes, or 1 for regression), `classes` (names, or
    None) and `info`, the TOML-ready description of the split and the statistics. `dls(bs)` gives the loaders;
    image batches are uint8 and the model's first layer, `normalize()`, scales them by the training set's statistics."""
    x_train: object
    y_train: object
    x_valid: object
    y_valid: object
    input_shape: tuple
    n_out: int
    classes: list | None
    info: dict = field(default_factory=dict)

    def __post_init__(self): self.info.setdefault('n_out', self.n_out)  # what rebuilding the model needs, with input_shape

    @property
    def task(self) -> str: return self.info.get('task', 'classification')

    @property
    def n_in(self) -> int:
        """What a model factory takes as its number of inputs: image channels, a table's features, a signal's channels."""
        return self.input_shape[0]

    def dls(self, bs: int = 64, seed: int | None = None, device=None, workers: int = 0):
        """DataLoaders: in-memory tensors by index slices (TensorLoader, on `device` when given), or torch DataLoaders
        with `workers` processes decoding images that did not fit in memory."""
        from .data import DataLoaders
        if isinstance(self.x_train, torch.Tensor):
            return DataLoaders.from_tensors(self.x_train, self.y_train, self.x_valid, self.y_valid, bs=bs, seed=seed,
                                            device=device)
        from torch.utils.data import DataLoader
        g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        kw = dict(num_workers=workers, persistent_workers=workers > 0)
        return DataLoaders(DataLoader(self.x_train, bs, shuffle=True, generator=g, **kw),
                           DataLoader(self.x_valid, bs, **kw))

    def normalize(self):
        """The model's first layer for images (`Normalize` with the training set's mean and std), else None."""
        from .models import Normalize
        img = self.info.get('image')
        return Normalize(img['mean'], img['std']) if img else None


# ---- splits ------------------------------------------------------------------------------------------------------
def _split(n: int, valid_pct: float, seed: int, saved: dict | None, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and valid indices (each ascending): a saved split's, else a `valid_pct` share of a seeded permutation."""
    if saved is not None and 'valid' in saved:
        valid = torch.tensor(saved['valid'], dtype=torch.long)
        if saved.get('n') != n or (len(valid) and int(valid.max()) >= n):
            raise ValueError(f'{where} holds {n} samples but the saved split was made for {saved.get("n")}; '
                             f'the data changed since the run: fit again without --config')
    else:
        if not 0 < valid_pct < 1: raise ValueError(f'--valid-pct must be between 0 and 1 (the share held out), got {valid_pct}')
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_valid = max(1, round(n * valid_pct))
        if n_valid >= n:
            raise ValueError(f'{where} has {n} samples: too few to hold out {valid_pct:g} of them and train on the rest; '
                             f'add data or lower --valid-pct')
        valid = perm[:n_valid].sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[valid] = False
    return mask.nonzero().squeeze(1), valid


def _split_info(n, valid, valid_pct, seed) -> dict:
    return {'how': 'seeded', 'n': n, 'valid_pct': valid_pct, 'seed': seed, 'valid': valid.tolist()}


def _classes_of(labels: list, where: str) -> list[str]:
    classes = sorted(set(labels), key=lambda c: (not isinstance(c, str), c)) if labels else []
    if len(classes) < 2:
        raise ValueError(f'{where} has {len(classes)} class{"" if len(classes) == 1 else "es"} '
                         f'({", ".join(map(str, classes)) or "none"}); classification needs at least 2: add examples of '
                         f'another class (or use --task regression for a numeric target)')
    return classes


# ---- a folder of images ------------------------------------------------------------------------------------------
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(root: Path, classes: list | None = None) -> dict[str, list[Path]]:
    """{class name: its image files}, one sub-folder per class; an empty class folder or a single class is an error."""
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
    if not dirs:
        raise ValueError(f'{root} has no class folders: put the images of each class in a sub-folder named after it '
                         f'({root}/cat/1.png, {root}/dog/2.png, ...)')
    files = {d.name: _image_files(d) for d in dirs}
    for name, fs in files.items():
        if not fs:
            raise ValueError(f'class folder {root / name} holds no images ({", ".join(IMAGE_SUFFIXES)}); add images of '
                             f'{name!r} or remove the folder')
    if classes is None: _classes_of(list(files), str(root))
    else:
        unknown = [c for c in files if c not in classes]
        if unknown:
            raise ValueError(f'{root} has class folder {unknown[0]!r}, which the model was not trained on (its classes: '
                             f'{", ".join(classes)}); remove it or fit again with it')
    return files


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError
    try:
        im = Image.open(path)
        im.load()  # decode now: a truncated file fails here, naming itself
        return im
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f'{path} cannot be read as an image ({e}); remove or replace it') from None


def _decode(path: Path, mode: str, size: int | None) -> torch.Tensor:
    """One image as a uint8 tensor (C, H, W), converted to `mode` and, with `size`, resized to size x size."""
    import numpy as np
    from PIL import Image
    im = _open_image(path).convert(mode)
    if size is not None and im.size != (size, size): im = im.resize((size, size), Image.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(a.copy()).reshape(im.size[1], im.size[0], -1).permute(2, 0, 1).contiguous()


class ImageFiles(torch.utils.data.Dataset):
    """Images decoded on demand (by DataLoader workers), for folders too large to keep in memory: (uint8 CxHxW, label)."""
    def __init__(self, files: list[Path], labels: list[int], mode: str, size: int | None):
        self.files, self.labels, self.mode, self.size = files, labels, mode, size

    def __len__(self) -> int: return len(self.files)

    def __getitem__(self, i):
        return _decode(self.files[i], self.mode, self.size), torch.tensor(self.labels[i])


def _scan(files: list[Path], size: int | None) -> tuple[str, tuple]:
    """The colour mode all images take (L when every one is grey, else RGB) and one image's shape; every file is
    opened (its header), so an unreadable one or mixed sizes without --size fail here, before any decoding."""
    from PIL import Image, UnidentifiedImageError
    first_size, first, grey = None, None, True
    for f in files:
        try:
            with Image.open(f) as im: sz, mode = im.size, im.mode
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ValueError(f'{f} cannot be read as an image ({e}); remove or replace it') from None
        grey = grey and mode in ('L', '1', 'I;16', 'I', 'F')
        if first_size is None: first_size, first = sz, f
        elif sz != first_size and size is None:
            raise ValueError(f'images differ in size: {first} is {first_size[0]}x{first_size[1]}, {f} is {sz[0]}x{sz[1]}; '
                             f'give --size N to resize them all to N x N')
    mode = 'L' if grey else 'RGB'
    w, h = (size, size) if size is not None else first_size
    return mode, (1 if grey else 3, h, w)


def _stats(batches) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (of pixels scaled to [0, 1]) over uint8 (N, C, H, W) batches, summed in float64."""
    s = s2 = n = 0
    for b in batches:
        x = b.double() / 255
        s, s2, n = s + x.sum((0, 2, 3)), s2 + (x * x).sum((0, 2, 3)), n + x[:, 0].numel()
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-3)  # a blank channel: no division by zero
    return [float(v) for v in mean], [float(v) for v in std]


def image_folder(path: str | os.PathLike, size: int | None = None, valid_pct: float = 0.2, seed: int = 0,
                 max_memory: int = 2**30, info: dict | None = None) -> Data:
    """A folder of images in one sub-folder per class (`path/cat/*.png`), or with `train/` and `valid/` folders of
    those. Without them a `valid_pct` share is held out (seeded). Images are decoded once with Pillow, resized to
    `size` x `size` when given (else they must share one size), and kept in memory as uint8 while they fit in
    `max_memory` bytes; else they are decoded again by DataLoader workers each epoch. `info` (from a run's config)
    gives the saved split, classes and statistics instead of computing them."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f'{root} is not a folder of images; give a folder with one sub-folder per class (predict takes '
                         f'one image too)')
    info = info or {}
    classes = info.get('classes')
    presplit = (root / 'train').is_dir() and (root / 'valid').is_dir()
    if presplit:
        tr, va = _class_folders(root / 'train', classes), _class_folders(root / 'valid', classes)
        if classes is None:
            classes = sorted(tr)
            missing = [c for c in va if c not in tr]
            if missing:
                raise ValueError(f'{root / "valid" / missing[0]} is a class with no training images in {root / "train"}; '
                                 f'add a {root / "train" / missing[0]} folder or remove it')
        t_files = [(f, classes.index(c)) for c in tr for f in tr[c]]
        v_files = [(f, classes.index(c)) for c in va for f in va[c]]
        split = {'how': 'folders'}
    else:
        per_class = _class_folders(root, classes)
        if classes is None: classes = sorted(per_class)
        files = [(f, classes.index(c)) for c in per_class for f in per_class[c]]
        t_idx, v_idx = _split(len(files), valid_pct, seed, info.get('split'), str(root))
        t_files, v_files = [files[i] for i in t_idx], [files[i] for i in v_idx]
        split = _split_info(len(files), v_idx, valid_pct, seed)
    if 'image' in info: size = info['image'].get('size')
    mode, shape = _scan([f for f, _ in t_files + v_files], size)
    if 'image' in info: mode = info['image']['mode']; shape = (1 if mode == 'L' else 3, *shape[1:])
    n = len(t_files) + len(v_files)
    in_memory = n * math.prod(shape) <= max_memory

    def decoded(pairs):
        return torch.stack([_decode(f, mode, size) for f, _ in pairs]), torch.tensor([y for _, y in pairs])

    if in_memory:
        (xt, yt), (xv, yv) = decoded(t_files), decoded(v_files)
        stats = _stats([xt])
    else:
        xt = ImageFiles([f for f, _ in t_files], [y for _, y in t_files], mode, size)
        xv = ImageFiles([f for f, _ in v_files], [y for _, y in v_files], mode, size)
        yt = yv = None
        stats = None if 'image' in info else _stats(
            torch.stack([_decode(f, mode, size) for f, _ in t_files[i:i + 256]]) for i in range(0, len(t_files), 256))
    mean, std = (info['image']['mean'], info['image']['std']) if 'image' in info else stats
    h, w = shape[1:]
    return Data(xt, yt, xv, yv, tuple(shape), len(classes), classes,
                {'kind': 'images', 'task': 'classification', 'classes': classes, 'split': split, 'input_shape': list(shape),
                 'image': {'mode': mode, 'size': size if size is not None else None, 'height': h, 'width': w,
                           'mean': mean, 'std': std, 'in_memory': in_memory}})


# ---- a table -----------------------------------------------------------------------------------------------------
def _read_table(path: Path):
    try: import pandas as pd
    except ImportError: raise ImportError('reading a table needs pandas: pip install "ultraloop[data]"') from None
    try:
        return pd.read_parquet(path) if path.suffix.lower() in ('.parquet', '.pq') else pd.read_csv(path)
    except ImportError as e:
        raise ImportError(f'reading {path} needs pyarrow ({e}): pip install "ultraloop[data]"') from None
    except Exception as e:  # pandas' parser errors are not OSErrors: name the file in one line
        if isinstance(e, (OSError, ValueError)) and not type(e).__module__.startswith('pandas'): raise
        raise ValueError(f'{path} cannot be read as a {path.suffix[1:].upper()} table ({type(e).__name__}: {e})') from None


def _is_numeric(s) -> bool:
    import pandas as pd
    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def _features(df, prep: dict, where: str = 'the table') -> torch.Tensor:
    """The feature matrix: numeric columns standardised by the saved mean and std (a missing value becomes the mean,
    0), then each categorical column one-hot over its saved categories (an unseen one is all zeros)."""
    import numpy as np
    num, cat = prep['numeric'], prep['categorical']
    missing = [c for c in [*num['names'], *cat] if c not in df.columns]
    if missing:
        raise ValueError(f'{where} lacks column {missing[0]!r} the model was trained on (its columns: '
                         f'{", ".join(map(str, df.columns))})')
    parts = []
    if num['names']:
        x = df[num['names']].astype('float64').to_numpy()
        x = (x - np.asarray(num['mean'])) / np.asarray(num['std'])
        parts.append(np.nan_to_num(x, nan=0.0))
    for c, cats in cat.items():
        vals = df[c].astype(str).to_numpy()
        parts.append((vals[:, None] == np.asarray(cats, dtype=object)[None, :]).astype('float64'))
    x = np.concatenate(parts, 1) if parts else np.zeros((len(df), 0))
    return torch.from_numpy(x).float()


def _table_prep(df, target: str) -> dict:
    cols = [c for c in df.columns if c != target]
    num = [c for c in cols if _is_numeric(df[c])]
    x = df[num].astype('float64')
    mean, std = x.mean().fillna(0.0), x.std(ddof=0).fillna(1.0)
    std = std.where(std > 0, 1.0)
    cat = {str(c): sorted(df[c].dropna().astype(str).unique().tolist()) for c in cols if c not in num}
    for c, values in cat.items():
        if len(values) > 50 and len(values) > len(df) / 2:  # an id, a date, free text: nearly one input per row
            warnings.warn(f'table column {c!r} holds {len(values)} distinct text values in {len(df)} training rows, each '
                          f'one-hot as an input of its own (an id, a date or free text?); drop the column or give it as '
                          f'numbers', stacklevel=4)
    return {'numeric': {'names': [str(c) for c in num], 'mean': [float(v) for v in mean], 'std': [float(v) for v in std]},
            'categorical': cat}


def _targets(s, task: str, classes: list | None, where: str) -> tuple[torch.Tensor, list | None]:
    """Class indices (int64) and class names for classification, or float32 (N, 1) values for regression."""
    import pandas as pd
    if s.isna().any():
        raise ValueError(f'{where}: target column {s.name!r} has {int(s.isna().sum())} missing values (first at row '
                         f'{int(s.isna().to_numpy().argmax())}); fill or drop those rows')
    if task == 'regression':
        if not _is_numeric(s):
            raise ValueError(f'{where}: target column {s.name!r} holds {s.dtype} values, not numbers; --task regression '
                             f'needs a numeric target (leave out --task for classification)')
        return torch.tensor(s.to_numpy(dtype='float64'), dtype=torch.float32).unsqueeze(1), None
    if pd.api.types.is_float_dtype(s) and not (s == s.round()).all():
        raise ValueError(f'{where}: target column {s.name!r} holds non-integer numbers ({float(s[s != s.round()].iloc[0]):g}); '
                         f'give --task regression to predict a number, or integer or text class labels')
    labels = [str(int(v)) if _is_numeric(s) else str(v) for v in s]
    if classes is None: classes = _classes_of(sorted(set(labels), key=lambda c: (len(c), c) if _is_numeric(s) else c), where)
    index = {c: i for i, c in enumerate(classes)}
    unknown = next((c for c in labels if c not in index), None)
    if unknown is not None:
        raise ValueError(f'{where}: target {unknown!r} is not one of the classes the model was trained on '
                         f'({", ".join(classes)}); remove those rows')
    return torch.tensor([index[c] for c in labels]), classes


def table(path: str | os.PathLike, target: str | None, task: str = 'classification', valid_pct: float = 0.2,
          seed: int = 0, info: dict | None = None) -> Data:
    """A CSV or Parquet table: `target` is the column to predict (class labels, integers or text, or numbers with
    `task='regression'`); every other column is an input, numeric ones standardised by the training split's mean and
    std, the others one-hot. A `valid_pct` share of the rows is held out (seeded)."""
    path = Path(path)
    df = _read_table(path)
    if target is None:
        raise ValueError(f'{path} is a table: give --target COLUMN, the column to predict (its columns: '
                         f'{", ".join(map(str, df.columns))})')
    if target not in df.columns:
        raise ValueError(f'{path} has no column {target!r}; its columns: {", ".join(map(str, df.columns))} '
                         f'(give one of them with --target)')
    if len(df.columns) < 2: raise ValueError(f'{path} has only the target column {target!r}; the model needs inputs')
    info = info or {}
    t_idx, v_idx = _split(len(df), valid_pct, seed, info.get('split'), str(path))
    train = df.iloc[t_idx.numpy()]
    prep = info.get('table') or _table_prep(train, target)
    y, classes = _targets(df[target], task, info.get('classes'), str(path))
    x = _features(df, prep)
    n_out = 1 if task == 'regression' else len(classes)
    out = {'kind': 'table', 'task': task, 'target': target, 'classes': classes,
           'split': info.get('split') or _split_info(len(df), v_idx, valid_pct, seed), 'input_shape': [x.shape[1]],
           'table': prep}
    if task == 'regression':
        yt = y[t_idx].double()
        out['target_stats'] = info.get('target_stats') or {'mean': float(yt.mean()), 'std': float(yt.std(correction=0)) or 1.0}
    if classes is None: del out['classes']
    return Data(x[t_idx], y[t_idx], x[v_idx], y[v_idx], (x.shape[1],), n_out, classes, out)


# ---- arrays in a file --------------------------------------------------------------------------------------------
def _read_arrays(path: Path) -> dict:
    if path.suffix.lower() == '.npz':
        import numpy as np
        try:
            with np.load(path, allow_pickle=False) as f: return {k: torch.from_numpy(f[k]) for k in f.files}
        except (OSError, ValueError) as e: raise ValueError(f'{path} cannot be read as an .npz file ({e})') from None
    try: d = torch.load(path, weights_only=True, map_location='cpu')
    except Exception as e: raise ValueError(f'{path} cannot be read as a .pt file of tensors ({e})') from None
    if not isinstance(d, dict):
        raise ValueError(f'{path} holds a {type(d).__name__}; save a dict of tensors: torch.save({{"x": x, "y": y}}, path)')
    return {k: torch.as_tensor(v) for k, v in d.items()}


def arrays(path: str | os.PathLike, task: str = 'classification', valid_pct: float = 0.2, seed: int = 0,
           info: dict | None = None) -> Data:
    """An .npz (numpy.savez) or .pt (torch.save of a dict) file with `x` and `y`, and optionally `x_valid` and
    `y_valid` (else a seeded `valid_pct` share is held out). x is used as it is (as float32), except uint8 images
    (N, C, H, W), which stay uint8 and are scaled by the model's first layer with the training images' mean and std, as
    an image folder's are; y holds class indices 0..C-1 (or numbers with `task='regression'`)."""
    path = Path(path)
    d = _read_arrays(path)
    missing = [k for k in ('x', 'y') if k not in d]
    if missing or (('x_valid' in d) != ('y_valid' in d)):
        raise ValueError(f'{path} holds {", ".join(d) or "nothing"}; it needs arrays named x and y (and optionally both '
                         f'x_valid and y_valid): numpy.savez(path, x=x, y=y)')
    info = info or {}
    images = d['x'].dtype == torch.uint8 and d['x'].ndim == 4
    as_x = (lambda t: t) if images else torch.Tensor.float
    x, y = as_x(d['x']), d['y']
    for k in ('x', 'y') + (('x_valid', 'y_valid') if 'x_valid' in d else ()):
        if d[k].ndim == 0: raise ValueError(f'{path}: {k} is a single number; it needs one row per sample')
    if len(x) != len(y): raise ValueError(f'{path}: x has {len(x)} rows but y has {len(y)}; give one target per sample')
    if 'x_valid' in d:
        xv, yv, split = as_x(d['x_valid']), d['y_valid'], {'how': 'given'}
        if xv.shape[1:] != x.shape[1:]:
            raise ValueError(f'{path}: x_valid samples are {tuple(xv.shape[1:])}, x samples {tuple(x.shape[1:])}; '
                             f'make them equal')
    else:
        t_idx, v_idx = _split(len(x), valid_pct, seed, info.get('split'), str(path))
        x, y, xv, yv = x[t_idx], y[t_idx], x[v_idx], y[v_idx]
        split = info.get('split') or _split_info(len(t_idx) + len(v_idx), v_idx, valid_pct, seed)
    out = {'kind': 'arrays', 'task': task, 'split': split, 'input_shape': list(x.shape[1:])}
    if images:
        mean, std = (info['image']['mean'], info['image']['std']) if 'image' in info else _stats([x])
        out['image'] = {'height': x.shape[2], 'width': x.shape[3], 'mean': mean, 'std': std, 'in_memory': True}
    if task == 'regression':
        y, yv = (t.float().reshape(len(t), -1) for t in (y, yv))
        n_out, classes = y.shape[1], None
        out['target_stats'] = info.get('target_stats') or {'mean': float(y.double().mean()),
                                                           'std': float(y.double().std(correction=0)) or 1.0}
    else:
        for k, t in (('y', y), ('y_valid', yv)):
            if t.is_floating_point() and not bool((t == t.round()).all()):
                raise ValueError(f'{path}: {k} holds non-integer numbers; give --task regression to predict numbers, '
                                 f'or class indices 0..C-1')
            if t.ndim != 1:
                raise ValueError(f'{path}: {k} has shape {tuple(t.shape)}; classification needs one class index per sample')
        y, yv = y.long(), yv.long()
        classes = info.get('classes') or [str(i) for i in range(int(torch.cat([y, yv]).max()) + 1)]
        if int(torch.cat([y, yv]).min()) < 0: raise ValueError(f'{path}: y holds a negative class; use class indices 0..C-1')
        _classes_of(sorted(set(y.tolist())), f'{path} (its training split)')
        n_out, out['classes'] = len(classes), classes
    return Data(x, y, xv, yv, tuple(x.shape[1:]), n_out, classes, out)


# ---- the benchmark and the bundled data ---------------------------------------------------------------------------
def mnist1d(n_samples: int = 5000, seed: int = 42) -> Data:
    """MNIST-1D (Greydanus 2020): 10 classes of 40-step 1-D signals made locally by the `mnist1d` package's
    `make_dataset()` (no download), its first 80% for training; `n_samples` and `seed` are its own arguments."""
    try: from mnist1d.data import get_dataset_args, make_dataset
    except ImportError: raise ImportError('--data mnist1d needs the mnist1d package: pip install "ultraloop[data]"') from None
    args = get_dataset_args()
    args.num_samples, args.seed = n_samples, seed
    d = make_dataset(args)
    x, xv = (torch.from_numpy(d[k]).float() for k in ('x', 'x_test'))
    y, yv = (torch.from_numpy(d[k]).long() for k in ('y', 'y_test'))
    classes = [str(i) for i in range(10)]
    return Data(x, y, xv, yv, tuple(x.shape[1:]), 10, classes,
                {'kind': 'mnist1d', 'task': 'classification', 'classes': classes, 'input_shape': list(x.shape[1:]),
                 'split': {'how': 'mnist1d', 'n_samples': n_samples, 'seed': seed}})


def _builtin(name: str, data_dir) -> Data:
    from .datasets import digits, fashion_mnist
    xt, yt, xv, yv = fashion_mnist(data_dir) if name == 'fashion-mnist' else digits()
    classes = [str(i) for i in range(10)]
    return Data(xt, yt, xv, yv, tuple(xt.shape[1:]), 10, classes,
                {'kind': name, 'task': 'classification', 'classes': classes, 'input_shape': list(xt.shape[1:]),
                 'split': {'how': name}})


def kind_of(spec: str) -> str:
    """'images', 'table', 'arrays', or the built-in name `spec` is; a path that is none of these is an error. One image
    file is 'images' too (what predict takes; fit needs a folder)."""
    if spec in BUILTIN: return spec
    p = Path(spec)
    if not p.exists():
        raise ValueError(f'--data {spec}: no such file or folder; give an image folder, a .csv, .parquet, .npz or .pt '
                         f'file, or one of {", ".join(BUILTIN)}')
    if p.is_dir(): return 'images'
    suffix = p.suffix.lower()
    if suffix in ('.csv', '.parquet', '.pq'): return 'table'
    if suffix in ('.npz', '.pt', '.pth'): return 'arrays'
    if suffix in IMAGE_SUFFIXES: return 'images'
    raise ValueError(f'--data {spec}: a {suffix or "file without a suffix"} is not data the command reads; give an image '
                     f'folder, a .csv, .parquet, .npz or .pt file')


def load_data(spec: str, target: str | None = None, task: str = 'classification', size: int | None = None,
              valid_pct: float = 0.2, seed: int = 0, max_memory: int = 2**30, data_dir=None,
              mnist1d_samples: int = 5000, info: dict | None = None) -> Data:
    """The `Data` that `spec` names: a built-in name, an image folder, a table or an arrays file (see each loader)."""
    kind = kind_of(spec)
    if task == 'regression' and kind in ('images', *BUILTIN):
        raise ValueError(f'--task regression needs a table or an arrays file with numeric targets; {spec} has classes')
    if kind == 'images': return image_folder(spec, size, valid_pct, seed, max_memory, info)
    if kind == 'table': return table(spec, target, task, valid_pct, seed, info)
    if kind == 'arrays': return arrays(spec, task, valid_pct, seed, info)
    if kind == 'mnist1d': return mnist1d(mnist1d_samples, (info or {}).get('split', {}).get('seed', 42))
    return _builtin(kind, data_dir)


def load_inputs(spec: str, info: dict, labelled: bool) -> tuple[object, torch.Tensor | None, list[str]]:
    """New data prepared as a run's data was (`info` from its config): (inputs, targets or None, one id per sample).
    Images: a folder of class folders (`valid/` when it has one) or, for prediction, any folder of images or one image;
    a table (the target column is optional for prediction); an arrays file's `x_valid`/`y_valid` if present, else
    `x`/`y`; a built-in name: its valid split."""
    kind = kind_of(spec)
    if kind != info['kind'] and not (info['kind'] in BUILTIN and kind == 'arrays'):  # a built-in's samples saved as arrays
        raise ValueError(f'--data {spec} is {kind} data but the model was trained on {info["kind"]} data; give data of '
                         f'that kind')
    p = Path(spec)
    if kind == 'images':
        img = info['image']
        root = p / 'valid' if (p / 'valid').is_dir() else p
        has_classes = root.is_dir() and any(d.is_dir() for d in root.iterdir())
        if has_classes:
            per_class = _class_folders(root, info['classes'])
            pairs = [(f, info['classes'].index(c)) for c in per_class for f in per_class[c]]
        elif labelled:
            raise ValueError(f'{spec} has no class folders; evaluate needs one sub-folder per class to know the answers')
        else:
            pairs = [(f, -1) for f in (_image_files(p) if p.is_dir() else [p])]
            if not pairs: raise ValueError(f'{spec} holds no images ({", ".join(IMAGE_SUFFIXES)})')
        size = img.get('size')
        _scan([f for f, _ in pairs], size if size is not None else img['height'])
        if size is None:
            bad = next((f for f, _ in pairs if _open_image(f).size != (img['width'], img['height'])), None)
            if bad is not None:
                raise ValueError(f'{bad} is not {img["width"]}x{img["height"]}, the size the model was trained on; '
                                 f'resize it (or fit with --size)')
        x = torch.stack([_decode(f, img['mode'], size) for f, _ in pairs])
        y = torch.tensor([c for _, c in pairs]) if has_classes else None
        return x, y, [str(f) for f, _ in pairs]
    if kind == 'table':
        df = _read_table(p)
        tgt = info['target']
        x = _features(df, info['table'], str(p))
        y = None
        if tgt in df.columns: y, _ = _targets(df[tgt], info['task'], info.get('classes'), str(p))
        elif labelled:
            raise ValueError(f'{p} has no column {tgt!r}, the target; its columns: {", ".join(map(str, df.columns))}')
        return x, y, [str(i) for i in range(len(df))]
    if kind == 'arrays':
        d = _read_arrays(p)
        xk, yk = ('x_valid', 'y_valid') if 'x_valid' in d else ('x', 'y')
        if xk not in d: raise ValueError(f'{p} holds {", ".join(d) or "nothing"}; it needs an array named x')
        x = d[xk].float()
        if list(x.shape[1:]) != list(info['input_shape']):
            raise ValueError(f'{p}: {xk} samples are {tuple(x.shape[1:])} but the model takes {tuple(info["input_shape"])}')
        y = d.get(yk)
        if y is None and labelled: raise ValueError(f'{p} has no {yk}, the targets evaluate needs')
        if y is not None: y = y.float().reshape(len(y), -1) if info['task'] == 'regression' else y.long()
        return x, y, [str(i) for i in range(len(x))]
    d = mnist1d(info['split']['n_samples'], info['split']['seed']) if kind == 'mnist1d' else _builtin(kind, None)
    return d.x_valid, d.y_valid, [str(i) for i in range(len(d.x_valid))]


# ---- config files ------------------------------------------------------------------------------------------------
_BARE_KEY = re.compile(r'[A-Za-z0-9_-]+')


def _toml_value(v) -> str:
    if isinstance(v, bool): return 'true' if v else 'false'
    if isinstance(v, int): return str(v)
    if isinstance(v, float): return repr(v) if math.isfinite(v) else ('nan' if v != v else ('inf' if v > 0 else '-inf'))
    if isinstance(v, (str, os.PathLike)): return json.dumps(str(v), ensure_ascii=False)
    if isinstance(v, (list, tuple)): return '[' + ', '.join(_toml_value(i) for i in v) + ']'
    raise TypeError(f'cannot write a {type(v).__name__} to a TOML file: {v!r}')


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else json.dumps(k, ensure_ascii=False)


def dump_toml(d: dict, _prefix: str = '') -> str:
    """A dict of tables (dicts) of simple values (str, int, float, bool, paths and lists of them; None left out) as
    TOML text, for config files; read it back with `read_toml`."""
    lines, tables = [], []
    for k, v in d.items():
        if v is None: continue
        if isinstance(v, dict): tables.append((k, v))
        else: lines.append(f'{_toml_key(k)} = {_toml_value(v)}')
    for k, v in tables:
        name = f'{_prefix}{_toml_key(k)}'
        lines += ['', f'[{name}]', dump_toml(v, name + '.').strip('\n')]
    return '\n'.join(lines).strip('\n') + '\n'


def read_toml(path: str | os.PathLike) -> dict:
    """A TOML file as a dict (tomllib on Python 3.11+, else the tomli package)."""
    try: import tomllib
    except ImportError:  # Python 3.10
        try: import tomli as tomllib
        except ImportError: raise ImportError('reading a config file on Python 3.10 needs tomli: pip install tomli') from None
    try:
        with open(path, 'rb') as f: return tomllib.load(f)
    except tomllib.TOMLDecodeError as e: raise ValueError(f'{path} is not a valid TOML file ({e})') from None
