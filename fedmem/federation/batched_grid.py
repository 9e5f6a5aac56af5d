"""An in-process Flower Grid that trains all clients of a round at once (``backend=batched``).

:class:`BatchedGrid` is a :class:`~fedmem.federation.local_grid.LocalGrid` (same nodes, same
persistent ``Context`` per node) whose ``train`` messages are answered by stacked training
(:func:`fedmem.federation.batched_train.train_clients`) instead of one ClientApp call per
client. Each client still gets its own reply Message with exactly what the ClientApp's
``train`` handler returns: its weights as an ArrayRecord and a MetricRecord with the same keys
(``num-examples``, ``partition-id``, ``train-loss``, ``examples``, ``steps``, ``noisy-share``,
``rounds-trained``, ``train-s``, ``unit-weight``), so the strategy aggregates with its own math
and the observer sees the same rows. ``train-s`` is the batched training's wall time shared
equally among the clients trained together.

Client state is kept exactly as the ClientApp keeps it (:mod:`fedmem.federation.client_state`:
``context.state`` and, when the server names a ``state-dir``, the client's state files), so a
resumed run continues the same way on either backend. Other messages (the partition-id
``query``) and clients that fail this round (``federation.client_failure_rate``: the ClientApp
raises before training) go through the real ClientApp, one by one, as in LocalGrid.

What the batched trainer supports is checked when the config is built
(:mod:`fedmem.federation.batched_support`); this module assumes a valid config.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from uuid import uuid4

import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable
from fedmem.federation import client_app
from fedmem.federation.arrays import held_record
from fedmem.federation.batched_train import train_clients
from fedmem.federation.client_state import current_state, save_state
from fedmem.federation.local_grid import LocalGrid
from fedmem.federation.records import metric_record, put_records
from fedmem.methods import build_plugins
from fedmem.methods.base import plugin_metrics
from fedmem.models.factory import experiment_model


class BatchedGrid(LocalGrid):
    """LocalGrid with every round's ``train`` messages answered by one batched training.

    ``workers``: Python threads training chunks of clients on CPU (default: torch's thread
    count when the round starts).
    """

    def __init__(self, app: ClientApp, num_nodes: int, workers: int | None = None):
        super().__init__(app, num_nodes, client_threads=None)
        self.workers = workers
        self._device_data: tuple[ExampleTable, torch.device, torch.Tensor, torch.Tensor] | None
        self._device_data = None
        # kept across rounds while the experiment is the same: its model template, and per
        # client its table rows and the share of them with a flipped label
        self._template: tuple[ExperimentConfig, torch.nn.Module] | None = None
        self._clients: tuple[ExampleTable, dict[int, tuple[torch.Tensor, float]]] | None = None

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        groups: dict[int, list[Message]] = {}  # train messages with the same content object
        for msg in messages:
            if msg.metadata.message_type == MessageType.TRAIN:
                groups.setdefault(id(msg.content), []).append(msg)
            else:
                self._replies[msg.metadata.message_id] = self._deliver(msg)
        for group in groups.values():
            for msg, reply in zip(group, self._train(group), strict=True):
                self._replies[msg.metadata.message_id] = reply
        return [msg.metadata.message_id for msg in messages]

    # -- training ----------------------------------------------------------------------------
    def _train(self, messages: list[Message]) -> list[Message]:
        """Replies to ``train`` messages that share one content (global model and config)."""
        conf = messages[0].content["config"]
        cfg, table = client_app.experiment(str(conf["experiment"]))
        round_ = int(conf["server-round"])
        replies: dict[int, Message] = {}
        training: list[tuple[int, Message]] = []
        for i, msg in enumerate(messages):
            pid = self._pid(msg)
            if client_app.fails(cfg, round_, pid):  # the ClientApp raises: its error reply
                replies[i] = self._deliver(msg)
            else:
                training.append((i, msg))
        if training:
            trained = self._train_clients(cfg, table, round_, [m for _, m in training])
            replies.update({i: r for (i, _), r in zip(training, trained, strict=True)})
        return [replies[i] for i in range(len(messages))]

    def _pid(self, msg: Message) -> int:
        return int(self.contexts[msg.metadata.dst_node_id].node_config["partition-id"])

    def _data(self, table: ExampleTable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The table's inputs and observed labels on ``device`` (kept across rounds)."""
        held = self._device_data
        if held is None or held[0] is not table or held[1] != device:
            self._device_data = (table, device, table.x.to(device), table.y_obs.to(device))
        return self._device_data[2], self._device_data[3]  # type: ignore[index]

    def _model_template(self, cfg: ExperimentConfig, table: ExampleTable) -> torch.nn.Module:
        """The experiment's model (its parameter names and shapes; built once per config)."""
        if self._template is None or self._template[0] is not cfg:
            self._template = (cfg, experiment_model(cfg, table.input_shape, table.num_classes))
        return self._template[1]

    def _client(self, table: ExampleTable, pid: int) -> tuple[torch.Tensor, float]:
        """Client ``pid``'s table rows and the share of them whose label was flipped."""
        if self._clients is None or self._clients[0] is not table:
            self._clients = (table, {})
        known = self._clients[1]
        if pid not in known:
            rows = table.client_rows(pid)
            noisy = float(table.is_noisy[rows].float().mean()) if len(rows) else 0.0
            known[pid] = (rows, noisy)
        return known[pid]

    def _train_clients(
        self, cfg: ExperimentConfig, table: ExampleTable, round_: int, messages: list[Message]
    ) -> list[Message]:
        t0 = time.perf_counter()
        conf = messages[0].content["config"]
        state_dir = str(conf["state-dir"]) if "state-dir" in conf else None
        device = client_app.client_device(cfg)
        template = self._model_template(cfg, table)
        model_state = template.state_dict()
        received = messages[0].content["arrays"].to_torch_state_dict()
        if set(received) != set(model_state):
            extra = sorted(set(received) - set(model_state))
            raise ValueError(
                f"federation.backend=batched: the global model carries {extra or 'fewer keys'} "
                "(a pruned model's masks?), which batched clients do not train; use "
                "federation.backend=local"
            )
        start = {n: received[n].to(device, model_state[n].dtype) for n in model_state}
        pids = [self._pid(m) for m in messages]
        clients = [self._client(table, pid) for pid in pids]
        rows = [r for r, _ in clients]
        states, plugins = [], []
        probe = build_plugins(cfg, "federated")  # FedProx's term at most (batched_support)
        other = sorted({p.name for p in probe} - {"proximal"})
        if other:  # a guard: batched_support refuses such configs
            raise ValueError(f"federation.backend=batched: cannot train plug-ins {other}")
        for msg, pid in zip(messages, pids, strict=True):
            state = current_state(
                self.contexts[msg.metadata.dst_node_id].state, state_dir, pid, round_
            )
            active = build_plugins(cfg, "federated") if probe else []  # one set per client
            for plugin in active:
                plugin.load_state_dict(state.plugins.get(plugin.name, {}))
            states.append(state)
            plugins.append(active)
        x, y = self._data(table, device)
        workers = self.workers if self.workers is not None else torch.get_num_threads()
        result = train_clients(
            template,
            start,
            x,
            y,
            rows,
            cfg.train,
            # "order-seed": another batch order with the same data (as the ClientApp reads it)
            seed=int(conf.get("order-seed", cfg.seed)),
            round_=round_,
            mu=cfg.train.proximal_mu,
            workers=workers,
        )
        share = (time.perf_counter() - t0) / len(messages)
        # each chunk's arrays once; a client's are numpy views into them (no torch op each)
        chunks = [{n: t.numpy() for n, t in chunk.items()} for chunk in result.chunks]
        replies = []
        for k, (msg, pid) in enumerate(zip(messages, pids, strict=True)):
            state = states[k]
            state.round = round_
            state.rounds_trained += 1
            state.plugins = {plugin.name: plugin.state_dict() for plugin in plugins[k]}
            state.to_context(self.contexts[msg.metadata.dst_node_id].state)
            if state_dir is not None:
                save_state(state_dir, pid, state, keep=int(conf.get("state-keep", 2)))
            n = len(rows[k])
            metrics = metric_record(
                {
                    "num-examples": n,
                    "partition-id": pid,
                    "train-loss": result.loss[k],
                    "examples": result.examples[k],
                    "steps": result.steps[k],
                    "noisy-share": clients[k][1],
                    "rounds-trained": state.rounds_trained,
                    "train-s": share,
                    "unit-weight": 1,  # uniform aggregation for user-level DP-FedAvg
                    **plugin_metrics(plugins[k]),
                }
            )
            c, i = result.where[k]
            weights = {name: chunks[c][name][i] for name in model_state}
            self._stamp(msg)
            replies.append(
                Message(
                    put_records(RecordDict(), {"arrays": held_record(weights), "metrics": metrics}),
                    reply_to=msg,
                )
            )
        return replies

    @staticmethod
    def _stamp(msg: Message) -> None:
        """What LocalGrid sets on a message before it is delivered (its id, its time)."""
        meta = msg.metadata.__dict__
        meta["_message_id"] = str(uuid4())
        meta["_created_at"] = time.time()
