"""The `ultraloop` command: `demo` trains the seed's CNN on the bundled digits; `fit` and `lr-find` on digits or FashionMNIST."""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

__all__ = ['main', 'build_parser']

# scikit-learn, torchmetrics and matplotlib are imported only once a command runs, so `--help` and usage errors are quick.
N_CLASSES = 10  # digits and FashionMNIST alike
DEFAULT_LR = {'sgd': 0.1, 'adamw': 3e-3}
MAX_SEED = 2**64 - 1  # torch.manual_seed takes at most 64 bits
SGD_MOMENTUM, ADAMW_WEIGHT_DECAY = 0.9, 0.01
EXIT_RESUMABLE = 75  # stopped by SIGTERM/SIGUSR1 at a checkpoint: learner.EXIT_RESUMABLE (importing it would import torch)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, exit code 2, pointing at --help."""
    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _int_at_least(lo: int, hi: int | None = None):
    def parse(s: str) -> int:
        try: v = int(s)
        except ValueError: raise argparse.ArgumentTypeError(f'expected a whole number, got {s!r}') from None
        if v < lo: raise argparse.ArgumentTypeError(f'must be >= {lo}, got {v}')
        if hi is not None and v > hi: raise argparse.ArgumentTypeError(f'must be <= {hi} (2**64 - 1), got {v}')
        return v
    return parse


def _float_above(lo: float):
    def parse(s: str) -> float:
        try: v = float(s)
        except ValueError: raise argparse.ArgumentTypeError(f'expected a number, got {s!r}') from None
        if not (v > lo and math.isfinite(v)): raise argparse.ArgumentTypeError(f'must be a finite number > {lo:g}, got {s}')
        return v
    return parse


LOGGERS = {'csv': None, 'tensorboard': ('tensorboard', 'tensorboard'), 'wandb': ('wandb', 'wandb'),
           'mlflow': ('mlflow', 'mlflow')}  # --log NAME: (module it needs, pip install NAME)


def _loggers(s: str) -> list[str]:
    """--log's comma-separated names, each known and with its library installed (checked before any work)."""
    import importlib.util
    names = [n.strip() for n in s.split(',') if n.strip()]
    for n in names:
        if n not in LOGGERS: raise argparse.ArgumentTypeError(f'unknown logger {n!r}; choose from {",".join(LOGGERS)}')
        if LOGGERS[n] is not None and importlib.util.find_spec(LOGGERS[n][0]) is None:
            raise argparse.ArgumentTypeError(f'{n} needs the {LOGGERS[n][0]} package: pip install {LOGGERS[n][1]}')
    return list(dict.fromkeys(names))


def _add_run_options(p: argparse.ArgumentParser, threads: int | None = None,
                     out: tuple[str, str] = ('DIR', 'run folder for the plots (default: runs/<command>-<date>-<time>)')) -> None:
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto',
                   help='where to train; auto: mps, else cuda, else cpu (default: auto)')
    p.add_argument('--seed', type=_int_at_least(0, MAX_SEED), default=0,
                   help='seeds the weights and the shuffle order (default: 0)')
    default = ("torch's choice" if threads is None
               else f'{threads}: a model this small runs fastest on one thread, above all on a busy machine')
    p.add_argument('--threads', type=_int_at_least(1), default=threads, help=f'CPU threads torch may use (default: {default})')
    p.add_argument('--out', type=Path, default=None, metavar=out[0], help=out[1])
    p.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                   help='on an error, show the full traceback instead of one line')


def _share(s: str) -> float:
    try: v = float(s)
    except ValueError: raise argparse.ArgumentTypeError(f'expected a number, got {s!r}') from None
    if not 0 < v < 1: raise argparse.ArgumentTypeError(f'must be between 0 and 1 (the share held out), got {s}')
    return v


_UNITS = {'': 1, 'k': 2**10, 'm': 2**20, 'g': 2**30, 't': 2**40}


def _bytes(s: str) -> int:
    m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*', s.lower())
    if m is None: raise argparse.ArgumentTypeError(f'expected a size such as 512M or 2G, got {s!r}')
    return int(float(m.group(1)) * _UNITS[m.group(2)])


MODELS = ('auto', 'cnn', 'mlp')


def _model_spec(s: str) -> str:
    if s in MODELS or re.fullmatch(r'timm:[\w.\-]+', s) or re.fullmatch(r'[\w.]+:\w+', s): return s
    raise argparse.ArgumentTypeError(f'invalid choice: {s!r} (choose from {", ".join(MODELS)}, timm:NAME or '
                                     f'module:function)')


