"""The central run: the federated experiment's data pooled on one machine.

What a central round is, is the config's choice (``central``, :func:`central_matching`):
with ``central.match=visits`` (default) central round ``r`` makes the same example visits as
federated round ``r`` at full participation (``train.local_epochs`` passes over every
training row), so both runs' curves share one x-axis in data seen; with ``steps`` it makes as
many sequential optimizer steps as a client's local training in a round (the mean over
clients), the depth one FedAvg round adds. ``central.optimizer=keep`` (default) carries the
optimizer state (momentum) across rounds as ordinary training does; ``reset`` starts each
round with a fresh optimizer, as every client does. A federation of one client holding all
the data then trains exactly like the central run under ``steps`` + ``reset`` (tested).
Both runs start from :func:`fedmem.models.init_model`'s weights.

With ``checkpoints`` (a :class:`~fedmem.runs.checkpoints.ModelCheckpoints`) the run keeps the
chosen rounds (weights and optimizer state) and, after every round, a resume state (weights,
optimizer, accountant history, plug-in state, counters); a run restarted after being killed
continues from it and ends exactly as an uninterrupted one (every random draw is keyed by
seed and round, so nothing else needs restoring).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable
from fedmem.methods import RoundContext, build_plugins
from fedmem.methods.base import plugin_metrics
from fedmem.models.factory import init_model, resolve_device
from fedmem.observer import Observer, stops_here
from fedmem.privacy.epsilon import privacy_fields
from fedmem.runs.checkpoints import ModelCheckpoints, cpu_state
from fedmem.train import keyed_order, make_optimizer, train_epochs


def central_matching(cfg: ExperimentConfig, table: ExampleTable) -> dict[str, Any]:
    """How the central run is matched to the federated one: summary.json's
    ``central_matching`` and the final table's title.

    ``steps_per_round``: the central run's optimizer steps per round; ``client_steps_mean``:
    the mean over clients of their local steps per round (``local_epochs * ceil(n_k / B)``).
    """
    b, e = cfg.train.batch_size, cfg.train.local_epochs
    sizes = [len(table.client_rows(k)) for k in range(table.num_clients)]
    client_steps = [e * math.ceil(n / b) for n in sizes if n > 0]
    mean_steps = sum(client_steps) / max(len(client_steps), 1)
    visit_steps = e * math.ceil(len(table) / b)
    steps = visit_steps if cfg.central.match == "visits" else max(1, round(mean_steps))
    return {
        "match": cfg.central.match,
        "optimizer": cfg.central.optimizer,
        "steps_per_round": steps,
        "visits_per_round": min(steps * b, e * len(table))
        if cfg.central.match == "steps"
        else e * len(table),
        "client_steps_mean": mean_steps,
    }


def matching_title(matching: dict[str, Any] | None) -> str:
    """ "central matched on visits, optimizer kept" (the final table's title)."""
    if not matching:
        return ""
    kept = "kept" if matching["optimizer"] == "keep" else "reset every round"
    return (
        f"central matched on {matching['match']} ({matching['steps_per_round']} steps/round), "
        f"optimizer {kept}"
    )


def run_central(
    cfg: ExperimentConfig,
    table: ExampleTable,
    observer: Observer,
    on_round: Callable[[int, dict], None] | None = None,
    checkpoints: ModelCheckpoints | None = None,
) -> nn.Module:
    """Train on all rows of ``table`` for ``cfg.train.rounds`` rounds; observe every round.

    Each round trains as ``cfg.central`` says (:func:`central_matching`). Returns the final
    model.
    """
    device = resolve_device(cfg.train.device)
    model = init_model(cfg, table).to(device)
    optimizer = make_optimizer(model, cfg.train)
    reset = cfg.central.optimizer == "reset"
    max_steps = (
        central_matching(cfg, table)["steps_per_round"] if cfg.central.match == "steps" else None
    )
    plugins = build_plugins(cfg, "central")
    rows, x, y = table.ids, table.x, table.y_obs
    if cfg.federation.excluded_clients:  # left out of every run (unlearning's reference)
        rows = rows[~torch.isin(table.client, torch.tensor(cfg.federation.excluded_clients))]
        x, y = x[rows], y[rows]
    x, y = x.to(device), y.to(device)
    history: Any = None
    dp_delta = None
    if cfg.privacy.record_level:
        from fedmem.privacy.dp import AccountantHistory, DPSession

        history = AccountantHistory()
    examples = 0

    def save(r: int) -> None:
        if checkpoints is None:
            return
        state = {
            "model": cpu_state(model),
            "optimizer": optimizer.state_dict(),
            "examples": examples,
            "dp": history.to_record() if history is not None else None,
            "dp_delta": dp_delta,
            "plugins": {p.name: p.state_dict() for p in plugins},
        }
        checkpoints.save_round(r, state, kept_keys=("model", "optimizer", "plugins"))

    resume = checkpoints.load_resume() if checkpoints is not None else None
    if resume is None:
        start = 0
        observer.start()
        row = observer(
            0,
            model,
            round_loss=None,
            examples=0,
            **privacy_fields(history, None, cfg.privacy.accountant),
        )
        save(0)
    else:
        start = int(resume["round"])
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        examples = int(resume["examples"])
        if history is not None:
            history = AccountantHistory.from_record(resume["dp"])
            dp_delta = resume["dp_delta"]
        for p in plugins:
            p.load_state_dict(resume["plugins"].get(p.name, {}))
        observer.last_state = cpu_state(model)
        row = observer.rows[-1] if observer.rows else None  # restored by the orchestrator
    if on_round and row is not None:
        on_round(start, row)
    if row is not None and stops_here(cfg, row):
        return model  # resumed after the round where it diverged and stopped
    for r in range(start + 1, cfg.train.rounds + 1):
        order = keyed_order(cfg.seed, r, rows, len(table))
        dp = None
        if history is not None:
            dp = DPSession.create(
                cfg.privacy,
                cfg.train,
                n_local=len(rows),
                seed=cfg.seed,
                round_=r,
                stream="central",
                table_size=len(table),
            )
            dp_delta = dp.delta
        ctx = RoundContext("central", r, None, rows, len(table), cfg.seed)
        res = train_epochs(
            model,
            x,
            y,
            cfg.train,
            order,
            optimizer=make_optimizer(model, cfg.train) if reset else optimizer,
            rows=rows,
            plugins=plugins,
            context=ctx,
            dp=dp,
            max_steps=max_steps,
        )
        if dp is not None:
            history.record(dp)
        examples += res.examples
        privacy = privacy_fields(history, dp_delta, cfg.privacy.accountant)
        row = observer(
            r, model, round_loss=res.loss, examples=examples, **privacy, **plugin_metrics(plugins)
        )
        save(r)
        if on_round:
            on_round(r, row)
        if stops_here(cfg, row):
            break
    return model
