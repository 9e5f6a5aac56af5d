"""Load a dataset named by ``cfg.data.name`` into standardized in-memory tensors.

Nothing is downloaded. ``mnist1d`` is generated locally (and cached as .npz), ``digits`` ships
with scikit-learn, and MNIST / FashionMNIST / CIFAR-10 / CIFAR-100 are read from
``cfg.data_dir`` through the torchvision dataset classes (``download=False``). Missing or
unreadable files raise a one-line :class:`~fedmem.errors.DataError` naming ``data.data_dir``.

Images are scaled to [0, 1] and standardized per channel with the mean/std of the training
examples actually used (after the optional ``num_train`` subset). ``mnist1d`` comes
standardized from its generator and is kept as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from fedmem.config import DataConfig
from fedmem.errors import DataError
from fedmem.seeding import np_rng


@dataclass(frozen=True)
class Source:
    """A dataset held in memory: standardized float32 inputs and int64 labels."""

    name: str
    x_train: torch.Tensor  # float32, shape (N, *input_shape), standardized
    y_train: torch.Tensor  # int64, shape (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]


@dataclass(frozen=True)
class _Raw:
    """What a dataset loader returns, before subsetting and standardization."""

    x_train: np.ndarray  # (N, C, ...) for images, any numeric dtype
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    scale: float | None  # divide by this, then standardize per channel; None: use as is


# ---------------------------------------------------------------------------------------------
# mnist1d: generated locally, cached
# ---------------------------------------------------------------------------------------------
def _mnist1d_args(cfg: DataConfig) -> dict:
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # never used: we generate instead of downloading
    args["num_samples"] = cfg.mnist1d.num_samples
    args["train_split"] = cfg.mnist1d.train_split
    return args


def _mnist1d_cache_path(cfg: DataConfig, args: dict) -> Path:
    """Cache file named by the generator arguments and the mnist1d package version."""
    key = {"args": args, "mnist1d": metadata.version("mnist1d")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir) / "mnist1d" / f"{digest}.npz"


def _generate_mnist1d(args: dict) -> dict[str, np.ndarray]:
    """Run ``make_dataset``; it seeds numpy's and python's global RNGs, so restore them."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.asarray(d["x"], dtype=np.float32),
        "y": np.asarray(d["y"], dtype=np.int64),
        "x_test": np.asarray(d["x_test"], dtype=np.float32),
        "y_test": np.asarray(d["y_test"], dtype=np.int64),
    }


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return {k: z[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        # truncated or foreign file: regenerate and overwrite it
        return None


def _load_mnist1d(cfg: DataConfig) -> _Raw:
    args = _mnist1d_args(cfg)
    path = _mnist1d_cache_path(cfg, args)
    d = _read_npz(path)
    if d is None:
        d = _generate_mnist1d(args)
        try:
            _write_npz_atomic(path, d)
        except OSError as e:
            raise DataError(
                f"data.cache_dir: cannot write the mnist1d cache {path} ({e.strerror or e})"
            ) from e
    return _Raw(d["x"], d["y"], d["x_test"], d["y_test"], num_classes=10, scale=None)


# ---------------------------------------------------------------------------------------------
# digits: bundled with scikit-learn
# ---------------------------------------------------------------------------------------------
_DIGITS_TEST_SHARE = 0.2


def _load_digits(cfg: DataConfig) -> _Raw:
    """8x8 digits with a FIXED 80/20 split (rng 0): the same dataset under every seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.reshape(-1, 1, 8, 8).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    n_test = round(len(y) * _DIGITS_TEST_SHARE)
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return _Raw(x[train], y[train], x[test], y[test], num_classes=10, scale=16.0)


# ---------------------------------------------------------------------------------------------
# torchvision: MNIST, FashionMNIST, CIFAR-10, CIFAR-100 from local files
# ---------------------------------------------------------------------------------------------
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")


def _data_dir(cfg: DataConfig) -> Path:
    if cfg.data_dir is None:
        raise DataError(f"data.data_dir: data.name={cfg.name} needs the folder with its files")
    return Path(cfg.data_dir)


def _require_files(cfg: DataConfig, root: Path, expected: list[Path]) -> None:
    """Raise a one-line DataError listing the expected files that are missing."""
    missing = [p for p in expected if not p.is_file()]
    if not missing:
        return
    hint = ""
    if any(p.with_name(p.name + ".gz").is_file() for p in missing):
        hint = " (found .gz archives: decompress them in place)"
    where = "does not exist" if not root.is_dir() else "lacks files"
    raise DataError(
        f"data.data_dir: {root} {where} for data.name={cfg.name}; expected "
        f"{', '.join(str(p) for p in missing)}{hint} (nothing is downloaded)"
    )


def _open(cfg: DataConfig, cls: type, root: Path, train: bool):
    """Construct a torchvision dataset; any failure becomes a one-line DataError."""
    try:
        return cls(root=str(root), train=train, download=False)
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        msg = msg.split(" You can use download=True")[0]  # we never download
        raise DataError(
            f"data.data_dir: torchvision cannot read {cfg.name} "
            f"({'train' if train else 'test'}) from {root}: {msg}"
        ) from e


def _value_problem(x: np.ndarray, y: np.ndarray, num_classes: int) -> str | None:
    """What is wrong with a split that parsed: image and label counts that differ, or a
    label outside ``0..num_classes-1`` (None: nothing)."""
    if len(x) != len(y):
        return f"{len(x)} images but {len(y)} labels"
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return (
            f"label {int(y[i])} at example {i} ({int(bad.sum())} outside the classes "
            f"0..{num_classes - 1})"
        )
    return None


def _bad_values(cfg: DataConfig, files: str, problem: str) -> DataError:
    return DataError(
        f"data.data_dir: {files} holds {problem} for data.name={cfg.name}; replace with an intact "
        "copy of the dataset's files"
    )


def _load_mnist_like(cfg: DataConfig, cls_name: str) -> _Raw:
    import torchvision.datasets as tvd

    root = _data_dir(cfg)
    raw = root / cls_name / "raw"
    legacy = [root / cls_name / "processed" / f for f in ("training.pt", "test.pt")]
    use_legacy = all(p.is_file() for p in legacy)  # torchvision also reads its old processed/
    if not use_legacy:
        _require_files(cfg, root, [raw / f for f in _MNIST_FILES])
    cls = getattr(tvd, cls_name)
    parts = []
    for train in (True, False):
        ds = _open(cfg, cls, root, train)
        x = ds.data.numpy().reshape(-1, 1, 28, 28)
        y = np.asarray(ds.targets, dtype=np.int64)
        problem = _value_problem(x, y, 10)
        if problem is not None:
            i = 0 if train else 2
            files = legacy[0 if train else 1] if use_legacy else raw / _MNIST_FILES[i]
            if not use_legacy and problem.startswith("label"):
                files = raw / _MNIST_FILES[i + 1]
            elif not use_legacy:
                files = f"{files} with {raw / _MNIST_FILES[i + 1]}"
            raise _bad_values(cfg, str(files), problem)
        parts += [x, y]
    return _Raw(*parts, num_classes=10, scale=255.0)


def _load_cifar(cfg: DataConfig, cls_name: str) -> _Raw:
    import torchvision.datasets as tvd

    root = _data_dir(cfg)
    folder, files, num_classes = {
        "CIFAR10": ("cifar-10-batches-py", _CIFAR10_FILES, 10),
        "CIFAR100": ("cifar-100-python", _CIFAR100_FILES, 100),
    }[cls_name]
    _require_files(cfg, root, [root / folder / f for f in files])
    cls = getattr(tvd, cls_name)
    parts = []
    for train in (True, False):
        ds = _open(cfg, cls, root, train)
        x = np.ascontiguousarray(np.asarray(ds.data).transpose(0, 3, 1, 2))  # NHWC -> NCHW
        y = np.asarray(ds.targets, dtype=np.int64)
        problem = _value_problem(x, y, num_classes)
        if problem is not None:
            names = [n for n, _ in (ds.train_list if train else ds.test_list)]
            raise _bad_values(cfg, *_cifar_culprit(root / folder, names, num_classes, problem))
        parts += [x, y]
    return _Raw(*parts, num_classes=num_classes, scale=255.0)


def _cifar_culprit(
    folder: Path, names: list[str], num_classes: int, problem: str
) -> tuple[str, str]:
    """The first batch file of a CIFAR split with bad values, and its problem (the split's
    files and the split's problem when no single file shows one)."""
    import pickle

    for name in names:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        x = np.asarray(entry["data"]).reshape(-1, 3072)
        y = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
        found = _value_problem(x, y, num_classes)
        if found is not None:
            return str(folder / name), found
    return f"{folder}/{{{','.join(names)}}}", problem


# ---------------------------------------------------------------------------------------------
# registry and the public entry point
# ---------------------------------------------------------------------------------------------
LOADERS: dict[str, Callable[[DataConfig], _Raw]] = {
    "mnist1d": _load_mnist1d,
    "digits": _load_digits,
    "mnist": lambda cfg: _load_mnist_like(cfg, "MNIST"),
    "fashionmnist": lambda cfg: _load_mnist_like(cfg, "FashionMNIST"),
    "cifar10": lambda cfg: _load_cifar(cfg, "CIFAR10"),
    "cifar100": lambda cfg: _load_cifar(cfg, "CIFAR100"),
}


def _subset(
    x: np.ndarray, y: np.ndarray, k: int | None, seed: int, split: str, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """k examples drawn without replacement (kept in their original order)."""
    if k is None:
        return x, y
    n = len(y)
    if k > n:
        raise DataError(
            f"data.num_{split}: {k} exceeds the {n} {split} examples of {name}; allowed: 1..{n}"
        )
    idx = np.sort(np_rng(seed, "subset", split).choice(n, size=k, replace=False))
    return x[idx], y[idx]


def _to_float(x: np.ndarray, scale: float | None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32, copy=True)  # owned
    return t if scale is None else t.div_(scale)


def _standardize(train: torch.Tensor, test: torch.Tensor) -> None:
    """In place, per channel (dim 1), with the train set's mean and std."""
    dims = [0] + list(range(2, train.dim()))
    std, mean = torch.std_mean(train, dim=dims, correction=0, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel stays finite
    for t in (train, test):
        t.sub_(mean).div_(std)


def load_source(cfg: DataConfig, seed: int) -> Source:
    """Load ``cfg.name``, take the optional ``num_train``/``num_test`` subsets, standardize."""
    raw = LOADERS[cfg.name](cfg)
    x_tr, y_tr = _subset(raw.x_train, raw.y_train, cfg.num_train, seed, "train", cfg.name)
    x_te, y_te = _subset(raw.x_test, raw.y_test, cfg.num_test, seed, "test", cfg.name)
    x_train, x_test = _to_float(x_tr, raw.scale), _to_float(x_te, raw.scale)
    if raw.scale is not None:
        _standardize(x_train, x_test)
    return Source(
        name=cfg.name,
        x_train=x_train,
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr, dtype=np.int64)),
        x_test=x_test,
        y_test=torch.from_numpy(np.ascontiguousarray(y_te, dtype=np.int64)),
        num_classes=raw.num_classes,
        input_shape=tuple(x_train.shape[1:]),
    )
