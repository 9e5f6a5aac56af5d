"""Central vs federated under label noise.

Noise rates {0, 0.2, 0.4} x {central, federated iid, federated Dirichlet(0.1)}, everything else
from the base config. One experiment per (noise rate, partition) gives its central and its
federated run; the central run does not depend on the partition (same rows, same batch-order
keys), so it is taken from the iid experiment.

    python -m fedmem.simulate --recipe central_vs_federated [key=value ...]
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedmem.config import ExperimentConfig, build, to_dict

TITLE = "central vs federated under label noise"
NOISE_RATES = (0.0, 0.2, 0.4)
PARTITIONS = (
    ("federated iid", {"kind": "iid"}),
    ("federated dir(0.1)", {"kind": "dirichlet", "alpha": 0.1}),
)
COLUMNS = (
    "test_acc",
    "train_acc_clean",
    "noisy_memorized",
    "noisy_true_acc",
    "peak_noisy_true_acc_round",
    "wall_s",
)


def cell_config(
    base: ExperimentConfig, noise: float, partition: dict[str, Any]
) -> ExperimentConfig:
    raw = to_dict(base)
    raw["data"]["noise"]["rate"] = noise
    raw["data"]["noise"]["client_rates"] = None
    raw["partition"].update(partition)
    raw["federation"]["enabled"] = True
    raw["output"]["name"] = f"{base.output.name}-cvf"
    return build(raw)


def run(base: ExperimentConfig, console: Console, force: bool = False) -> list[dict[str, Any]]:
    from fedmem.runs.experiment import run_or_load

    rows = []
    for noise in NOISE_RATES:
        for i, (setting, partition) in enumerate(PARTITIONS):
            cfg = cell_config(base, noise, partition)
            console.rule(f"noise {noise}  {setting}")
            _, summary = run_or_load(cfg, console, force)
            runs = [("central", "central")] if i == 0 else []
            runs.append((setting, "federated"))
            for label, key in runs:
                s = summary["runs"][key]
                rows.append({"noise": noise, "setting": label, **{c: s.get(c) for c in COLUMNS}})
    return rows
