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


RECORD_NEIGHBOURS = "add/remove one record (Poisson-sampled DP-SGD, Opacus' accountant)"
USER_NEIGHBOURS = (
    "zero-out one client (its update replaced by none in every round; the same as add/remove "
    "of a client when every client trains every round)"
)


def _finite(eps: float | str | None) -> float:
    return math.inf if eps is None or isinstance(eps, str) else float(eps)


def claimed_privacy(cfg: ExperimentConfig, summary: dict, run: str, n: int) -> list[dict]:
    """The (epsilon, delta) guarantees that model ``run`` claims, each at its own level, and
    the record-level claim it implies, which the audit's record canaries can test.

    Every claim has ``accountant``, ``level`` (``record`` or ``user``), ``neighbouring`` (the
    relation its accountant assumes), ``epsilon`` and ``delta``; and ``test_epsilon`` /
    ``test_delta``: the guarantee it gives for adding or removing *one record*, the unit the
    audit canaries are (Steinke et al. 2023 need the relation of the claim to match how the
    canaries enter training).

    - Central with DP-SGD: its record-level accountant, tested as is.
    - Federated with DP-SGD: every client's accountant covers its own records, so the model is
      (max epsilon, max delta)-DP for any one record: tested as is.
    - Federated with DP-FedAvg (user level): a record added to client k changes k's update; in
      the client-level relation that is two steps (drop k's update, put back the new one), so
      by group privacy (Dwork & Roth 2014, Lemma 2.2 for k = 2) a user-level (eps, delta)
      claim gives (2 eps, (1 + e^eps) delta) per record. That weaker record claim is what the
      canaries test; the user-level claim itself would need whole clients included at random
      (the held-out clients are a fixed set), so it is reported, not tested.
    - Without DP: one claim ``none`` with epsilon ``inf`` at the default delta 1/(10 n), which
      no bound can contradict (the one-run bound is still reported).
    """
    priv = summary.get("privacy") or {}
    out = []
    rec = priv.get("record_level") or {}
    if run == "central" and "central" in rec:
        c = rec["central"]
        delta = c.get("delta") or _delta(cfg, n)
        out.append(_claim("record_level", "record", RECORD_NEIGHBOURS, c.get("epsilon"), delta))
    if run == "federated" and rec.get("clients"):
        clients = rec["clients"].values()
        eps = max(_finite(c["epsilon"]) for c in clients)
        delta = max(float(c["delta"]) for c in clients)
        out.append(
            _claim(
                "record_level",
                "record",
                RECORD_NEIGHBOURS + ", the largest over clients",
                "inf" if math.isinf(eps) else eps,
                delta,
            )
        )
    user = priv.get("user_level") or {}
    if run == "federated" and user:
        claim = _claim("user_level", "user", USER_NEIGHBOURS, user["epsilon"], user["delta"])
        eps = _finite(user["epsilon"])
        test_delta = (1.0 + math.exp(min(eps, 700.0))) * float(user["delta"])
        claim["test_epsilon"] = 2.0 * eps if test_delta < 1.0 else math.inf
        claim["test_delta"] = min(test_delta, 1.0)
        claim["tested_as"] = "one record, by group privacy of 2 client-level steps"
        out.append(claim)
    return out or [_claim("none", "record", RECORD_NEIGHBOURS, "inf", _delta(cfg, n))]


def _claim(accountant: str, level: str, neighbouring: str, eps: Any, delta: float) -> dict:
    return {
        "accountant": accountant,
        "level": level,
        "neighbouring": neighbouring,
        "epsilon": eps,
        "delta": float(delta),
        "test_epsilon": _finite(eps),
        "test_delta": float(delta),
        "tested_as": "one record",
    }


def use_fixed_variance(cfg: ExperimentConfig, shadows: int) -> bool:
    """LiRA with one pooled variance: ``audit.attack.fixed_variance``, where ``auto`` means
    fewer than 64 shadows (Carlini et al. 2022 use it when shadow models are few)."""
    fixed = cfg.audit.attack.fixed_variance
    return shadows < 64 if fixed == "auto" else fixed == "yes"


def _delta(cfg: ExperimentConfig, n: int) -> float:
    return cfg.privacy.delta if cfg.privacy.delta is not None else default_delta(n)
