"""One-run privacy auditing (Steinke, Nasr & Jagielski 2023): p-value, epsilon bound, sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedmem.privacy.audit.one_run import (
    epsilon_lower_bound,
    guesses,
    one_run_epsilon,
    p_value,
)


def _q(eps: float) -> float:
    return math.exp(eps) / (1 + math.exp(eps))


@pytest.mark.parametrize(("r", "v", "eps"), [(50, 50, 1.0), (100, 70, 0.5), (200, 150, 2.0)])
def test_p_value_without_delta_is_the_binomial_tail(r, v, eps):
    assert p_value(1000, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, _q(eps)))


def test_p_value_delta_term_matches_the_definition():
    m, r, v, eps, delta = 1000, 100, 80, 1.0, 1e-4
    q = _q(eps)
    beta = stats.binom.sf(v - 1, r, q)
    alpha = max(
        (stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)) / i
        for i in range(1, v + 1)
    )
    assert p_value(m, r, v, eps, delta) == pytest.approx(beta + alpha * delta * 2 * m)
    assert p_value(m, r, v, eps, delta) > p_value(m, r, v, eps, 0.0)
    assert p_value(m, r, 0, eps, delta) == 1.0


def test_p_value_increases_with_eps():
    ps = [p_value(500, 100, 75, eps, 1e-5) for eps in np.linspace(0, 4, 9)]
    assert all(a <= b for a, b in zip(ps, ps[1:], strict=False))


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_bound_has_a_closed_form(r):
    # delta = 0, v = r: p-value q^r = 1 - confidence  =>  eps = log(p / (1 - p)), p = 0.05^(1/r)
    p = 0.05 ** (1 / r)
    assert epsilon_lower_bound(2 * r, r, r, 0.0) == pytest.approx(math.log(p / (1 - p)), abs=1e-6)
    assert epsilon_lower_bound(2 * r, r, r, 1e-5) < epsilon_lower_bound(2 * r, r, r, 0.0)


def test_bound_is_zero_when_eps_zero_is_not_rejected():
    assert epsilon_lower_bound(1000, 100, 55, 0.0) == 0.0  # P[Bin(100, 1/2) >= 55] = 0.18
    assert epsilon_lower_bound(1000, 10, 0, 0.0) == 0.0


def test_bound_is_rejected_at_its_value():
    eps = epsilon_lower_bound(1000, 300, 260, 1e-5, confidence=0.99)
    assert eps > 0
    assert p_value(1000, 300, 260, eps, 1e-5) <= 0.01
    assert p_value(1000, 300, 260, eps + 1e-6, 1e-5) > 0.01


def test_guesses_ties_and_nan():
    scores = np.array([0.5, np.nan, 0.1, 0.5, 0.9, 0.1])
    g = guesses(scores, k_plus=2, k_minus=1)
    assert g.dtype == np.int8
    # ascending with ties by index: 2 (0.1), 5 (0.1), 0 (0.5), 3 (0.5), 4 (0.9)
    assert g.tolist() == [0, 0, -1, 1, 1, 0]
    with pytest.raises(ValueError):
        guesses(scores, k_plus=3, k_minus=3)  # only 5 scored canaries


def test_no_signal_gives_no_privacy_loss():
    bounds = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        bounds.append(
            one_run_epsilon(rng.normal(size=1000), included, delta=1e-5)["epsilon_lower_bound"]
        )
    assert max(bounds) <= 0.1
    assert sum(b == 0.0 for b in bounds) >= 4


def test_perfect_scores_give_a_clearly_positive_bound():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    scores = included + 0.01 * rng.random(1000)
    out = one_run_epsilon(scores, included, delta=1e-5)
    assert out["epsilon_lower_bound"] > 3.0
    assert out["correct"] >= 0.99 * out["guesses"]
    assert out["m"] == 1000 and out["grid_size"] == 63  # 8 k values, 8 x 8 pairs minus (0, 0)
    assert isinstance(out["epsilon_lower_bound"], float) and isinstance(out["k_plus"], int)
    assert set(out) == {
        "epsilon_lower_bound",
        "k_plus",
        "k_minus",
        "guesses",
        "correct",
        "m",
        "grid_size",
        "confidence",
        "delta",
    }


def test_one_pair_grid_is_the_direct_bound_and_bonferroni_lowers_it():
    rng = np.random.default_rng(3)
    included = rng.random(1000) < 0.5
    scores = included + rng.normal(0, 0.7, size=1000)
    one = one_run_epsilon(scores, included, delta=1e-5, k_grid=[(100, 100)])
    g = guesses(scores, 100, 100)
    v = int(((g == 1) & included).sum() + ((g == -1) & ~included).sum())
    assert (one["guesses"], one["correct"], one["grid_size"]) == (200, v, 1)
    assert one["epsilon_lower_bound"] == epsilon_lower_bound(1000, 200, v, 1e-5, 0.95)
    assert one["epsilon_lower_bound"] > 0
    two = one_run_epsilon(scores, included, delta=1e-5, k_grid=[(100, 100), (0, 1)])
    assert two["k_plus"] == 100
    assert two["epsilon_lower_bound"] == epsilon_lower_bound(1000, 200, v, 1e-5, 0.975)
    assert two["epsilon_lower_bound"] < one["epsilon_lower_bound"]


def test_no_scored_canary_gives_zero_without_guesses():
    out = one_run_epsilon(np.full(10, np.nan), np.ones(10, dtype=bool), delta=1e-5)
    assert (out["epsilon_lower_bound"], out["guesses"], out["grid_size"]) == (0.0, 0, 0)
    with pytest.raises(ValueError):
        one_run_epsilon(np.zeros(10), np.ones(10, dtype=bool), delta=0.0, k_grid=[])
