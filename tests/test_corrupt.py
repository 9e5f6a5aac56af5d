"""Corruption primitives: exact noise counts, label flips, outlier inputs, canaries."""

from __future__ import annotations

import numpy as np
import pytest

from fedmem.data import corrupt

# ---------------------------------------------------------------------------------------------
# choose_exact
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pool_size", "rate", "n"),
    [(100, 0.2, 100), (80, 0.25, 100), (1000, 0.333, 1000), (10, 0.0, 10), (50, 0.5, 100)],
)
def test_choose_exact_count_distinct_sorted_from_pool(pool_size, rate, n):
    rng = np.random.default_rng(0)
    pool = np.sort(rng.choice(10 * n, size=pool_size, replace=False))
    chosen = corrupt.choose_exact(pool, rate, n, np.random.default_rng(1))
    assert len(chosen) == int(round(rate * n))
    assert len(np.unique(chosen)) == len(chosen)
    assert np.all(np.diff(chosen) > 0)
    assert np.isin(chosen, pool).all()


def test_choose_exact_count_uses_population_not_pool():
    # rate refers to n=100 but only 60 are eligible: still exactly round(0.3 * 100) = 30
    pool = np.arange(40, 100)
    chosen = corrupt.choose_exact(pool, 0.3, 100, np.random.default_rng(3))
    assert len(chosen) == 30
    assert chosen.min() >= 40


def test_choose_exact_zero_rate_is_empty():
    chosen = corrupt.choose_exact(np.arange(10), 0.0, 10, np.random.default_rng(0))
    assert len(chosen) == 0


def test_choose_exact_pool_too_small_raises():
    with pytest.raises(ValueError, match="cannot pick 30 of 20"):
        corrupt.choose_exact(np.arange(20), 0.3, 100, np.random.default_rng(0))


def test_choose_exact_exact_fit_uses_whole_pool():
    pool = np.arange(5, 35)
    chosen = corrupt.choose_exact(pool, 0.3, 100, np.random.default_rng(0))
    assert np.array_equal(chosen, pool)


