"""fedmem.data.sources: generated, bundled and torchvision-format datasets, subsets, errors.

The torchvision datasets are written here in their real on-disk formats (IDX files, pickled
CIFAR batches) at tiny sizes and read back through the real torchvision classes.
"""

from __future__ import annotations

import os
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

from fedmem.config import DataConfig, Mnist1dConfig
from fedmem.data import sources
from fedmem.data.sources import Source, load_source
from fedmem.errors import DataError

N_TRAIN, N_TEST = 20, 10


def _expected(images: np.ndarray, train: np.ndarray) -> np.ndarray:
    """images / 255 standardized per channel (axis 1) with the stats of ``train``."""
    x, t = images.astype(np.float64) / 255, train.astype(np.float64) / 255
    axes = (0, 2, 3)
    return (x - t.mean(axis=axes, keepdims=True)) / t.std(axis=axes, keepdims=True)


def _check_source(src: Source, shape: tuple[int, ...], classes: int, n_tr: int, n_te: int):
    assert src.input_shape == shape
    assert src.num_classes == classes
    assert src.x_train.shape == (n_tr, *shape) and src.x_test.shape == (n_te, *shape)
    assert src.x_train.dtype == torch.float32 and src.x_test.dtype == torch.float32
    assert src.y_train.dtype == torch.int64 and src.y_test.dtype == torch.int64
    assert src.y_train.shape == (n_tr,) and src.y_test.shape == (n_te,)
    for y in (src.y_train, src.y_test):
        assert int(y.min()) >= 0 and int(y.max()) < classes
    assert torch.isfinite(src.x_train).all() and torch.isfinite(src.x_test).all()


# ---------------------------------------------------------------------------------------------
# mnist1d
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _mnist1d_cfg(cache: Path, num_samples: int = 500, **kw) -> DataConfig:
    return DataConfig(
        name="mnist1d", cache_dir=cache, mnist1d=Mnist1dConfig(num_samples=num_samples), **kw
    )


def test_mnist1d_generates_caches_and_keeps_global_rng(mnist1d_cache, monkeypatch):
    np.random.seed(123)
    random.seed(456)
    np_before, py_before = np.random.get_state(), random.getstate()

    src = load_source(_mnist1d_cfg(mnist1d_cache), seed=0)

    np_after = np.random.get_state()
    assert np_after[0] == np_before[0] and np.array_equal(np_after[1], np_before[1])
    assert np_after[2:] == np_before[2:]
    assert random.getstate() == py_before
    _check_source(src, (40,), 10, 400, 100)
    assert set(src.y_train.tolist()) == set(range(10))

    files = list((mnist1d_cache / "mnist1d").glob("*.npz"))
    assert len(files) == 1
    assert not list((mnist1d_cache / "mnist1d").glob("*.tmp"))

    # A second load must come from the cache: generating again would fail.
    def boom(args):
        raise AssertionError("regenerated instead of reading the cache")

    monkeypatch.setattr(sources, "_generate_mnist1d", boom)
    again = load_source(_mnist1d_cfg(mnist1d_cache), seed=0)
    for a, b in zip(
        (src.x_train, src.y_train, src.x_test, src.y_test),
        (again.x_train, again.y_train, again.x_test, again.y_test),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_mnist1d_matches_package_generator_with_its_defaults(mnist1d_cache):
    from mnist1d.data import get_dataset_args, make_dataset

    src = load_source(_mnist1d_cfg(mnist1d_cache), seed=0)
    args = get_dataset_args()
    args.num_samples, args.train_split = 500, 0.8
    state = np.random.get_state()
    ref = make_dataset(args)
    np.random.set_state(state)
    assert np.allclose(src.x_train.numpy(), ref["x"], atol=1e-6)
    assert np.array_equal(src.y_test.numpy(), ref["y_test"])


def test_mnist1d_cache_key_and_corrupt_cache(tmp_path):
    cfg = _mnist1d_cfg(tmp_path, num_samples=200)
    first = load_source(cfg, seed=0)
    load_source(_mnist1d_cfg(tmp_path, num_samples=300), seed=0)
    files = sorted((tmp_path / "mnist1d").glob("*.npz"))
    assert len(files) == 2  # one file per argument set

    path = sources._mnist1d_cache_path(cfg, sources._mnist1d_args(cfg))
    path.write_bytes(b"not a zip file")  # a broken cache is regenerated, not an error
    again = load_source(cfg, seed=0)
    assert torch.equal(first.x_train, again.x_train)
    assert np.load(path)["x"].shape == (160, 40)


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------
def test_digits_standardized_and_fixed_split():
    src = load_source(DataConfig(name="digits"), seed=0)
    _check_source(src, (1, 8, 8), 10, 1438, 359)
    assert abs(float(src.x_train.mean())) < 1e-4
    assert abs(float(src.x_train.std(correction=0)) - 1) < 1e-4
    other = load_source(DataConfig(name="digits"), seed=7)  # split does not depend on the seed
    assert torch.equal(src.x_train, other.x_train) and torch.equal(src.y_test, other.y_test)


# ---------------------------------------------------------------------------------------------
# MNIST / FashionMNIST in IDX format
# ---------------------------------------------------------------------------------------------
def _write_idx(path: Path, arr: np.ndarray) -> None:
    """IDX file: magic 0x000008nn (uint8, nn dims), big-endian uint32 dims, raw bytes."""
    assert arr.dtype == np.uint8
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.tobytes())


