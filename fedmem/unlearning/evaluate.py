"""Side-by-side measures of unlearned models (pure functions of a model and the table).

Forgetting is good when a measure matches the retrained model's, not when it falls below it:
a model that forgot "too much" is as distinguishable from retraining as one that forgot
nothing (Halimi et al. 2022; Liu et al., "Learn to Forget").

- ``forgotten_acc`` / ``remaining_acc``: training accuracy (given labels) on the forgotten
  clients' rows / on every other client's rows; ``test_acc``;
- ``forgotten_mia_auc``: loss-threshold membership inference (Yeom et al. 2018), the
  forgotten clients' rows against as many test rows, as a ROC AUC (0.5: no signal);
- ``forgotten_lira_auc``, ``forgotten_lira_tpr_at_1pct_fpr``, ``forgotten_client_auc``,
  ``forgotten_client_llr``: LiRA (Carlini et al. 2022) and client-level inference on the
  forgotten clients against the held-out clients, with the audit's client-level shadows
  (:mod:`fedmem.unlearning.inference`; None without ``audit.heldout_clients``);
- ``forgotten_exposure``: mean exposure (Carlini et al. 2019) of the canaries only the
  forgotten clients held (None without such canaries);
- ``forgetting_rate``: of the forgotten clients' rows that Yeom et al.'s threshold oracle
  judged members of the original model, the share it judges non-members of this one ("Learn
  to Forget", Liu et al. 2020);
- ``backdoor_asr``: the attack success rate of the run's backdoor (``data.backdoor``; the
  triggered test examples predicted as its target), when it has one;
- ``l2_to_retrain`` (weights) and ``kl_to_retrain`` (mean KL(retrain || model) of the
  predicted class distributions on the test set).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmem.data.table import ExampleTable
from fedmem.observer import backdoor_success, predict
from fedmem.privacy.audit.exposure import exposure
from fedmem.seeding import np_rng
from fedmem.stats import roc_auc

BATCH = 4096
COLUMNS = (  # what the CLI and the recipe show per model: the measures, then the cost
    "test_acc",
    "remaining_acc",
    "forgotten_acc",
    "forgotten_mia_auc",
    "forgetting_rate",
    "forgotten_lira_auc",  # LiRA and client-level inference: fedmem.unlearning.inference
    "forgotten_lira_tpr_at_1pct_fpr",
    "forgotten_client_auc",
    "forgotten_client_llr",
    "forgotten_exposure",
    "backdoor_asr",
    "l2_to_retrain",
    "kl_to_retrain",
    "wall_s",
    "rounds",
    "speed_up",
)


def loss_auc(model: nn.Module, table: ExampleTable, rows: torch.Tensor, seed: int) -> float:
    """Yeom et al. loss-threshold attack: ``rows`` (members) vs as many random test rows."""
    n = min(len(rows), len(table.y_test))
    test = torch.from_numpy(np_rng(seed, "unlearn", "mia").choice(len(table.y_test), n, False))
    member = F.cross_entropy(
        predict(model, table.x[rows], BATCH), table.y_obs[rows], reduction="none"
    )
    other = F.cross_entropy(
        predict(model, table.x_test[test], BATCH), table.y_test[test], reduction="none"
    )
    labels = np.r_[np.ones(len(member)), np.zeros(len(other))]
    return roc_auc(-torch.cat([member, other]).numpy(), labels)


def only_held_by(table: ExampleTable, clients: tuple[int, ...]) -> np.ndarray:
    """Canary ids whose every copy sits at the given clients."""
    out = []
    for c in torch.unique(table.canary_id[table.canary_id >= 0]).tolist():
        holders = set(torch.unique(table.client[table.canary_id == c]).tolist())
        if holders <= set(clients):
            out.append(c)
    return np.array(out, dtype=np.int64)


def forgotten_exposure(
    model: nn.Module, table: ExampleTable, clients: tuple[int, ...]
) -> float | None:
    ids = only_held_by(table, clients)
    if len(ids) == 0 or len(table.canary_ref_x) == 0:
        return None
    rows = [int(torch.nonzero(table.canary_id == c)[0]) for c in ids]
    losses = F.cross_entropy(
        predict(model, table.x[rows], BATCH), table.y_obs[rows], reduction="none"
    )
    ref = F.cross_entropy(
        predict(model, table.canary_ref_x, BATCH), table.canary_ref_y, reduction="none"
    )
    return float(np.mean(exposure(losses.numpy(), ref.numpy())))


def yeom_members(model: nn.Module, table: ExampleTable, clients: tuple[int, ...]) -> torch.Tensor:
    """The membership oracle of the forgetting rate: Yeom et al. 2018's threshold attack with
    the model's expected training loss as threshold (their Sec. 3.2), here its mean loss on the
    remaining clients' rows (training data of every compared model). (n_forgotten,) bool:
    each of the forgotten clients' rows judged a member (loss <= threshold)."""
    forgotten = torch.isin(table.client, torch.tensor(clients))
    losses = F.cross_entropy(predict(model, table.x, BATCH), table.y_obs, reduction="none")
    return losses[forgotten] <= losses[~forgotten].mean()


def forgetting_rate(before: torch.Tensor, after: torch.Tensor) -> float | None:
    """The forgetting rate of "Learn to Forget" (Liu et al. 2020): the share of the examples a
    membership oracle judged members before unlearning (``before``, bool) that it judges
    non-members after (``after``); None when none was judged a member before."""
    if not bool(before.any()):
        return None
    return float((before & ~after).sum() / before.sum())


def measures(
    model: nn.Module,
    table: ExampleTable,
    clients: tuple[int, ...],
    retrained: nn.Module | None,
    seed: int = 0,
    original: nn.Module | None = None,
) -> dict[str, Any]:
    forgotten = torch.isin(table.client, torch.tensor(clients))
    pred = predict(model, table.x, BATCH).argmax(1)
    test_logits = predict(model, table.x_test, BATCH)
    out: dict[str, Any] = {
        "test_acc": float((test_logits.argmax(1) == table.y_test).float().mean()),
        "forgotten_acc": float((pred[forgotten] == table.y_obs[forgotten]).float().mean()),
        "remaining_acc": float((pred[~forgotten] == table.y_obs[~forgotten]).float().mean()),
        "forgotten_mia_auc": loss_auc(model, table, torch.nonzero(forgotten).flatten(), seed),
        "forgotten_exposure": forgotten_exposure(model, table, clients),
        "backdoor_asr": backdoor_success(model, table) if len(table.backdoor_y_test) else None,
    }
    if original is not None:
        before = yeom_members(original, table, clients)
        out["forgetting_rate"] = forgetting_rate(before, yeom_members(model, table, clients))
    if retrained is not None:
        a = torch.cat(
            [p.detach().reshape(-1) for p in model.state_dict().values() if p.is_floating_point()]
        )
        b = torch.cat(
            [
                p.detach().reshape(-1)
                for p in retrained.state_dict().values()
                if p.is_floating_point()
            ]
        )
        ref = F.log_softmax(predict(retrained, table.x_test, BATCH), 1)
        out["l2_to_retrain"] = float((a - b).norm())
        out["kl_to_retrain"] = float(
            F.kl_div(F.log_softmax(test_logits, 1), ref, log_target=True, reduction="batchmean")
        )
    return out
