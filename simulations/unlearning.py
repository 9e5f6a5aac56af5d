"""Forget one client with every unlearning method and compare each with retraining without it
(:mod:`fedmem.unlearning`; issue 15).

The base experiment is trained once with the clients' updates stored
(``checkpoints.client_updates``) and every client training its unlearning generator
(``plugins.forget_generator``); the forgotten client is the base config's first backdoor
client (``data.backdoor.clients``), else the client holding the most canaries alone, else 0.
Then :func:`fedmem.unlearning.run.unlearn` runs ``retrain`` and every method of
:data:`METHODS` with default settings, adds their models to the run, and one row per model
gives the side-by-side measures (:mod:`fedmem.unlearning.evaluate`) with time and speed-up.

    python -m fedmem.simulate --recipe unlearning --config configs/unlearn.yaml
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedmem.config import ExperimentConfig, build, to_dict
from fedmem.unlearning.evaluate import COLUMNS

TITLE = "unlearning one client: every method against retraining without it"
METHODS = ("ascent", "federaser", "generator")


def base_config(base: ExperimentConfig) -> ExperimentConfig:
    raw = to_dict(base)
    raw["federation"]["enabled"] = True
    raw["checkpoints"]["client_updates"] = True
    raw["plugins"]["forget_generator"]["enabled"] = True  # the clients train their generators
    raw["analysis"]["gradients"]["enabled"] = False
    return build(raw)


def forgotten_client(cfg: ExperimentConfig, table: Any) -> int:
    """The backdoor client, else the client holding the most canaries alone, else 0."""
    import torch

    if cfg.data.backdoor.clients:
        return cfg.data.backdoor.clients[0]
    alone = []
    for c in torch.unique(table.canary_id[table.canary_id >= 0]).tolist():
        holders = torch.unique(table.client[table.canary_id == c]).tolist()
        if len(holders) == 1:
            alone.append(holders[0])
    return max(set(alone), key=alone.count) if alone else 0


def run(base: ExperimentConfig, console: Console, force: bool = False) -> list[dict[str, Any]]:
    from fedmem.data.table import cached_table
    from fedmem.runs.experiment import run_or_load
    from fedmem.unlearning.run import unlearn

    cfg = base_config(base)
    rd, _ = run_or_load(cfg, console, force)
    client = forgotten_client(cfg, cached_table(cfg))
    console.rule(f"forgetting client {client}")
    result = unlearn(rd.path, (client,), list(METHODS), {}, console)
    return [
        {"model": name, "client": client, **{c: r.get(c) for c in COLUMNS}}
        for name, r in result["models"].items()
    ]
