"""The Flower ServerApp: map nodes to partitions, run the strategy, observe every round.

The ServerApp runs in a thread of the driver process (``run_simulation``), so it is built
around a :class:`FederatedJob` that holds the config, the ExampleTable and the observer. The
observer sees the global model after every round through the strategy's ``evaluate_fn``
(round 0 = the initial model, the same weights as the central run's).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from fedmem.analysis.gradients import layer_groups, split_clients, update_cosine
from fedmem.config import ExperimentConfig, to_dict
from fedmem.data.table import ExampleTable
from fedmem.methods.pruning import enforce_masks, load_pruned
from fedmem.models.factory import init_model
from fedmem.observer import Observer, stops_here
from fedmem.privacy.epsilon import INF, json_epsilon
from fedmem.runs.checkpoints import ModelCheckpoints, UpdateLog, cpu_state
from strategies import RoundReport, build_strategy, clients_per_round
from strategies.sampling import user_dp_sampling
from strategies.state import load_strategy_state, strategy_state

ROUND_TIMEOUT_S = 3600.0


@dataclass
class FederatedJob:
    """Everything the ServerApp thread needs, and where it leaves its results."""

    cfg: ExperimentConfig
    table: ExampleTable
    observer: Observer
    client_sink: Callable[[dict[str, Any]], None] = lambda row: None
    gradient_sink: Callable[[dict[str, Any]], None] | None = None  # client-update geometry
    on_round: Callable[[int, dict[str, Any]], None] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # restored ones first on resume
    final_state: dict[str, Any] | None = None  # global model weights after the last round
    error: BaseException | None = None
    checkpoints: ModelCheckpoints | None = None  # kept rounds + resume state (run directory)
    updates: UpdateLog | None = None  # every round's client updates (checkpoints.client_updates)
    state_dir: str | None = None  # where clients keep their own state files (resume)
    # start from these weights after round ``start[0]`` instead of the initialization (the
    # lottery's rewound tickets: pruning masks in the state are enforced after every round)
    start: tuple[int, dict[str, torch.Tensor]] | None = None
    order_seed: int | None = None  # clients' batch-order seed (default: the experiment seed)


def partition_map(grid: Grid, num_clients: int, timeout: float = 600.0) -> dict[int, int]:
    """Ask every node for its partition id once: ``{partition_id: node_id}``."""
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {num_clients} nodes connected")
        time.sleep(0.05)
    messages = [
        Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids
    ]
    out: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        pid = int(reply.content["info"]["partition-id"])
        out[pid] = reply.metadata.src_node_id
    if sorted(out) != list(range(num_clients)):
        raise RuntimeError(
            f"only partitions {sorted(out)} of 0..{num_clients - 1} answered within {timeout:.0f}"
            " s: the client actors did not start (see Ray's logs)"
        )
    return out


def update_geometry(
    report: RoundReport,
    global_model: torch.nn.Module,
    round_: int,
    sink: Callable[[dict[str, Any]], None],
) -> None:
    """Per layer, cosine between the mean update of the noisier and of the cleaner clients of
    the round (the federated analogue of Maini et al. 2023, Fig. 2).

    The groups are :func:`~fedmem.analysis.gradients.split_clients` of the noisy shares the
    clients report: holding mislabeled data vs clean where both exist, else above vs at or
    below the median share. Each row records the split, its threshold, and each group's size
    and mean noisy share. ``global_model`` still holds the weights the clients started from.
    """
    start = global_model.state_dict()
    shares = {r["client"]: r["noisy_share"] for r in report.clients if "noisy_share" in r}
    split = split_clients({pid: shares[pid] for pid in report.arrays if pid in shares})
    deltas = {}
    for pid in split.noisier + split.cleaner:
        state = report.arrays[pid].to_torch_state_dict()
        deltas[pid] = {k: state[k].float() - start[k].float() for k in start}
    cos = update_cosine(
        [deltas[p] for p in split.noisier],
        [deltas[p] for p in split.cleaner],
        layer_groups(global_model),
    )
    for layer, value in cos.items():
        sink(
            {
                "run": "federated",
                "round": round_,
                "kind": "client_updates",
                "layer": layer,
                "cos": value,
                **split.record(),
            }
        )


class PrivacyLedger:
    """The epsilons of a federated run, as the server knows them after each round.

    Record-level: every client reports the epsilon of its own accountant (composed over all
    its rounds, kept in its context.state); a client not sampled keeps its last value; the
    run's ``epsilon`` is the largest. User-level (DP-FedAvg): an Opacus RDP accountant over
    the released rounds, noise ``user_noise_multiplier``, at the sampling rate
    :func:`strategies.sampling.user_dp_sampling` allows for the fixed-size client sample
    (q = 1: no amplification).
    Without DP epsilon is "inf" (never 0).
    """

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.client_eps: dict[int, float] = {}
        self.delta: float | None = None  # the largest record-level delta a client reported
        self.user = None
        if cfg.privacy.user_level:
            from fedmem.privacy.dp import AccountantHistory

            self.user = AccountantHistory()
            n = cfg.federation.num_clients
            self.q, self.sampling = user_dp_sampling(clients_per_round(cfg), n)
            self.user_delta = cfg.privacy.user_delta or 1.0 / (10 * n)

    def observe(self, report: RoundReport) -> None:
        for row in report.clients:
            if isinstance(row.get("epsilon"), int | float):
                self.client_eps[row["client"]] = float(row["epsilon"])
            if isinstance(row.get("delta"), int | float):
                self.delta = max(self.delta or 0.0, float(row["delta"]))
        if self.user is not None and not report.lost:
            self.user.add(self.cfg.privacy.user_noise_multiplier, self.q, 1)

    def user_epsilon(self) -> float:
        if self.user is None:
            return float("inf")
        return self.user.epsilon(self.user_delta, self.cfg.privacy.accountant)

    def state_dict(self) -> dict[str, Any]:
        return {
            "client_eps": {str(k): v for k, v in self.client_eps.items()},
            "delta": self.delta,
            "user": self.user.to_record() if self.user is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from fedmem.privacy.dp import AccountantHistory

        self.client_eps = {int(k): float(v) for k, v in state["client_eps"].items()}
        self.delta = state.get("delta")
        if self.user is not None:
            self.user = AccountantHistory.from_record(state["user"])

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epsilon": INF}
        if self.cfg.privacy.record_level:
            out["epsilon"] = json_epsilon(max(self.client_eps.values(), default=0.0))
            if self.delta is not None:
                out["delta"] = self.delta
        if self.user is not None:
            out["user_epsilon"] = json_epsilon(self.user_epsilon())
            out["user_delta"] = self.user_delta
        return out


def run_rounds(
    strategy: Any,
    grid: Grid,
    arrays: ArrayRecord,
    first_round: int,
    num_rounds: int,
    train_config: ConfigRecord,
    evaluate_fn: Callable[[int, ArrayRecord], Any],
    timeout: float = ROUND_TIMEOUT_S,
    stop: Callable[[int], bool] | None = None,
    after_aggregate: Callable[[ArrayRecord], ArrayRecord] | None = None,
) -> ArrayRecord:
    """Rounds ``first_round..num_rounds`` of Flower's ``Strategy.start`` loop.

    The same calls in the same order as ``flwr.serverapp.strategy.Strategy.start`` (configure,
    send and receive, aggregate; client-side evaluation when the strategy asks for it; the
    server-side ``evaluate_fn``), which always starts at round 1 and so cannot resume a run.
    Round 0's evaluation (the initial model) happens when ``first_round == 1``. ``stop(r)``
    true after round ``r``'s evaluation ends the run there (a diverged model).
    ``after_aggregate`` maps each round's aggregate before anything else sees it (re-zeroing
    pruned weights).
    """
    if first_round == 1:
        evaluate_fn(0, arrays)
    for r in range(first_round, num_rounds + 1):
        replies = grid.send_and_receive(
            strategy.configure_train(r, arrays, train_config, grid), timeout=timeout
        )
        aggregated, _ = strategy.aggregate_train(r, replies)
        if aggregated is not None:
            arrays = aggregated if after_aggregate is None else after_aggregate(aggregated)
        evaluate = list(strategy.configure_evaluate(r, arrays, ConfigRecord(), grid))
        if evaluate:
            strategy.aggregate_evaluate(r, grid.send_and_receive(evaluate, timeout=timeout))
        evaluate_fn(r, arrays)
        if stop is not None and stop(r):
            break
    return arrays


def run_job(job: FederatedJob, grid: Grid) -> None:
    cfg, table = job.cfg, job.table
    strategy, core = build_strategy(cfg)
    core.set_nodes(partition_map(grid, cfg.federation.num_clients))
    privacy = PrivacyLedger(cfg)
    model = init_model(cfg, table)
    examples = 0
    first_round = 1
    masks: dict[str, torch.Tensor] = {}
    if job.start is not None:
        masks = load_pruned(model, job.start[1])
        first_round = job.start[0] + 1
    resume = job.checkpoints.load_resume() if job.checkpoints is not None else None
    if resume is not None:
        model.load_state_dict(resume["model"])
        load_strategy_state(strategy, resume["strategy"])
        privacy.load_state_dict(resume["privacy"])
        examples = int(resume["examples"])
        first_round = int(resume["round"]) + 1
    initial = ArrayRecord(model.state_dict() if resume is None else resume["arrays"])

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal examples
        report = core.fm_reports.get(server_round)
        if report is not None and job.gradient_sink is not None:
            update_geometry(report, model, server_round, job.gradient_sink)
        if report is not None and job.updates is not None:
            clients = {pid: a.to_torch_state_dict() for pid, a in report.arrays.items()}
            job.updates.save(server_round, model.state_dict(), clients)
        if report is not None:
            report.arrays.clear()  # client models are not kept past their round
        model.load_state_dict(arrays.to_torch_state_dict())
        extra: dict[str, Any] = {
            "clients_sampled": 0,
            "clients_ok": 0,
            "clients_failed": 0,
            "round_lost": False,
        }
        if report is not None:
            for row in report.clients:
                job.client_sink(row)
            for pid, reason in sorted(report.failed.items()):
                job.client_sink(
                    {"round": server_round, "client": pid, "failed": True, "reason": reason}
                )
            examples += sum(int(r.get("examples", 0)) for r in report.clients)
            extra = {
                "clients_sampled": len(report.sampled),
                "clients_ok": len(report.succeeded),
                "clients_failed": len(report.failed),
                "round_lost": report.lost,
            }
            privacy.observe(report)
        extra.update(privacy.fields())
        row = job.observer(server_round, model, examples=examples, **extra)
        job.rows.append(row)
        if job.checkpoints is not None:
            state = {
                "model": cpu_state(model),
                # the global arrays exactly as the strategy passes them on (FedOpt's are
                # float64, the model's float32): the next round must start from these
                "arrays": arrays.to_torch_state_dict(),
                "strategy": strategy_state(strategy),
                "privacy": privacy.state_dict(),
                "examples": examples,
            }
            job.checkpoints.save_round(server_round, state, kept_keys=("model",))
        if job.on_round:
            job.on_round(server_round, row)
        return MetricRecord(
            {
                k: float(v)
                for k, v in row.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )

    if resume is None:
        job.observer.start()
    elif job.on_round and job.rows:
        job.on_round(first_round - 1, job.rows[-1])
    train_config = {"experiment": json.dumps(to_dict(cfg))}
    if job.order_seed is not None:
        train_config["order-seed"] = job.order_seed
    if job.state_dir is not None:
        train_config["state-dir"] = job.state_dir
        # a client's newest state file from a round <= the server's resume round must survive
        train_config["state-keep"] = max(cfg.checkpoints.resume_every, 1) + 1
    run_rounds(
        strategy,
        grid,
        initial,
        first_round,
        cfg.train.rounds,
        ConfigRecord(train_config),
        evaluate_fn,
        stop=lambda r: stops_here(cfg, job.rows[-1]),
        after_aggregate=(
            (lambda a: ArrayRecord(enforce_masks(a.to_torch_state_dict(), masks)))
            if masks
            else None
        ),
    )
    # evaluate_fn loaded the last global weights into ``model``
    job.final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_server_app(job: FederatedJob) -> ServerApp:
    """A ServerApp bound to ``job`` (it runs in this process, so a closure is fine)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_job(job, grid)
        except BaseException as e:  # surfaced by the engine after the simulation ends
            job.error = e
            raise

    return app