def _add_data_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument('--data', default='digits', metavar='PATH',
                   help='a folder of images with one sub-folder per class (train/ and valid/ folders of those if you '
                        'have a split), a .csv or .parquet table (with --target), an .npz or .pt file with x and y (and '
                        "x_valid, y_valid), or a built-in: digits (scikit-learn's bundled 8x8 digits), fashion-mnist "
                        '(the four IDX files in --data-dir), mnist1d (made by the mnist1d package) (default: digits)')
    p.add_argument('--data-dir', type=Path, default=None, metavar='DIR',
                   help='folder holding the FashionMNIST .gz files, or torchvision\'s DIR/FashionMNIST/raw '
                        '(default: data; only with --data fashion-mnist)')
    p.add_argument('--target', default=None, metavar='COLUMN', help='the column to predict, for a table')
    p.add_argument('--task', choices=['classification', 'regression'], default='classification',
                   help='classification (the target holds class labels: integers or text) or regression (numbers; '
                        'mean squared error, with the mean absolute error beside it) (default: classification)')
    p.add_argument('--size', type=_int_at_least(1), default=None, metavar='N',
                   help='resize images to N x N (needed when their sizes differ)')
    p.add_argument('--valid-pct', type=_share, default=0.2, metavar='P',
                   help='share of the samples held out for validation when the data has no split of its own, drawn with '
                        '--seed (default: 0.2)')
    p.add_argument('--max-memory', type=_bytes, default='2G', metavar='SIZE',
                   help='keep decoded images in memory (uint8) up to this size, else decode them in DataLoader workers '
                        'each epoch (default: 2G)')
    p.add_argument('--workers', type=_int_at_least(0), default=2,
                   help='DataLoader worker processes decoding images that do not fit in --max-memory (default: 2)')
    p.add_argument('--mnist1d-samples', type=_int_at_least(20), default=5000, metavar='N',
                   help='samples make_dataset makes for --data mnist1d, 80%% for training (default: 5000)')
    p.add_argument('--model', type=_model_spec, default='auto',
                   help="auto (cnn for images and signals, else mlp), cnn (the seed's three-convolution CNN; a small 1-D "
                        'CNN for signals), mlp (one hidden layer of 128), timm:NAME (a timm model, where timm is '
                        'installed), or module:function, your own factory called as function(n_in, n_classes) '
                        '(default: auto)')
    p.add_argument('--pretrained', type=Path, default=None, metavar='FILE',
                   help='start a timm:NAME model from this local weights file (never downloaded)')
    p.add_argument('--bs', type=_int_at_least(1), default=64, help='batch size (default: 64)')
    p.add_argument('--opt', choices=['sgd', 'adamw'], default='adamw',
                   help=f'optimiser: sgd (momentum {SGD_MOMENTUM}) or adamw (weight decay {ADAMW_WEIGHT_DECAY}) '
                        '(default: adamw)')
    p.add_argument('--precision', choices=['no', 'bf16', 'fp16'], default='no',
                   help='mixed precision with MixedPrecisionCB: bf16, or fp16 with a gradient scaler (default: no)')
    p.add_argument('--config', type=Path, default=None, metavar='FILE',
                   help="a run's config.toml: every option not given on the command line is taken from it, and the "
                        "data's split and statistics too (output paths are not: the run gets a new folder)")
    _add_run_options(p)