def test_choose_exact_is_deterministic_and_seed_dependent():
    pool = np.arange(1000)
    a = corrupt.choose_exact(pool, 0.2, 1000, np.random.default_rng(7))
    b = corrupt.choose_exact(pool, 0.2, 1000, np.random.default_rng(7))
    c = corrupt.choose_exact(pool, 0.2, 1000, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------------------------------------
# flip_labels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_flip_symmetric_never_true_label_and_in_range(num_classes):
    rng = np.random.default_rng(0)
    y = rng.integers(0, num_classes, size=5000)
    new = corrupt.flip_labels(y, num_classes, "symmetric", np.random.default_rng(1))
    assert new.shape == y.shape
    assert new.dtype == np.int64
    assert np.all(new != y)
    assert new.min() >= 0 and new.max() < num_classes


def test_flip_symmetric_uniform_over_other_classes():
    num_classes, per_class = 10, 9000
    y = np.repeat(np.arange(num_classes), per_class)
    new = corrupt.flip_labels(y, num_classes, "symmetric", np.random.default_rng(2))
    expected = per_class / (num_classes - 1)  # 1000 per (true, new) pair
    for c in range(num_classes):
        counts = np.bincount(new[y == c], minlength=num_classes)
        assert counts[c] == 0
        others = np.delete(counts, c)
        assert others.sum() == per_class
        # chi-square with 8 dof: 99.9% quantile is ~26.1
        chi2 = float(((others - expected) ** 2 / expected).sum())
        assert chi2 < 26.1, (c, counts)
        # and every other class share within 15% of 1/9
        assert np.all(np.abs(others / per_class - 1 / 9) < 0.15 / 9), (c, counts)


def test_flip_pair_is_next_class():
    num_classes = 7
    y = np.arange(num_classes).repeat(3)
    new = corrupt.flip_labels(y, num_classes, "pair", np.random.default_rng(0))
    assert np.array_equal(new, (y + 1) % num_classes)
    assert new[y == num_classes - 1].tolist() == [0, 0, 0]


def test_flip_does_not_modify_input():
    y = np.array([0, 1, 2, 3], dtype=np.int64)
    before = y.copy()
    corrupt.flip_labels(y, 4, "symmetric", np.random.default_rng(0))
    assert np.array_equal(y, before)


def test_flip_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown noise kind"):
        corrupt.flip_labels(np.array([0, 1]), 3, "bogus", np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# corrupt_inputs
# ---------------------------------------------------------------------------------------------


def _inputs(shape=(200, 40), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 1.5 + 0.3


@pytest.mark.parametrize("kind", ["noise", "invert", "shuffle"])
@pytest.mark.parametrize("shape", [(64, 40), (16, 1, 8, 8), (8, 3, 32, 32)])
def test_corrupt_keeps_shape_dtype_changes_values(kind, shape):
    x = _inputs(shape)
    before = x.copy()
    out = corrupt.corrupt_inputs(x, kind, 2.0, np.random.default_rng(1))
    assert out.shape == x.shape
    assert out.dtype == np.float32
    assert np.array_equal(x, before), "input must not be modified"
    # every single example is changed
    diff = np.abs(out - x).reshape(len(x), -1).max(axis=1)
    assert np.all(diff > 0), kind


@pytest.mark.parametrize("strength", [0.5, 2.0, 5.0])
def test_corrupt_noise_distance_matches_strength(strength):
    x = _inputs((400, 40))
    std = float(x.std())
    out = corrupt.corrupt_inputs(x, "noise", strength, np.random.default_rng(2))
    delta = out - x
    # the added noise is zero-mean Gaussian with std strength * std(x)
    assert abs(float(delta.mean())) < 0.02 * strength * std
    assert float(delta.std()) == pytest.approx(strength * std, rel=0.02)
    # per-example RMS distance is ~ strength * std too
    rms = np.sqrt((delta**2).mean(axis=1))
    assert float(rms.mean()) == pytest.approx(strength * std, rel=0.03)
    assert np.allclose(rms, strength * std, rtol=0.6)
    # distance from the original is the noise: a bigger strength moves inputs further
    assert float(np.linalg.norm(delta)) > 0.9 * strength * std * np.sqrt(delta.size)


def test_corrupt_invert_is_negative_scaled():
    x = _inputs((10, 40))
    out = corrupt.corrupt_inputs(x, "invert", 3.0, np.random.default_rng(0))
    np.testing.assert_allclose(out, -3.0 * x, rtol=1e-6)


@pytest.mark.parametrize("shape", [(50, 40), (10, 3, 8, 8)])
def test_corrupt_shuffle_preserves_values_per_example(shape):
    x = _inputs(shape)
    out = corrupt.corrupt_inputs(x, "shuffle", 1.0, np.random.default_rng(4))
    flat_in, flat_out = x.reshape(len(x), -1), out.reshape(len(x), -1)
    assert np.array_equal(np.sort(flat_in, axis=1), np.sort(flat_out, axis=1))
    # the order is really changed: most positions move
    moved = (flat_in != flat_out).mean()
    assert moved > 0.9
    # recover each example's permutation (values are distinct): out[e] == in[e][perm[e]]
    perms = []
    for a, b in zip(flat_in, flat_out, strict=True):
        perm = np.argsort(a)[np.argsort(np.argsort(b))]
        assert np.array_equal(a[perm], b)
        perms.append(perm)
    # each example gets its own random permutation
    assert len({p.tobytes() for p in perms}) == len(perms)


@pytest.mark.parametrize("kind", ["noise", "invert"])
def test_corrupt_empty_batch(kind):
    x = np.zeros((0, 40), dtype=np.float32)
    out = corrupt.corrupt_inputs(x, kind, 2.0, np.random.default_rng(0))
    assert out.shape == (0, 40)


@pytest.mark.parametrize("shape", [(0, 40), (0, 1, 8, 8)])
def test_corrupt_shuffle_empty_batch(shape):
    x = np.zeros(shape, dtype=np.float32)
    out = corrupt.corrupt_inputs(x, "shuffle", 2.0, np.random.default_rng(0))
    assert out.shape == shape


def test_corrupt_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown outlier kind"):
        corrupt.corrupt_inputs(_inputs((2, 4)), "blur", 1.0, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# canaries
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40,), (1, 8, 8), (3, 32, 32)])
def test_make_canaries_shapes_and_labels(shape):
    x, y = corrupt.make_canaries(500, shape, 10, np.random.default_rng(0))
    assert x.shape == (500, *shape)
    assert x.dtype == np.float32
    assert y.shape == (500,)
    assert y.min() >= 0 and y.max() <= 9
    assert len(np.unique(y)) == 10  # 500 uniform draws cover all 10 classes
    assert abs(float(x.mean())) < 0.05
    assert float(x.std()) == pytest.approx(1.0, rel=0.05)
    # all canaries are distinct
    assert len(np.unique(x.reshape(500, -1), axis=0)) == 500


def test_make_canaries_zero_count():
    x, y = corrupt.make_canaries(0, (40,), 10, np.random.default_rng(0))
    assert x.shape == (0, 40) and y.shape == (0,)


@pytest.mark.parametrize(
    ("count", "repeats", "num_canary_clients", "per_canary"),
    [(10, 4, 2, 1), (10, 4, 2, 2), (25, 7, 5, 3), (5, 3, 3, 3), (8, 1, 4, 1)],
)
def test_place_canaries(count, repeats, num_canary_clients, per_canary):
    canary_clients = np.array([1, 4, 6, 8, 9])[:num_canary_clients]
    placement = corrupt.place_canaries(
        [(repeats, per_canary)], count, canary_clients, np.random.default_rng(5)
    )
    assert len(placement) == count
    for holders in placement:
        assert len(holders) == repeats
        assert len(np.unique(holders)) == per_canary
        assert np.isin(holders, canary_clients).all()
        # each chosen client holds at least ceil/floor share of the copies
        counts = np.unique(holders, return_counts=True)[1]
        assert counts.max() - counts.min() <= 1


def test_place_canaries_uses_all_canary_clients_over_many():
    canary_clients = np.array([0, 3, 7])
    placement = corrupt.place_canaries([(2, 1)], 200, canary_clients, np.random.default_rng(0))
    used = np.concatenate(placement)
    assert set(used.tolist()) == {0, 3, 7}


def test_place_canaries_cycles_through_kinds():
    kinds = [(1, 1), (4, 1), (4, 2)]
    placement = corrupt.place_canaries(kinds, 9, np.array([0, 2, 5]), np.random.default_rng(1))
    for i, holders in enumerate(placement):
        copies, clients = kinds[i % 3]
        assert len(holders) == copies and len(np.unique(holders)) == clients
