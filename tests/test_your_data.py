"""`ultraloop fit --data PATH` on the user's own data, made here under tmp_path: a folder of PNGs, a CSV and a Parquet
table, an .npz file, mnist1d; a model factory of the user's; config.toml repeating a run; predict and evaluate; and the
bad-data errors, one line each with exit code 2. The data are easy on purpose: each run must beat chance by far."""
import csv
import sys
import types

import numpy as np
import pytest
import torch

from ultraloop.cli import main


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """`ultraloop ARGS` in this process, run from tmp_path; returns returncode, stdout, stderr."""
    n = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)

    def run(*args):
        capsys.readouterr()
        code = main(list(map(str, args)))
        out, err = capsys.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)
    yield run
    torch.set_num_threads(n)


def rows(path) -> list[dict]:
    with open(path, newline='') as f: return list(csv.DictReader(f))


def last_valid(path) -> dict:
    return [r for r in rows(path) if r['train'] == 'eval'][-1]


def grey_images(folder, n_per_class=16, size=10):
    """Three classes of grey PNGs told apart by their brightness (dark, mid, bright), with noise; 10x10 pixels."""
    from PIL import Image
    g = np.random.default_rng(0)
    for c, level in (('dark', 40), ('mid', 128), ('bright', 215)):
        (folder / c).mkdir(parents=True)
        for i in range(n_per_class):
            a = np.clip(level + g.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(a, mode='L').save(folder / c / f'{i}.png')


def features(n=300, seed=0):
    g = np.random.default_rng(seed)
    return g.normal(size=n), g.normal(size=n), g.choice(['red', 'green'], n)


def test_image_folder_fit_config_predict_evaluate(tmp_path, cli):
    grey_images(tmp_path / 'imgs')
    r = cli('fit', '--data', 'imgs', '--epochs', '4', '--bs', '8', '--lr', '0.01', '--threads', '1', '--out', 'run',
            '--csv', 'a.csv')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('data: imgs (38 train, 10 valid, (1, 10, 10), 3 classes), model: cnn, opt: adamw')
    assert list(rows(tmp_path / 'a.csv')[0]) == ['accuracy', 'loss', 'epoch', 'train']  # 16 of each: balanced
    assert float(last_valid(tmp_path / 'a.csv')['accuracy']) >= 0.8  # chance: 1/3
    assert (tmp_path / 'run' / 'model.pt').is_file()
    # the config repeats the run: the same split and statistics, the same rows, bitwise
    r = cli('fit', '--config', 'run/config.toml', '--out', 'again', '--csv', 'b.csv')
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'a.csv').read_text() == (tmp_path / 'b.csv').read_text()
    # predict: one row per image, named by its file, mostly right
    r = cli('predict', '--checkpoint', 'run/model.pt', '--data', 'imgs', '--out', 'preds.csv')
    assert r.returncode == 0, r.stderr
    preds = rows(tmp_path / 'preds.csv')
    assert len(preds) == 48 and list(preds[0]) == ['id', 'prediction', 'probability']
    right = sum(p['prediction'] == p['id'].split('/')[-2] for p in preds)
    assert right >= 0.8 * 48
    # evaluate: the same share right over the whole folder, and the confusion matrix counts every image once
    r = cli('evaluate', '--checkpoint', 'run/model.pt', '--data', 'imgs', '--out', 'ev')
    assert r.returncode == 0, r.stderr
    assert f'eval: accuracy {right / 48:.3f}' in r.stdout
    matrix = r.stdout.split('columns: predicted):\n')[1].splitlines()[:3]
    assert [line.split()[0] for line in matrix] == ['bright', 'dark', 'mid']
    assert sum(int(v) for line in matrix for v in line.split()[1:]) == 48
    assert sum(int(line.split()[1 + i]) for i, line in enumerate(matrix)) == right
    assert (tmp_path / 'ev' / 'confusion.png').is_file()
    # images over --max-memory are decoded again each epoch by the loader, and learn as well
    r = cli('fit', '--data', 'imgs', '--epochs', '4', '--bs', '8', '--lr', '0.01', '--threads', '1', '--out', 'disk',
            '--csv', 'c.csv', '--max-memory', '1K', '--workers', '0')
    assert r.returncode == 0, r.stderr
    assert float(last_valid(tmp_path / 'c.csv')['accuracy']) >= 0.8


