"""Layer rewinding and layer retraining: is memorization held by one layer?

Maini, Mozer, Sedghi, Lipton, Kolter, Zhang 2023, "Can Neural Network Memorization Be
Localized?" (ICML), Sec. 3.2 and 3.3, following their
``experiments/rewinding.py`` and ``experiments/retraining.py`` (read, not copied):

- Layer rewinding (:func:`rewind_layer`, :func:`rewinding`): replace the parameters of one
  layer group of the final model by their values at an earlier checkpoint (round 0 = the
  initialization, or an early round) and measure training accuracy on clean vs mislabeled
  examples. If one layer held the memorization, rewinding it would drop the mislabeled
  examples' accuracy (on their given labels) while keeping the clean accuracy. The paper finds
  most layers are redundant for memorization, and the critical ones are not the last.
  Only parameters are rewound; buffers (BatchNorm statistics) stay final (as the authors do).
- Layer retraining (:func:`retrain_layer`): reset one group to its initialization, freeze the
  others, train on the clean examples only, and track the mislabeled examples' accuracy on
  their given labels per epoch. If it comes back without ever training on them, the
  memorization is held by the frozen rest of the network. We reset to the run's own round-0
  checkpoint (the authors' initial model; for the federated run the initial global model) and
  train with the run's optimizer settings (``make_optimizer``, ``train_epochs``, batch size,
  lr, momentum, weight decay: ours; the authors fine-tune with their own schedule) for a
  fixed number of epochs, in a keyed batch order of our own stream ``(seed,
  "localization-retrain")`` (:func:`fedmem.train.keyed_order`). Frozen parameters are outside
  the optimizer and stay bit-identical; BatchNorm statistics of frozen layers would still
  update in train mode (none in the MLP).

Groups are :func:`fedmem.analysis.gradients.layer_groups` (parameters by owning module).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable
from fedmem.models.factory import experiment_model
from fedmem.observer import evaluate_logits
from fedmem.seeding import derive_seed
from fedmem.train import keyed_order, make_optimizer, train_epochs

State = Mapping[str, torch.Tensor]
METRICS = (
    "test_acc",
    "train_acc_clean",
    "noisy_memorized",
    "noisy_true_acc",
    "outlier_acc",
    "canary_acc",
)


def rewind_layer(final_state: State, earlier_state: State, group: Sequence[str]) -> dict:
    """A copy of ``final_state`` whose tensors named in ``group`` come from ``earlier_state``."""
    missing = [k for k in group if k not in final_state or k not in earlier_state]
    if missing:
        raise KeyError(f"rewind_layer: {missing} not in both states")
    out = {k: v.clone() for k, v in final_state.items()}
    for k in group:
        out[k] = earlier_state[k].detach().clone().to(out[k].dtype)
    return out


def _metrics(model: nn.Module, table: ExampleTable, batch_size: int) -> dict[str, Any]:
    row, _ = evaluate_logits(model, table, batch_size)
    return {k: row.get(k) for k in METRICS}


def rewinding(
    model: nn.Module,
    table: ExampleTable,
    final_state: State,
    earlier: Mapping[int, State],
    groups: Mapping[str, Sequence[str]],
    batch_size: int = 4096,
) -> list[dict[str, Any]]:
    """Per earlier round and group, the final model with that group rewound, evaluated on the
    table (:data:`METRICS`); first a row for the final model itself (``group`` ``"none"``).
    ``model`` is a template of the architecture (it is not changed)."""
    probe = copy.deepcopy(model)
    probe.load_state_dict(dict(final_state))
    rows = [{"rewind_round": None, "group": "none", **_metrics(probe, table, batch_size)}]
    for k, state in earlier.items():
        for name, params in groups.items():
            probe.load_state_dict(rewind_layer(final_state, state, params))
            rows.append({"rewind_round": k, "group": name, **_metrics(probe, table, batch_size)})
    return rows


def retrain_layer(
    cfg: ExperimentConfig,
    table: ExampleTable,
    final_state: State,
    init_state: State,
    group: Sequence[str],
    epochs: int,
) -> tuple[list[dict[str, Any]], nn.Module]:
    """Reset ``group`` to ``init_state``, freeze the rest, train ``epochs`` epochs on the clean
    examples (``table.is_clean``; given labels = true labels). Returns one row per epoch
    (epoch 0: right after the reset) with :data:`METRICS` on the whole table, and the model."""
    model = experiment_model(cfg, table.input_shape, table.num_classes)
    model.load_state_dict(rewind_layer(final_state, init_state, group))
    trainable = set(group)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    optimizer = make_optimizer(model, cfg.train)
    rows = table.ids[table.is_clean]
    x, y = table.x[rows], table.y_obs[rows]
    seed = derive_seed(cfg.seed, "localization-retrain") % 2**31
    bs = cfg.train.eval_batch_size
    out = [{"epoch": 0, **_metrics(model, table, bs)}]
    for epoch in range(1, epochs + 1):
        order = keyed_order(seed, epoch, rows, len(table))
        train_epochs(model, x, y, cfg.train, order, optimizer=optimizer, rows=rows, epochs=1)
        out.append({"epoch": epoch, **_metrics(model, table, bs)})
    for p in model.parameters():
        p.requires_grad_(True)
    return out, model
