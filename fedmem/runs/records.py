"""Run lineage: a small record for every model a run directory holds.

``summary.json["models"]`` maps a model's name to its :class:`ModelRecord`: how it was trained
(central SGD or federated through a strategy), with which training plug-ins, under which
differential privacy, and which checkpoint it started from (``parent``; ``None`` = the run's
initialization). The audit chooses its shadow recipe from the record and lists what the
shadows do not simulate (:func:`deviations`); the report lists the records. Commands that
derive models from a finished run (pruning, unlearning) add theirs with :func:`add_model`,
which also puts the model's final metrics beside the originals in ``summary.json["runs"]``.

Older run directories have no ``models`` section: :func:`read_records` derives their records
from the config, as they were trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fedmem.config import ExperimentConfig
from fedmem.errors import InputError

Trainer = Literal["central", "federated"]


@dataclass(frozen=True)
class ModelRecord:
    """How one model of a run directory was trained."""

    name: str
    trainer: Trainer  # central SGD on the pooled data, or federated rounds
    rounds: int
    checkpoint: str  # final weights, relative to the run directory
    strategy: str | None = None  # federated: the server strategy
    plugins: tuple[str, ...] = ()  # training plug-ins active while it trained
    record_dp: bool = False  # record-level DP-SGD (Opacus)
    user_dp: bool = False  # user-level DP-FedAvg
    client_failure_rate: float = 0.0
    parent: str | None = None  # "<model>@<round>" it started from; None = the initialization
    method: str | None = None  # the command that derived it (e.g. "prune", "unlearn")
    details: dict[str, Any] = field(default_factory=dict)  # method settings

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plugins"] = list(self.plugins)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRecord:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["plugins"] = tuple(known.get("plugins", ()))
        return cls(**known)


def experiment_records(cfg: ExperimentConfig) -> dict[str, ModelRecord]:
    """The records of the models ``python -m fedmem.simulate`` trains for ``cfg``."""
    from fedmem.methods.registry import active_plugin_names

    p = cfg.privacy
    out = {
        "central": ModelRecord(
            name="central",
            trainer="central",
            rounds=cfg.train.rounds,
            checkpoint="checkpoints/central.pt",
            plugins=tuple(active_plugin_names(cfg, "central")),
            record_dp=p.record_level,
        )
    }
    if cfg.federation.enabled:
        fed = cfg.federation
        out["federated"] = ModelRecord(
            name="federated",
            trainer="federated",
            rounds=cfg.train.rounds,
            checkpoint="checkpoints/federated.pt",
            strategy=fed.strategy,
            plugins=tuple(active_plugin_names(cfg, "federated")),
            record_dp=p.record_level,
            user_dp=p.user_level,
            client_failure_rate=fed.client_failure_rate,
        )
    return out


def read_records(summary: dict[str, Any], cfg: ExperimentConfig) -> dict[str, ModelRecord]:
    """The run's model records (derived from the config for runs made before lineage)."""
    if "models" in summary:
        return {name: ModelRecord.from_dict(d) for name, d in summary["models"].items()}
    return {n: r for n, r in experiment_records(cfg).items() if n in summary.get("runs", {})}


def deviations(record: ModelRecord, recipe: str, simulated_plugins: frozenset[str]) -> list[str]:
    """What training ``record`` describes that shadows of ``recipe`` (``central`` or
    ``fedavg``, trained by the batched ensemble trainer from the initialization) leave out."""
    out: list[str] = []
    if record.parent is not None:
        out.append(f"starts from {record.parent} (shadows start from the initialization)")
    if record.method is not None:
        out.append(f"derived by {record.method} (not simulated)")
    if record.record_dp:
        out.append("privacy.record_level (DP-SGD) not simulated")
    if recipe == "central":
        out += [f"plug-in {p} not simulated" for p in record.plugins if p not in simulated_plugins]
        return out
    if record.strategy not in (None, "fedavg"):
        out.append(f"federation.strategy={record.strategy} simulated as plain fedavg")
    for p in record.plugins:
        if p not in simulated_plugins:
            hint = " (train.proximal_mu, FedProx term)" if p == "proximal" else ""
            out.append(f"plug-in {p}{hint} not simulated")
    if record.client_failure_rate > 0:
        out.append(f"federation.client_failure_rate={record.client_failure_rate} not simulated")
    if record.user_dp:
        out.append("privacy.user_level (DP-FedAvg) not simulated")
    return out


def shadow_recipe(record: ModelRecord) -> str:
    """The shadow recipe that imitates ``record``: central SGD or plain FedAvg."""
    return "central" if record.trainer == "central" else "fedavg"


def add_model(run_dir: Any, record: ModelRecord, final_metrics: dict[str, Any]) -> None:
    """Add a derived model to a finished run: its record, its final metrics row (shown beside
    the originals), then ``report.md`` rendered again."""
    from fedmem.reporting.report import render_report
    from fedmem.runs.rundir import RunDir

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if not rd.complete:
        raise InputError(f"RUN_DIR: {rd.path} is not a complete run; finish it first")
    if not (rd.path / record.checkpoint).is_file():
        raise ValueError(f"{record.name}: checkpoint {record.checkpoint} does not exist")
    summary = rd.read_summary()
    if "models" not in summary:
        cfg = rd.read_config()
        summary["models"] = {n: r.to_dict() for n, r in read_records(summary, cfg).items()}
    summary["models"][record.name] = record.to_dict()
    summary.setdefault("runs", {})[record.name] = final_metrics
    rd.write_json("summary.json", summary)
    render_report(rd.path)
