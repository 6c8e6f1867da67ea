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
        try: code = main(list(map(str, args)))
        except SystemExit as e: code = e.code  # the argument parser's own errors exit
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
    # one image file: its row, the same as in the folder's predictions
    r = cli('predict', '--checkpoint', 'run/model.pt', '--data', 'imgs/mid/3.png', '--out', 'one.csv')
    assert r.returncode == 0, r.stderr
    assert rows(tmp_path / 'one.csv') == [p for p in preds if p['id'] == 'imgs/mid/3.png']
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
    # a table without one of the model's columns: one line naming the file, the column and the columns it has
    pd.DataFrame({'x1': x1, 'colour': colour}).to_csv(tmp_path / 'less.csv', index=False)
    r = cli('predict', '--checkpoint', 'run/model.pt', '--data', 'less.csv', '--out', 'q.csv')
    assert (r.returncode, r.stderr) == (2, "ultraloop: error: less.csv lacks column 'x2' the model was trained on (its "
                                           "columns: x1, colour) (run with --debug for the traceback)\n")
    assert not (tmp_path / 'q.csv').exists()


def test_wide_table_gets_the_mlp_and_a_text_column_of_ids_a_warning(tmp_path, cli):
    """--model auto takes the MLP for a table however many columns it has (a 1-D CNN for 40 or more would convolve
    over an order the columns do not have), and predict rebuilds the same; a text column with nearly one value per
    row (here dates) is one-hot into as many inputs, which the command warns of in one line."""
    import pandas as pd
    g = np.random.default_rng(5)
    x1 = g.normal(size=120)
    pd.DataFrame({'x1': x1, 'when': pd.date_range('2020-01-01', periods=120).astype(str),
                  'label': np.where(x1 > 0, 'up', 'down')}).to_csv(tmp_path / 'w.csv', index=False)
    r = cli('fit', '--data', 'w.csv', '--target', 'label', '--epochs', '1', '--threads', '1', '--out', 'run')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('data: w.csv (96 train, 24 valid, (97,), 2 classes), model: mlp')
    assert r.stderr.splitlines() == ["ultraloop: warning: table column 'when' holds 96 distinct text values in 96 training "
                                     "rows, each one-hot as an input of its own (an id, a date or free text?); drop the "
                                     "column or give it as numbers"]
    r = cli('predict', '--checkpoint', 'run/model.pt', '--data', 'w.csv', '--out', 'p.csv')
    assert r.returncode == 0, r.stderr
    assert len(rows(tmp_path / 'p.csv')) == 120


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
    # predict writes numbers in the target's units; evaluate's mae is theirs against the column, over the whole table
    r = cli('predict', '--checkpoint', 'run/model.pt', '--data', 't.parquet', '--out', 'p.csv')
    assert r.returncode == 0, r.stderr
    preds = np.array([float(p['prediction']) for p in rows(tmp_path / 'p.csv')])
    assert len(preds) == 300 and np.abs(preds - y).mean() < 0.25 * baseline
    r = cli('evaluate', '--checkpoint', 'run/model.pt', '--data', 't.parquet', '--out', 'ev')
    assert r.returncode == 0, r.stderr
    assert f'eval: mae {np.abs(preds - y).mean():.3f}' in r.stdout and 'confusion' not in r.stdout


def test_npz_arrays_and_a_model_factory_of_yours(tmp_path, cli, monkeypatch):
    g = np.random.default_rng(2)
    x = g.normal(size=(300, 6)).astype(np.float32)
    np.savez(tmp_path / 'a.npz', x=x, y=x[:, :3].argmax(1))
    r = cli('fit', '--data', 'a.npz', '--epochs', '8', '--bs', '32', '--lr', '0.01', '--threads', '1', '--out', 'run',
            '--csv', 'h.csv')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('data: a.npz (240 train, 60 valid, (6,), 3 classes), model: mlp')
    assert float(last_valid(tmp_path / 'h.csv')['accuracy']) >= 0.75  # chance: 1/3
    r = cli('evaluate', '--checkpoint', 'run/model.pt', '--data', 'a.npz', '--out', 'ev')
    assert r.returncode == 0, r.stderr
    r2 = cli('predict', '--checkpoint', 'run/model.pt', '--data', 'a.npz', '--out', 'p.csv')
    assert r2.returncode == 0, r2.stderr
    right = sum(int(p['prediction']) == t for p, t in zip(rows(tmp_path / 'p.csv'), x[:, :3].argmax(1)))
    assert right >= 0.75 * 300 and f'eval: accuracy {right / 300:.3f}' in r.stdout
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


