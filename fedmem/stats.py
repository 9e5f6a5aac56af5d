"""Small statistics helpers shared by the analysis and the privacy audit (a leaf module).

:func:`roc_auc` (Mann-Whitney U) and :func:`spearman` (rank correlation), both with average
ranks for ties; :data:`ArrayLike` and :func:`to_numpy` for functions that take tensors or
arrays.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def to_numpy(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``v`` with ties given their average rank."""
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg = ends - (counts - 1) / 2.0
    return avg[inverse]


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for the positive rows ``labels`` (bool).

    The Mann-Whitney U statistic: the share of (positive, negative) pairs in which the positive
    row scores higher, ties counted half; computed from average ranks, O(n log n). Rows with a
    NaN score are dropped. NaN if no positive or no negative row remains.
    """
    s = to_numpy(scores).astype(np.float64).ravel()
    lab = to_numpy(labels).astype(bool).ravel()
    if s.shape != lab.shape:
        raise ValueError(f"roc_auc: {s.shape[0]} scores for {lab.shape[0]} labels")
    keep = ~np.isnan(s)
    s, lab = s[keep], lab[keep]
    n_pos = int(lab.sum())
    n_neg = len(lab) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[lab].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation of ``a`` and ``b`` (average ranks for ties).

    Pairs where either value is NaN are dropped. NaN if fewer than two pairs remain or either
    side is constant.
    """
    x = to_numpy(a).astype(np.float64).ravel()
    y = to_numpy(b).astype(np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman: {x.shape[0]} vs {y.shape[0]} values")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    if denom == 0:
        return float("nan")
    return float((rx * ry).sum() / denom)


EXACT_PERMUTATIONS = 20_000
"""Up to this many label arrangements the permutation p-value enumerates them all."""


def auc_test(
    scores: ArrayLike,
    labels: ArrayLike,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """The AUC of few units with what it can claim: a permutation p-value and an interval.

    For AUCs over a handful of units (e.g. client-level membership inference over 10 training
    and 4 held-out clients: 40 pairs, AUC in steps of 1/40), the point estimate alone says
    little. Returns:

    - ``p_value``: one-sided permutation test of "the scores do not depend on the labels"
      (AUC = 0.5 in distribution) against "positives score higher": the share of the
      C(n, n_pos) label arrangements whose Mann-Whitney U is at least the observed one, exact
      when there are at most :data:`EXACT_PERMUTATIONS` arrangements, else Monte Carlo over
      ``resamples * 10`` random ones with the (1 + hits) / (1 + draws) correction (Phipson &
      Smyth 2010), so the p-value is never 0;
    - ``ci_low`` / ``ci_high``: stratified percentile bootstrap interval of the AUC at
      ``level`` (positives and negatives resampled separately, ``resamples`` draws); with
      few units it is approximate and tends to be too narrow, hence the p-value beside it;
    - ``units``, ``positives``, ``negatives`` and the method names.

    NaN scores are dropped, as in :func:`roc_auc`.
    """
    s = to_numpy(scores).astype(np.float64).ravel()
    lab = to_numpy(labels).astype(bool).ravel()
    keep = ~np.isnan(s)
    s, lab = s[keep], lab[keep]
    n, n_pos = len(s), int(lab.sum())
    out: dict[str, float | int | str] = {
        "auc": roc_auc(s, lab),
        "units": n,
        "positives": n_pos,
        "negatives": n - n_pos,
        "level": level,
    }
    if n_pos == 0 or n_pos == n:
        return out | {"p_value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    ranks = _average_ranks(s)
    observed = ranks[lab].sum()
    rng = np.random.default_rng(seed)
    if math.comb(n, n_pos) <= EXACT_PERMUTATIONS:
        from itertools import combinations

        sums = np.fromiter(
            (ranks[list(c)].sum() for c in combinations(range(n), n_pos)), dtype=np.float64
        )
        p = float(np.mean(sums >= observed - 1e-9))
        method = "exact permutation"
    else:
        draws = resamples * 10
        order = np.argsort(rng.random((draws, n)), axis=1)[:, :n_pos]
        hits = int((ranks[order].sum(1) >= observed - 1e-9).sum())
        p = (1 + hits) / (1 + draws)
        method = f"Monte Carlo permutation ({draws} draws)"
    pos, neg = s[lab], s[~lab]
    boot = np.empty(resamples)
    for b in range(resamples):
        bp = pos[rng.integers(0, len(pos), len(pos))]
        bn = neg[rng.integers(0, len(neg), len(neg))]
        boot[b] = roc_auc(np.concatenate([bp, bn]), np.r_[np.ones(len(bp)), np.zeros(len(bn))])
    alpha = (1.0 - level) / 2.0
    return out | {
        "p_value": p,
        "p_value_method": method,
        "ci_low": float(np.quantile(boot, alpha)),
        "ci_high": float(np.quantile(boot, 1.0 - alpha)),
        "ci_method": f"stratified percentile bootstrap ({resamples} draws)",
    }
