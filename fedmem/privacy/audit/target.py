"""Every audit part for one target model: exposure, record- and client-level membership
inference, and the one-run empirical epsilon of its audit canaries."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmem.data.table import AUDIT_CANARY, AUDIT_POOL, ExampleTable
from fedmem.observer import predict
from fedmem.privacy.audit import attacks, one_run
from fedmem.privacy.audit.data import ShadowData, client_shadow_data
from fedmem.privacy.audit.records import AuditedRun
from fedmem.privacy.audit.scoring import (
    canary_exposure,
    claimed_privacy,
    client_scores,
    mia_scores,
    use_fixed_variance,
)
from fedmem.privacy.audit.shadows import ShadowModels
from fedmem.seeding import derive_seed
from fedmem.stats import auc_test, roc_auc


def _eps(v: float | str | None) -> float:
    return math.inf if v is None or isinstance(v, str) else float(v)


def audit_model(
    run: AuditedRun,
    name: str,
    model: nn.Module,
    shadows: ShadowModels | None,
    candidate_masks: torch.Tensor | None,
    missing: dict[str, str],
    client_shadows: tuple[ShadowModels, ShadowData, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Every audit part for one target model: its audit.json entry and its ROC curves."""
    cfg, table = run.cfg, run.table
    bs = cfg.train.eval_batch_size
    res: dict[str, Any] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    if "exposure" not in missing:
        rows, copies, holders = canary_rows(table)
        losses = F.cross_entropy(
            predict(model, table.x[rows], bs), table.y_obs[rows], reduction="none"
        )
        ref = F.cross_entropy(
            predict(model, table.canary_ref_x, bs), table.canary_ref_y, reduction="none"
        )
        res["exposure"] = canary_exposure(losses.numpy(), ref.numpy(), copies, holders)

    if shadows is not None and candidate_masks is not None:
        cand_logits = predict(model, table.audit_x, bs)
        pop_logits = predict(model, table.x_test, bs)
        sh_cand = shadows.logits(table.audit_x, bs)
        sh_pop = shadows.logits(table.x_test, bs)
        fixed_variance = use_fixed_variance(cfg, len(shadows))
        kind = table.audit_kind.numpy()
        scores = population_scores(
            kind,
            lambda cols: mia_scores(
                cand_logits[cols],
                sh_cand[:, cols],
                table.audit_y[cols],
                candidate_masks[:, cols],
                pop_logits,
                sh_pop,
                table.y_test,
                fixed_variance,
            ),
        )
        member = table.audit_member.numpy()
        pool = kind == AUDIT_POOL
        if pool.any():
            noisy = (table.audit_y != table.audit_y_true).numpy()
            groups = {"mislabeled": pool & noisy, "clean label": pool & ~noisy}
            res["membership"] = {
                "candidates": int(pool.sum()),
                "members": int(member[pool].sum()),
                "fixed_variance": fixed_variance,
                "attacks": {
                    a: attacks.attack_summary(s[pool], member[pool]) for a, s in scores.items()
                },
                "auc_by_group": {
                    g: {a: roc_auc(s[m], member[m]) for a, s in scores.items()}
                    for g, m in groups.items()
                },
            }
            curves = {a: attacks.roc_curve(s[pool], member[pool]) for a, s in scores.items()}
        can = kind == AUDIT_CANARY
        if can.any():
            res["one_run_epsilon"] = one_run_epsilon(run, name, scores, member, can)

    if "client_membership" not in missing:
        res["client_membership"] = client_membership(run, model, client_shadows)
    return res, curves