def _write_mnist(root: Path, folder: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    data = {
        "x_train": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(N_TRAIN) * 3 % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(N_TEST) * 7 % 10).astype(np.uint8),
    }
    data["x_train"][0] = 0
    data["x_train"][0, 3, 5] = 255  # one bright pixel at row 3, column 5
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    assert struct.pack(">I", 0x0800 | 3) == b"\x00\x00\x08\x03"
    _write_idx(raw / "train-images-idx3-ubyte", data["x_train"])
    _write_idx(raw / "train-labels-idx1-ubyte", data["y_train"])
    _write_idx(raw / "t10k-images-idx3-ubyte", data["x_test"])
    _write_idx(raw / "t10k-labels-idx1-ubyte", data["y_test"])
    return data


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_formats_roundtrip(tmp_path, name, folder):
    data = _write_mnist(tmp_path, folder)
    src = load_source(DataConfig(name=name, data_dir=tmp_path), seed=0)
    _check_source(src, (1, 28, 28), 10, N_TRAIN, N_TEST)

    x_tr, x_te = data["x_train"][:, None], data["x_test"][:, None]
    assert np.allclose(src.x_train.numpy(), _expected(x_tr, x_tr), atol=1e-5)
    assert np.allclose(src.x_test.numpy(), _expected(x_te, x_tr), atol=1e-5)
    assert src.y_train.tolist() == data["y_train"].tolist()
    assert src.y_test.tolist() == data["y_test"].tolist()
    img = src.x_train[0, 0]
    assert int(img.argmax()) == 3 * 28 + 5 and float(img.max()) > float(img.min())


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 as pickled python batches
# ---------------------------------------------------------------------------------------------
def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    imgs = rng.integers(0, 128, (n, 3, 32, 32), dtype=np.uint8)  # NCHW
    imgs[0] = 0
    imgs[0, 0] = 255  # a pure red image: R plane 255, G and B planes 0
    return imgs


def _rows(x: np.ndarray) -> np.ndarray:
    """CIFAR `data` rows: the R plane, then G, then B (1024 bytes each), i.e. NCHW flattened."""
    return x.reshape(len(x), 3072)


