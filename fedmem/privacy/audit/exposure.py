"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"). Pure functions.

Carlini, Liu, Erlingsson, Kos & Song 2019, "The Secret Sharer: Evaluating and Testing
Unintended Memorization in Neural Networks" (USENIX Security): a canary inserted into the
training data is ranked, by the trained model's loss, among reference canaries drawn from the
same randomness space R but never inserted. Their Def. of rank counts the candidates whose loss
is at most the canary's, and exposure (their Def. of exposure) is

    exposure = log2 |R| - log2 rank,

here with |R| = number of references + 1 (the canary itself is one of the candidates), so
exposure lies in [0, log2(|R| + 1)]: the maximum means the inserted canary has the lowest loss
of all. Sec. 4.3 estimates exposure beyond that maximum by fitting a skew-normal distribution
to the reference losses (:func:`exposure_extrapolated`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from fedmem.stats import ArrayLike


def _np(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _losses(a: ArrayLike, what: str) -> np.ndarray:
    v = _np(a).astype(np.float64).ravel()
    if np.isnan(v).any():
        raise ValueError(f"{what} contain NaN: cannot rank")
    return v


def ranks(canary_losses: ArrayLike, reference_losses: ArrayLike) -> np.ndarray:
    """Carlini et al. 2019 rank of each canary among the references (int64, 1 = lowest loss).

    ``rank = 1 + #(reference loss < canary loss) + #(reference loss == canary loss)``: ties go
    against the canary, so the audit never overstates exposure. Binary search on the sorted
    reference losses, O((c + |R|) log |R|).
    """
    canary = _losses(canary_losses, "canary losses")
    ref = np.sort(_losses(reference_losses, "reference losses"))
    return (1 + np.searchsorted(ref, canary, side="right")).astype(np.int64)


def exposure(canary_losses: ArrayLike, reference_losses: ArrayLike) -> np.ndarray:
    """Carlini et al. 2019 exposure ``log2(|R| + 1) - log2(rank)`` per canary (float64).

    |R| = number of reference losses, :func:`ranks` for the rank; in [0, log2(|R| + 1)].
    """
    size = _losses(reference_losses, "reference losses").size
    return math.log2(size + 1) - np.log2(ranks(canary_losses, reference_losses))


def exposure_extrapolated(canary_losses: ArrayLike, reference_losses: ArrayLike) -> np.ndarray:
    """Carlini et al. 2019 (Sec. 4.3) extrapolated exposure ``-log2 P[L_ref <= canary loss]``.

    ``L_ref`` follows a skew-normal distribution fitted by maximum likelihood to the reference
    losses (``scipy.stats.skewnorm.fit``), as in the paper; the probability is its CDF at the
    canary's loss (computed as a log-CDF). Unlike :func:`exposure` it is not capped at
    log2(|R| + 1): a canary far below every reference gets a large value (+inf if the tail
    probability underflows). Needs at least 3 references (a 3-parameter fit).
    """
    canary = _losses(canary_losses, "canary losses")
    ref = _losses(reference_losses, "reference losses")
    if ref.size < 3:
        raise ValueError(f"exposure_extrapolated: {ref.size} reference losses, need >= 3")
    shape, loc, scale = stats.skewnorm.fit(ref)
    return -stats.skewnorm.logcdf(canary, shape, loc, scale) / math.log(2)


def exposure_summary(exposures: ArrayLike, groups: dict[str, ArrayLike]) -> dict:
    """Count, mean, median and max exposure per named canary group (bool mask over canaries).

    NaN exposures are skipped. Plain Python numbers; mean / median / max are None for a group
    without exposures.
    """
    e = _np(exposures).astype(np.float64).ravel()
    out: dict[str, dict] = {}
    for name, mask in groups.items():
        rows = _np(mask).astype(bool).ravel()
        if rows.shape != e.shape:
            raise ValueError(f"group {name!r}: mask {rows.shape} for {e.shape[0]} exposures")
        vals = e[rows & ~np.isnan(e)]
        empty = vals.size == 0
        out[name] = {
            "count": int(vals.size),
            "mean": None if empty else float(vals.mean()),
            "median": None if empty else float(np.median(vals)),
            "max": None if empty else float(vals.max()),
        }
    return out