def test_csv_table_with_unbalanced_classes_shows_balanced_accuracy(tmp_path, cli):
    import pandas as pd
    x1, x2, colour = features()
    label = np.where(x1 + (colour == 'red') > 1, 'yes', 'no')  # about 1 yes for 2 no
    pd.DataFrame({'x1': x1, 'x2': x2, 'colour': colour, 'label': label}).to_csv(tmp_path / 't.csv', index=False)
    r = cli('fit', '--data', 't.csv', '--target', 'label', '--epochs', '8', '--bs', '32', '--lr', '0.03',
            '--threads', '1', '--out', 'run', '--csv', 'h.csv')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('data: t.csv (240 train, 60 valid, (4,), 2 classes), model: mlp')  # x1, x2, red, green
    last = last_valid(tmp_path / 'h.csv')
    assert list(last) == ['accuracy', 'balanced_accuracy', 'loss', 'epoch', 'train']
    assert float(last['accuracy']) >= 0.85 and float(last['balanced_accuracy']) >= 0.8
    assert f"balanced_accuracy {float(last['balanced_accuracy']):.3f}" in r.stdout
    # predict on the table without its target column: one row per table row, the class names, mostly right
    pd.DataFrame({'x1': x1, 'x2': x2, 'colour': colour}).to_csv(tmp_path / 'new.csv', index=False)
    r = cli('predict', '--checkpoint', 'run/model.pt', '--data', 'new.csv', '--out', 'p.csv')
    assert r.returncode == 0, r.stderr
    preds = rows(tmp_path / 'p.csv')
    assert [p['id'] for p in preds] == [str(i) for i in range(300)]
    assert sum(p['prediction'] == t for p, t in zip(preds, label)) >= 0.85 * 300


def test_parquet_table_regression(tmp_path, cli):
    import pandas as pd
    x1, x2, colour = features(seed=1)
    y = 3 * x1 - 2 * x2 + 2 * (colour == 'red') + 10
    pd.DataFrame({'x1': x1, 'x2': x2, 'colour': colour, 'y': y}).to_parquet(tmp_path / 't.parquet')
    r = cli('fit', '--data', 't.parquet', '--target', 'y', '--task', 'regression', '--epochs', '10', '--bs', '16',
            '--lr', '0.01', '--threads', '1', '--out', 'run', '--csv', 'h.csv')
    assert r.returncode == 0, r.stderr
    last = last_valid(tmp_path / 'h.csv')
    assert list(last) == ['mae', 'loss', 'epoch', 'train']
    baseline = float(np.abs(y - y.mean()).mean())  # predicting the mean: about 3.1
    assert float(last['mae']) < 0.25 * baseline