def _write_cifar(root: Path, num_classes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    x_train, x_test = _cifar_images(rng, N_TRAIN), _cifar_images(rng, N_TEST)
    y_train = rng.integers(0, num_classes, N_TRAIN)
    y_test = rng.integers(0, num_classes, N_TEST)
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, part in enumerate(np.array_split(np.arange(N_TRAIN), 5), start=1):
            batch = {"data": _rows(x_train[part]), "labels": y_train[part].tolist()}
            _pickle(folder / f"data_batch_{i}", batch)
        _pickle(folder / "test_batch", {"data": _rows(x_test), "labels": y_test.tolist()})
        _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            _pickle(
                folder / split,
                {"data": _rows(x), "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist()},
            )
        _pickle(
            folder / "meta",
            {
                "fine_label_names": [f"f{i}" for i in range(100)],
                "coarse_label_names": [f"c{i}" for i in range(20)],
            },
        )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


@pytest.fixture
def cifar_existence_check_only(monkeypatch):
    # torchvision's CIFAR classes compare the md5 of every batch file (CIFAR10._check_integrity,
    # inherited by CIFAR100) and of the meta file (_load_meta) with the checksums of the real
    # downloads, which tiny test files cannot match. Both go through the module-level
    # `check_integrity`, so in this test only it checks that the file exists. The production
    # loader keeps the checksums (see test_cifar_checksum_mismatch_is_a_data_error).
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_formats_roundtrip(tmp_path, cifar_existence_check_only, name, classes):
    data = _write_cifar(tmp_path, classes)
    src = load_source(DataConfig(name=name, data_dir=tmp_path), seed=0)
    _check_source(src, (3, 32, 32), classes, N_TRAIN, N_TEST)

    assert np.allclose(src.x_train.numpy(), _expected(data["x_train"], data["x_train"]), atol=1e-5)
    assert np.allclose(src.x_test.numpy(), _expected(data["x_test"], data["x_train"]), atol=1e-5)
    assert src.y_train.tolist() == data["y_train"].tolist()
    assert src.y_test.tolist() == data["y_test"].tolist()
    for x in (src.x_train, src.x_test):  # the red image is red: channel 0 is the largest
        per_channel = x[0].mean(dim=(1, 2))
        assert int(per_channel.argmax()) == 0
        assert float(per_channel[0]) > 0 > float(per_channel[1])


def test_cifar_checksum_mismatch_is_a_data_error(tmp_path):
    _write_cifar(tmp_path, 10)  # right names, wrong md5: torchvision refuses, we say so
    with pytest.raises(DataError) as err:
        load_source(DataConfig(name="cifar10", data_dir=tmp_path), seed=0)
    msg = str(err.value)
    assert msg.startswith("data.data_dir:") and "\n" not in msg and "corrupted" in msg


# ---------------------------------------------------------------------------------------------
# missing files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("fashionmnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("cifar100", "cifar-100-python/train"),
    ],
)
def test_missing_files_are_one_line_data_errors(tmp_path, name, expected):
    with pytest.raises(DataError) as err:
        load_source(DataConfig(name=name, data_dir=tmp_path), seed=0)
    msg = str(err.value)
    assert "data.data_dir" in msg and str(tmp_path / expected) in msg
    assert "\n" not in msg


def test_missing_data_dir_and_gz_hint(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source(DataConfig(name="mnist", data_dir=tmp_path / "nope"), seed=0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError, match="decompress"):
        load_source(DataConfig(name="mnist", data_dir=tmp_path), seed=0)


def test_unreadable_file_is_a_data_error(tmp_path):
    _write_mnist(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x05")
    with pytest.raises(DataError) as err:
        load_source(DataConfig(name="mnist", data_dir=tmp_path), seed=0)
    msg = str(err.value)
    assert msg.startswith("data.data_dir: torchvision cannot read mnist") and "\n" not in msg


# ---------------------------------------------------------------------------------------------
# num_train / num_test subsets
# ---------------------------------------------------------------------------------------------
def test_subset_size_determinism_and_order(mnist1d_cache):
    full = load_source(_mnist1d_cfg(mnist1d_cache), seed=0)
    cfg = _mnist1d_cfg(mnist1d_cache, num_train=50, num_test=30)
    a, b = load_source(cfg, seed=0), load_source(cfg, seed=0)
    c = load_source(cfg, seed=1)
    assert a.x_train.shape == (50, 40) and a.x_test.shape == (30, 40)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    # mnist1d is not re-standardized, so subset rows are rows of the full set, in order.
    rows = [int(torch.nonzero((full.x_train == r).all(dim=1))[0]) for r in a.x_train]
    assert rows == sorted(rows) and len(set(rows)) == 50
    assert torch.equal(full.y_train[rows], a.y_train)


def test_subset_of_standardized_dataset_is_standardized():
    src = load_source(DataConfig(name="digits", num_train=300), seed=3)
    assert src.x_train.shape == (300, 1, 8, 8) and src.x_test.shape == (359, 1, 8, 8)
    assert abs(float(src.x_train.mean())) < 1e-4


@pytest.mark.parametrize(("key", "available"), [("num_train", 1438), ("num_test", 359)])
def test_subset_too_large(key, available):
    with pytest.raises(DataError) as err:
        load_source(DataConfig(name="digits", **{key: 5000}), seed=0)
    msg = str(err.value)
    assert msg.startswith(f"data.{key}:") and str(available) in msg and "\n" not in msg
