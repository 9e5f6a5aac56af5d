"""Where the central-vs-federated gap comes from: local steps, optimizer reset, averaging and
data heterogeneity, one change at a time (issue 11, item 8).

A federated round and a central round at ``central.match=visits`` see the same examples, but
they differ in four ways at once: the central optimizer keeps its momentum across rounds (each
client starts afresh), the central run takes ``ceil(N/B)`` sequential steps per round where a
client takes ``ceil(N_k/B)`` (about 1/K as many), FedAvg averages K such short runs, and the
clients' data differ (label skew). This recipe walks from central training to FedAvg on the
base config's partition, changing one of these per row, so that the difference between
consecutive rows is the effect of that one cause on this config:

1. central, matched on visits, optimizer kept (the default central run);
2. central, optimizer reset every round (cause: optimizer reset);
3. central, matched on a client's steps per round, optimizer reset (cause: fewer sequential
   steps, the local steps of one client);
4. FedAvg over IID clients (cause: averaging K models each trained that many steps);
5. FedAvg over the base config's partition (cause: data heterogeneity), skipped when the base
   partition is already IID.

Rows 1 and 4 come from one experiment (its central and federated runs), rows 2 and 3 from
central-only experiments (``federation.enabled=false``), row 5 from the base config. Each
cell is an ordinary cached run directory.

    python -m fedmem.simulate --recipe central_gap --config configs/noise.yaml
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedmem.config import ExperimentConfig, build, to_dict

TITLE = "central vs federated gap, one cause at a time (central section: match, optimizer)"
COLUMNS = (
    "test_acc",
    "train_acc_clean",
    "noisy_memorized",
    "noisy_true_acc",
    "peak_noisy_true_acc",
    "peak_noisy_true_acc_round",
    "max_noisy_memorized",
)


def cell_config(
    base: ExperimentConfig,
    *,
    match: str = "visits",
    optimizer: str = "keep",
    federated: bool = True,
    iid: bool = True,
) -> ExperimentConfig:
    raw = to_dict(base)
    raw["central"] = {"match": match, "optimizer": optimizer}
    raw["federation"]["enabled"] = federated
    if iid:
        raw["partition"]["kind"] = "iid"
    raw["output"]["name"] = f"{base.output.name}-gap"
    return build(raw)


def plan(base: ExperimentConfig) -> list[tuple[str, str, dict[str, Any], str]]:
    """(row label, cause vs the previous row, cell_config kwargs, run to read)."""
    rows = [
        ("central: visits, optimizer kept", "-", {}, "central"),
        (
            "central: visits, optimizer reset",
            "optimizer reset",
            {"optimizer": "reset", "federated": False},
            "central",
        ),
        (
            "central: client steps, optimizer reset",
            "fewer sequential steps",
            {"match": "steps", "optimizer": "reset", "federated": False},
            "central",
        ),
        ("FedAvg iid", "averaging", {}, "federated"),
    ]
    if base.partition.kind != "iid":
        rows.append((f"FedAvg {base.partition.kind}", "heterogeneity", {"iid": False}, "federated"))
    return rows


def run(base: ExperimentConfig, console: Console, force: bool = False) -> list[dict[str, Any]]:
    from fedmem.runs.experiment import run_or_load

    out: list[dict[str, Any]] = []
    prev: dict[str, Any] | None = None
    for label, cause, kwargs, which in plan(base):
        cfg = cell_config(base, **kwargs)
        console.rule(label)
        _, summary = run_or_load(cfg, console, force)
        s = summary["runs"][which]
        m = summary["central_matching"]
        steps = m["steps_per_round"] if which == "central" else round(m["client_steps_mean"])
        row = {
            "setting": label,
            "cause": cause,
            "steps/round": steps,
            **{c: s.get(c) for c in COLUMNS},
        }
        for c in ("test_acc", "noisy_memorized"):
            a, b = s.get(c), None if prev is None else prev.get(c)
            row[f"d {c}"] = None if a is None or b is None else a - b
        out.append(row)
        prev = s
    return out
