"""Empirical epsilon lower bounds from one training run. Pure functions.

Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run" (NeurIPS): m audit
canaries are each included in the training set independently with probability 1/2. After
training, an auditor scores every canary, guesses "in" for the k+ highest scores and "out"
for the k- lowest and abstains on the rest: r = k+ + k- guesses, v of them correct. If the
training algorithm is (eps, delta)-DP, the number of correct guesses is (up to a delta term)
stochastically dominated by Binomial(r, e^eps / (1 + e^eps)), the accuracy of eps-DP
randomized response. Their main theorem for (eps, delta)-DP bounds

    P[>= v correct] <= beta + alpha * delta * 2m,
    beta  = P[Binomial(r, q) >= v],          q = e^eps / (1 + e^eps),
    alpha = max_{1 <= i <= v} P[v > Binomial(r, q) >= v - i] / i,

(the paper's p-value computation, :func:`p_value`). Observing v correct guesses with p-value
<= 1 - confidence rejects "the algorithm is (eps, delta)-DP"; the largest such eps is the
audit's lower bound (:func:`epsilon_lower_bound`). :func:`one_run_epsilon` sweeps (k+, k-)
with a Bonferroni correction, so that picking the best pair keeps the confidence level.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import optimize, special, stats

from fedmem.stats import ArrayLike

EPS_CAP = 50.0
"""Upper end of the epsilon search; the bound is reported as this cap if even it is rejected."""

EPS_XTOL = 1e-9
"""Absolute tolerance of the epsilon root search (the result errs on the low side)."""

K_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
"""Default k+ and k- values as shares of m for :func:`one_run_epsilon`."""


def _np(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _check(m: int, r: int, v: int, delta: float) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"need 0 <= delta <= 1, got {delta}")


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of >= v correct of r guesses on m canaries if the training is (eps, delta)-DP.

    Steinke et al. 2023, main theorem: ``min(1, beta + alpha * delta * 2m)`` with ``beta =
    P[Bin(r, q) >= v]``, ``alpha = max_{1<=i<=v} P[v > Bin(r, q) >= v - i] / i`` and ``q =
    e^eps / (1 + e^eps)``; alpha is vectorized over i (cumulative sum of the pmf at v-1, v-2,
    ..., 0). Non-decreasing in eps (checked numerically; the epsilon search relies on it).
    """
    _check(m, r, v, delta)
    if eps < 0:
        raise ValueError(f"need eps >= 0, got {eps}")
    q = float(special.expit(eps))
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0.0 or v == 0:
        return min(1.0, beta)
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v > W >= v - i]
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest eps with ``p_value(m, r, v, eps, delta) <= 1 - confidence`` (Steinke et al. 2023).

    For every smaller eps the null "the training is (eps, delta)-DP" is rejected at that level
    (the p-value increases with eps). 0.0 if even eps = 0 is not rejected; :data:`EPS_CAP` if
    even the cap is. Brent's method to :data:`EPS_XTOL`, stepped down until the returned eps is
    itself rejected, so the bound never overstates.
    """
    _check(m, r, v, delta)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"need 0 < confidence < 1, got {confidence}")
    level = 1.0 - confidence

    def gap(eps: float) -> float:
        return p_value(m, r, v, eps, delta) - level

    if gap(0.0) > 0:
        return 0.0
    if gap(EPS_CAP) <= 0:
        return EPS_CAP
    eps = optimize.brentq(gap, 0.0, EPS_CAP, xtol=EPS_XTOL)
    while eps > 0 and gap(eps) > 0:
        eps = max(0.0, eps - EPS_XTOL)
    return float(eps)


def _order(scores: ArrayLike) -> np.ndarray:
    """Indices of the non-NaN scores, ascending; ties by index (stable sort)."""
    s = _np(scores).astype(np.float64).ravel()
    valid = np.flatnonzero(~np.isnan(s))
    return valid[np.argsort(s[valid], kind="stable")]


def guesses(scores: ArrayLike, k_plus: int, k_minus: int) -> np.ndarray:
    """Steinke et al. 2023 auditor guesses (m,) int8: +1 "in" for the k+ highest scores, -1
    "out" for the k- lowest, 0 abstain. NaN scores abstain; tied scores are ordered by index
    (a lower index counts as the lower score)."""
    m = _np(scores).size
    order = _order(scores)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(order):
        raise ValueError(f"k+={k_plus}, k-={k_minus}: need k+ + k- <= {len(order)} scored canaries")
    g = np.zeros(m, dtype=np.int8)
    g[order[:k_minus]] = -1
    g[order[len(order) - k_plus :]] = 1
    return g


def _default_grid(m: int, scored: int) -> list[tuple[int, int]]:
    ks = sorted({int(round(f * m)) for f in K_FRACTIONS})
    return [(kp, km) for kp in ks for km in ks if 0 < kp + km <= scored]


def one_run_epsilon(
    scores: ArrayLike,
    included: ArrayLike,
    delta: float,
    confidence: float = 0.95,
    k_grid: Sequence[tuple[int, int]] | None = None,
) -> dict:
    """Best one-run epsilon lower bound over (k+, k-) pairs (Steinke et al. 2023).

    ``scores`` (m,): higher = more likely included (NaN abstains); ``included`` (m,) bool: the
    canary's coin flip. ``k_grid``: (k+, k-) pairs; default every pair with k+ and k- in
    :data:`K_FRACTIONS` of m (rounded, deduplicated), dropping r = 0 and pairs needing more
    than the scored canaries. Each of the G pairs is bounded at confidence ``1 - (1 -
    confidence) / G`` (Bonferroni), so the maximum over pairs holds at ``confidence``.

    Returns the best pair (the first in grid order on ties): ``epsilon_lower_bound``,
    ``k_plus``, ``k_minus``, ``guesses`` (r), ``correct`` (v), ``m``, ``grid_size`` (G),
    ``confidence``, ``delta``. With no scored canary the default grid is empty and the bound
    is 0.0 with no guesses (G = 0).
    """
    inc = _np(included).astype(bool).ravel()
    m = inc.size
    if _np(scores).size != m:
        raise ValueError(f"one_run_epsilon: {_np(scores).size} scores for {m} canaries")
    order = _order(scores)
    grid = list(k_grid) if k_grid is not None else _default_grid(m, len(order))
    if k_grid is not None and not grid:
        raise ValueError("one_run_epsilon: empty (k+, k-) grid")
    # correct "in" guesses among the top k, correct "out" guesses among the bottom k
    top_in = np.r_[0, np.cumsum(inc[order[::-1]])]
    bottom_out = np.r_[0, np.cumsum(~inc[order])]
    level = 1.0 - (1.0 - confidence) / max(len(grid), 1)
    results = []
    for k_plus, k_minus in grid:
        k_plus, k_minus = int(k_plus), int(k_minus)
        if k_plus < 0 or k_minus < 0 or not 0 < k_plus + k_minus <= len(order):
            raise ValueError(f"(k+, k-) = ({k_plus}, {k_minus}) with {len(order)} scored canaries")
        r = k_plus + k_minus
        v = int(top_in[k_plus] + bottom_out[k_minus])
        eps = epsilon_lower_bound(m, r, v, delta, level)
        results.append((eps, k_plus, k_minus, r, v))
    # max keeps the first maximum: the first grid pair on ties
    eps, k_plus, k_minus, r, v = max(results, key=lambda res: res[0], default=(0.0, 0, 0, 0, 0))
    return {
        "epsilon_lower_bound": eps,
        "k_plus": k_plus,
        "k_minus": k_minus,
        "guesses": r,
        "correct": v,
        "m": m,
        "grid_size": len(grid),
        "confidence": float(confidence),
        "delta": float(delta),
    }