def canary_rows(table: ExampleTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every inserted canary (ascending id): the table row of its first copy, its number
    of copies and the number of clients holding it (the exposure groups)."""
    ids, first = np.unique(table.canary_id.numpy(), return_index=True)
    cid, rows = ids[ids >= 0], first[ids >= 0]
    copies = np.bincount(table.canary_id[table.is_canary].numpy(), minlength=len(cid))
    holders = np.array(
        [len(torch.unique(table.client[table.canary_id == c])) for c in cid], dtype=np.int64
    )
    return rows, copies[cid], holders


def population_scores(
    kind: np.ndarray, score: Callable[[torch.Tensor], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Attack scores computed separately for each candidate population (``kind``: the
    membership pool, the audit canaries) and put back in candidate order.

    LiRA's fixed variance (Carlini et al. 2022, Sec. 4.3) is one standard deviation pooled
    over the examples it scores; pooled over two populations as different as real training
    examples and random-input canaries, it would fit neither. ``score(cols)`` returns every
    attack's scores for the candidate columns ``cols``.
    """
    out: dict[str, np.ndarray] = {}
    for k in np.unique(kind):
        cols = np.flatnonzero(kind == k)
        for a, s in score(torch.from_numpy(cols)).items():
            out.setdefault(a, np.full(len(kind), np.nan))[cols] = s
    return out


def one_run_epsilon(
    run: AuditedRun, name: str, scores: dict[str, np.ndarray], member: np.ndarray, can: np.ndarray
) -> dict[str, Any]:
    """Steinke et al. (2023) lower bounds from each attack's scores on the audit canaries, and
    a test of every privacy claim of the model that the canaries can test.

    Each claim (:func:`~fedmem.privacy.audit.scoring.claimed_privacy`) is tested at the record
    level it implies (``test_epsilon``, ``test_delta``); a claim with an infinite test epsilon
    (no DP, or a user-level claim too weak to say anything per record) is reported, not
    tested. With T claims tested, each test runs at confidence ``1 - (1 - c) / T``
    (Bonferroni), so that "some claim is violated" holds at ``audit.attack.confidence`` = c
    for the whole family: only then may the CLI exit with code 3.
    """
    att = run.cfg.audit.attack
    record = run.records[name]
    # a model derived from another (pruned, unlearned, fine-tuned) claims nothing of its own
    trained_as = record.trainer if record.parent is None and record.method is None else "derived"
    claims = claimed_privacy(run.cfg, run.summary, trained_as, len(run.table))
    tests = sum(math.isfinite(c["test_epsilon"]) for c in claims)
    each = 1.0 - (1.0 - att.confidence) / max(tests, 1)
    bounds = []
    for claim in claims:
        tested = math.isfinite(claim["test_epsilon"])
        per_attack = {
            a: one_run.one_run_epsilon(
                s[can], member[can], claim["test_delta"], each if tested else att.confidence
            )
            for a, s in scores.items()
        }
        lb = per_attack[att.epsilon_attack]["epsilon_lower_bound"]
        bounds.append(
            {
                **claim,
                "tested": tested,
                "confidence": each if tested else att.confidence,
                "lower_bound": lb,
                "violated": tested and lb > claim["test_epsilon"],
                "lower_bound_by_attack": {
                    a: r["epsilon_lower_bound"] for a, r in per_attack.items()
                },
                "guesses": per_attack[att.epsilon_attack],
            }
        )
    head = bounds[0]
    return {
        "attack": att.epsilon_attack,
        "canaries": int(can.sum()),
        "included": int(member[can].sum()),
        "confidence": att.confidence,
        "tests": tests,
        "confidence_each": each,
        "claims": bounds,
        "lower_bound": head["lower_bound"],
        "lower_bound_delta": head["test_delta"],
        "accountant_epsilon": head["epsilon"],
        "accountant_delta": head["delta"],
        "accountant_level": head["level"],
    }


def client_membership(
    run: AuditedRun,
    model: nn.Module,
    shadows: tuple[ShadowModels, ShadowData, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Client-level inference: did client k's data train the model?

    Per-example scores over every client's ordinary examples (canary copies left out: only
    training clients hold them), averaged per client; AUC of training (member) vs held-out
    (non-member) clients. ``loss``: the loss-threshold score (Yeom et al. 2018) aggregated.
    With client-level shadows (:func:`fedmem.privacy.audit.engine.train_client_shadows`), also
    LiRA online / offline (Carlini et al. 2022) per example with "in" meaning *the example's
    client* was in the shadow's training, then averaged per client (the mean log-likelihood
    ratio; assumes the examples independent, as aggregating per-example tests does).

    Training vs held-out clients are few units (e.g. 10 vs 4: AUC in steps of 1/40), so every
    AUC comes with its permutation p-value and a bootstrap interval
    (:func:`fedmem.stats.auc_test`); "above chance" means a small p-value, not AUC > 0.5. No
    user-level privacy claim is tested here: the held-out clients are a fixed set, not clients
    included at random, which a sound test (one-run or otherwise) would need.
    """
    table, bs = run.table, run.cfg.train.eval_batch_size
    data = client_shadow_data(table)
    ordinary = torch.cat(
        [
            (table.canary_id < 0) & ~table.is_audit_canary,
            torch.ones(len(table.heldout_y), dtype=torch.bool),
        ]
    )
    x, y, client = data.x[ordinary], data.y[ordinary], data.client[ordinary].numpy()
    logits = predict(model, x, bs)
    scores = {"loss": attacks.loss_scores(logits, y)}
    if shadows is not None:
        sh, _, clients = shadows
        fixed_variance = use_fixed_variance(run.cfg, len(sh))
        phi = attacks.logit_confidence(logits, y)
        sh_phi = attacks.logit_confidence(sh.logits(x, bs), y)
        inside = clients[:, torch.from_numpy(client)]
        for online in (True, False):
            scores["lira_online" if online else "lira_offline"] = attacks.lira_scores(
                phi, sh_phi, inside, online=online, fixed_variance=fixed_variance
            )
    out: dict[str, Any] = {"attacks": {}, "tests": {}, "score_per_client": {}}
    for a, s in scores.items():
        ids, means = client_scores(s, client)
        member = ids < table.num_clients
        test = auc_test(means, member, seed=derive_seed(run.cfg.seed, "audit", "client-auc", a))
        out["attacks"][a] = test["auc"]
        out["tests"][a] = test
        out["score_per_client"][a] = {
            str(int(k)): float(v) for k, v in zip(ids, means, strict=True)
        }
    return {
        "clients": int(member.sum()),
        "heldout_clients": int((~member).sum()),
        "auc": out["attacks"]["loss"],
        "auc_by_attack": out["attacks"],
        # few units: every AUC with its permutation p-value and bootstrap interval
        "auc_tests": out["tests"],
        "shadows": 0 if shadows is None else len(shadows[0]),
        "score_per_client": out["score_per_client"],
    }
