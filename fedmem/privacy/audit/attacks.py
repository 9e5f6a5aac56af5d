"""Membership-inference scores and their ROC summaries. Pure functions; higher score = member.

- Yeom, Giacomelli, Fredrikson & Jha 2018, "Privacy Risk in Machine Learning: Analyzing the
  Connection to Overfitting" (CSF): the loss-threshold attack, score = -loss
  (:func:`loss_scores`).
- Carlini, Chien, Nasr, Song, Terzis & Tramer 2022, "Membership Inference Attacks From First
  Principles" (IEEE S&P), LiRA: the logit-scaled confidence ``phi = log(p_y / (1 - p_y))``
  (Sec. 4.3, :func:`logit_confidence`) modelled per example as a Gaussian over shadow models
  trained with (IN) and without (OUT) the example; online = Gaussian likelihood ratio
  (Alg. 1), offline = one-sided test against the OUT Gaussian only (Sec. 4.3); "fixed
  variance" = one global variance per group, for few (< 64) shadow models (:func:`lira_scores`).
  Results are reported as TPR at low FPR (0.1 %, 1 %) next to the AUC (Sec. 3,
  :func:`attack_summary`).
- Zarifzadeh, Liu & Shokri 2024, "Low-Cost High-Power Membership Inference Attacks" (ICML),
  RMIA offline: the likelihood ratio of x against population samples z,
  ``LR(x, z) = (Pr(x|theta) / Pr(x)) / (Pr(z|theta) / Pr(z))``, score = share of z with
  ``LR >= gamma`` (:func:`rmia_scores`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from fedmem.stats import ArrayLike, roc_auc

STD_FLOOR = 1e-6
"""Smallest standard deviation LiRA uses; guards constant shadow outputs (zero variance)."""

RMIA_A = 0.3
"""RMIA offline coefficient a in ``Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2``.

Zarifzadeh et al. 2024 tune a per dataset; 0.3 is the default of the maintained reference
implementation (privacy-meter ``modules/mia/attacks/rmia.py``, which can also tune it on a
paired model over 0, 0.1, ..., 1); the paper's CIFAR-10 attack configs use a = 0.33.
"""

RMIA_GAMMA = 1.0
"""RMIA threshold gamma on LR(x, z): privacy-meter's library attack counts z with LR > 1
(``rmia.py``); the paper's research configs (``research/2023_rmia``) use gamma = 2 together
with temperature-scaled, augmented signals that this module does not use."""


def _np(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _label_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits (..., n, C) and the label's logit (..., n), labels broadcast over ``...``."""
    z = torch.as_tensor(logits).to(torch.float64)
    y = torch.as_tensor(labels, device=z.device).to(torch.int64)
    if z.dim() < 2 or y.dim() != 1 or z.shape[-2] != y.shape[0]:
        raise ValueError(
            f"logits {tuple(z.shape)}, labels {tuple(y.shape)}: need (..., n, C), (n,)"
        )
    index = y.view(*([1] * (z.dim() - 2)), -1, 1).expand(*z.shape[:-1], 1)
    return z, z.gather(-1, index).squeeze(-1)


