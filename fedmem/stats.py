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
