"""The `ultraloop` command: `demo` trains the seed's CNN on the bundled digits; `fit` and `lr-find` on digits or FashionMNIST."""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
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


def _add_run_options(p: argparse.ArgumentParser, threads: int | None = None) -> None:
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda', 'mps'], default='auto',
                   help='where to train; auto: mps, else cuda, else cpu (default: auto)')
    p.add_argument('--seed', type=_int_at_least(0, MAX_SEED), default=0,
                   help='seeds the weights and the shuffle order (default: 0)')
    default = ("torch's choice" if threads is None
               else f'{threads}: a model this small runs fastest on one thread, above all on a busy machine')
    p.add_argument('--threads', type=_int_at_least(1), default=threads, help=f'CPU threads torch may use (default: {default})')
    p.add_argument('--out', type=Path, default=None, metavar='DIR',
                   help='run folder for the plots (default: runs/<command>-<date>-<time>)')
    p.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                   help='on an error, show the full traceback instead of one line')


def _add_data_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument('--data', choices=['digits', 'fashion-mnist'], default='digits',
                   help="digits: scikit-learn's bundled 8x8 digits, no download; fashion-mnist: the four IDX files "
                        'in --data-dir (default: digits)')
    p.add_argument('--data-dir', type=Path, default=None, metavar='DIR',
                   help='folder holding the FashionMNIST .gz files, or torchvision\'s DIR/FashionMNIST/raw '
                        '(default: data; only with --data fashion-mnist)')
    p.add_argument('--model', choices=['cnn', 'mlp'], default='cnn',
                   help="cnn: the seed's three-convolution CNN; mlp: one hidden layer of 128 (default: cnn)")
    p.add_argument('--bs', type=_int_at_least(1), default=64, help='batch size (default: 64)')
    p.add_argument('--opt', choices=['sgd', 'adamw'], default='adamw',
                   help=f'optimiser: sgd (momentum {SGD_MOMENTUM}) or adamw (weight decay {ADAMW_WEIGHT_DECAY}) '
                        '(default: adamw)')
    p.add_argument('--precision', choices=['no', 'bf16', 'fp16'], default='no',
                   help='mixed precision with MixedPrecisionCB: bf16, or fp16 with a gradient scaler (default: no)')
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

    fit = sub.add_parser('fit', help='fit a model on digits or FashionMNIST', description='Fit a model, print the '
                         'metrics table (accuracy: the share of samples classified right) and save the metrics plot in '
                         'the run folder. A NaN or inf loss stops the run with exit code 1, naming the epoch and '
                         'batch; SIGTERM or SIGUSR1 stops it at the end of a batch (checkpointed with --checkpoint-dir) '
                         f'with exit code {EXIT_RESUMABLE}. Started by torchrun (torchrun --nproc-per-node 2 -m '
                         'ultraloop fit ...), the processes train '
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
    for p in (demo, fit, lrf): p.set_defaults(parser=p)
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
    if args.out is not None and (problem := _file_problem(args.out, folder=True)) is not None:
        args.parser.error(f'--out: {problem} for the run')
    if getattr(args, 'csv', None) is not None:
        if (problem := _csv_problem(args.csv, _columns())) is not None: args.parser.error(f'--csv: {problem}')
    if getattr(args, 'save', None) is not None:
        if (problem := _file_problem(args.save)) is not None: args.parser.error(f'--save: {problem}')


def _check_data_args(args) -> None:
    _check_paths(args)
    if args.data == 'digits' and args.data_dir is not None:
        args.parser.error('--data-dir is for --data fashion-mnist; the digits ship with scikit-learn')
    if args.data == 'fashion-mnist':
        if args.data_dir is None: args.data_dir = Path('data')
        if not args.data_dir.is_dir():
            args.parser.error(f'--data-dir {args.data_dir} is not a folder; put the FashionMNIST IDX files in one')


def _load(args):
    from .datasets import digits, fashion_mnist
    return fashion_mnist(args.data_dir) if args.data == 'fashion-mnist' else digits()


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
    from .data import DataLoaders
    from .learner import Learner
    from .models import get_model, mlp

    device = _device(args.device, args.parser)
    if args.threads is not None: torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    xt, yt, xv, yv = _load(args)
    # keep the data on a GPU when there is one: batches are then cut there, with no copy per batch
    dls = DataLoaders.from_tensors(xt, yt, xv, yv, bs=bs, seed=args.seed, device=None if device.type == 'cpu' else device)
    model = get_model(N_CLASSES) if model_name == 'cnn' else mlp(xt[0].numel(), 128, N_CLASSES)
    opt_func = (partial(optim.SGD, momentum=SGD_MOMENTUM) if opt_name == 'sgd'
                else partial(optim.AdamW, weight_decay=ADAMW_WEIGHT_DECAY))
    cbs = [TrainCB(), DeviceCB(device), ProgressCB()]
    if precision != 'no':
        from .callbacks import MixedPrecisionCB
        cbs.append(MixedPrecisionCB(dtype=torch.bfloat16 if precision == 'bf16' else torch.float16))
    print(f'data: {args.data} ({len(xt):,} train, {len(xv):,} valid, {tuple(xt.shape[1:])}), model: {model_name}, '
          f'opt: {opt_name}, device: {device}, precision: {precision}')
    return Learner(model, dls, F.cross_entropy, lr=DEFAULT_LR[opt_name], cbs=cbs, opt_func=opt_func)


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
    return ', '.join(f'{k} {v:.3f}' for k, v in hist[-1].items() if k in ('accuracy', 'loss')) if hist else ''


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
    learn.add_cbs(_metric_cbs())
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
    print(f'run folder: {out} (metrics.png)' + (f'; metrics CSV: {args.csv}' if args.csv is not None else ''))
    if args.save is not None:
        _save_weights(learn.model, args.save)
        print(f'weights: {args.save} (torch.load({str(args.save)!r}, weights_only=True) gives the state_dict)')
    return 0


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
               if v is not None and k not in ('run', 'parser', 'made', 'debug', 'log', 'argv')}
    made = {'csv': lambda: cbs.CSVLoggerCB(out / 'history.csv'), 'tensorboard': lambda: cbs.TensorBoardCB(out / 'tensorboard'),
            'wandb': lambda: cbs.WandbCB(project='ultraloop', name=out.name, config=options, dir=str(out)),
            'mlflow': lambda: cbs.MLflowCB(run_name=out.name, params=options)}
    return [made[n]() for n in args.log]


def _save_weights(model, path: Path) -> None:
    """The model's state_dict, on the CPU, written to a temporary file then renamed: a crash leaves no half file."""
    import torch
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a file it cannot open as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise ValueError(f'--save {path}: the weights could not be written ({e}); give a path you can write to') from None


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


def main(argv: list[str] | None = None) -> int:
    """Run the `ultraloop` command; returns the exit code (2 for bad arguments or data, with a one-line message).
    Only the errors a user can cause (ValueError, TypeError, OSError) are shortened to a line, and `--debug` shows
    them whole; any other exception, such as a bug in the library, propagates with its traceback."""
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with contextlib.nullcontext() if _main_process() else contextlib.redirect_stdout(io.StringIO()):
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
