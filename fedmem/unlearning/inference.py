"""Membership and client-level inference on the forgotten clients, from the privacy audit's
client-level shadows (issue 15: "LiRA from the audit; AUC and TPR at low FPR, client-level
inference for K").

The attacker is the audit's (:mod:`fedmem.privacy.audit`). Once per ``python -m
fedmem.unlearn`` call, :func:`~fedmem.privacy.audit.engine.train_client_shadows` trains
``audit.attack.client_shadows`` shadow models with the run's federated recipe (FedAvg), each
on every row of a random half of all clients: the training clients and the
``audit.heldout_clients`` held-out clients that no target model ever trained on, every client
in exactly half the shadows. An example is IN a shadow when *its client* is.

Every model measured (the original, the retrained one, each method's) is attacked with the same
shadows. LiRA online (Carlini, Chien, Nasr, Song, Terzis & Tramer 2022, "Membership Inference
Attacks From First Principles", IEEE S&P, Alg. 1) scores each row by the Gaussian
log-likelihood ratio of the model's logit-scaled confidence under the IN and OUT shadows, with
one pooled variance per group below 64 shadows (Sec. 4.3;
:func:`~fedmem.privacy.audit.scoring.use_fixed_variance`, pooled over all clients' rows as in
the audit). The rows are every client's ordinary ones: canary copies and audit canaries are
left out, as the audit's client-level inference does (only training clients hold them), and,
beyond the audit, backdoor rows (``data.backdoor``) for the same reason; ``forgotten_exposure``
and ``backdoor_asr`` measure those. With the trigger rows kept, the retrained model's LiRA AUC
on K was 0.25 on ``configs/unlearn.yaml``: trigger rows that look OUT, not forgetting. Then,
with the forgotten clients' rows as members and the held-out clients' rows as non-members (no
other row is judged):

- ``forgotten_lira_auc`` and ``forgotten_lira_tpr_at_1pct_fpr``: record-level membership
  inference on the forgotten clients' examples, the ROC AUC and the TPR at 1 % FPR
  (:func:`~fedmem.privacy.audit.attacks.attack_summary`; the held-out rows set the threshold);
- ``forgotten_client_auc``: client-level inference as the audit does it
  (:func:`~fedmem.privacy.audit.target.client_membership`): each client's mean per-example
  LiRA score, AUC of the forgotten clients (members) against the held-out clients
  (non-members). For one forgotten client K it is K's percentile among the held-out clients
  (the share whose mean K's exceeds, ties half): in steps of ``1 / heldout_clients``;
- ``forgotten_client_llr``: the forgotten clients' mean per-example LiRA score itself (mean
  log-likelihood ratio, > 0 leans IN; assumes the examples independent, as averaging
  per-example tests does): the continuous statistic behind the coarse percentile.

For the retrained model the forgotten clients' rows and the held-out clients' are both
non-members, exchangeable under an IID partition, so its values sit near 0.5
(``forgotten_client_llr`` near the held-out clients'), up to the noise of few clients: a
client's rows are IN or OUT of
a shadow together, so the shadows' luck moves all of them at once. Forgetting is good when a
method's values match the retrained model's, not when they are lower (see
:mod:`fedmem.unlearning.evaluate`). Shadows are trained from scratch like the original model;
a derived model (ascent) is scored against the same Gaussians, so a value away from
retraining's in either direction is a model that does not look retrained. Without held-out
clients or client shadows the columns are None and the console names the keys to set. What
the original's training did that the shadows do not simulate (DP-SGD, DP-FedAvg, plug-ins:
:func:`fedmem.runs.records.deviations`, as the audit lists them) is printed and kept in
``unlearning.json["inference"]["not_simulated"]``: LiRA's Gaussians then come from differently
trained models, and the measures compare the methods with retraining, nothing more.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from fedmem.observer import predict
from fedmem.privacy.audit import attacks
from fedmem.privacy.audit.scoring import client_scores, use_fixed_variance
from fedmem.stats import roc_auc

MEASURES = (
    "forgotten_lira_auc",
    "forgotten_lira_tpr_at_1pct_fpr",
    "forgotten_client_auc",
    "forgotten_client_llr",
)
NEEDS = "audit.heldout_clients (e.g. 4) and audit.attack.client_shadows (e.g. 16)"


def forgotten_inference(
    scores: np.ndarray, client: np.ndarray, forgotten: tuple[int, ...], heldout: np.ndarray
) -> dict[str, float]:
    """The forgotten clients' membership measures from per-row attack scores (pure).

    ``scores`` (n,): higher = member; ``client`` (n,): each row's client; ``forgotten``: the
    forgotten client ids (members); ``heldout``: the held-out client ids (non-members). Rows
    of any other client are ignored. Record level: AUC and TPR at 1 % FPR of the
    forgotten rows against the held-out rows. Client level: the clients' mean scores
    (:func:`~fedmem.privacy.audit.scoring.client_scores`), AUC of the forgotten clients against
    the held-out clients (one forgotten client: its percentile among them, ties half), and the
    forgotten clients' mean of their mean scores.
    """
    member = np.isin(client, np.asarray(forgotten))
    judged = member | np.isin(client, heldout)
    summary = attacks.attack_summary(scores[judged], member[judged])
    ids, means = client_scores(scores[judged], client[judged])
    is_forgotten = np.isin(ids, np.asarray(forgotten))
    return {
        "forgotten_lira_auc": summary["auc"],
        "forgotten_lira_tpr_at_1pct_fpr": summary["tpr_at_1pct_fpr"],
        "forgotten_client_auc": roc_auc(means, is_forgotten),
        "forgotten_client_llr": float(np.mean(means[is_forgotten])),
    }


@dataclass(frozen=True)
class ForgottenInference:
    """The client-level shadows' confidences on every client's ordinary rows, ready to attack
    any model (:meth:`measure`); ``shadows == 0`` when unavailable (every measure None)."""

    clients: tuple[int, ...]
    x: torch.Tensor
    y: torch.Tensor
    client: np.ndarray
    heldout: np.ndarray
    shadow_phi: torch.Tensor  # (K, n) logit-scaled confidences
    inside: torch.Tensor  # (K, n) bool: the row's client trained shadow k
    fixed_variance: bool
    shadows: int
    train_s: float
    batch_size: int
    not_simulated: tuple[str, ...] = ()  # what the target's training did that shadows do not

    def scores(self, model: nn.Module) -> np.ndarray:
        """LiRA online scores (n,) of ``model`` on the rows (``self.client`` says whose)."""
        phi = attacks.logit_confidence(predict(model, self.x, self.batch_size), self.y)
        return attacks.lira_scores(
            phi, self.shadow_phi, self.inside, online=True, fixed_variance=self.fixed_variance
        )

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """The :data:`MEASURES` of ``model`` (all None when unavailable)."""
        if self.shadows == 0:
            return dict.fromkeys(MEASURES)
        return forgotten_inference(self.scores(model), self.client, self.clients, self.heldout)

    def details(self) -> dict[str, Any]:
        return {
            "attack": "lira_online",
            "shadows": self.shadows,
            "heldout_clients": len(self.heldout),
            "fixed_variance": self.fixed_variance,
            "train_s": round(self.train_s, 2),
            "not_simulated": list(self.not_simulated),
        }


def forgotten_inference_for(
    run: Any, clients: tuple[int, ...], console: Console
) -> ForgottenInference:
    """Train the client-level shadows of ``run`` (an
    :class:`~fedmem.privacy.audit.records.AuditedRun`) once and score their rows; without
    held-out clients or client shadows, an unavailable one and a console note."""
    from fedmem.ensemble import SIMULATED_PLUGINS
    from fedmem.privacy.audit.engine import train_client_shadows
    from fedmem.runs.records import deviations

    cfg, table = run.cfg, run.table
    bs = cfg.train.eval_batch_size
    if cfg.audit.heldout_clients == 0 or cfg.audit.attack.client_shadows == 0:
        console.print(
            f"[yellow]no LiRA / client-level inference on the forgotten clients[/]: set {NEEDS}"
        )
        empty = torch.empty(0)
        return ForgottenInference(
            clients, empty, empty, np.empty(0), np.empty(0), empty, empty, False, 0, 0.0, bs
        )
    not_simulated = tuple(deviations(run.records["federated"], "fedavg", SIMULATED_PLUGINS))
    if not_simulated:  # e.g. DP-SGD: non-private shadows, their Gaussians miss private targets
        console.print(f"[yellow]client shadows for LiRA[/]: {'; '.join(not_simulated)}")
    t0 = time.perf_counter()
    sh, data, masks = train_client_shadows(run, "federated", console)
    ordinary = torch.cat(
        [
            (table.canary_id < 0) & ~table.is_audit_canary & ~table.is_backdoor,
            torch.ones(len(table.heldout_y), dtype=torch.bool),
        ]
    )
    x, y, client = data.x[ordinary], data.y[ordinary], data.client[ordinary]
    return ForgottenInference(
        clients=clients,
        x=x,
        y=y,
        client=client.numpy(),
        heldout=np.unique(table.heldout_client.numpy()),
        shadow_phi=attacks.logit_confidence(sh.logits(x, bs), y),
        inside=masks[:, client],
        fixed_variance=use_fixed_variance(cfg, len(sh)),
        shadows=len(sh),
        train_s=time.perf_counter() - t0,
        batch_size=bs,
        not_simulated=not_simulated,
    )
