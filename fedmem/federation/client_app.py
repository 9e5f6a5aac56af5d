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

A client process (a Ray actor, or the driver with ``backend=local``) keeps one dense model and
reloads it for every client it runs (:func:`reusable` says when), instead of building one per
message.
"""

from __future__ import annotations

import json
import os
import time

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedmem import config as config_mod
from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable, cached_table
from fedmem.federation.arrays import record_of, replies_in_process, state_dict_of
from fedmem.federation.client_state import current_state, save_state
from fedmem.federation.records import metric_record, put_records
from fedmem.methods import RoundContext, build_plugins
from fedmem.methods.base import plugin_metrics
from fedmem.methods.pruning import MaskPlugin, load_pruned, masks_in_state
from fedmem.models.factory import experiment_model, resolve_device
from fedmem.seeding import np_rng
from fedmem.train import keyed_order, train_epochs

app = ClientApp()

THREADS_ENV = "FEDMEM_CLIENT_THREADS"
_cache: dict[str, tuple[ExperimentConfig, ExampleTable]] = {}
_models: dict[tuple[str, str], nn.Module] = {}  # (experiment JSON, device): a model to reuse


class InjectedClientFailure(RuntimeError):
    """Raised on purpose (``federation.client_failure_rate``) to simulate a client dropping out."""


def experiment(text: str) -> tuple[ExperimentConfig, ExampleTable]:
    """The config and table for a message's experiment JSON (cached per actor process)."""
    if text not in _cache:
        cfg = config_mod.build(json.loads(text))
        _cache.clear()
        _models.clear()
        _cache[text] = (cfg, cached_table(cfg))
    return _cache[text]


def fails(cfg: ExperimentConfig, round_: int, partition_id: int) -> bool:
    """Whether this client fails this round (seeded, so reruns fail the same clients)."""
    rate = cfg.federation.client_failure_rate
    return rate > 0 and np_rng(cfg.seed, "failure", round_, partition_id).random() < rate


def reusable(cfg: ExperimentConfig, plugins: list, masks: dict, dp: object) -> bool:
    """Whether a client's model may train the next client (loading its global weights) instead
    of a freshly built one: when everything the model carries between calls is in its state
    dict. Not with training plug-ins (they may wrap or mark the model), pruning masks (buffers
    attached per message), record-level DP (Opacus) or tied dropout (its modules count steps).
    Building a model draws its initial weights from torch's global RNG, which nothing in a
    client's training reads (every random stream is keyed), so reuse changes no result."""
    return not plugins and not masks and dp is None and cfg.model.dropout.kind == "none"


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

    received = state_dict_of(msg.content["arrays"])
    # a pruned global model carries its masks: train only the surviving weights
    masks = masks_in_state(received)
    # a dense model is kept per process and reloaded for the next client (see reusable();
    # popped, so two calls never share one)
    model_key = (str(conf["experiment"]), str(device))
    model = None if masks else _models.pop(model_key, None)
    if model is None:
        model = experiment_model(cfg, table.input_shape, table.num_classes)
        load_pruned(model, received)
        model.to(device)
    else:
        model.load_state_dict(received)

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

    metrics = metric_record(
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
    weights = model.state_dict()
    if reusable(cfg, plugins, masks, dp):
        # the reply keeps its own copy; the model goes back for the next client
        weights = {k: v.detach().clone() for k, v in weights.items()}
        model.zero_grad(set_to_none=True)
        _models[model_key] = model
    # in one process (LocalGrid) the reply's arrays hold the tensors' values (no np.save bytes)
    arrays = record_of(weights, held=replies_in_process())
    return Message(put_records(RecordDict(), {"arrays": arrays, "metrics": metrics}), reply_to=msg)
