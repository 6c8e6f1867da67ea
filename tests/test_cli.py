"""The `ultraloop` command end to end: demo, fit and lr-find, and every kind of bad argument. Most runs call the command's
`main` in this process (each new interpreter costs seconds importing torch); the demo, the installed console script and
what needs a terminal or a signal run as real subprocesses."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ultraloop.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PNG = b'\x89PNG\r\n\x1a\n'


def run_cli(*args, cwd=None, timeout=120, env_extra=None):
    import os
    env = {**os.environ, **env_extra} if env_extra else None
    return subprocess.run([sys.executable, '-m', 'ultraloop', *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env=env)


@pytest.fixture
def cli(capsys, monkeypatch, keep_threads):
    """Runs the command in this process as `python -m ultraloop ARGS` would (optionally from folder `cwd`); returns what
    a subprocess run gives: returncode, stdout, stderr."""
    import types

    def run(*args, cwd=None):
        if cwd is not None: monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main(list(map(str, args)))
        out, err = capsys.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return run


@pytest.fixture
def keep_threads():
    """In-process runs with --threads change torch's thread count for the whole test process: put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


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


def test_console_script_is_installed_and_answers():
    exe = Path(sys.executable).with_name('ultraloop')  # what `pip install` makes of the entry point; demo.sh runs it
    if not exe.exists(): pytest.skip('ultraloop is not installed in this environment (pip install -e .)')
    r = subprocess.run([str(exe), '--help'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith('usage: ultraloop [-h] [--debug] COMMAND ...')
    assert re.search(r'^    demo ', r.stdout, re.M) and re.search(r'^    lr-find ', r.stdout, re.M)


@pytest.mark.parametrize('argv, message', [
    (['fit', '--epochs', '-1'], r'^ultraloop fit: error: argument --epochs: must be >= 1, got -1 \(see ultraloop fit --help\)$'),
    (['fit', '--epochs', 'two'], r"argument --epochs: expected a whole number, got 'two'"),
    (['fit', '--model', 'resnet'], r"argument --model: invalid choice: 'resnet'"),
    (['fit', '--lr', '0'], r'argument --lr: must be a finite number > 0, got 0'),
    (['fit', '--lr', 'nan'], r'argument --lr: must be a finite number > 0, got nan'),
    (['fit', '--lr', 'inf'], r'argument --lr: must be a finite number > 0, got inf'),
    (['lr-find', '--start-lr', 'inf'], r'argument --start-lr: must be a finite number > 0, got inf'),
    (['lr-find', '--lr-mult', '1'], r'argument --lr-mult: must be a finite number > 1, got 1'),
    (['fit', '--seed', str(2**64)], r'--seed: must be <= 18446744073709551615 \(2\*\*64 - 1\), got 18446744073709551616'),
    (['fit', '--bs', '0'], r'argument --bs: must be >= 1, got 0'),
    (['fit', '--opt', 'adam'], r"argument --opt: invalid choice: 'adam'"),
    (['fit', '--precision', 'fp8'], r"argument --precision: invalid choice: 'fp8'"),
    (['demo', '--epochs', '0'], r'^ultraloop demo: error: argument --epochs: must be >= 1, got 0'),
    (['train'], r"^ultraloop: error: argument COMMAND: invalid choice: 'train'"),
    ([], r'^ultraloop: error: the following arguments are required: COMMAND'),
    (['fit', '--data-dir', 'data'], r'--data-dir is for --data fashion-mnist; the digits ship with scikit-learn'),
    (['lr-find', '--data', 'fashion-mnist', '--data-dir', 'no/such/dir'], r'--data-dir no/such/dir is not a folder'),
    (['fit', '--every-batches', '3'], r'--every-batches needs --checkpoint-dir DIR, the folder of the checkpoints'),
    (['fit', '--resume'], r'--resume needs --checkpoint-dir DIR, the folder of the checkpoints'),
    (['fit', '--checkpoint-dir', 'README.md'], r'--checkpoint-dir README.md is a file; give a folder'),
    (['fit', '--early-stop', '0'], r'argument --early-stop: must be >= 1, got 0'),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e: main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err
    assert re.search(message, err.strip())


def test_bad_paths_exit_2_with_one_line(tmp_path, capsys, keep_threads):
    a_file = tmp_path / 'notes.txt'
    a_file.write_text('x')
    for argv, message in [(['fit', '--out', a_file], f'--out: {a_file} is a file; give the path of a folder for the run'),
                          (['fit', '--csv', tmp_path], f'--csv: {tmp_path} is a folder; give the path of a .csv file'),
                          (['demo', '--out', a_file], f'--out: {a_file} is a file'),
                          (['fit', '--csv', a_file / 'm.csv'], f'--csv: {a_file} is a file, so {a_file / "m.csv"} cannot '
                                                               f'be written; give a path in a folder')]:
        with pytest.raises(SystemExit) as e: main(list(map(str, argv)))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count('\n') == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on a machine without CUDA')
def test_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e: main(['fit', '--device', 'cuda'])
    assert e.value.code == 2
    assert re.fullmatch(r'ultraloop fit: error: --device cuda: CUDA is not available here \(torch .*\); use --device cpu '
                        r'or auto \(see ultraloop fit --help\)\n', capsys.readouterr().err)


def test_bad_arguments_and_missing_files_one_line_no_traceback(tmp_path, cli, capsys):
    with pytest.raises(SystemExit) as e: main(['fit', '--epochs', '-3'])
    assert e.value.code == 2 and capsys.readouterr() == (
        '', 'ultraloop fit: error: argument --epochs: must be >= 1, got -3 (see ultraloop fit --help)\n')
    r = cli('fit', '--data', 'fashion-mnist', '--data-dir', tmp_path, '--out', tmp_path / 'run')
    assert r.returncode == 2, r.stderr
    last = r.stderr.splitlines()
    assert len(last) == 1 and 'Traceback' not in r.stderr
    assert re.fullmatch(r'ultraloop: error: FashionMNIST files not found: train-images-idx3-ubyte\.gz, .*'
                        r'put the four IDX files .* in .*/FashionMNIST/raw/ \(run with --debug for the traceback\)', last[0])


def test_demo_end_to_end(tmp_path, cli):
    # in this process: `python -m ultraloop` itself is run by the terminal test below, the console script by the one above
    out = tmp_path / 'demo'
    r = cli('demo', '--epochs', '1', '--out', out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'data: digits (1,438 train, 359 valid, (1, 8, 8)), model: cnn' in r.stdout
    assert re.search(r'^suggested lr: \d', r.stdout, re.M)  # seeded: the digits show a clear descent
    assert re.search(r'^valid: accuracy 0\.\d{3}, loss \d+\.\d{3}$', r.stdout, re.M)
    assert r.stdout.rstrip().splitlines()[-1] == f'run folder: {out} (metrics.png, lr_find.png)'
    for png in ('metrics.png', 'lr_find.png'): assert (out / png).read_bytes()[:8] == PNG


def test_fit_fashion_mnist_files_end_to_end(tmp_path, cli):
    from test_datasets import write_fashion
    write_fashion(tmp_path / 'data' / 'FashionMNIST' / 'raw', n_train=96, n_test=40)
    csv = tmp_path / 'metrics.csv'
    r = cli('fit', '--data', 'fashion-mnist', '--data-dir', tmp_path / 'data', '--model', 'mlp', '--epochs', '2',
            '--bs', '32', '--opt', 'sgd', '--lr', '0.05', '--one-cycle', '--precision', 'bf16', '--device', 'cpu',
            '--threads', '1', '--csv', csv, '--out', tmp_path / 'run')
    assert r.returncode == 0, r.stderr[-3000:]
    assert ('data: fashion-mnist (96 train, 40 valid, (1, 28, 28)), model: mlp, opt: sgd, device: cpu, '
            'precision: bf16') in r.stdout
    rows = csv.read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 and 'accuracy' in rows[0]  # a header, then train and valid for each epoch
    assert (tmp_path / 'run' / 'metrics.png').read_bytes()[:8] == PNG


def test_lr_find_end_to_end_shows_its_progress(tmp_path, cli):
    r = cli('lr-find', '--model', 'mlp', '--opt', 'sgd', '--max-epochs', '3', '--threads', '1', '--out', tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r'^suggested lr: \d', r.stdout, re.M)
    # not a terminal: no bars, one line per phase while the finder runs (23 batches of 64 in an epoch of the digits)
    phases = re.findall(r'^train epoch (\d): (\d+) batch(?:es)?, loss \d+\.\d{4}, \d\d:\d\d$', r.stdout, re.M)
    assert phases and phases[0] == ('0', '23') and [e for e, _ in phases] == [str(i) for i in range(len(phases))]
    assert '\r' not in r.stderr
    assert (tmp_path / 'lr_find.png').read_bytes()[:8] == PNG


def test_fit_is_reproducible_from_its_seed_and_names_its_run_folder(tmp_path, monkeypatch, capsys, keep_threads):
    monkeypatch.chdir(tmp_path)

    def fit(seed):
        assert main(['fit', '--model', 'mlp', '--epochs', '1', '--seed', str(seed), '--threads', '1']) == 0
        out = capsys.readouterr().out
        folder = re.search(r'^run folder: (\S+) \(metrics\.png\)$', out, re.M).group(1)
        assert (tmp_path / folder / 'metrics.png').is_file()
        return re.search(r'^valid: (.*)$', out, re.M).group(1), folder

    (a, fa), (b, fb), (c, _) = fit(3), fit(3), fit(4)
    assert re.fullmatch(r'runs/fit-\d{8}-\d{6}(-\d+)?', fa) and fa != fb
    assert a == b and a != c


def test_user_errors_are_one_line_and_library_bugs_keep_their_traceback(monkeypatch, capsys, tmp_path, keep_threads):
    from ultraloop import cli

    def bad_value(args): raise ValueError('--bs 3 is too\nsmall: pass 4')
    monkeypatch.setattr(cli, '_load', bad_value)
    args = ['fit', '--model', 'mlp', '--epochs', '1', '--out', tmp_path / 'run']
    assert main(list(map(str, args))) == 2
    assert capsys.readouterr().err == 'ultraloop: error: --bs 3 is too small: pass 4 (run with --debug for the traceback)\n'
    with pytest.raises(ValueError, match='too'): main([*map(str, args), '--debug'])

    def bug(args): return {}['missing']  # a mistake inside the library, not the user's
    monkeypatch.setattr(cli, '_load', bug)
    with pytest.raises(KeyError, match='missing'): main(list(map(str, args)))


# ---- first contact (issue 14) ----------------------------------------------------------------------------------------
def test_diverged_fit_exits_1_naming_epoch_and_batch_and_leaves_no_empty_run_folder(tmp_path, cli):
    r = cli('fit', '--model', 'mlp', '--lr', '1e6', '--epochs', '3', '--threads', '1', cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert re.fullmatch(r'ultraloop: error: the training loss is (nan|inf) at epoch 0, batch \d+ \(both counted from 0\); '
                        r"the fit stopped before that batch's step: lower the lr, or look for NaN/inf in the data\n",
                        r.stderr)
    assert not (tmp_path / 'runs').exists()  # nothing was plotted: no empty run folder is left behind
    assert 'valid:' not in r.stdout


def test_fit_saves_weights_that_load_with_weights_only_and_reports_micro_accuracy(tmp_path, cli):
    from ultraloop.datasets import digits
    from ultraloop.models import mlp
    weights, csv = tmp_path / 'w' / 'mlp.pt', tmp_path / 'm.csv'
    r = cli('fit', '--model', 'mlp', '--epochs', '1', '--threads', '1', '--out', tmp_path / 'run', '--save', weights,
            '--csv', csv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"weights: {weights} (torch.load('{weights}', weights_only=True) gives the state_dict)" in r.stdout
    model = mlp(64, 128, 10)
    model.load_state_dict(torch.load(weights, weights_only=True))  # as the README shows
    _, _, xv, yv = digits()
    with torch.no_grad(): right = (model(xv).argmax(1) == yv).float().mean().item()  # micro: the share classified right
    printed = float(re.search(r'^valid: accuracy (\d\.\d{3}), loss', r.stdout, re.M).group(1))
    assert printed == round(right, 3)
    assert float(csv.read_text().splitlines()[-1].split(',')[0]) == pytest.approx(right, abs=1e-6)


def test_in_a_terminal_bars_show_and_ctrl_c_saves_the_plot_of_the_finished_phases(tmp_path):
    import fcntl
    import os
    import pty
    import signal
    import struct
    import termios
    import threading
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))  # a new terminal is 0 columns wide
    p = subprocess.Popen([sys.executable, '-m', 'ultraloop', 'fit', '--model', 'mlp', '--epochs', '1000', '--threads', '1',
                          '--out', str(tmp_path)], stdout=subprocess.PIPE, stderr=follower, text=True, cwd=ROOT,
                         env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    os.close(follower)
    chunks = []

    def read_terminal():  # all along: a full terminal buffer would block the child's writes
        while True:
            try: chunk = os.read(leader, 4096)
            except OSError: break  # the child closed the terminal
            if not chunk: break
            chunks.append(chunk)
    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        for line in p.stdout:  # the first eval row: two phases are done
            if re.match(r'^\d\.\d{3}\s+\d\.\d{3}\s+0\s+eval', line): break
        p.send_signal(signal.SIGINT)
        out = p.stdout.read()
        p.wait(timeout=60)
        reader.join(timeout=60)
    finally:
        p.kill()
        os.close(leader)
    err = b''.join(chunks)
    assert p.returncode == 130, err[-2000:]
    assert b'\r' in err and re.search(rb'epochs: +0%.*\d+/1000 ', err)  # bars, drawn on the terminal (redirected,
    # the command draws none: test_lr_find_end_to_end_shows_its_progress)
    assert err.endswith(b'ultraloop: interrupted\r\n')
    n = int(re.search(r'^interrupted: the plot of the (\d+) finished phases is in (.*)metrics\.png$', out, re.M).group(1))
    assert n >= 2
    assert (tmp_path / 'metrics.png').read_bytes()[:8] == PNG


def test_bad_csv_file_names_option_and_file(tmp_path, capsys):
    binary = tmp_path / 'plot.csv'
    binary.write_bytes(PNG + b'\x00' * 8)
    other = tmp_path / 'other.csv'
    other.write_text('acc,epoch\n0.5,0\n')
    for path, message in [(binary, f'--csv: {binary} is not a CSV file (UnicodeDecodeError: '),
                          (other, f"--csv: {other} has the columns ['acc', 'epoch'], this run logs ['accuracy', 'loss', "
                                  f"'epoch', 'train']: pass another path")]:
        with pytest.raises(SystemExit) as e: main(['fit', '--csv', str(path), '--out', str(tmp_path / 'run')])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f'ultraloop fit: error: {message}') and err.count('\n') == 1
    assert not (tmp_path / 'run').exists() and binary.read_bytes() == PNG + b'\x00' * 8


def test_unwritable_out_and_save_name_the_option(tmp_path, capsys):
    ro = tmp_path / 'ro'
    ro.mkdir()
    (ro / 'f').write_text('x')
    for argv, message in [(['--out', ro / 'f' / 'run'], f'--out: {ro / "f"} is a file, so {ro / "f" / "run"} cannot be written'),
                          (['--save', ro], f'--save: {ro} is a folder; give the path of a file'),
                          (['--save', ro / 'f' / 'w.pt'], f'--save: {ro / "f"} is a file')]:
        with pytest.raises(SystemExit) as e: main(['fit', *map(str, argv)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f'ultraloop fit: error: {message}') and err.count('\n') == 1


def test_fit_stopped_by_ctrl_c_goes_on_with_resume_as_if_never_stopped(tmp_path, monkeypatch, capsys, keep_threads):
    import os
    import signal

    from ultraloop import Callback, cli

    class CtrlC(Callback):
        def __init__(self): self.n = 0
        def after_backward(self, learn):
            self.n += 1
            if self.n == 30: os.kill(os.getpid(), signal.SIGINT)  # epoch 1 (23 batches an epoch), between backward and step

    def fit(csv, ck, *extra):
        return main(['fit', '--model', 'mlp', '--epochs', '2', '--threads', '1', '--out', str(tmp_path / 'run'),
                     '--csv', str(tmp_path / csv), '--checkpoint-dir', str(tmp_path / ck), '--every-batches', '10',
                     '--early-stop', '3', *extra])
    assert fit('whole.csv', 'a') == 0
    metric_cbs = cli._metric_cbs
    monkeypatch.setattr(cli, '_metric_cbs', lambda: [*metric_cbs(), CtrlC()])
    capsys.readouterr()
    assert fit('parts.csv', 'b') == 130
    err = capsys.readouterr().err
    assert f'checkpoint in {tmp_path / "b"}: the same command, ultraloop fit --model mlp ' in err
    assert (tmp_path / 'b' / 'checkpoint-000003-epoch1-train7.pt').is_file()  # 10, 20, the epoch end, then ctrl-C
    monkeypatch.setattr(cli, '_metric_cbs', metric_cbs)
    assert fit('parts.csv', 'b', '--resume') == 0
    assert f'resuming from {tmp_path / "b" / "checkpoint-000003-epoch1-train7.pt"}' in capsys.readouterr().out
    assert (tmp_path / 'parts.csv').read_text() == (tmp_path / 'whole.csv').read_text()  # every number, to the last bit
    assert fit('fresh.csv', 'c', '--resume') == 0  # nothing to resume from yet: a run from the start
    assert f'no checkpoint in {tmp_path / "c"} yet: starting from the beginning' in capsys.readouterr().out