def build_parser() -> argparse.ArgumentParser:
    """The `ultraloop` argument parser, with the demo, fit and lr-find subcommands."""
    parser = _Parser(prog='ultraloop', description='Train with ultraloop from the command line. '
                     'Start with `ultraloop demo`; `ultraloop COMMAND --help` lists each command\'s options.')
    parser.add_argument('--debug', action='store_true', help='on an error, show the full traceback instead of one line')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    demo = sub.add_parser('demo', help="the seed's CNN on the bundled digits: LR finder, then a one-cycle fit",
                          description="Train the seed's CNN on scikit-learn's bundled 8x8 digits (no download) with "
                          'TrainCB, DeviceCB, MetricsCB and ProgressCB: run the LR finder, fit one cycle at its '
                          'suggestion, print the metrics table (accuracy: the share of samples classified right) and '
                          'save the metrics and LR-finder plots.')
    demo.add_argument('--epochs', type=_int_at_least(1), default=10, help='epochs to fit (default: 10)')
    _add_run_options(demo, threads=1)
    demo.set_defaults(run=_demo)

    fit = sub.add_parser('fit', help='fit a model on your data (images, a table, arrays) or a built-in set',
                         description='Fit a model, print the metrics table (accuracy: the share of samples classified '
                         'right) and save the metrics plot, the weights (model.pt) and every option with the data\'s '
                         'classes, statistics and split (config.toml) in the run folder: `ultraloop fit --config '
                         'runs/<run>/config.toml` runs it again. A NaN or inf loss stops the run with exit code 1, '
                         'naming the epoch and batch; SIGTERM or SIGUSR1 stops it at the end of a batch (checkpointed with '
                         f'--checkpoint-dir) with exit code {EXIT_RESUMABLE}. '
                         'Started by torchrun (torchrun --nproc-per-node 2 -m ultraloop fit ...), the processes train '
                         'together (DistributedCB).')
    _add_data_model_options(fit)
    fit.add_argument('--epochs', type=_int_at_least(1), default=5, help='epochs to fit (default: 5)')
    fit.add_argument('--lr', type=_float_above(0), default=None,
                     help=f'learning rate, the peak with --one-cycle (default: {DEFAULT_LR["sgd"]} for sgd, '
                          f'{DEFAULT_LR["adamw"]} for adamw)')
    fit.add_argument('--one-cycle', action='store_true', help='one-cycle schedule (fit_one_cycle) instead of a constant lr')
    fit.add_argument('--csv', type=Path, default=None, metavar='PATH', help='also log each epoch phase to this CSV file')
    fit.add_argument('--log', type=_loggers, default=[], metavar='NAMES',
                     help='log the run to each of these, comma-separated: csv (history.csv) and tensorboard '
                          '(tensorboard/) in the run folder, wandb (W&B project "ultraloop"; WANDB_MODE=offline works '
                          'without a network), mlflow (MLFLOW_TRACKING_URI, else MLflow\'s default store)')
    fit.add_argument('--checkpoint-dir', type=Path, default=None, metavar='DIR',
                     help='write a checkpoint to DIR at every epoch end and on ctrl-C, SIGTERM or SIGUSR1 (CheckpointCB), '
                          'keeping the newest 2, and go on from the newest there (see --fresh). Stopped by SIGTERM or '
                          f'SIGUSR1, the command exits with code {EXIT_RESUMABLE}: stopped at a checkpoint, resumable')
    fit.add_argument('--every-batches', type=_int_at_least(1), default=None, metavar='K',
                     help='also checkpoint every K training batches (needs --checkpoint-dir)')
    fit.add_argument('--resume', action='store_true',
                     help='go on from the newest checkpoint in --checkpoint-dir, exactly where the run stopped; the '
                          'default with --checkpoint-dir (kept for older command lines)')
    fit.add_argument('--fresh', action='store_true',
                     help='start from the beginning even when --checkpoint-dir holds checkpoints; without it the same '
                          'command line, relaunched (SLURM --requeue, torchrun --max-restarts, after ctrl-C or SIGTERM), '
                          'goes on from the newest checkpoint there, exactly, and starts afresh while there is none')
    fit.add_argument('--init-from', type=Path, default=None, metavar='CHECKPOINT',
                     help="start a new run from a checkpoint's weights only (another lr, optimiser or data: a fine-tune); "
                          'a run that goes on from its own checkpoint in --checkpoint-dir ignores it')
    fit.add_argument('--early-stop', type=_int_at_least(1), default=None, metavar='PATIENCE',
                     help='stop once the valid loss has not improved for PATIENCE epochs (EarlyStoppingCB)')
    fit.add_argument('--strategy', choices=['ddp', 'fsdp'], default='ddp',
                     help='under torchrun, how the processes share the model: ddp (DistributedDataParallel) or fsdp '
                          '(FSDP2 fully_shard); --bs is then per process (default: ddp; a single process ignores it)')
    fit.add_argument('--save', type=Path, default=None, metavar='PATH',
                     help="save the trained weights (the model's state_dict) to this file; "
                          'torch.load(PATH, weights_only=True) reads them back')
    fit.set_defaults(run=_fit)

    lrf = sub.add_parser('lr-find', help='run the LR finder and print its suggestion',
                         description='Train with a growing learning rate until the smoothed loss exceeds 3x its minimum, '
                         'save the loss-against-lr plot and print the suggested learning rate. The model is left '
                         'as it was.')
    _add_data_model_options(lrf)
    lrf.add_argument('--start-lr', type=_float_above(0), default=1e-5, help='first learning rate (default: 1e-05)')
    lrf.add_argument('--lr-mult', type=_float_above(1), default=1.3, help='lr growth per batch (default: 1.3)')
    lrf.add_argument('--max-epochs', type=_int_at_least(1), default=10, help='at most this many epochs (default: 10)')
    lrf.set_defaults(run=_lr_find)

    pred = sub.add_parser('predict', help="a fitted model's predictions on new data, as a CSV file",
                          description="Rebuild the model and the data's preparation from a run's config.toml (found beside "
                          '--checkpoint or in the folder above it, or given with --config), load the weights and write one '
                          'row per sample: its id (file or row), the prediction (a class name, or a number) and, for '
                          'classes, its probability.')
    evl = sub.add_parser('evaluate', help="a fitted model's metrics on labelled data, with a confusion matrix",
                         description="Rebuild the model and the data's preparation from a run's config.toml, load the "
                         'weights, print the metrics table over --data (for an image folder with a valid/ folder, that '
                         'one; for a built-in, its valid split) and save the confusion matrix plot in the run folder.')
    for p in (pred, evl):
        p.add_argument('--checkpoint', type=Path, required=True, metavar='FILE',
                       help="the weights: a fit's runs/<run>/model.pt, a --save file or a CheckpointCB checkpoint")
        p.add_argument('--data', required=True, metavar='PATH', help='the data, of the kind the model was fitted on')
        p.add_argument('--config', type=Path, default=None, metavar='FILE',
                       help="the run's config.toml (default: the one beside --checkpoint or in the folder above it)")
        p.add_argument('--bs', type=_int_at_least(1), default=256, help='batch size (default: 256)')
    _add_run_options(evl)
    _add_run_options(pred, out=('FILE', 'the CSV file to write (default: runs/predict-<date>-<time>/preds.csv)'))
    pred.set_defaults(run=_predict)
    evl.set_defaults(run=_evaluate)
    for p in (demo, fit, lrf, pred, evl): p.set_defaults(parser=p)
    return parser


def _main_process() -> bool:
    """False in every process torchrun started but the one of rank 0."""
    return os.environ.get('RANK', '0') == '0'


# ---- checks and set-up shared by the commands ------------------------------------------------------------------
def _device(name: str, parser: argparse.ArgumentParser):
    import torch

    from .data import def_device
    if name in ('auto', 'cuda') and torch.cuda.is_available() and 'LOCAL_RANK' in os.environ:
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))  # one GPU per process under torchrun
        return torch.device('cuda', torch.cuda.current_device())
    if name == 'auto': return torch.device(def_device)
    if name == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device cuda: CUDA is not available here (torch {torch.__version__}); use --device cpu or auto')
    if name == 'mps' and not torch.backends.mps.is_available():
        parser.error('--device mps: MPS (Apple GPU) is not available here; use --device cpu or auto')
    return torch.device(name)


def _check_paths(args) -> None:
    """Refuse a run folder or output file that cannot be written, naming the option, before any work."""
    from .callbacks.logs import _csv_problem, _file_problem
    folder = args.command != 'predict'  # predict's --out is the CSV file it writes
    if args.out is not None and (problem := _file_problem(args.out, folder=folder)) is not None:
        args.parser.error(f'--out: {problem}' + (' for the run' if folder else ''))
    if getattr(args, 'csv', None) is not None:
        if (problem := _csv_problem(args.csv, _task_columns(args))) is not None: args.parser.error(f'--csv: {problem}')
    if getattr(args, 'save', None) is not None:
        if (problem := _file_problem(args.save)) is not None: args.parser.error(f'--save: {problem}')


