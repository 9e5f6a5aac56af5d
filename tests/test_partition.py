"""Client partitions: disjoint, complete, sorted, deterministic; skew and error cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmem.data import partition as P
from fedmem.errors import ConfigError


@st.composite
def labelled(draw, max_n: int = 300, max_clients: int = 20):
    """(labels, num_classes, num_clients, seed) with every class present."""
    num_classes = draw(st.integers(2, 10))
    n = draw(st.integers(num_classes, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    labels = np.random.default_rng(seed).permutation(np.arange(n) % num_classes)
    num_clients = draw(st.integers(1, min(n, max_clients)))
    return labels.astype(np.int64), num_classes, num_clients, seed


def check_split(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.ndim == 1
        assert np.issubdtype(p.dtype, np.integer)
        assert np.all(np.diff(p) > 0), "each part sorted, no duplicates"
    allp = np.concatenate(parts)
    assert len(allp) == n, "disjoint and complete"
    assert np.array_equal(np.sort(allp), np.arange(n))


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(labelled())
def test_iid_properties(case):
    labels, _, num_clients, seed = case
    parts = P.partition(labels, num_clients, "iid", np.random.default_rng(seed))
    check_split(parts, len(labels), num_clients)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert same(parts, P.partition(labels, num_clients, "iid", np.random.default_rng(seed)))


@settings(max_examples=30, deadline=None)
@given(labelled(max_clients=10), st.floats(0.05, 10.0))
def test_dirichlet_properties(case, alpha):
    labels, _, num_clients, seed = case
    try:
        parts = P.partition(
            labels, num_clients, "dirichlet", np.random.default_rng(seed), alpha=alpha
        )
    except ConfigError as e:
        # possible for tiny alpha with many clients: every try left a client empty
        assert str(e).startswith("partition.alpha:")
        return
    check_split(parts, len(labels), num_clients)
    assert min(len(p) for p in parts) >= 1
    again = P.partition(labels, num_clients, "dirichlet", np.random.default_rng(seed), alpha=alpha)
    assert same(parts, again)


@settings(max_examples=30, deadline=None)
@given(labelled(max_n=400, max_clients=8), st.floats(0.5, 10.0), st.integers(1, 40))
def test_dirichlet_min_size(case, alpha, min_size):
    labels, _, num_clients, seed = case
    n = len(labels)
    if min_size * num_clients > n:
        with pytest.raises(ConfigError, match=r"^partition\.min_size:"):
            P.dirichlet(labels, num_clients, alpha, np.random.default_rng(seed), min_size=min_size)
        return
    try:
        parts = P.partition(
            labels,
            num_clients,
            "dirichlet",
            np.random.default_rng(seed),
            alpha=alpha,
            min_size=min_size,
        )
    except ConfigError as e:
        assert str(e).startswith("partition.alpha:")
        return
    check_split(parts, n, num_clients)
    assert min(len(p) for p in parts) >= min_size


@settings(max_examples=30, deadline=None)
@given(labelled(), st.data())
def test_shards_properties(case, data):
    labels, num_classes, num_clients, seed = case
    k_min = -(-num_classes // num_clients)  # k * num_clients >= C
    k = data.draw(st.integers(k_min, num_classes))
    parts = P.partition(
        labels, num_clients, "shards", np.random.default_rng(seed), classes_per_client=k
    )
    check_split(parts, len(labels), num_clients)
    for p in parts:
        assert len(np.unique(labels[p])) <= k
    again = P.partition(
        labels, num_clients, "shards", np.random.default_rng(seed), classes_per_client=k
    )
    assert same(parts, again)


def test_shards_each_client_gets_k_classes_when_plenty_of_data():
    labels = np.repeat(np.arange(10), 100)
    parts = P.shards(labels, 10, 2, np.random.default_rng(0))
    check_split(parts, 1000, 10)
    for p in parts:
        assert len(np.unique(labels[p])) == 2
        assert len(p) == 100  # each class split evenly over its 2 holders
    # every class goes to num_clients * k / C = 2 clients
    holders = [sum(c in set(labels[p]) for p in parts) for c in range(10)]
    assert holders == [2] * 10


def test_different_seeds_give_different_splits():
    labels = np.repeat(np.arange(10), 50)
    for kind in ("iid", "dirichlet", "shards"):
        a = P.partition(labels, 5, kind, np.random.default_rng(1))
        b = P.partition(labels, 5, kind, np.random.default_rng(2))
        assert not same(a, b), kind


# ---------------------------------------------------------------------------------------------
# label skew
# ---------------------------------------------------------------------------------------------


def _mean_max_share(parts: list[np.ndarray], labels: np.ndarray) -> float:
    shares = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts if len(p)]
    return float(np.mean(shares))


def test_smaller_alpha_more_skew():
    labels = np.repeat(np.arange(10), 200)  # n = 2000, 10 classes
    skew = {}
    for alpha in (0.1, 1.0, 100.0):
        vals = [
            _mean_max_share(
                P.partition(labels, 10, "dirichlet", np.random.default_rng(s), alpha=alpha),
                labels,
            )
            for s in range(5)
        ]
        skew[alpha] = float(np.mean(vals))
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.5  # few classes dominate each client
    assert skew[100.0] < 0.2  # close to the uniform 0.1
    iid = P.partition(labels, 10, "iid", np.random.default_rng(0))
    assert _mean_max_share(iid, labels) < 0.2


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_more_clients_than_examples(kind):
    labels = np.arange(8) % 2
    with pytest.raises(ConfigError, match=r"^federation\.num_clients:"):
        P.partition(labels, 9, kind, np.random.default_rng(0))


def test_shards_cannot_cover_classes():
    labels = np.repeat(np.arange(10), 20)
    with pytest.raises(ConfigError, match=r"^partition\.classes_per_client:.*at least 4"):
        P.partition(labels, 3, "shards", np.random.default_rng(0), classes_per_client=3)


def test_shards_more_classes_per_client_than_classes():
    labels = np.repeat(np.arange(4), 20)
    with pytest.raises(ConfigError, match=r"^partition\.classes_per_client:"):
        P.partition(labels, 3, "shards", np.random.default_rng(0), classes_per_client=5)


def test_min_size_too_large():
    labels = np.repeat(np.arange(10), 10)  # n = 100
    with pytest.raises(ConfigError, match=r"^partition\.min_size:"):
        P.partition(labels, 10, "dirichlet", np.random.default_rng(0), min_size=11)
    # below the bound a balanced-enough split is found and respected
    parts = P.partition(labels, 10, "dirichlet", np.random.default_rng(0), min_size=5, alpha=100.0)
    assert min(len(p) for p in parts) >= 5


def test_unreachable_min_size_names_alpha():
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(ConfigError, match=r"^partition\.alpha:"):
        P.dirichlet(labels, 10, 0.01, np.random.default_rng(0), min_size=10, max_tries=50)


def test_unknown_kind():
    with pytest.raises(ConfigError, match=r"^partition\.kind:"):
        P.partition(np.arange(10) % 2, 2, "bogus", np.random.default_rng(0))
