"""Pure pieces of the audit: attack scores, canary exposure, per-client scores, the privacy
claims of a run (arrays and config in, numbers out)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedmem.config import ExperimentConfig
from fedmem.privacy.audit import attacks, exposure
from fedmem.privacy.dp.planning import default_delta

ATTACKS = ("loss", "lira_online", "lira_offline", "rmia")


def canary_exposure(
    canary_losses: np.ndarray,
    reference_losses: np.ndarray,
    copies: np.ndarray,
    holders: np.ndarray,
) -> dict[str, Any]:
    """Exposure of each inserted canary, summarized overall, by copies and by holders."""
    exp = exposure.exposure(canary_losses, reference_losses)
    extra = exposure.exposure_extrapolated(canary_losses, reference_losses)
    groups = {"all": np.ones(len(exp), dtype=bool)}
    groups |= {f"copies={c}": copies == c for c in np.unique(copies)}
    groups |= {f"clients={h}": holders == h for h in np.unique(holders)}
    return {
        "references": len(reference_losses),
        "max_possible": math.log2(len(reference_losses) + 1),
        "by_group": exposure.exposure_summary(exp, groups),
        "extrapolated_by_group": exposure.exposure_summary(extra, groups),
        "per_canary": [float(v) for v in exp],
    }


def client_scores(scores: np.ndarray, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-example score of every client: (client ids ascending, mean scores)."""
    ids, inverse = np.unique(clients, return_inverse=True)
    sums = np.bincount(inverse, weights=scores, minlength=len(ids))
    return ids, sums / np.bincount(inverse, minlength=len(ids))


def mia_scores(
    target_logits: torch.Tensor,
    shadow_logits: torch.Tensor,
    labels: torch.Tensor,
    shadow_in: torch.Tensor,
    target_pop_logits: torch.Tensor,
    shadow_pop_logits: torch.Tensor,
    pop_labels: torch.Tensor,
    fixed_variance: bool,
) -> dict[str, np.ndarray]:
    """Scores of every attack for the candidates (higher = more likely a member).

    ``target_logits`` (M, C), ``shadow_logits`` (K, M, C) with ``shadow_in`` (K, M); the
    population (RMIA's z: test examples no model trained on) as ``*_pop_logits``.
    """
    phi = attacks.logit_confidence(target_logits, labels)
    shadow_phi = attacks.logit_confidence(shadow_logits, labels)
    out = {"loss": attacks.loss_scores(target_logits, labels)}
    for online in (True, False):
        out["lira_online" if online else "lira_offline"] = attacks.lira_scores(
            phi, shadow_phi, shadow_in, online=online, fixed_variance=fixed_variance
        )
    out["rmia"] = attacks.rmia_scores(
        attacks.label_probability(target_logits, labels),
        attacks.label_probability(shadow_logits, labels),
        shadow_in,
        attacks.label_probability(target_pop_logits, pop_labels),
        attacks.label_probability(shadow_pop_logits, pop_labels),
    )
    return out


def claimed_privacy(cfg: ExperimentConfig, summary: dict, run: str, n: int) -> list[dict]:
    """The (epsilon, delta) guarantees the run claims for one record of model ``run``.

    Central: its record-level accountant. Federated: the worst client's record-level
    accountant, and the user-level accountant (a record belongs to one user). Without DP one
    entry with epsilon ``inf`` at the default delta 1/(10 n).
    """
    priv = summary.get("privacy") or {}
    out = []
    rec = priv.get("record_level") or {}
    if run == "central" and "central" in rec:
        eps = rec["central"].get("epsilon")
        out.append({"accountant": "record_level", "epsilon": eps, "delta": _delta(cfg, n)})
    if run == "federated" and rec.get("clients"):
        worst = max(
            rec["clients"].values(),
            key=lambda c: math.inf if isinstance(c["epsilon"], str) else c["epsilon"],
        )
        out.append(
            {"accountant": "record_level", "epsilon": worst["epsilon"], "delta": worst["delta"]}
        )
    user = priv.get("user_level") or {}
    if run == "federated" and user:
        out.append({"accountant": "user_level", "epsilon": user["epsilon"], "delta": user["delta"]})
    return out or [{"accountant": "none", "epsilon": "inf", "delta": _delta(cfg, n)}]


def use_fixed_variance(cfg: ExperimentConfig, shadows: int) -> bool:
    """LiRA with one pooled variance: ``audit.attack.fixed_variance``, where ``auto`` means
    fewer than 64 shadows (Carlini et al. 2022 use it when shadow models are few)."""
    fixed = cfg.audit.attack.fixed_variance
    return shadows < 64 if fixed == "auto" else fixed == "yes"


def _delta(cfg: ExperimentConfig, n: int) -> float:
    return cfg.privacy.delta if cfg.privacy.delta is not None else default_delta(n)
