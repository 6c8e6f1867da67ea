"""The `ultraloop` command end to end: demo, fit and lr-find in a subprocess, and every kind of bad argument."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ultraloop.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PNG = b'\x89PNG\r\n\x1a\n'


def run_cli(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, '-m', 'ultraloop', *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout)


def option_strings(command: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a.choices, dict)).choices[command]
    return [s for a in sub._actions for s in a.option_strings if s.startswith('--') and s != '--help']


@pytest.mark.parametrize('command', ['demo', 'fit', 'lr-find'])
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as e: main([command, '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    opts = option_strings(command)
    assert opts, 'the parser has options'
    for opt in opts:
        line = re.search(rf'^  {re.escape(opt)}\b.*$', out, re.M)
        assert line, f'{opt} missing from `ultraloop {command} --help`'
    if command != 'demo':
        for opt in ('--data', '--data-dir', '--model', '--bs', '--opt', '--precision', '--device', '--seed'):
            assert opt in opts


@pytest.mark.parametrize('argv, message', [
    (['fit', '--epochs', '-1'], r'^ultraloop fit: error: argument --epochs: must be >= 1, got -1 \(see ultraloop fit --help\)$'),
    (['fit', '--epochs', 'two'], r"argument --epochs: expected a whole number, got 'two'"),
    (['fit', '--model', 'resnet'], r"argument --model: invalid choice: 'resnet'"),
    (['fit', '--lr', '0'], r'argument --lr: must be > 0, got 0'),
    (['fit', '--lr', 'nan'], r'argument --lr: must be > 0, got nan'),
    (['lr-find', '--lr-mult', '1'], r'argument --lr-mult: must be > 1, got 1'),
    (['fit', '--bs', '0'], r'argument --bs: must be >= 1, got 0'),
    (['fit', '--opt', 'adam'], r"argument --opt: invalid choice: 'adam'"),
    (['fit', '--precision', 'fp8'], r"argument --precision: invalid choice: 'fp8'"),
    (['demo', '--epochs', '0'], r'^ultraloop demo: error: argument --epochs: must be >= 1, got 0'),
    (['train'], r"^ultraloop: error: argument COMMAND: invalid choice: 'train'"),
    ([], r'^ultraloop: error: the following arguments are required: COMMAND'),
    (['fit', '--data-dir', 'data'], r'--data-dir is for --data fashion-mnist; the digits ship with scikit-learn'),
    (['lr-find', '--data', 'fashion-mnist', '--data-dir', 'no/such/dir'], r'--data-dir no/such/dir is not a folder'),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e: main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err
    assert re.search(message, err.strip())


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on a machine without CUDA')
def test_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e: main(['fit', '--device', 'cuda'])
    assert e.value.code == 2
    assert re.fullmatch(r'ultraloop fit: error: --device cuda: CUDA is not available here \(torch .*\); use --device cpu '
                        r'or auto \(see ultraloop fit --help\)\n', capsys.readouterr().err)


def test_subprocess_bad_arguments_and_missing_files_one_line_no_traceback(tmp_path):
    r = run_cli('fit', '--epochs', '-3')
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr == 'ultraloop fit: error: argument --epochs: must be >= 1, got -3 (see ultraloop fit --help)\n'
    r = run_cli('fit', '--data', 'fashion-mnist', '--data-dir', tmp_path, '--out', tmp_path / 'run')
    assert r.returncode == 2, r.stderr
    last = r.stderr.splitlines()
    assert len(last) == 1 and 'Traceback' not in r.stderr
    assert re.fullmatch(r'ultraloop: error: FashionMNIST files not found: train-images-idx3-ubyte\.gz, .*'
                        r'put the four IDX files .* in .*/FashionMNIST/raw/', last[0])
