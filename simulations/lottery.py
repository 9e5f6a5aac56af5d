"""Lottery tickets of the central run: iterative magnitude pruning with rewinding to round 0
and to an early round, against a random re-initialization and a random mask
(:mod:`fedmem.methods.lottery`; Frankle & Carbin 2019, Frankle et al. 2020).

The base experiment is trained once, keeping the round-k weights (``checkpoints.rounds``);
each of ``LEVELS`` levels prunes 20% of the remaining weights of the previous ticket. Per level
and variant: weights remaining, test accuracy and the memorization numbers after retraining;
per rewind round, the instability barrier of Frankle et al. 2020 (test error barrier on the
linear path between two dense copies trained from those weights with different batch
orders).
Central only so far (the federated variant is not built yet).

    python -m fedmem.simulate --recipe lottery [--config configs/lottery.yaml]
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedmem.config import ExperimentConfig, build, to_dict

TITLE = "lottery tickets (central): ticket vs re-init vs random mask per pruning level"
LEVELS = 7  # 0.8^7 = 21% of the hidden weights remain
EARLY_ROUND = 2
COLUMNS = (
    "weights_remaining",
    "test_acc",
    "train_acc_clean",
    "noisy_memorized",
    "noisy_true_acc",
    "canary_acc",
)


def base_config(base: ExperimentConfig) -> ExperimentConfig:
    raw = to_dict(base)
    rounds = sorted({*raw["checkpoints"]["rounds"], EARLY_ROUND})
    raw["checkpoints"]["rounds"] = rounds
    raw["analysis"]["gradients"]["enabled"] = False
    raw["output"]["name"] = f"{base.output.name}-lottery"
    return build(raw)


def run(base: ExperimentConfig, console: Console, force: bool = False) -> list[dict[str, Any]]:
    from fedmem.data.table import cached_table
    from fedmem.methods.lottery import imp, instability
    from fedmem.runs.checkpoints import load
    from fedmem.runs.experiment import run_or_load

    cfg = base_config(base)
    rd, summary = run_or_load(cfg, console, force)
    table = cached_table(cfg)
    trained = load(rd.path / "checkpoints" / "central.pt")
    dense = summary["runs"]["central"]
    rows: list[dict[str, Any]] = [
        {
            "rewind_round": "-",
            "level": 0,
            "variant": "dense",
            "weights_remaining": 1.0,
            **{c: dense.get(c) for c in COLUMNS[1:]},
            "instability_barrier": None,
        }
    ]
    for k in (0, EARLY_ROUND):
        console.print(f"iterative pruning, rewinding to round {k} ({LEVELS} levels)")
        start = load(rd.path / "checkpoints" / "central" / f"round-{k:05d}.pt")["model"]
        barrier = instability(cfg, table, start, k)["barrier"]
        for r in imp(cfg, table, trained, start, k, LEVELS):
            rows.append(
                {
                    "rewind_round": k,
                    "level": r["level"],
                    "variant": r["variant"],
                    **{c: r.get(c) for c in COLUMNS},
                    "instability_barrier": barrier,
                }
            )
    return rows


def plot(base: ExperimentConfig, rows: list[dict[str, Any]], out_dir: Any) -> list[Any]:
    """Test accuracy and noisy_memorized vs weights remaining, per variant and rewind round."""
    from pathlib import Path

    from fedmem.reporting.plots import xy_lines

    series = {}
    colors = {"ticket": "b", "reinit": "r", "random mask": "g"}
    for k, style in ((0, "-"), (EARLY_ROUND, "--")):
        for variant, color in colors.items():
            rr = [r for r in rows if r["rewind_round"] == k and r["variant"] == variant]
            xs = [r["weights_remaining"] for r in rr]
            series[f"{variant}, rewind {k}: test"] = (
                xs,
                [r["test_acc"] for r in rr],
                f"{color}{style}",
            )
    return [
        xy_lines(
            series,
            Path(out_dir) / "test_acc_by_weights.png",
            "share of weights remaining (log scale)",
            "test accuracy",
            "lottery tickets (central)",
            logx=True,
        )
    ]