def _check_data_args(args) -> None:
    """Options that do not fit the data they are given with are usage errors; a missing file or folder is one line."""
    from .sources import kind_of
    _check_paths(args)
    if args.data == 'digits' and args.data_dir is not None:
        args.parser.error('--data-dir is for --data fashion-mnist; the digits ship with scikit-learn')
    if args.data == 'fashion-mnist':
        if args.data_dir is None: args.data_dir = Path('data')
        if not args.data_dir.is_dir():
            args.parser.error(f'--data-dir {args.data_dir} is not a folder; put the FashionMNIST IDX files in one')
    kind = kind_of(args.data)
    if args.target is not None and kind != 'table':
        args.parser.error(f'--target is for a table (.csv or .parquet); {args.data} is {kind} data')
    if args.size is not None and kind != 'images':
        args.parser.error(f'--size is for a folder of images; {args.data} is {kind} data')
    if args.pretrained is not None and not args.model.startswith('timm:'):
        args.parser.error(f'--pretrained is for --model timm:NAME (a timm model); --model {args.model} starts from '
                          f'random weights')
    if args.pretrained is not None and not args.pretrained.is_file():
        args.parser.error(f'--pretrained {args.pretrained}: no such file; give the weights file of {args.model} on this '
                          f'machine (it is never downloaded)')


def _load(args):
    """The `Data` that --data names, with the split and statistics of --config's run when it is given for that data."""
    from .sources import load_data
    return load_data(args.data, target=getattr(args, 'target', None), task=getattr(args, 'task', 'classification'),
                     size=getattr(args, 'size', None), valid_pct=getattr(args, 'valid_pct', 0.2), seed=args.seed,
                     max_memory=getattr(args, 'max_memory', 2**30), data_dir=args.data_dir,
                     mnist1d_samples=getattr(args, 'mnist1d_samples', 5000), info=getattr(args, 'data_info', None))


def _model(model_name: str, info: dict, pretrained=None):
    """The model `model_name` asks for, sized by the data (`info`: a `Data.info` or a config's [data]): images start
    with their normalisation, regression ends by scaling the outputs to the target's units."""
    from .models import Normalize, Rescale, build_model
    img, ts = info.get('image'), info.get('target_stats')
    return build_model(model_name, info['input_shape'], info['n_out'],
                       normalize=Normalize(img['mean'], img['std']) if img else None,
                       rescale=Rescale(ts['mean'], ts['std']) if ts else None, pretrained=pretrained, kind=info.get('kind'))


def _run_dir(args, command: str) -> Path:
    """The run folder: --out, or runs/<command>-<date>-<time> (with -2, -3, ... when that exists). The folders made
    here are listed in args.made, so a run that ends before writing anything leaves none behind. Under torchrun only
    the main process makes it (and writes in it)."""
    out = args.out
    if out is None:
        base = Path('runs') / f'{command}-{time.strftime("%Y%m%d-%H%M%S")}'
        out, i = base, 1
        while out.exists(): i += 1; out = base.with_name(f'{base.name}-{i}')
    made = [d for d in (out, *out.parents) if not d.exists()] if _main_process() else []
    try:
        if _main_process(): out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        args.parser.error(f'{"--out " if args.out is not None else ""}{out}: cannot make the run folder ({e.strerror}); '
                          f'give a folder you can write to with --out DIR')
    args.made = made
    return out


def _remove_empty_run_dirs(args) -> None:
    for d in getattr(args, 'made', []):  # innermost first
        try: d.rmdir()
        except OSError: break  # not empty (the run wrote something), or gone


def _learner(args, model_name: str, opt_name: str, precision: str, bs: int):
    """Data, model, optimiser and the step callbacks (TrainCB, DeviceCB, MixedPrecisionCB) for a command."""
    from functools import partial

    import torch
    from torch import optim
    from torch.nn import functional as F

    from .callbacks import DeviceCB, ProgressCB, TrainCB
    from .data import set_seed
    from .learner import Learner
    from .models import resolve_model

    device = _device(args.device, args.parser)
    if args.threads is not None: torch.set_num_threads(args.threads)
    set_seed(args.seed)  # torch, python's random and numpy: the weights, the shuffle and anything a factory draws
    data = args.loaded = _load(args)
    # keep the data on a GPU when there is one: batches are then cut there, with no copy per batch
    dls = data.dls(bs, seed=args.seed, device=None if device.type == 'cpu' else device, workers=getattr(args, 'workers', 0))
    model = _model(model_name, data.info, getattr(args, 'pretrained', None))
    opt_func = (partial(optim.SGD, momentum=SGD_MOMENTUM) if opt_name == 'sgd'
                else partial(optim.AdamW, weight_decay=ADAMW_WEIGHT_DECAY))
    cbs = [TrainCB(), DeviceCB(device), ProgressCB()]
    if precision != 'no':
        from .callbacks import MixedPrecisionCB
        cbs.append(MixedPrecisionCB(dtype=torch.bfloat16 if precision == 'bf16' else torch.float16))
    print(f'data: {args.data} ({len(data.x_train):,} train, {len(data.x_valid):,} valid, {tuple(data.input_shape)}'
          + (f', {data.n_out} classes' if data.classes is not None and data.info['kind'] not in _TEN_DIGITS else '')
          + f'), model: {resolve_model(model_name, data.input_shape, data.info["kind"])}, opt: {opt_name}, device: {device}, '
          + f'precision: {precision}')
    loss = F.mse_loss if data.task == 'regression' else F.cross_entropy
    return Learner(model, dls, loss, lr=DEFAULT_LR[opt_name], cbs=cbs, opt_func=opt_func)


