"""What fedmem adds to every Flower strategy: reproducible sampling and per-client records.

Flower's strategies sample clients by node id with Python's global RNG, and node ids are
random per run, so a run cannot be repeated. :class:`PartitionSampled` is a mixin placed in
front of a ``flwr.serverapp.strategy`` class that

- samples by *partition id* with an RNG derived from the experiment seed
  (:func:`sample_partitions`), handing the parent's ``configure_train`` a view of the grid
  that shows only the chosen nodes, so the parent's own logic (FedProx's mu, FedOpt's state)
  still runs;
- sorts replies by partition id before the parent aggregates them (summation order fixes the
  floating-point result);
- keeps every client's metrics (Flower would average them away) and counts failures; a round
  with fewer than ``min_train_clients`` successful clients is lost: the model stays as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedmem.seeding import np_rng


def sample_partitions(
    seed: int, round_: int, num_clients: int, fraction: float, min_clients: int
) -> list[int]:
    """Partition ids trained in ``round_``: ``max(floor(fraction * n), min_clients)`` of them."""
    k = min(num_clients, max(math.floor(fraction * num_clients + 1e-9), min_clients, 1))
    if k == num_clients:
        return list(range(num_clients))
    chosen = np_rng(seed, "sample", round_).choice(num_clients, size=k, replace=False)
    return sorted(int(c) for c in chosen)


def user_dp_sampling(per_round: int, num_clients: int) -> tuple[float, str]:
    """The client sampling rate a user-level DP accountant may use for
    :func:`sample_partitions`, and a sentence saying why.

    Amplification by subsampling holds for the sampling actually used. Poisson sampling at
    rate q may be accounted at q; :func:`sample_partitions` draws a fixed-size set without
    replacement, which may not be accounted as Poisson (the RDP bounds differ, and Flower's own
    accountant for DP-FedAvg with fixed-size sampling refuses amplification). So every round is
    accounted at q = 1: an upper bound on epsilon, never an understatement.
    """
    if per_round >= num_clients:
        return 1.0, f"all {num_clients} clients every round (q = 1)"
    return 1.0, (
        f"fixed-size sample of {per_round} of {num_clients} clients without replacement, "
        f"accounted without amplification (q = 1; Poisson accounting at q = "
        f"{per_round / num_clients:.3g} would not hold for this sampling)"
    )


@dataclass
class RoundReport:
    """What happened in one training round, as the server saw it."""

    round: int
    sampled: list[int]
    succeeded: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # partition id -> reason
    clients: list[dict[str, Any]] = field(default_factory=list)  # per-client metrics rows
    lost: bool = False
    arrays: dict[int, ArrayRecord] = field(default_factory=dict)  # client models, until observed


def _finite(v: Any) -> Any:
    """Non-finite floats as the string "inf"/"nan" (results are strict JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else str(v)
    return v


class _NodeSubset:
    """A read-only view of a Grid that lists only the chosen nodes (for the parent's sampler)."""

    def __init__(self, grid: Grid, node_ids: list[int]):
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class PartitionSampled:
    """Mixin: deterministic sampling by partition id, per-client records, lost rounds."""

    def setup_fedmem(
        self,
        *,
        seed: int,
        num_clients: int,
        fraction_train: float,
        min_train_clients: int,
        excluded: tuple[int, ...] = (),
    ) -> None:
        self.fm_seed = seed
        self.fm_excluded = frozenset(excluded)  # never trained (unlearning's retrain reference)
        self.fm_num_clients = num_clients
        self.fm_fraction = fraction_train
        self.fm_min_train = min_train_clients
        self.fm_node_of: dict[int, int] = {}
        self.fm_partition_of: dict[int, int] = {}
        self.fm_reports: dict[int, RoundReport] = {}

    def set_nodes(self, partition_to_node: dict[int, int]) -> None:
        self.fm_node_of = dict(partition_to_node)
        self.fm_partition_of = {n: p for p, n in partition_to_node.items()}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        chosen = sample_partitions(
            self.fm_seed, server_round, self.fm_num_clients, self.fm_fraction, self.fm_min_train
        )
        # the run's own sample minus the excluded clients: the others train exactly as before
        chosen = [p for p in chosen if p not in self.fm_excluded]
        self.fm_reports[server_round] = RoundReport(server_round, chosen)
        view = _NodeSubset(grid, [self.fm_node_of[p] for p in chosen])
        return super().configure_train(server_round, arrays, config, view)  # type: ignore[misc]

    def record_failures(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Note the error replies in the round's report; return the others."""
        report = self.fm_reports[server_round]
        ok = []
        for msg in replies:
            if msg.has_error():
                pid = self.fm_partition_of[msg.metadata.src_node_id]
                report.failed[pid] = msg.error.reason or f"error code {msg.error.code}"
            else:
                ok.append(msg)
        return ok

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = self.fm_reports[server_round]
        ok = [
            (self.fm_partition_of[msg.metadata.src_node_id], msg)
            for msg in self.record_failures(server_round, replies)
        ]
        for pid in set(report.sampled) - {p for p, _ in ok} - set(report.failed):
            report.failed[pid] = "no reply"
        ok.sort(key=lambda item: item[0])
        report.succeeded = [p for p, _ in ok]
        for pid, msg in ok:
            metrics = msg.content.get("metrics")
            row = {"round": server_round, "client": pid}
            if metrics is not None:
                row.update({k.replace("-", "_"): _finite(v) for k, v in metrics.items()})
            row.pop("partition_id", None)
            report.clients.append(row)
            report.arrays[pid] = msg.content["arrays"]
        if len(ok) < self.fm_min_train:
            report.lost = True
            return None, None
        return super().aggregate_train(server_round, [m for _, m in ok])  # type: ignore[misc]


def with_partition_sampling(cls: type) -> type:
    """``cls`` (a flwr.serverapp strategy class) with :class:`PartitionSampled` in front."""
    return type(f"Sampled{cls.__name__}", (PartitionSampled, cls), {})
