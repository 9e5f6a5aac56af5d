"""Differential privacy vs memorization.

noise_multiplier in {0, 0.5, 1, 2} x {central, federated record-level, federated user-level},
with the base config's label noise and canaries (use ``--config configs/dp.yaml``). Noise 0
is the non-private baseline. Per noise level, one experiment with record-level DP-SGD gives
the central and the federated record-level rows; one with user-level DP-FedAvg (noise on the
aggregate, clip ``privacy.user_clip_norm``) gives the federated user-level row. Every
epsilon is stated with its delta: record level at one delta for the central run and every
client (``privacy.delta_convention=dataset``), user level at ``privacy.user_delta``.

    python -m fedmem.simulate --recipe dp_memorization --config configs/dp.yaml
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedmem.config import ExperimentConfig, build, to_dict

TITLE = "DP vs memorization: accuracy, noisy-label fit, canaries and epsilon"
NOISE_MULTIPLIERS = (0.0, 0.5, 1.0, 2.0)
COLUMNS = ("test_acc", "noisy_memorized", "noisy_true_acc", "canary_acc")


def cell_config(base: ExperimentConfig, z: float, level: str) -> ExperimentConfig:
    raw = to_dict(base)
    p = raw["privacy"]
    p.update(record_level=False, user_level=False, noise_multiplier=None, target_epsilon=None)
    if z > 0 and level == "record":
        p.update(record_level=True, noise_multiplier=z)
    if z > 0 and level == "user":
        p.update(user_level=True, user_noise_multiplier=z)
    raw["federation"]["enabled"] = True
    raw["output"]["name"] = f"{base.output.name}-dpmem"
    return build(raw)


def run(base: ExperimentConfig, console: Console, force: bool = False) -> list[dict[str, Any]]:
    from fedmem.runs.experiment import run_or_load

    rows: list[dict[str, Any]] = []
    for z in NOISE_MULTIPLIERS:
        plan = [
            (
                "record",
                [
                    ("central", "central", "epsilon"),
                    ("federated record-level", "federated", "epsilon"),
                ],
            )
        ]
        if z > 0:
            plan.append(("user", [("federated user-level", "federated", "user_epsilon")]))
        else:
            plan[0][1].append(("federated user-level", "federated", "user_epsilon"))
        for level, picks in plan:
            cfg = cell_config(base, z, level)
            console.rule(f"noise multiplier {z}  ({level}-level)")
            _, summary = run_or_load(cfg, console, force)
            for label, run_name, eps_key in picks:
                s = summary["runs"][run_name]
                eps = s.get(eps_key, "inf")
                delta_key = "user_delta" if eps_key == "user_epsilon" else "delta"
                rows.append(
                    {
                        "noise_multiplier": z,
                        "setting": label,
                        **{c: s.get(c) for c in COLUMNS},
                        "epsilon": eps,
                        "delta": s.get(delta_key),
                    }
                )
    return rows
