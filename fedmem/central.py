"""The central run: the federated experiment's data pooled on one machine.

Central round ``r`` makes the same example visits as federated round ``r`` at full
participation (``train.local_epochs`` passes over every training row), so both runs' curves
share one x-axis. Both runs start from :func:`init_model`'s weights.
"""

from __future__ import annotations

import math
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


def experiment_model(
    cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """The experiment's architecture, as every trainer builds it (central, clients, server).

    With record-level DP, layers Opacus cannot handle are replaced the same way everywhere
    (:func:`fedmem.privacy.dp.dp_ready_model`, BatchNorm -> GroupNorm).
    """
    model = build_model(cfg.model, input_shape, num_classes)
    if cfg.privacy.record_level:
        from fedmem.privacy.dp import dp_ready_model

        model = dp_ready_model(model)
    return model


def init_model(cfg: ExperimentConfig, table: ExampleTable) -> nn.Module:
    """The initial model of both runs, seeded by ``(seed, "init")``; global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        return experiment_model(cfg, table.input_shape, table.num_classes)


INF = "inf"  # how an infinite epsilon (no DP, or zero noise) is written in JSON results


def json_epsilon(eps: float) -> float | str:
    return eps if math.isfinite(eps) else INF


def privacy_fields(history: object | None, delta: float | None, accountant: str) -> dict:
    """Row fields of a record-level DP trainer: its composed epsilon so far ("inf" without
    DP; never 0) and its DP steps."""
    if history is None:
        return {"epsilon": INF}
    if delta is None:  # nothing trained yet
        return {"epsilon": 0.0, "dp_steps": 0}
    eps = history.epsilon(delta, accountant)  # type: ignore[attr-defined]
    return {"epsilon": json_epsilon(eps), "dp_steps": history.steps}  # type: ignore[attr-defined]


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
    history = dp_delta = None
    if cfg.privacy.record_level:
        from fedmem.privacy.dp import AccountantHistory, DPSession

        history = AccountantHistory()
    observer.start()
    row = observer(
        0,
        model,
        round_loss=None,
        examples=0,
        **privacy_fields(history, None, cfg.privacy.accountant),
    )
    if on_round:
        on_round(0, row)
    examples = 0
    for r in range(1, cfg.train.rounds + 1):
        order = keyed_order(cfg.seed, r, rows, len(table))
        dp = None
        if history is not None:
            dp = DPSession.create(
                cfg.privacy,
                cfg.train,
                n_local=len(table),
                seed=cfg.seed,
                round_=r,
                stream="central",
                table_size=len(table),
            )
            dp_delta = dp.delta
        res = train_epochs(model, x, y, cfg.train, order, optimizer=optimizer, rows=rows, dp=dp)
        if dp is not None:
            history.record(dp)
        examples += res.examples
        privacy = privacy_fields(history, dp_delta, cfg.privacy.accountant)
        row = observer(r, model, round_loss=res.loss, examples=examples, **privacy)
        if on_round:
            on_round(r, row)
    return model