_TEN_DIGITS = ('digits', 'fashion-mnist', 'mnist1d')  # their table line says no class count, as before


def _task_columns(args) -> list[str] | None:
    """The columns a fit logs, where known before the data is loaded (user data may add balanced_accuracy: the CSV
    logger then checks the file's header before the first batch)."""
    if getattr(args, 'task', 'classification') == 'regression': return _regression_columns()
    return _columns() if getattr(args, 'data', 'digits') in _TEN_DIGITS else None


def _regression_columns() -> list[str]:
    return ['mae', 'loss', 'epoch', 'train']


UNBALANCED = 1.5  # largest class over smallest in the training samples beyond which balanced_accuracy is shown too


def _unbalanced(*ys) -> bool:
    """Whether the largest class holds over UNBALANCED times the samples of the smallest, over the targets `ys` (label
    tensors, or the datasets of images decoded each epoch)."""
    import torch
    y = torch.cat([t if isinstance(t, torch.Tensor) else torch.as_tensor(t.labels) for t in ys]).long().flatten()
    counts = torch.bincount(y)
    return bool(counts.min() == 0 or counts.max() > UNBALANCED * counts.min())


def _labels(data) -> list:
    return [data.x_train if data.y_train is None else data.y_train, data.x_valid if data.y_valid is None else data.y_valid]


def _task_metric_cbs(task: str, n_out: int, balanced: bool = False) -> list:
    """The metrics of a classification (`_metric_cbs`, with balanced_accuracy for unbalanced classes) or, for
    regression, the mean absolute error beside the loss (mean squared error), both in the target's units."""
    if task != 'regression': return _metric_cbs(n_out, balanced=True) if balanced else _metric_cbs()  # micro: any n_out
    from torchmetrics.regression import MeanAbsoluteError

    from .callbacks import MetricsCB
    m = MetricsCB(mae=MeanAbsoluteError())
    assert m.columns == _regression_columns()
    return [m]


def _columns(balanced: bool = False) -> list[str]:
    """What _metric_cbs logs (a --csv file is checked against it up front): `accuracy` is the micro accuracy, the share
    of samples classified right; `balanced_accuracy`, the mean recall over classes, joins it for unbalanced classes."""
    return ['accuracy', *(['balanced_accuracy'] if balanced else []), 'loss', 'epoch', 'train']


def _metric_cbs(n_classes: int = N_CLASSES, balanced: bool = False) -> list:
    """MetricsCB with the built-in accuracies: exact counts summed over processes, and no torchmetrics import (with the
    scipy it pulls in, about 3 s before the first batch)."""
    from .callbacks import MetricsCB
    from .callbacks.metrics import BalancedAccuracy, MicroAccuracy
    ms = {'accuracy': MicroAccuracy(), **({'balanced_accuracy': BalancedAccuracy(n_classes)} if balanced else {})}
    m = MetricsCB(**ms)
    assert m.columns == _columns(balanced)
    return [m]


def _train(learn, out: Path, run) -> int:
    """`run(extra_cbs)` fits; the metrics plot of the phases that finished is saved even on ctrl-C. A NaN or inf loss
    ends the fit (TerminateOnNaNCB) and the command with exit code 1, naming where it happened."""
    from .callbacks import TerminateOnNaNCB
    from .learner import Preempted
    nan = TerminateOnNaNCB('stop')

    def plot() -> str:
        if not learn.metrics.history: return ''
        learn.plot_metrics(out / 'metrics.png')
        return f'the plot of the {len(learn.metrics.history)} finished phases is in {out / "metrics.png"}'
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='(TerminateOnNaNCB|MetricsCB): ')  # said below, as the error
            run([nan])
    except (KeyboardInterrupt, Preempted):
        if saved := plot(): print(f'interrupted: {saved}')
        raise
    saved = plot()
    if nan.stopped_at is not None: problem = nan.message
    elif (bad := next((r for r in learn.metrics.history if not math.isfinite(r['loss'])), None)) is not None:
        problem = (f"the {bad['train']} loss of epoch {bad['epoch']} is {bad['loss']}: the weights diverged in the last "
                   f'training steps; lower --lr')
    else: return 0
    print(f'ultraloop: error: {problem}' + (f' ({saved})' if saved else ''), file=sys.stderr)
    return 1


