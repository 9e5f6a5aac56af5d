"""Corruptions with ground truth: label noise, outliers, canaries and backdoors.

Each function is pure given its numpy Generator: it returns the chosen indices / new arrays and
leaves its inputs untouched, so the ExampleTable can record exactly what was done.
"""

from __future__ import annotations

import numpy as np


def choose_exact(pool: np.ndarray, rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Pick exactly ``round(rate * n)`` indices from ``pool`` (sorted).

    ``n`` is the size of the population the rate refers to; ``pool`` holds the eligible
    members (e.g. the population without its outliers), so the realised rate is exact.
    """
    count = int(round(rate * n))
    if count > len(pool):
        raise ValueError(f"cannot pick {count} of {len(pool)} eligible examples")
    return np.sort(rng.choice(pool, size=count, replace=False)) if count else pool[:0]


def flip_labels(
    y_true: np.ndarray, num_classes: int, kind: str, rng: np.random.Generator
) -> np.ndarray:
    """New labels for ``y_true``, each different from its true label.

    symmetric: uniform over the other ``C - 1`` classes (Arpit et al. 2017; Liu et al. 2020).
    pair: class ``c`` becomes ``(c + 1) mod C`` (pair flipping, Han et al. 2018, Co-teaching).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    if kind == "symmetric":
        shift = rng.integers(1, num_classes, size=len(y_true))
    elif kind == "pair":
        shift = np.ones(len(y_true), dtype=np.int64)
    else:
        raise ValueError(f"unknown noise kind {kind!r}")
    return (y_true + shift) % num_classes


def corrupt_inputs(
    x: np.ndarray, kind: str, strength: float, rng: np.random.Generator
) -> np.ndarray:
    """Make inputs atypical while their labels stay correct (outliers).

    noise: add ``strength`` x (data std) Gaussian noise; invert: ``-strength * x``;
    shuffle: permute each example's features at random (destroys its structure).
    """
    x = np.asarray(x, dtype=np.float32)
    if kind == "noise":
        scale = strength * max(float(x.std()), 1e-6) if len(x) else 0.0
        return (x + scale * rng.standard_normal(x.shape)).astype(np.float32)
    if kind == "invert":
        return (-strength * x).astype(np.float32)
    if kind == "shuffle":
        flat = x.reshape(len(x), int(np.prod(x.shape[1:])))
        order = np.argsort(rng.random(flat.shape), axis=1)
        return np.take_along_axis(flat, order, axis=1).reshape(x.shape)
    raise ValueError(f"unknown outlier kind {kind!r}")


def make_canaries(
    count: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random inputs ~ N(0, 1) (data are standardized) with uniform random labels."""
    x = rng.standard_normal((count, *input_shape)).astype(np.float32)
    y = rng.integers(0, num_classes, size=count)
    return x, y


def place_canaries(
    kinds: list[tuple[int, int]],
    count: int,
    canary_clients: np.ndarray,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """For each canary, the client of each of its copies.

    Canary ``i`` is of kind ``kinds[i % len(kinds)] = (copies, holders)``: it picks
    ``holders`` distinct clients from ``canary_clients`` and its copies go to them in turn, so
    every chosen client holds at least one copy.
    """
    out = []
    for i in range(count):
        copies, holders = kinds[i % len(kinds)]
        chosen = rng.choice(canary_clients, size=holders, replace=False)
        out.append(np.resize(chosen, copies))
    return out


def add_trigger(x: np.ndarray, width: int, strength: float) -> np.ndarray:
    """BadNets-style trigger (Gu, Dolan-Gavitt, Garg 2017): the last ``width`` features of each
    flattened input set to the fixed pattern ``+s, -s, +s, ...`` (``s = strength``; the data
    are standardized, so ``s`` is in units of the data's std). Returns a new array."""
    flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1).copy()
    if width > flat.shape[1]:
        raise ValueError(f"trigger width {width} exceeds the {flat.shape[1]} input features")
    flat[:, -width:] = strength * np.where(np.arange(width) % 2 == 0, 1.0, -1.0)
    return flat.reshape(np.shape(x))