def test_npz_arrays_and_a_model_factory_of_yours(tmp_path, cli, monkeypatch):
    g = np.random.default_rng(2)
    x = g.normal(size=(300, 6)).astype(np.float32)
    np.savez(tmp_path / 'a.npz', x=x, y=x[:, :3].argmax(1))
    r = cli('fit', '--data', 'a.npz', '--epochs', '8', '--bs', '32', '--lr', '0.01', '--threads', '1', '--out', 'run',
            '--csv', 'h.csv')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('data: a.npz (240 train, 60 valid, (6,), 3 classes), model: mlp')
    assert float(last_valid(tmp_path / 'h.csv')['accuracy']) >= 0.75  # chance: 1/3
    # a .pt file: torch.save of a dict of tensors, read the same way
    torch.save({'x': torch.from_numpy(x), 'y': torch.from_numpy(x[:, :3].argmax(1))}, tmp_path / 'a.pt')
    r = cli('fit', '--data', 'a.pt', '--epochs', '1', '--threads', '1', '--out', 'pt')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('data: a.pt (240 train, 60 valid, (6,), 3 classes), model: mlp')
    # --model module:function: the factory is called with (inputs, classes) and its model is trained
    (tmp_path / 'my_nets.py').write_text(
        'import torch\ncalls = []\n\ndef make_net(n_in, n_classes):\n    calls.append((n_in, n_classes))\n'
        '    return torch.nn.Sequential(torch.nn.Linear(n_in, 32), torch.nn.ReLU(), torch.nn.Linear(32, n_classes))\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    r = cli('fit', '--data', 'a.npz', '--model', 'my_nets:make_net', '--epochs', '8', '--bs', '32', '--lr', '0.01',
            '--threads', '1', '--out', 'mine', '--csv', 'm.csv')
    assert r.returncode == 0, r.stderr
    import my_nets
    monkeypatch.delitem(sys.modules, 'my_nets')  # imported from this test's folder: gone after it
    assert my_nets.calls == [(6, 3)]
    assert 'model: my_nets:make_net' in r.stdout
    assert float(last_valid(tmp_path / 'm.csv')['accuracy']) >= 0.75
    sd = torch.load(tmp_path / 'mine' / 'model.pt', weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {'0.weight': (32, 6), '0.bias': (32,), '2.weight': (3, 32),
                                                         '2.bias': (3,)}


def test_mnist1d_small(tmp_path, cli):
    r = cli('fit', '--data', 'mnist1d', '--mnist1d-samples', '600', '--epochs', '6', '--bs', '32', '--threads', '1',
            '--out', 'run', '--csv', 'h.csv')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('data: mnist1d (480 train, 120 valid, (40,)), model: cnn')
    assert float(last_valid(tmp_path / 'h.csv')['accuracy']) >= 0.25  # chance: 0.1


@pytest.mark.parametrize('command', ['predict', 'evaluate'])
def test_help_documents_every_option(command, capsys):
    from ultraloop.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a.choices, dict)).choices[command]
    opts = [s for a in sub._actions for s in a.option_strings if s.startswith('--') and s != '--help']
    with pytest.raises(SystemExit) as e: main([command, '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert '--checkpoint' in opts and [o for o in opts if o not in out] == []


def test_bad_data_one_line_exit_2(tmp_path, cli):
    import pandas as pd
    pd.DataFrame({'a': [1, 2], 'b': [0, 1]}).to_csv(tmp_path / 't.csv', index=False)
    grey_images(tmp_path / 'imgs', n_per_class=2)
    (tmp_path / 'imgs' / 'empty').mkdir()
    cases = [
        (['--data', 't.csv', '--target', 'label'],
         "t.csv has no column 'label'; its columns: a, b (give one of them with --target)"),
        (['--data', 't.csv'], 't.csv is a table: give --target COLUMN, the column to predict (its columns: a, b)'),
        (['--data', 'imgs'], "class folder imgs/empty holds no images (.png, .jpg, .jpeg, .bmp, .gif, .webp, .tif, "
                             ".tiff); add images of 'empty' or remove the folder"),
        (['--data', 'nothing.csv'], '--data nothing.csv: no such file or folder; give an image folder, a .csv, .parquet, '
                                    '.npz or .pt file, or one of digits, fashion-mnist, mnist1d'),
        (['--data', 't.csv', '--target', 'b', '--model', 'no_such_module:make'], None),
    ]
    for argv, message in cases:
        r = cli('fit', *argv, '--epochs', '1', '--out', 'run')
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stdout == '' or r.stdout.startswith('data: ')
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith('ultraloop: error: '), r.stderr
        if message is not None:
            assert lines[0] == f'ultraloop: error: {message} (run with --debug for the traceback)'
        assert not (tmp_path / 'run').exists()
