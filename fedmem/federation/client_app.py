"""The Flower ClientApp: one federated client, training with the shared loop of ``train.py``.

Each message carries the resolved experiment config (JSON in the ConfigRecord under
``"experiment"``); the client rebuilds the ExampleTable from it (cached on disk by its hash and
in the actor's memory), takes its own rows by partition id, and trains them exactly as the
central run would (same loop, same batch-order keys). State that must survive rounds (rounds
trained, the DP accountant history, training plug-ins' state) is a
:class:`~fedmem.federation.client_state.ClientState` in ``context.state``, and, when the
server names a ``state-dir``, in the client's own state files too (so a resumed run continues
exactly).

Message handlers:
- ``query``: reply with the partition id (the server maps random node ids to partitions).
- ``train``: local training from the received global model; reply with weights and metrics.
  A pruned global model carries its masks as buffers (:mod:`fedmem.methods.pruning`): the
  client trains only the surviving weights (re-zeroed after every step).
"""

from __future__ import annotations

import json
import os
import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmem import config as config_mod
from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable, cached_table
from fedmem.federation.client_state import current_state, save_state
from fedmem.methods import RoundContext, build_plugins
from fedmem.methods.base import plugin_metrics
from fedmem.methods.pruning import MaskPlugin, load_pruned
from fedmem.models.factory import experiment_model, resolve_device
from fedmem.seeding import np_rng
from fedmem.train import keyed_order, train_epochs

app = ClientApp()

THREADS_ENV = "FEDMEM_CLIENT_THREADS"
_cache: dict[str, tuple[ExperimentConfig, ExampleTable]] = {}


class InjectedClientFailure(RuntimeError):
    """Raised on purpose (``federation.client_failure_rate``) to simulate a client dropping out."""


def experiment(text: str) -> tuple[ExperimentConfig, ExampleTable]:
    """The config and table for a message's experiment JSON (cached per actor process)."""
    if text not in _cache:
        cfg = config_mod.build(json.loads(text))
        _cache.clear()
        _cache[text] = (cfg, cached_table(cfg))
    return _cache[text]


def fails(cfg: ExperimentConfig, round_: int, partition_id: int) -> bool:
    """Whether this client fails this round (seeded, so reruns fail the same clients)."""
    rate = cfg.federation.client_failure_rate
    return rate > 0 and np_rng(cfg.seed, "failure", round_, partition_id).random() < rate


def client_device(cfg: ExperimentConfig) -> torch.device:
    """cuda when the client was given a GPU share by Ray (or train.device asks), else cpu."""
    if cfg.federation.client_resources.num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return resolve_device(cfg.train.device)


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"info": MetricRecord({"partition-id": pid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    conf = msg.content["config"]
    cfg, table = experiment(str(conf["experiment"]))
    round_ = int(conf["server-round"])
    pid = int(context.node_config["partition-id"])
    if fails(cfg, round_, pid):
        raise InjectedClientFailure(f"client {pid} failed in round {round_} (injected)")
    threads = os.environ.get(THREADS_ENV)  # set for Ray actors only (engine.py)
    if threads:
        torch.set_num_threads(int(threads))
    device = client_device(cfg)

    model = experiment_model(cfg, table.input_shape, table.num_classes)
    # a pruned global model carries its masks: train only the surviving weights
    masks = load_pruned(model, msg.content["arrays"].to_torch_state_dict())
    model.to(device)

    state_dir = str(conf["state-dir"]) if "state-dir" in conf else None
    state = current_state(context.state, state_dir, pid, round_)
    plugins = build_plugins(cfg, "federated")
    for plugin in plugins:
        plugin.load_state_dict(state.plugins.get(plugin.name, {}))
    if masks:
        plugins.append(MaskPlugin(masks))  # last: re-zeroes after every other plug-in

    rows = table.client_rows(pid)
    x, y = table.x[rows].to(device), table.y_obs[rows].to(device)
    # "order-seed": another batch order with the same data (the lottery's instability test)
    order = keyed_order(int(conf.get("order-seed", cfg.seed)), round_, rows, len(table))
    dp = history = None
    if cfg.privacy.record_level:
        from fedmem.privacy.dp import AccountantHistory, DPSession

        # the accountant persists across rounds in the client's state: epsilon composes
        history = AccountantHistory.from_record(state.dp)
        dp = DPSession.create(
            cfg.privacy,
            cfg.train,
            n_local=len(rows),
            seed=cfg.seed,
            round_=round_,
            stream=pid,
            table_size=len(table),
            n_dataset=len(table),
        )
    ctx = RoundContext("federated", round_, pid, rows, len(table), cfg.seed)
    result = train_epochs(
        model, x, y, cfg.train, order, rows=rows, plugins=plugins, context=ctx, dp=dp
    )
    privacy: dict[str, float] = {}
    if dp is not None and history is not None:
        history.record(dp)
        state.dp = history.to_record()
        privacy = {
            "epsilon": float(history.epsilon(dp.delta, cfg.privacy.accountant)),
            "delta": float(dp.delta),
            "noise-multiplier": dp.noise_multiplier,
            "sample-rate": dp.sample_rate,
            "dp-steps": dp.steps,
            "dp-steps-total": history.steps,
        }

    state.round = round_
    state.rounds_trained += 1
    state.plugins = {p.name: p.state_dict() for p in plugins if not isinstance(p, MaskPlugin)}
    state.to_context(context.state)
    if state_dir is not None:
        save_state(state_dir, pid, state, keep=int(conf.get("state-keep", 2)))
    rounds_trained = state.rounds_trained

    metrics = MetricRecord(
        {
            "num-examples": len(rows),
            "partition-id": pid,
            "train-loss": result.loss,
            "examples": result.examples,
            "steps": result.steps,
            "noisy-share": float(table.is_noisy[rows].float().mean()) if len(rows) else 0.0,
            "rounds-trained": rounds_trained,
            "train-s": time.perf_counter() - t0,
            "unit-weight": 1,  # uniform aggregation for user-level DP-FedAvg
            **privacy,
            **plugin_metrics(plugins),
        }
    )
    model.cpu()
    return Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
        reply_to=msg,
    )