def _lr_find_quietly(learn, out: Path, **kwargs) -> float | None:
    """learn.lr_find, saving its plot in `out`; its no-clear-descent warning is left out, the commands say so themselves."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='lr_find', category=UserWarning)
        return learn.lr_find(plot_path=out / 'lr_find.png', **kwargs)


def _last_valid(learn) -> str:
    hist = [h for h in learn.metrics.history if h.get('train') != 'train']
    shown = ('accuracy', 'balanced_accuracy', 'mae', 'loss')
    return ', '.join(f'{k} {v:.3f}' for k, v in hist[-1].items() if k in shown) if hist else ''


# ---- the commands ------------------------------------------------------------------------------------------------
def _demo(args) -> int:
    args.data, args.data_dir = 'digits', None
    _check_paths(args)
    learn = _learner(args, 'cnn', 'adamw', 'no', 64)
    out = _run_dir(args, 'demo')
    print('LR finder: the lr grows 1.3x per batch from 1e-5 until the smoothed loss exceeds 3x its minimum')
    lr = _lr_find_quietly(learn, out)
    if lr is None: lr = DEFAULT_LR['adamw']; print(f'no suggested lr (the loss shows no clear descent); using lr {lr:g}')
    else: print(f'suggested lr: {lr:.3g}')
    learn.add_cbs(_metric_cbs())
    print(f'fit_one_cycle({args.epochs}, lr_max={lr:.3g})')
    if code := _train(learn, out, lambda cbs: learn.fit_one_cycle(args.epochs, lr, cbs=cbs)): return code
    print(f'valid: {_last_valid(learn)}')
    print(f'run folder: {out} (metrics.png, lr_find.png)')
    return 0


def _check_long_run_args(args) -> None:
    ck = args.checkpoint_dir
    for flag, given in (('--every-batches', args.every_batches is not None), ('--resume', args.resume),
                        ('--fresh', args.fresh)):
        if given and ck is None: args.parser.error(f'{flag} needs --checkpoint-dir DIR, the folder of the checkpoints')
    if args.resume and args.fresh: args.parser.error('--resume and --fresh contradict each other: give one (or neither: resume)')
    if ck is not None and ck.exists() and not ck.is_dir(): args.parser.error(f'--checkpoint-dir {ck} is a file; give a folder')


def _fit(args) -> int:
    _check_data_args(args)
    _check_long_run_args(args)
    learn = _learner(args, args.model, args.opt, args.precision, args.bs)
    out = _run_dir(args, 'fit')
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.opt]
    from .callbacks.distributed import DistributedCB, launched
    if launched(): learn.add_cb(DistributedCB(args.strategy))  # torchrun started this process: train with the others
    data = args.loaded
    learn.add_cbs(_task_metric_cbs(data.task, data.n_out, data.task != 'regression' and _unbalanced(*_labels(data))))
    if args.csv is not None:
        from .callbacks import CSVLoggerCB
        learn.add_cb(CSVLoggerCB(args.csv))
    learn.add_cbs(_logger_cbs(args, out))
    resume, ck, stop, newest = None, args.checkpoint_dir, None, None
    if args.early_stop is not None:
        from .callbacks import EarlyStoppingCB
        learn.add_cb(stop := EarlyStoppingCB(patience=args.early_stop))
    if ck is not None:
        from .callbacks import CheckpointCB
        from .state import newest_checkpoint
        learn.add_cb(CheckpointCB(ck, every_batches=args.every_batches))
        newest = newest_checkpoint(ck) if not args.fresh and ck.is_dir() else None
        if newest is not None: print(f'resuming from {newest}')
        elif not args.fresh: print(f'no checkpoint in {ck} yet: starting from the beginning')
        if not args.fresh: resume = 'auto'  # the CheckpointCB's folder: the newest there, else a fresh start
    if args.init_from is not None and newest is None:  # a run going on from its own checkpoint keeps its weights
        learn.load_state(args.init_from, weights_only=True)
        print(f'weights from {args.init_from} (a new run)')

    def run(cbs):
        try:
            if args.one_cycle: learn.fit_one_cycle(args.epochs, lr, cbs=cbs, resume=resume)
            else: learn.fit(args.epochs, lr=lr, cbs=cbs, resume=resume)
        except KeyboardInterrupt:
            if ck is not None: print(f'checkpoint in {ck}: {_again(args)} goes on from there', file=sys.stderr)
            raise
    from .learner import Preempted
    try: code = _train(learn, out, run)
    except Preempted as e:  # SIGTERM or SIGUSR1: fit printed where it stopped and the checkpoint
        if _main_process():
            print(f'ultraloop: stopped by {e.signal.name}, exit code {EXIT_RESUMABLE}: '
                  + (f'{_again(args)} goes on from the checkpoint' if e.checkpoint is not None
                     else 'without --checkpoint-dir there is no checkpoint to go on from'), file=sys.stderr)
        return EXIT_RESUMABLE
    if code: return code
    if stop is not None and stop.stopped_epoch is not None:
        print(f'early stop after epoch {stop.stopped_epoch}: no better valid loss for {stop.patience} epochs')
    print(f'valid: {_last_valid(learn)}')
    if _main_process(): _save_run(args, learn, out)
    print(f'run folder: {out} (metrics.png)' + (f'; metrics CSV: {args.csv}' if args.csv is not None else ''))
    for cb in learn.cbs:  # the trackers --log added say where their runs went
        if getattr(cb, 'where', None) and _main_process(): print(f'{type(cb).__name__}: {cb.where}')
    if args.save is not None:
        _save_weights(learn.model, args.save)
        print(f'weights: {args.save} (torch.load({str(args.save)!r}, weights_only=True) gives the state_dict)')
    return 0


def _save_run(args, learn, out: Path) -> None:
    """The run's weights (model.pt) and config.toml: every option, and the data's classes, statistics and split, so
    `fit --config` repeats the run and `predict`/`evaluate` prepare new data as this run's."""
    from .sources import dump_toml
    _save_weights(getattr(learn.model, 'module', learn.model), out / 'model.pt', '--out')  # DDP's wrapper: the model's own keys
    options = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS and isinstance(v, (str, int, float, Path))}
    info = args.loaded.info
    cfg = {'ultraloop': {'version': sys.modules[__package__].__version__, 'command': args.command},
           'options': options, 'data': info}
    (out / 'config.toml').write_text(dump_toml(cfg), encoding='utf-8')
    print(f'config: {out / "config.toml"} (ultraloop fit --config {out / "config.toml"} runs it again); '
          f'weights: {out / "model.pt"}')


