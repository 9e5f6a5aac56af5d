"""The central run: the federated experiment's data pooled on one machine.

Central round ``r`` makes the same example visits as federated round ``r`` at full
participation (``train.local_epochs`` passes over every training row), so both runs' curves
share one x-axis. Both runs start from :func:`init_model`'s weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable
from fedmem.models import build_model
from fedmem.observer import Observer
from fedmem.seeding import derive_seed
from fedmem.train import keyed_order, make_optimizer, train_epochs


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_model(cfg: ExperimentConfig, table: ExampleTable) -> nn.Module:
    """The initial model of both runs, seeded by ``(seed, "init")``; global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        return build_model(cfg.model, table.input_shape, table.num_classes)


def run_central(
    cfg: ExperimentConfig,
    table: ExampleTable,
    observer: Observer,
    on_round: Callable[[int, dict], None] | None = None,
) -> nn.Module:
    """Train on all rows of ``table`` for ``cfg.train.rounds`` rounds; observe every round.

    The optimizer (and its momentum) persists across rounds, as in ordinary central training.
    Returns the final model.
    """
    device = resolve_device(cfg.train.device)
    model = init_model(cfg, table).to(device)
    optimizer = make_optimizer(model, cfg.train)
    x, y = table.x.to(device), table.y_obs.to(device)
    rows = table.ids
    observer.start()
    row = observer(0, model, round_loss=None, examples=0)
    if on_round:
        on_round(0, row)
    examples = 0
    for r in range(1, cfg.train.rounds + 1):
        order = keyed_order(cfg.seed, r, rows, len(table))
        res = train_epochs(model, x, y, cfg.train, order, optimizer=optimizer, rows=rows)
        examples += res.examples
        row = observer(r, model, round_loss=res.loss, examples=examples)
        if on_round:
            on_round(r, row)
    return model
