"""Evaluating example- and client-tied dropout (Maini et al. 2023, Sec. 5, Table 3).

- :func:`mode_rows`: the same trained model with all units (memorization units scaled by
  ``p_mem``) and in drop mode (memorization units off). The paper's pattern: dropping the
  memorization units takes the mislabeled examples' fit on their given label from ~100% to a
  few percent while clean training accuracy and test accuracy hold.
- :func:`client_forgetting` (client-tied dropout, ours): switch off the memorization units of
  one client only and compare that client's training accuracy and membership-inference AUC
  (loss threshold: its training rows vs as many test rows,
  :func:`fedmem.unlearning.evaluate.loss_auc`)
  before and after, next to the other clients' (whose units overlap the dropped ones at rate
  ``p_mem``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fedmem.data.table import ExampleTable
from fedmem.models.tied_dropout import set_mode, tied_modules
from fedmem.observer import evaluate_logits, predict
from fedmem.unlearning.evaluate import loss_auc

KEYS = ("test_acc", "train_acc_clean", "noisy_memorized", "noisy_true_acc", "canary_acc")


def mode_rows(model: nn.Module, table: ExampleTable, batch_size: int = 4096) -> list[dict]:
    """``[{"mode": "all", ...}, {"mode": "drop", ...}]`` for a model with tied dropout (one
    ``"mode": "-"`` row for a model without: standard dropout and fixed-sparse baselines
    behave the same in both)."""
    modules = tied_modules(model)
    tied = any(m.kind in ("example", "client") for m in modules)
    out = []
    for mode in ("all", "drop") if tied else ("-",):
        if tied:
            set_mode(model, mode)  # type: ignore[arg-type]
        row, _ = evaluate_logits(model, table, batch_size)
        out.append({"mode": mode, **{k: row.get(k) for k in KEYS}})
    if tied:
        set_mode(model, "drop")
    return out


def client_forgetting(
    model: nn.Module, table: ExampleTable, client: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Client ``client``'s and the other clients' training accuracy and loss-threshold
    membership AUC with all units, then with ``client``'s memorization units off."""
    clients = table.client.numpy()
    groups = {"forgotten client": clients == client, "other clients": clients != client}
    out = []
    for state, keys in (("all units", None), ("client's units off", torch.tensor([client]))):
        set_mode(model, "all", drop_keys=keys)
        pred = predict(model, table.x, 4096).argmax(1)
        for group, member in groups.items():
            rows = np.flatnonzero(member)
            out.append(
                {
                    "state": state,
                    "group": group,
                    "train_acc": float((pred[rows] == table.y_obs[rows]).float().mean()),
                    "mia_auc": loss_auc(model, table, torch.from_numpy(rows), seed),
                }
            )
    set_mode(model, "drop")
    return out