_NOT_OPTIONS = ('command', 'parser', 'run', 'made', 'loaded', 'data_info', 'config', 'debug', 'argv', 'log')
# output paths: a run repeated from its config gets its own folder and files unless they are given again
_OUTPUT_OPTIONS = ('out', 'csv', 'save', 'checkpoint_dir', 'every_batches', 'resume', 'fresh')


def _again(args) -> str:
    """The command that goes on from the checkpoint: this one, without --fresh."""
    argv = [a for a in args.argv if a != '--fresh']
    if 'LOCAL_RANK' in os.environ: return 'the same torchrun command'
    return 'the same command, ' + shlex.join(['ultraloop', *argv]) + ','


def _logger_cbs(args, out: Path) -> list:
    """The callbacks --log asks for: CSV and TensorBoard files in the run folder, a W&B run (its files in the run
    folder too) or an MLflow run named after the run folder, with the command's options as hyper-parameters."""
    from . import callbacks as cbs
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
               if v is not None and k not in _NOT_OPTIONS}
    made = {'csv': lambda: cbs.CSVLoggerCB(out / 'history.csv'), 'tensorboard': lambda: cbs.TensorBoardCB(out / 'tensorboard'),
            'wandb': lambda: cbs.WandbCB(project='ultraloop', name=out.name, config=options, dir=str(out)),
            'mlflow': lambda: cbs.MLflowCB(run_name=out.name, params=options)}
    return [made[n]() for n in args.log]


def _save_weights(model, path: Path, option: str = '--save') -> None:
    """The model's state_dict, on the CPU, written to a temporary file then renamed: a crash leaves no half file."""
    import torch
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a file it cannot open as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise ValueError(f'{option} {path}: the weights could not be written ({e}); give a path you can write to') from None


def _lr_find(args) -> int:
    _check_data_args(args)
    learn = _learner(args, args.model, args.opt, args.precision, args.bs)
    out = _run_dir(args, 'lr-find')
    print(f'LR finder: the lr grows {args.lr_mult:g}x per batch from {args.start_lr:g} until the smoothed loss exceeds '
          f'3x its minimum')
    lr = _lr_find_quietly(learn, out, start_lr=args.start_lr, gamma=args.lr_mult, max_epochs=args.max_epochs)
    print('suggested lr: none (the loss shows no clear descent: see the plot)' if lr is None else f'suggested lr: {lr:.3g}')
    print(f'run folder: {out} (lr_find.png)')
    return 0


# ---- a fitted model on new data -----------------------------------------------------------------------------------
def _run_config(args) -> tuple[dict, Path]:
    """The config.toml of the run --checkpoint comes from: --config, else the one beside it or in the folder above."""
    from .sources import read_toml
    ck = args.checkpoint
    if not ck.is_file():
        raise ValueError(f'--checkpoint {ck}: no such file; give the weights of a fit (runs/<run>/model.pt) or a checkpoint')
    path = args.config or next((d / 'config.toml' for d in (ck.parent, ck.parent.parent) if (d / 'config.toml').is_file()),
                               None)
    if path is None:
        raise ValueError(f'no config.toml beside {ck} or in {ck.parent.parent}: give the config of the run that made it '
                         f'with --config runs/<run>/config.toml')
    if not path.is_file(): raise ValueError(f'--config {path}: no such file; give the config.toml of a fit')
    cfg = read_toml(path)
    if not isinstance(cfg.get('data'), dict) or 'model' not in cfg.get('options', {}):
        raise ValueError(f'{path} is not the config.toml of a fit (it lacks the [options] and [data] tables fit writes)')
    return cfg, path


def _fitted_model(args, cfg: dict, path: Path):
    """The run's model with the weights of --checkpoint (a model.pt or --save file, or a CheckpointCB checkpoint)."""
    import torch
    model = _model(cfg['options']['model'], cfg['data'])
    try: sd = torch.load(args.checkpoint, weights_only=True, map_location='cpu')
    except Exception as e:  # pickle and zip errors alike: the file is not a torch file of tensors
        raise ValueError(f'--checkpoint {args.checkpoint} cannot be read as saved weights ({type(e).__name__}: {e})') from None
    if isinstance(sd, dict) and isinstance(sd.get('model'), dict): sd = sd['model']  # a CheckpointCB checkpoint
    try: model.load_state_dict(sd)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f'--checkpoint {args.checkpoint} does not hold the weights of the model in {path} ({first}); '
                         f'give the model.pt of that run') from None
    return model.eval()


def _outputs(model, x, bs: int, device):
    """The model's outputs over `x` in batches of `bs`, on the CPU."""
    import torch
    model.to(device)
    with torch.no_grad(): return torch.cat([model(x[i:i + bs].to(device)).float().cpu() for i in range(0, len(x), bs)])


def _saved_run(args):
    """What predict and evaluate start from: the run's config file, the device, the fitted model and the data's
    preparation (the config's `data` table)."""
    import torch
    _check_paths(args)
    cfg, path = _run_config(args)
    device = _device(args.device, args.parser)
    if args.threads is not None: torch.set_num_threads(args.threads)
    model = _fitted_model(args, cfg, path)
    info = cfg['data']
    return path, device, model, info