def _log_p_label(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    z, z_y = _label_logits(logits, labels)
    return z_y - torch.logsumexp(z, dim=-1)


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Carlini et al. 2022 (Sec. 4.3) logit-scaled confidence ``phi = log(p_y / (1 - p_y))``.

    Computed without a softmax as ``z_y - logsumexp_{y' != y} z_{y'}``, which equals
    ``log p_y - log(1 - p_y)`` exactly and stays finite for huge logits. ``logits`` (..., n, C),
    ``labels`` (n,) broadcast over the leading dims (e.g. K shadow models); returns (..., n)
    float64. Needs C >= 2.
    """
    z, z_y = _label_logits(logits, labels)
    if z.shape[-1] < 2:
        raise ValueError("logit_confidence needs at least two classes")
    y = torch.as_tensor(labels, device=z.device).to(torch.int64)
    others = z.masked_fill(torch.nn.functional.one_hot(y, z.shape[-1]).bool(), -math.inf)
    return z_y - torch.logsumexp(others, dim=-1)


def label_probability(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the label ``p_y`` (..., n) float64, shapes as in
    :func:`logit_confidence`: RMIA's ``Pr(x | theta)`` (Zarifzadeh et al. 2024)."""
    return torch.exp(_log_p_label(logits, labels))


def loss_scores(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Yeom et al. 2018 loss attack: score = -cross-entropy = ``log p_y`` per example (..., n)."""
    return _log_p_label(logits, labels).cpu().numpy()


def _gaussian_fit(
    phi: np.ndarray, member: np.ndarray, fixed_variance: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and std (n,) of ``phi`` (K, n) over the shadow models ``member`` (K, n).

    Per-example std: sample std (ddof 1), NaN with fewer than two samples. Fixed variance: one
    std pooled over all examples, ``sqrt(sum of squared residuals / (samples - examples))``
    with residuals from each example's own mean. NaN mean where an example has no sample.
    Stds are floored at :data:`STD_FLOOR`.
    """
    count = member.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(member, phi, 0.0).sum(0) / count
        sq = np.where(member, (phi - mean) ** 2, 0.0).sum(0)
        if fixed_variance:
            dof = int((count - (count > 0)).sum())
            pooled = math.sqrt(sq.sum() / dof) if dof > 0 else math.nan
            std = np.where(count > 0, pooled, np.nan)
        else:
            std = np.where(count >= 2, np.sqrt(sq / (count - 1)), np.nan)
    mean = np.where(count > 0, mean, np.nan)
    return mean, np.maximum(std, STD_FLOOR)


def lira_scores(
    target_phi: ArrayLike,
    shadow_phi: ArrayLike,
    shadow_in: ArrayLike,
    *,
    online: bool,
    fixed_variance: bool,
) -> np.ndarray:
    """LiRA (Carlini et al. 2022) membership scores (n,) float64 from logit-scaled confidences.

    ``target_phi`` (n,): :func:`logit_confidence` of the target model; ``shadow_phi`` (K, n):
    the same for K shadow models; ``shadow_in`` (K, n) bool: example i was in shadow k's
    training set (NaN shadow values count as missing).

    - online (Alg. 1): ``log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)``;
    - offline (Sec. 4.3): ``log Phi((phi - mu_out) / s_out)``, a one-sided test that phi is
      larger than the OUT models' (``scipy.stats.norm.logcdf``).

    ``fixed_variance`` (Sec. 4.3, for fewer than 64 shadow models): ``s_in`` and ``s_out`` are
    each one std pooled over all examples (see :func:`_gaussian_fit`) instead of per-example
    sample stds. NaN where a needed Gaussian cannot be fitted: no OUT (offline) or no IN / no
    OUT (online) shadow, or fewer than two of them for a per-example std.
    """
    phi = _np(target_phi).astype(np.float64).ravel()
    shadow = _np(shadow_phi).astype(np.float64)
    member = _np(shadow_in).astype(bool)
    if shadow.ndim != 2 or shadow.shape != member.shape or shadow.shape[1] != phi.shape[0]:
        raise ValueError(
            f"lira_scores: {phi.shape}, {shadow.shape}, {member.shape}: need (n,), (K, n)"
        )
    valid = ~np.isnan(shadow)
    mu_out, s_out = _gaussian_fit(shadow, ~member & valid, fixed_variance)
    if not online:
        return stats.norm.logcdf(phi, loc=mu_out, scale=s_out)
    mu_in, s_in = _gaussian_fit(shadow, member & valid, fixed_variance)
    return stats.norm.logpdf(phi, mu_in, s_in) - stats.norm.logpdf(phi, mu_out, s_out)


def _offline_pr(ref_p: np.ndarray, use: np.ndarray, a: float) -> np.ndarray:
    """Zarifzadeh et al. 2024 offline ``Pr(x) = ((1 + a) mean_OUT Pr(x|theta') + (1 - a)) / 2``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_out = np.where(use, ref_p, 0.0).sum(0) / use.sum(0)
    return 0.5 * ((1.0 + a) * mean_out + (1.0 - a))


def rmia_scores(
    target_px: ArrayLike,
    ref_px: ArrayLike,
    ref_in: ArrayLike,
    target_pz: ArrayLike,
    ref_pz: ArrayLike,
    *,
    a: float = RMIA_A,
    gamma: float = RMIA_GAMMA,
) -> np.ndarray:
    """RMIA offline (Zarifzadeh et al. 2024) membership scores (n,) float64 in [0, 1].

    Inputs are probabilities of the label (:func:`label_probability`): ``target_px`` (n,) the
    target model's on the audited examples x, ``ref_px`` (K, n) K reference models' with
    ``ref_in`` (K, n) marking which reference trained on which x; ``target_pz`` (z,) and
    ``ref_pz`` (K, z) on population samples z that no model trained on.

    ``Pr(x)`` is the offline estimate ``((1 + a) mean_OUT Pr(x|theta') + (1 - a)) / 2`` over
    the references that did not train on x (the paper's linear approximation of the IN/OUT
    average from OUT models only); ``Pr(z)`` gets the same formula over all references, as in
    the reference implementation (privacy-meter). With ``LR(x, z) = (Pr(x|theta) / Pr(x)) /
    (Pr(z|theta) / Pr(z))`` the score is the share of z with ``LR(x, z) >= gamma`` (the
    paper's Eq. for Score_MIA), computed as the share of z with ``Pr(z|theta) / Pr(z) <=
    (Pr(x|theta) / Pr(x)) / gamma`` by binary search on the sorted z ratios: O((n + z) log z),
    no (n, z) matrix. NaN for an x without an OUT reference or with a NaN probability; z with
    NaN ratios are dropped.
    """
    px = _np(target_px).astype(np.float64).ravel()
    rx = _np(ref_px).astype(np.float64)
    rin = _np(ref_in).astype(bool)
    pz = _np(target_pz).astype(np.float64).ravel()
    rz = _np(ref_pz).astype(np.float64)
    if rx.ndim != 2 or rx.shape != rin.shape or rx.shape[1] != px.shape[0]:
        raise ValueError(
            f"rmia_scores: x shapes {px.shape}, {rx.shape}, {rin.shape}: need (n,), (K, n)"
        )
    if rz.ndim != 2 or rz.shape != (rx.shape[0], pz.shape[0]):
        raise ValueError(f"rmia_scores: z shapes {pz.shape}, {rz.shape}: need (z,), (K, z)")
    if not 0.0 <= a <= 1.0 or not gamma > 0.0:
        raise ValueError(f"rmia_scores: need 0 <= a <= 1, gamma > 0; got a={a}, gamma={gamma}")
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_x = px / _offline_pr(rx, ~rin & ~np.isnan(rx), a)
        ratio_z = pz / _offline_pr(rz, ~np.isnan(rz), a)
    ratio_z = np.sort(ratio_z[~np.isnan(ratio_z)])
    if len(ratio_z) == 0:
        return np.full(px.shape, np.nan)
    counts = np.searchsorted(ratio_z, ratio_x / gamma, side="right")
    return np.where(np.isnan(ratio_x), np.nan, counts / len(ratio_z))


def _scores_labels(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s, lab = _np(scores).astype(np.float64).ravel(), _np(labels).astype(bool).ravel()
    if s.shape != lab.shape:
        raise ValueError(f"{s.shape[0]} scores for {lab.shape[0]} labels")
    return s, lab


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr) of ``scores`` for the members ``labels``, over all thresholds.

    One point per distinct score (predict "member" for score >= threshold), from (0, 0) to
    (1, 1), increasing; tied scores move together. Rows with a NaN score are dropped. Empty
    arrays if no member or no non-member remains.
    """
    s, lab = _scores_labels(scores, labels)
    keep = ~np.isnan(s)
    s, lab = s[keep], lab[keep]
    n_pos = int(lab.sum())
    n_neg = len(lab) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.empty(0), np.empty(0)
    order = np.argsort(-s, kind="stable")
    s, lab = s[order], lab[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(lab)[last_of_tie]
    fp = np.cumsum(~lab)[last_of_tie]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def tpr_at_fpr(scores: ArrayLike, labels: ArrayLike, fpr: float) -> float:
    """Largest TPR over the thresholds whose FPR <= ``fpr`` (Carlini et al. 2022, Sec. 3).

    NaN if :func:`roc_curve` is empty (no member or no non-member).
    """
    f, t = roc_curve(scores, labels)
    if len(f) == 0:
        return float("nan")
    return float(t[f <= fpr].max())


def attack_summary(scores: ArrayLike, labels: ArrayLike) -> dict:
    """AUC, TPR at 0.1 % and 1 % FPR, and the member / non-member counts of an attack.

    Counts are over the rows with a (non-NaN) score, the rows the metrics use. Plain Python
    numbers; NaN metrics when a class is empty.
    """
    s, lab = _scores_labels(scores, labels)
    scored = lab[~np.isnan(s)]
    return {
        "auc": roc_auc(s, lab),
        "tpr_at_0.1pct_fpr": tpr_at_fpr(s, lab, 0.001),
        "tpr_at_1pct_fpr": tpr_at_fpr(s, lab, 0.01),
        "members": int(scored.sum()),
        "nonmembers": int((~scored).sum()),
    }