def test_npz_uint8_images_are_scaled_by_the_models_first_layer(tmp_path, cli):
    """uint8 (N, C, H, W) arrays stay uint8; the model starts with Normalize holding the training images' statistics,
    as for an image folder, and predict feeds it the file's arrays the same way."""
    g = np.random.default_rng(4)
    y = g.integers(0, 3, 120)
    x = np.clip(np.array([40, 128, 215])[y][:, None, None, None] + g.normal(0, 20, (120, 1, 8, 8)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / 'img.npz', x=x, y=y)
    r = cli('fit', '--data', 'img.npz', '--epochs', '4', '--bs', '8', '--lr', '0.01', '--threads', '1', '--out', 'run',
            '--csv', 'h.csv')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('data: img.npz (96 train, 24 valid, (1, 8, 8), 3 classes), model: cnn')
    assert float(last_valid(tmp_path / 'h.csv')['accuracy']) >= 0.8  # chance: 1/3
    from ultraloop.sources import read_toml
    split = read_toml(tmp_path / 'run' / 'config.toml')['data']['split']
    train = np.setdiff1d(np.arange(120), split['valid'])
    sd = torch.load(tmp_path / 'run' / 'model.pt', weights_only=True)
    pixels = x[train].astype(np.float64) / 255
    assert sd['normalize.mean'].flatten().tolist() == pytest.approx([pixels.mean()], abs=1e-6)
    assert sd['normalize.std'].flatten().tolist() == pytest.approx([pixels.std()], abs=1e-6)
    r = cli('predict', '--checkpoint', 'run/model.pt', '--data', 'img.npz', '--out', 'p.csv')
    assert r.returncode == 0, r.stderr
    assert sum(int(p['prediction']) == t for p, t in zip(rows(tmp_path / 'p.csv'), y)) >= 0.8 * 120


def test_mnist1d_small(tmp_path, cli):
    r = cli('fit', '--data', 'mnist1d', '--mnist1d-samples', '600', '--epochs', '6', '--bs', '32', '--threads', '1',
            '--out', 'run', '--csv', 'h.csv')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('data: mnist1d (480 train, 120 valid, (40,)), model: cnn')
    assert float(last_valid(tmp_path / 'h.csv')['accuracy']) >= 0.25  # chance: 0.1
    # predict and evaluate take the run's own valid split (from its config) and agree: evaluate's accuracy is the share
    # predict gets right, and the fit's last valid accuracy
    r = cli('predict', '--checkpoint', 'run/model.pt', '--data', 'mnist1d', '--out', 'p.csv')
    assert r.returncode == 0, r.stderr
    preds = rows(tmp_path / 'p.csv')
    r = cli('evaluate', '--checkpoint', 'run/model.pt', '--data', 'mnist1d', '--out', 'ev')
    assert r.returncode == 0, r.stderr
    matrix = r.stdout.split('columns: predicted):\n')[1].splitlines()[:10]
    counts = [[int(v) for v in line.split()[1:]] for line in matrix]
    assert sum(map(sum, counts)) == len(preds)
    assert [sum(col) for col in zip(*counts)] == [sum(p['prediction'] == c for p in preds) for c in
                                                 [line.split()[0] for line in matrix]]
    right = sum(counts[i][i] for i in range(10))
    assert len(preds) == 120 and f'eval: accuracy {right / 120:.3f}' in r.stdout
    assert right / 120 == pytest.approx(float(last_valid(tmp_path / 'h.csv')['accuracy']), abs=1e-6)


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
    pd.DataFrame({'a': [1, 2, 3], 'f': [1.0, 2.5, 3.0]}).to_csv(tmp_path / 'f.csv', index=False)
    grey_images(tmp_path / 'imgs', n_per_class=2)
    (tmp_path / 'imgs' / 'empty').mkdir()
    cases = [
        (['--data', 't.csv', '--target', 'label'],
         "t.csv has no column 'label'; its columns: a, b (give one of them with --target)"),
        (['--data', 't.csv'], 't.csv is a table: give --target COLUMN, the column to predict (its columns: a, b)'),
        (['--data', 'f.csv', '--target', 'f'], "f.csv: target column 'f' holds non-integer numbers (2.5); give --task "
                                               'regression to predict a number, or integer or text class labels'),
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


FAKE_TIMM = '''"""A stand-in for timm's create_model (timm itself needs a torchvision built for this torch): the keywords the
command passes, and the local weights file read the way timm reads pretrained_cfg_overlay's 'file'."""
import torch
calls = []


def create_model(name, pretrained=False, pretrained_cfg_overlay=None, num_classes=1000, in_chans=3):
    calls.append(dict(name=name, pretrained=pretrained, overlay=pretrained_cfg_overlay, num_classes=num_classes,
                      in_chans=in_chans))
    if name != 'tiny_net': raise RuntimeError(f'Unknown model ({name})')
    net = torch.nn.Sequential(torch.nn.Conv2d(in_chans, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, num_classes))
    if pretrained:  # timm drops a classifier of another number of classes and loads the rest
        sd = torch.load(pretrained_cfg_overlay['file'], weights_only=True)
        net.load_state_dict({k: v for k, v in sd.items() if not k.startswith('4.')}, strict=False)
    return net
'''


def test_timm_model_and_local_pretrained_weights(tmp_path, cli, monkeypatch):
    grey_images(tmp_path / 'imgs')
    monkeypatch.setitem(sys.modules, 'timm', None)  # timm missing: one line saying how to install it
    r = cli('fit', '--data', 'imgs', '--model', 'timm:tiny_net', '--epochs', '1', '--out', 'none')
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr
    assert '--model timm:tiny_net needs timm, which is not installed: pip install timm' in r.stderr
    monkeypatch.delitem(sys.modules, 'timm')
    (tmp_path / 'timm.py').write_text(FAKE_TIMM)
    monkeypatch.syspath_prepend(str(tmp_path))
    import timm
    monkeypatch.setitem(sys.modules, 'timm', timm)  # removed again after this test
    torch.manual_seed(5)
    donor = timm.create_model('tiny_net', num_classes=7, in_chans=1)  # "pretrained" on 7 classes
    torch.save(donor.state_dict(), tmp_path / 'tiny.pt')
    timm.calls.clear()
    r = cli('fit', '--data', 'imgs', '--model', 'timm:tiny_net', '--pretrained', 'tiny.pt', '--epochs', '4', '--bs', '8',
            '--lr', '0.03', '--threads', '1', '--out', 'run', '--csv', 'h.csv', '--save', 'w.pt')
    assert r.returncode == 0, r.stderr
    assert timm.calls == [dict(name='tiny_net', pretrained=True, overlay={'file': 'tiny.pt'}, num_classes=3, in_chans=1)]
    assert 'model: timm:tiny_net' in r.stdout
    assert float(last_valid(tmp_path / 'h.csv')['accuracy']) >= 0.6  # chance: 1/3
    # the run's model is the timm net behind the images' normalisation; predict rebuilds it without the weights file
    sd = torch.load(tmp_path / 'w.pt', weights_only=True)
    assert sorted(sd) == ['net.0.bias', 'net.0.weight', 'net.4.bias', 'net.4.weight', 'normalize.mean', 'normalize.std']
    (tmp_path / 'tiny.pt').unlink()
    timm.calls.clear()
    r = cli('predict', '--checkpoint', 'run/model.pt', '--data', 'imgs', '--out', 'p.csv')
    assert r.returncode == 0, r.stderr
    assert [c['pretrained'] for c in timm.calls] == [False] and len(rows(tmp_path / 'p.csv')) == 48
    # the bad cases, each one line before any work
    cases = [(['--model', 'timm:tiny_net', '--pretrained', 'tiny.pt'],
              '--pretrained tiny.pt: no such file; give the weights file of timm:tiny_net on this machine (it is never '
              'downloaded)'),
             (['--model', 'cnn', '--pretrained', 'w.pt'],
              '--pretrained is for --model timm:NAME (a timm model); --model cnn starts from random weights')]
    for argv, message in cases:
        r = cli('fit', '--data', 'imgs', *argv, '--epochs', '1', '--out', 'bad')
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith('ultraloop fit: error: ') and message in r.stderr
        assert not (tmp_path / 'bad').exists()


def sized_images(folder, sizes, n_per_class=8):
    """Two classes of RGB PNGs (reddish, bluish) in the given sizes, cycled."""
    from PIL import Image
    g = np.random.default_rng(3)
    for c, colour in (('blue', (40, 60, 200)), ('red', (200, 50, 40))):
        (folder / c).mkdir(parents=True)
        for i in range(n_per_class):
            w, h = sizes[i % len(sizes)]
            a = np.clip(np.array(colour) + g.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a, mode='RGB').save(folder / c / f'{i}.png')


def test_image_folders_presplit_mixed_sizes_and_lr_find(tmp_path, cli):
    # train/ and valid/ folders are the split; no share is held out of train
    sized_images(tmp_path / 'split' / 'train', [(12, 12)], n_per_class=12)
    sized_images(tmp_path / 'split' / 'valid', [(12, 12)], n_per_class=3)
    r = cli('fit', '--data', 'split', '--epochs', '3', '--bs', '8', '--lr', '0.01', '--threads', '1', '--out', 'run',
            '--csv', 'h.csv')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('data: split (24 train, 6 valid, (3, 12, 12), 2 classes), model: cnn')
    assert float(last_valid(tmp_path / 'h.csv')['accuracy']) == 1.0  # red against blue
    from ultraloop.sources import read_toml
    assert read_toml(tmp_path / 'run' / 'config.toml')['data']['split'] == {'how': 'folders'}
    # mixed sizes: refused without --size, naming two files; resized to N x N with it
    sized_images(tmp_path / 'mixed', [(12, 12), (16, 10)])
    r = cli('fit', '--data', 'mixed', '--epochs', '1', '--out', 'bad')
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert ('ultraloop: error: images differ in size: mixed/blue/0.png is 12x12, mixed/blue/1.png is 16x10; '
            'give --size N to resize them all to N x N') in r.stderr
    r = cli('fit', '--data', 'mixed', '--size', '14', '--epochs', '3', '--bs', '4', '--lr', '0.01', '--threads', '1',
            '--out', 'sized', '--csv', 's.csv')
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('data: mixed (13 train, 3 valid, (3, 14, 14), 2 classes)')
    assert float(last_valid(tmp_path / 's.csv')['accuracy']) == 1.0
    # lr-find on your data: a suggestion and its plot
    r = cli('lr-find', '--data', 'mixed', '--size', '14', '--bs', '4', '--threads', '1', '--out', 'lrf')
    assert r.returncode == 0, r.stderr
    assert 'suggested lr: ' in r.stdout and (tmp_path / 'lrf' / 'lr_find.png').is_file()


def test_bad_images_one_line_exit_2(tmp_path, cli):
    grey_images(tmp_path / 'one', n_per_class=2)
    for c in ('mid', 'bright'):
        for f in (tmp_path / 'one' / c).iterdir(): f.unlink()
        (tmp_path / 'one' / c).rmdir()
    grey_images(tmp_path / 'broken', n_per_class=2)
    (tmp_path / 'broken' / 'mid' / '0.png').write_bytes(b'not a png')
    (tmp_path / 'broken' / 'mid' / '1.png').write_bytes(b'nor this')
    sized_images(tmp_path / 'unseen' / 'train', [(12, 12)], n_per_class=2)
    sized_images(tmp_path / 'unseen' / 'valid', [(12, 12)], n_per_class=2)
    (tmp_path / 'unseen' / 'valid' / 'green').mkdir()
    (tmp_path / 'unseen' / 'valid' / 'blue' / '0.png').rename(tmp_path / 'unseen' / 'valid' / 'green' / '0.png')
    cases = [('one', 'one has 1 class (dark); classification needs at least 2: add examples of another class (or use '
                     '--task regression for a numeric target)'),
             ('broken', 'broken/mid/0.png cannot be read as an image ('),
             ('unseen', 'unseen/valid/green is a class with no training images in unseen/train; add a '
                        'unseen/train/green folder or remove it'),
             ('one/dark/0.png', 'one/dark/0.png is not a folder of images; give a folder with one sub-folder per class '
                                '(predict takes one image too)')]
    for data, message in cases:
        r = cli('fit', '--data', data, '--epochs', '1', '--out', 'run')
        assert r.returncode == 2, (data, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f'ultraloop: error: {message}'), r.stderr
        assert not (tmp_path / 'run').exists()