def _predict(args) -> int:
    import csv

    from .sources import load_inputs
    path, device, model, info = _saved_run(args)
    x, _, ids = load_inputs(args.data, info, labelled=False)
    out = args.out if args.out is not None else _run_dir(args, 'predict') / 'preds.csv'
    preds = _outputs(model, x, args.bs, device)
    if info['task'] == 'regression':
        cols = ['prediction'] if preds.shape[1] == 1 else [f'prediction_{i}' for i in range(preds.shape[1])]
        rows = [[i, *map(float, p)] for i, p in zip(ids, preds)]
    else:
        prob, cls = preds.softmax(1).max(1)
        cols, rows = ['prediction', 'probability'], [[i, info['classes'][c], f'{p:.6f}'] for i, c, p in
                                                     zip(ids, cls.tolist(), prob.tolist())]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, 'w', newline='', encoding='utf-8') as f: csv.writer(f).writerows([['id', *cols], *rows])
    print(f'model: {args.checkpoint} (config {path}); data: {args.data} ({len(ids):,} samples)')
    print(f'predictions: {out}')
    return 0


def _evaluate(args) -> int:
    import torch
    from torch.nn import functional as F

    from .callbacks import CapturePreds, DeviceCB, ProgressCB, TrainCB
    from .data import DataLoaders
    from .learner import Learner
    from .sources import load_inputs
    path, device, model, info = _saved_run(args)
    x, y, _ = load_inputs(args.data, info, labelled=True)
    regression = info['task'] == 'regression'
    metric_cbs = _task_metric_cbs(info['task'], info['n_out'], not regression and _unbalanced(y))
    dls = DataLoaders.from_tensors(x, y, x, y, bs=args.bs, shuffle=False)
    learn = Learner(model, dls, F.mse_loss if regression else F.cross_entropy,
                    cbs=[TrainCB(), DeviceCB(device), ProgressCB(), *metric_cbs])
    print(f'model: {args.checkpoint} (config {path}); data: {args.data} ({len(x):,} samples)')
    cp = CapturePreds()
    learn.fit(1, train=False, cbs=[cp])
    out = _run_dir(args, 'evaluate')
    print(f'{"eval"}: {_last_valid(learn)}')
    if not regression:
        classes = info['classes']
        n = len(classes)
        cm = torch.bincount(y * n + cp.all_preds.argmax(1), minlength=n * n).reshape(n, n)
        _plot_confusion(cm, classes, out / 'confusion.png')
        width = max(len(c) for c in classes)
        print('confusion matrix (rows: true class, columns: predicted):')
        for c, row in zip(classes, cm.tolist()): print(f'  {c:>{width}}  ' + ' '.join(f'{v:>5}' for v in row))
    print(f'run folder: {out}' + ('' if regression else ' (confusion.png)'))
    return 0


def _plot_confusion(cm, classes: list, path: Path) -> None:
    from .plotting import show_or_save, subplots
    n = len(classes)
    fig, ax = subplots(figsize=(1.5 + 0.5 * n, 1 + 0.5 * n))
    ax.imshow(cm.numpy(), cmap='Blues')
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel('predicted'); ax.set_ylabel('true class')
    top = int(cm.max()) if cm.numel() else 0
    for (i, j), v in zip([(i, j) for i in range(n) for j in range(n)], cm.flatten().tolist()):
        ax.text(j, i, str(v), ha='center', va='center', color='white' if v > top / 2 else 'black')
    fig.tight_layout()
    show_or_save(fig, path, 'confusion.png')


def _with_config(parser, argv, args):
    """Parse `argv` again with the options of --config's run as defaults, so what the command line gives wins; the
    run's split and statistics come along when --data is the run's."""
    from .sources import read_toml
    path = args.config
    if not path.is_file(): raise ValueError(f'--config {path}: no such file; give a run\'s config.toml (runs/<run>/config.toml)')
    opts = read_toml(path).get('options')
    if not isinstance(opts, dict): raise ValueError(f'{path} has no [options] table; give the config.toml a fit wrote')
    known = {a.dest for a in args.parser._actions}
    unknown = [k for k in opts if k not in known]
    if unknown: raise ValueError(f'{path}: unknown option {unknown[0]!r} for ultraloop {args.command}; remove it from the file')
    args.parser.set_defaults(**{k: v for k, v in opts.items() if k not in _OUTPUT_OPTIONS})
    new = parser.parse_args(argv)
    if new.data == opts.get('data'): new.data_info = read_toml(path).get('data')
    return new


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning during a command, as one line like its errors (Python's own format adds the file and the code line)."""
    print(f'ultraloop: warning: {" ".join(str(message).split())}', file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the `ultraloop` command; returns the exit code (2 for bad arguments or data, with a one-line message).
    Only the errors a user can cause (ValueError, TypeError, OSError) are shortened to a line, and `--debug` shows
    them whole; any other exception, such as a bug in the library, propagates with its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if args.command in ('fit', 'lr-find') and args.config is not None:
            args = _with_config(parser, argv, args)
            args.argv = sys.argv[1:] if argv is None else list(argv)
        with contextlib.nullcontext() if _main_process() else contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.showwarning = _warn_in_one_line
            return args.run(args)  # under torchrun only the main process prints
    except (ValueError, TypeError, OSError) as e:  # bad values, missing or unwritable files: the user can fix these
        if args.debug: raise
        msg = ' '.join(str(e).split())  # one line, whatever the message held
        print(f'ultraloop: error: {msg} (run with --debug for the traceback)', file=sys.stderr)
        return 2
    except ImportError as e:  # an optional dependency is missing
        if (e.name or '').startswith('ultraloop'): raise  # a broken install or a bug, not a missing extra
        hint = '' if 'pip install' in str(e) else ' (pip install "ultraloop[demo]" installs what the commands use)'
        print(f'ultraloop: error: {e}{hint}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('ultraloop: interrupted', file=sys.stderr)
        return 130
    finally:
        _remove_empty_run_dirs(args)


if __name__ == '__main__':
    sys.exit(main())
