"""What ships for the demo and examples: the bundled digits, the FashionMNIST IDX reader (on files written by the
tests), and the seed's CNN and an MLP."""
import gzip
import struct
import subprocess
import sys

import pytest
import torch
from conftest import cpu_child_env

import ultraloop
from ultraloop.data import digits, fashion_mnist
from ultraloop.datasets import FASHION_MNIST_FILES, read_idx
from ultraloop.models import get_model, mlp


def idx_bytes(t: torch.Tensor, magic_type: int = 0x08) -> bytes:
    """The IDX encoding of a uint8 tensor: magic 0000 <type> <ndim>, big-endian dims, raw bytes."""
    head = bytes([0, 0, magic_type, t.ndim]) + b''.join(struct.pack('>I', s) for s in t.shape)
    return head + t.numpy().tobytes()


def write_fashion(folder, n_train=6, n_test=4, gz=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
               torch.randint(0, 10, (n_train,), generator=g, dtype=torch.uint8),
               torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
               torch.randint(0, 10, (n_test,), generator=g, dtype=torch.uint8)]
    folder.mkdir(parents=True, exist_ok=True)
    for nm, t in zip(FASHION_MNIST_FILES, tensors):
        if gz: (folder / nm).write_bytes(gzip.compress(idx_bytes(t)))
        else: (folder / nm.removesuffix('.gz')).write_bytes(idx_bytes(t))
    return tensors


def test_reexported_from_data_and_package():
    assert ultraloop.data.fashion_mnist is fashion_mnist and ultraloop.data.digits is digits
    assert ultraloop.digits is digits


def test_fashion_mnist_reads_gz_files_and_normalises_like_the_seed(tmp_path):
    raw = write_fashion(tmp_path)
    xt, yt, xv, yv = fashion_mnist(tmp_path)
    assert xt.shape == (6, 1, 28, 28) and xv.shape == (4, 1, 28, 28)
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64
    torch.testing.assert_close(xt[:, 0], (raw[0].float() / 255 - 0.5) / 0.5)
    torch.testing.assert_close(xv[:, 0], (raw[2].float() / 255 - 0.5) / 0.5)
    assert yt.tolist() == raw[1].tolist() and yv.tolist() == raw[3].tolist()


def test_fashion_mnist_pixel_values_by_hand(tmp_path):
    write_fashion(tmp_path)
    imgs = torch.zeros(2, 28, 28, dtype=torch.uint8)
    imgs[0, 0, 0], imgs[0, 0, 1], imgs[1, 27, 27] = 255, 51, 102
    (tmp_path / FASHION_MNIST_FILES[0]).write_bytes(gzip.compress(idx_bytes(imgs)))
    (tmp_path / FASHION_MNIST_FILES[1]).write_bytes(gzip.compress(idx_bytes(torch.tensor([3, 9], dtype=torch.uint8))))
    xt, yt, _, _ = fashion_mnist(tmp_path)
    assert xt[0, 0, 0, :3].tolist() == pytest.approx([1.0, -0.6, -1.0])
    assert xt[1, 0, 27, 27].item() == pytest.approx(-0.2)
    assert yt.tolist() == [3, 9]


def test_fashion_mnist_reads_torchvision_layout_uncompressed(tmp_path):
    raw = write_fashion(tmp_path / 'FashionMNIST' / 'raw', gz=False)
    xt, yt, xv, yv = fashion_mnist(str(tmp_path))
    assert yt.tolist() == raw[1].tolist() and yv.tolist() == raw[3].tolist()
    assert xt.shape == (6, 1, 28, 28)


def test_fashion_mnist_missing_files_say_which_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'train-images-idx3-ubyte\.gz.*t10k-labels-idx1-ubyte\.gz.*FashionMNIST/raw'):
        fashion_mnist(tmp_path)
    write_fashion(tmp_path)
    (tmp_path / FASHION_MNIST_FILES[3]).unlink()
    with pytest.raises(FileNotFoundError, match=r'not found: t10k-labels-idx1-ubyte\.gz; put'):
        fashion_mnist(tmp_path)


def test_idx_bad_magic_truncated_and_mismatched_counts(tmp_path):
    write_fashion(tmp_path)
    bad = tmp_path / FASHION_MNIST_FILES[0]
    bad.write_bytes(gzip.compress(b'\x00\x00\x0d\x03' + bytes(20)))  # 0x0d: floats, not bytes
    with pytest.raises(ValueError, match=r'not an IDX file of unsigned bytes \(magic number 00000d03'):
        fashion_mnist(tmp_path)
    good = idx_bytes(torch.zeros(6, 28, 28, dtype=torch.uint8))
    bad.write_bytes(gzip.compress(good[:-10]))
    with pytest.raises(ValueError, match=r'holds 4694 bytes of data but its header says \[6, 28, 28\]'):
        fashion_mnist(tmp_path)
    bad.write_bytes(gzip.compress(idx_bytes(torch.zeros(5, 28, 28, dtype=torch.uint8))))
    with pytest.raises(ValueError, match=r'holds 6 labels for the 5 images'):
        fashion_mnist(tmp_path)
    bad.write_bytes(b'not gzip at all')
    with pytest.raises(ValueError, match=r'cannot be read as an IDX file'):
        fashion_mnist(tmp_path)


