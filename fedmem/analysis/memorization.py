"""Memorization scores and outlier metrics from an ensemble trained on random subsets.

Pure functions: tensors (or arrays) in, numbers out. The ensemble is K models, model k trained
on the rows ``masks[k]`` (:func:`subset_masks`, :func:`client_subset_masks`,
:func:`fedmem.ensemble.train_ensemble`).

- Feldman & Zhang 2020, "What Neural Networks Memorize and Why: Discovering the Long Tail via
  Influence Estimation" (NeurIPS): label memorization of example i by algorithm A on data S,
  ``mem(A, S, i) = P_{h<-A(S)}[h(x_i) = y_i] - P_{h<-A(S\\i)}[h(x_i) = y_i]`` (their Eq. 1),
  estimated with models trained on random subsets I of m = 0.7 n rows as
  ``P[h(x_i) = y_i | i in I] - P[h(x_i) = y_i | i not in I]`` (their subsampled memorization
  estimate, Sec. 2: each probability is the accuracy on row i over the models whose subset
  does / does not contain it). :func:`memorization_scores`.
- Carlini, Erlingsson & Papernot 2019, "Distribution Density, Tails, and Outliers in Machine
  Learning: Metrics and Applications" (arXiv:1910.13427): "model confidence" (softmax
  probability of the label, averaged over models, :func:`confidence`) and "ensemble agreement"
  (Jensen-Shannon divergence between the output distributions of models trained on the data,
  averaged over pairs of models, :func:`ensemble_agreement`).
- :func:`fedmem.stats.roc_auc` (Mann-Whitney U) and :func:`fedmem.stats.spearman` summarize
  how the scores separate mislabeled from clean rows and how the metrics relate.

Client level: with :func:`client_subset_masks` each model includes or leaves out whole clients,
so the same formulas measure how much a row's label depends on its client's participation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from fedmem.stats import ArrayLike, roc_auc, spearman, to_numpy


def _share_count(share: float, total: int, what: str) -> int:
    count = int(round(share * total))
    if not 0 < count < total:
        raise ValueError(
            f"subset share {share} of {total} {what} gives {count}: every model would "
            f"{'leave out' if count <= 0 else 'include'} all {what}; need 0 < round(share * "
            f"{total}) < {total}"
        )
    return count


# ---------------------------------------------------------------------------------------------
# subsets
# ---------------------------------------------------------------------------------------------
def subset_masks(
    num_rows: int, models: int, share: float, rng: np.random.Generator
) -> torch.Tensor:
    """(K, N) bool: model k's random subset of exactly ``round(share * N)`` rows.

    Each row of the mask is a uniformly random subset of that size (Feldman & Zhang's
    I ~ P([n], m)), drawn independently per model from ``rng``.
    """
    m = _share_count(share, num_rows, "rows")
    chosen = np.argsort(rng.random((models, num_rows)), axis=1)[:, :m]
    masks = np.zeros((models, num_rows), dtype=bool)
    np.put_along_axis(masks, chosen, True, axis=1)
    return torch.from_numpy(masks)


def client_subset_masks(
    client_of_row: ArrayLike,
    num_clients: int,
    models: int,
    share: float,
    rng: np.random.Generator,
) -> torch.Tensor:
    """(K, N) bool: model k trains on all rows of ``round(share * num_clients)`` random clients.

    ``client_of_row`` (N,) is each row's client id in ``0..num_clients-1``. Row i is in model
    k's subset iff its whole client is: the client-level analogue of :func:`subset_masks`.
    Any grouping of rows works as "clients" (e.g. all copies of a canary as one unit); with
    one row per group the draws equal :func:`subset_masks`'.
    """
    c = _share_count(share, num_clients, "clients")
    clients = to_numpy(client_of_row).astype(np.int64)
    chosen = np.argsort(rng.random((models, num_clients)), axis=1)[:, :c]
    include = np.zeros((models, num_clients), dtype=bool)
    np.put_along_axis(include, chosen, True, axis=1)
    return torch.from_numpy(include[:, clients])


# ---------------------------------------------------------------------------------------------
# Feldman & Zhang memorization
# ---------------------------------------------------------------------------------------------
def in_out_accuracy(
    correct: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: accuracy over models that trained on it, and over models that did not (N,).

    ``correct`` and ``masks`` are (K, N) bool. NaN where a row has no such model.
    """
    correct = torch.as_tensor(correct).to(torch.bool)
    masks = torch.as_tensor(masks).to(torch.bool)
    if correct.shape != masks.shape or correct.dim() != 2:
        raise ValueError(
            f"correct {tuple(correct.shape)} and masks {tuple(masks.shape)}: need (K, N)"
        )
    n_in = masks.sum(0).double()
    n_out = (~masks).sum(0).double()
    hit_in = (correct & masks).sum(0).double()
    hit_out = (correct & ~masks).sum(0).double()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    p_in = torch.where(n_in > 0, hit_in / n_in.clamp(min=1), nan)
    p_out = torch.where(n_out > 0, hit_out / n_out.clamp(min=1), nan)
    return p_in, p_out


def memorization_scores(correct: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Feldman & Zhang (2020) label memorization per row (N,) float64, in [-1, 1].

    ``mem_i = P[h(x_i) = y_i | i in S] - P[h(x_i) = y_i | i not in S]`` (their Eq. 1, estimated
    from models trained on random subsets as in their Sec. 2): the accuracy on row i of the
    models that trained on it minus that of the models that did not. ``correct[k, i]``: model
    k predicts row i's (observed) label; ``masks[k, i]``: model k trained on row i. NaN where a
    row is in every model's subset or in none.
    """
    p_in, p_out = in_out_accuracy(correct, masks)
    return p_in - p_out


# ---------------------------------------------------------------------------------------------
# Carlini, Erlingsson & Papernot outlier metrics
# ---------------------------------------------------------------------------------------------
def _select(masks: torch.Tensor, held_out: bool) -> torch.Tensor:
    masks = torch.as_tensor(masks).to(torch.bool)
    return ~masks if held_out else masks


def confidence(
    probs: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, *, held_out: bool = False
) -> torch.Tensor:
    """Carlini et al. (2019) model confidence per row (N,) float64.

    The softmax probability of the row's given label ``y`` (N,), averaged over the models that
    trained on the row (``held_out=False``; the paper's models are trained on the data) or
    over the models that did not (``held_out=True``). ``probs`` is (K, N, C). NaN where no model
    qualifies. Low confidence marks atypical or mislabeled rows.
    """
    sel = _select(masks, held_out)
    p_y = probs.gather(2, y.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(2)
    count = sel.sum(0).double()
    total = (p_y.double() * sel).sum(0)
    return torch.where(
        count > 0, total / count.clamp(min=1), torch.tensor(float("nan"), dtype=torch.float64)
    )


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1) / math.log(2)


def ensemble_agreement(
    probs: torch.Tensor, masks: torch.Tensor, *, held_out: bool = True
) -> torch.Tensor:
    """Carlini et al. (2019) ensemble agreement per row (N,) float64: mean pairwise JS divergence.

    For each row, the Jensen-Shannon divergence ``JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2``
    (in bits, so in [0, 1]) between the softmax outputs of every pair of distinct models in the
    selected set, averaged over the pairs. 0 = all models output the same distribution; larger =
    less agreement (the paper ranks examples by it: outliers are where models disagree). The
    selected models are those that did not train on the row (``held_out=True``, default) or
    those that did (``held_out=False``; the paper's models are trained on the data). ``probs`` is
    (K, N, C). NaN where fewer than two models qualify.
    """
    return _pairwise_js(probs, [_select(masks, held_out)])[0]


def _pairwise_js(probs: torch.Tensor, selections: list[torch.Tensor]) -> list[torch.Tensor]:
    """Mean pairwise JS divergence (bits) per row over each (K, N) bool model selection.

    One pass over the K (K - 1) / 2 model pairs serves every selection.
    """
    k_models = probs.shape[0]
    p = probs.float()
    h = _entropy_bits(p)  # (K, N)
    sels = [sel.to(p.device).float() for sel in selections]
    sums = [torch.zeros(probs.shape[1], dtype=torch.float64, device=p.device) for _ in sels]
    for a in range(k_models - 1):
        m = 0.5 * (p[a + 1 :] + p[a].unsqueeze(0))
        js = (_entropy_bits(m) - 0.5 * (h[a + 1 :] + h[a].unsqueeze(0))).clamp_(min=0)
        for total, w in zip(sums, sels, strict=True):
            total += (js * w[a + 1 :]).sum(0).double() * w[a].double()
    out = []
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=p.device)
    for total, w in zip(sums, sels, strict=True):
        count = w.sum(0).double()
        pairs = count * (count - 1) / 2
        out.append(torch.where(pairs > 0, total / pairs.clamp(min=1), nan).cpu())
    return out


# ---------------------------------------------------------------------------------------------
# summary statistics
# ---------------------------------------------------------------------------------------------
def _nanmean(v: np.ndarray) -> float:
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else float("nan")


def memorization_report(
    ensemble_logits: torch.Tensor,
    y_obs: torch.Tensor,
    masks: torch.Tensor,
    groups: Mapping[str, torch.Tensor],
) -> dict:
    """Memorization scores and outlier metrics of an ensemble, per row and summarized.

    ``ensemble_logits`` (K, N, C) of the K models on the N rows, ``y_obs`` (N,) the labels
    they trained on, ``masks`` (K, N) which rows each model trained on, ``groups`` named (N,)
    bool row sets (e.g. ``clean``, ``mislabeled``, ``outlier``, ``canary``).

    Returns ``{"per_row": {...}, "summary": {...}}``. ``per_row`` holds float64 numpy arrays
    (N,): ``mem`` (:func:`memorization_scores` on correct = argmax == y_obs), ``acc_in`` and
    ``acc_out`` (its two terms), ``confidence`` / ``confidence_out`` (:func:`confidence` over
    in / held-out models), ``agreement`` / ``agreement_in`` (:func:`ensemble_agreement`, mean
    pairwise JS divergence over held-out / in models). ``summary``: ``models``, ``rows``,
    ``mem_mean`` and ``count`` per group (NaN rows skipped), ``auc_vs_clean`` per group
    (:func:`roc_auc` of mem, the group as positives against ``clean``, when both exist),
    ``auc_mislabeled_vs_clean`` (the same for ``mislabeled``; NaN without those groups),
    ``spearman_mem_confidence``, ``spearman_mem_confidence_out`` and
    ``spearman_mem_agreement`` (:func:`spearman` over all rows).
    """
    logits = ensemble_logits.float()
    masks = torch.as_tensor(masks).to(torch.bool).to(logits.device)
    y = y_obs.to(logits.device)
    if logits.dim() != 3 or logits.shape[:2] != masks.shape or len(y) != logits.shape[1]:
        raise ValueError(
            f"memorization_report: logits {tuple(logits.shape)}, masks {tuple(masks.shape)}, "
            f"y_obs {tuple(y.shape)} do not fit (K, N, C), (K, N), (N,)"
        )
    probs = torch.softmax(logits, dim=-1)
    correct = logits.argmax(-1) == y.unsqueeze(0)
    acc_in, acc_out = in_out_accuracy(correct.cpu(), masks.cpu())
    mem = acc_in - acc_out
    per_row = {
        "mem": mem.numpy(),
        "acc_in": acc_in.numpy(),
        "acc_out": acc_out.numpy(),
        "confidence": confidence(probs, y, masks).cpu().numpy(),
        "confidence_out": confidence(probs, y, masks, held_out=True).cpu().numpy(),
    }
    agreement, agreement_in = _pairwise_js(probs, [~masks, masks])
    per_row["agreement"] = agreement.numpy()
    per_row["agreement_in"] = agreement_in.numpy()
    g_np = {name: to_numpy(rows).astype(bool).ravel() for name, rows in groups.items()}
    mem_np = per_row["mem"]
    auc_vs_clean: dict[str, float] = {}
    if "clean" in g_np:
        clean = g_np["clean"]
        for name, rows in g_np.items():
            if name == "clean":
                continue
            sel = rows | clean
            auc_vs_clean[name] = roc_auc(mem_np[sel], rows[sel])
    summary = {
        "models": int(logits.shape[0]),
        "rows": int(logits.shape[1]),
        "mem_mean": {"all": _nanmean(mem_np)}
        | {name: _nanmean(mem_np[rows]) for name, rows in g_np.items()},
        "count": {name: int(rows.sum()) for name, rows in g_np.items()},
        "auc_vs_clean": auc_vs_clean,
        "auc_mislabeled_vs_clean": auc_vs_clean.get("mislabeled", float("nan")),
        "spearman_mem_confidence": spearman(mem_np, per_row["confidence"]),
        "spearman_mem_confidence_out": spearman(mem_np, per_row["confidence_out"]),
        "spearman_mem_agreement": spearman(mem_np, per_row["agreement"]),
    }
    return {"per_row": per_row, "summary": summary}