def test_a_labels_file_under_an_images_name_is_named(tmp_path):
    write_fashion(tmp_path)
    imgs, lbls = (tmp_path / nm for nm in FASHION_MNIST_FILES[:2])
    real_imgs = imgs.read_bytes()
    imgs.write_bytes(lbls.read_bytes())  # the labels file copied over the images file
    with pytest.raises(ValueError, match=rf"^{imgs} holds 6 labels \(a 1-dimensional IDX file\), not images: it is a labels "
                                         rf"file under an images file's name; put the images \(train-images-idx3-ubyte.gz, "
                                         rf'3-dimensional, N x 28 x 28\) there$'):
        fashion_mnist(tmp_path)
    imgs.write_bytes(real_imgs)
    lbls.write_bytes(real_imgs)  # and the other way round
    with pytest.raises(ValueError, match=rf"^{lbls} holds images of shape \(28, 28\), not labels: it is an images file "
                                         rf"under a labels file's name; put the labels \(train-labels-idx1-ubyte.gz, "
                                         rf'1-dimensional\) there$'):
        fashion_mnist(tmp_path)


def test_read_idx_shape_from_header(tmp_path):
    t = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    p = tmp_path / 'x-idx3-ubyte'
    p.write_bytes(idx_bytes(t))
    assert torch.equal(read_idx(p), t)


def test_digits_are_read_without_importing_the_heavy_libraries_and_equal_scikit_learns(tmp_path):
    """One fresh process: `import ultraloop`, the command's parser and metrics and `digits()` import none of
    scikit-learn, scipy, pandas, matplotlib or torchmetrics (seconds before a first batch; tqdm is left out: torch.hub
    imports it); the digits it reads from scikit-learn's file equal load_digits' exactly."""
    code = (f'import sys, torch, ultraloop; from ultraloop import cli; cli.build_parser(); cli._metric_cbs(10, True); '
            f'from ultraloop.datasets import _sklearn_digits; torch.save(_sklearn_digits(), {str(tmp_path / "d.pt")!r}); '
            f'print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"sklearn", "scipy", "pandas", "matplotlib", '
            f'"torchmetrics"}}))')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=cpu_child_env())
    assert r.returncode == 0 and r.stdout == '[]\n', r.stderr[-2000:]
    from sklearn.datasets import load_digits
    images, labels = torch.load(tmp_path / 'd.pt')
    d = load_digits()
    assert torch.equal(images, torch.from_numpy(d.images)) and torch.equal(labels, torch.from_numpy(d.target).long())


def test_digits_split_is_seeded_disjoint_and_scaled():
    from sklearn.datasets import load_digits
    d = load_digits()
    xt, yt, xv, yv = digits()
    assert xt.shape == (1438, 1, 8, 8) and xv.shape == (359, 1, 8, 8)
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64
    assert xt.min().item() == -1.0 and xt.max().item() == 1.0
    # every image appears exactly once across the two splits, scaled (x / 16 - 0.5) / 0.5
    full = torch.cat([xt, xv]).flatten(1)
    ref = (torch.from_numpy(d.images).float().flatten(1) / 16 - 0.5) / 0.5
    assert sorted(map(tuple, full.tolist())) == sorted(map(tuple, ref.tolist()))
    assert torch.cat([yt, yv]).bincount().tolist() == torch.from_numpy(d.target).bincount().tolist()
    again = digits()
    assert torch.equal(again[0], xt) and torch.equal(again[3], yv)
    assert not torch.equal(digits(seed=1)[1], yt)
    assert len(digits(valid_pct=0.5)[2]) == 898


@pytest.mark.parametrize('bad', [0, 1, 1.5, -0.1, '0.2', True])
def test_digits_bad_valid_pct(bad):
    with pytest.raises(ValueError, match=r'valid_pct must be a number in \(0, 1\) \(the share held out, e.g. 0.2\), got '):
        digits(valid_pct=bad)


SEED_CNN_REPR = """Sequential(
  (0): Conv2d(1, 8, kernel_size=(3, 3), stride=(1, 1))
  (1): ReLU()
  (2): Conv2d(8, 16, kernel_size=(3, 3), stride=(1, 1))
  (3): ReLU()
  (4): Conv2d(16, 32, kernel_size=(3, 3), stride=(1, 1))
  (5): ReLU()
  (6): AdaptiveAvgPool2d(output_size=1)
  (7): Flatten(start_dim=1, end_dim=-1)
  (8): Linear(in_features=32, out_features=10, bias=True)
)"""  # as the seed prints its get_model()


def test_get_model_is_the_seed_cnn_and_takes_both_image_sizes():
    m = get_model()
    assert repr(m) == SEED_CNN_REPR
    assert sum(p.numel() for p in m.parameters()) == (9 * 8 + 8) + (8 * 9 * 16 + 16) + (16 * 9 * 32 + 32) + (32 * 10 + 10)
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 10) and m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    wide = get_model(n_out=3, widths=(4, 6), n_in=2)
    assert [tuple(p.shape) for p in wide.parameters()] == [(4, 2, 3, 3), (4,), (6, 4, 3, 3), (6,), (3, 6), (3,)]


def test_mlp_shapes_and_bad_sizes():
    m = mlp(784)
    assert m(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    assert sum(p.numel() for p in m.parameters()) == 784 * 128 + 128 + 128 * 10 + 10
    with pytest.raises(ValueError, match=r"n_hidden must be an int >= 1, got 0"): mlp(64, 0)
    with pytest.raises(ValueError, match=r"widths must be a non-empty sequence of ints >= 1 .* got \[\]"): get_model(widths=())
    with pytest.raises(ValueError, match=r"got \[8, 2\.5\]"): get_model(widths=(8, 2.5))
    with pytest.raises(ValueError, match=r"n_out must be an int >= 1, got 0"): get_model(n_out=0)
    with pytest.raises(ValueError, match=r"n_in must be an int >= 1, got 1\.0"): get_model(n_in=1.0)
