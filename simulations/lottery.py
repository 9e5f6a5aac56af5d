"""Lottery tickets, central and federated: iterative magnitude pruning with rewinding to round
0 and to an early round, against a random re-initialization and a random mask
(:mod:`fedmem.methods.lottery`; Frankle & Carbin 2019, Frankle et al. 2020).

The base experiment is trained once, keeping the round-k weights (``checkpoints.rounds``).
For the central model and the final global model alike, each of ``LEVELS`` levels prunes 20%
of the remaining weights of the previous ticket, rewinds and retrains the way the model was
trained (federated: the server prunes the global model, rewinds it to the global model of
round k and runs the remaining rounds with the masks broadcast). Per level and variant:
weights remaining, test accuracy and the memorization numbers after retraining; per rewind
round, the instability barrier of Frankle et al. 2020 (test error barrier on the linear path
between two dense copies trained from those weights with different batch orders).

The last level's ticket of every rewind round is added to the run directory as a derived
model (``<model>-ticket-k<k>``). When the config keeps audit candidates (``audit.pool``,
``configs/lottery.yaml`` does), the recipe audits the run: membership-inference AUC and canary
exposure of the dense models and of the final tickets fill the last columns.

    python -m fedmem.simulate --recipe lottery [--config configs/lottery.yaml]
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedmem.config import ExperimentConfig, build, to_dict

TITLE = "lottery tickets: ticket vs re-init vs random mask per pruning level, central and federated"
LEVELS = 7  # 0.8^7 = 21% of the hidden weights remain
FRACTION = 0.2
EARLY_ROUND = 2
COLUMNS = (
    "weights_remaining",
    "test_acc",
    "train_acc_clean",
    "noisy_memorized",
    "noisy_true_acc",
    "canary_acc",
)
AUDIT_ATTACK = "lira_online"
AUDIT_COLUMNS = ("mia_auc", "exposure_mean")


def base_config(base: ExperimentConfig) -> ExperimentConfig:
    raw = to_dict(base)
    rounds = sorted({*raw["checkpoints"]["rounds"], EARLY_ROUND})
    raw["checkpoints"]["rounds"] = rounds
    raw["analysis"]["gradients"]["enabled"] = False
    raw["output"]["name"] = f"{base.output.name}-lottery"
    return build(raw)


def run(base: ExperimentConfig, console: Console, force: bool = False) -> list[dict[str, Any]]:
    from fedmem.data.table import cached_table
    from fedmem.methods.lottery import imp, instability, register_ticket
    from fedmem.runs.checkpoints import load
    from fedmem.runs.experiment import run_or_load

    cfg = base_config(base)
    rd, summary = run_or_load(cfg, console, force)
    table = cached_table(cfg)
    models = ["central", "federated"] if cfg.federation.enabled else ["central"]
    rows: list[dict[str, Any]] = []
    for model in models:
        dense = summary["runs"][model]
        rows.append(
            {
                "model": model,
                "rewind_round": "-",
                "level": 0,
                "variant": "dense",
                "weights_remaining": 1.0,
                **{c: dense.get(c) for c in COLUMNS[1:]},
                "instability_barrier": None,
                "audited_as": model,
            }
        )
        trained = load(rd.path / "checkpoints" / f"{model}.pt")
        for k in (0, EARLY_ROUND):
            console.print(f"{model}: iterative pruning, rewinding to round {k} ({LEVELS} levels)")
            start = load(rd.path / "checkpoints" / model / f"round-{k:05d}.pt")["model"]
            barrier = instability(cfg, table, start, k, trainer=model)["barrier"]
            level_rows, ticket = imp(cfg, table, trained, start, k, LEVELS, FRACTION, trainer=model)
            for r in level_rows:
                rows.append(
                    {
                        "model": model,
                        "rewind_round": k,
                        "level": r["level"],
                        "variant": r["variant"],
                        **{c: r.get(c) for c in COLUMNS},
                        "instability_barrier": barrier,
                        "audited_as": None,
                    }
                )
            last = [r for r in rows if r["rewind_round"] == k and r["variant"] == "ticket"][-1]
            details = {"levels": LEVELS, "fraction": FRACTION}
            last["audited_as"] = register_ticket(rd.path, model, k, ticket, last, details)
    audit = _audit(rd.path, [r["audited_as"] for r in rows if r["audited_as"]], console)
    for r in rows:
        name = r.pop("audited_as")
        h = audit.get(name, {}) if name else {}
        r["mia_auc"] = h.get(f"{AUDIT_ATTACK}_auc")
        r["exposure_mean"] = h.get("exposure_mean")
    return rows


def _audit(run_dir: Any, names: list[str], console: Console) -> dict[str, dict[str, Any]]:
    """The audit's headline numbers per model (empty when the run kept no candidates)."""
    from fedmem.errors import InputError
    from fedmem.privacy.audit.engine import cached_audit, run_audit
    from fedmem.privacy.audit.records import check_auditable, open_run
    from fedmem.privacy.audit.report import headline

    run = open_run(run_dir)
    try:
        check_auditable(run.cfg)
    except InputError:
        console.print("[yellow]not audited[/]: set audit.pool to audit the tickets")
        return {}
    cached = cached_audit(run)
    if cached is None or not set(names) <= set(cached["runs"]):
        cached = run_audit(run, console, force=True)
    return headline(cached)


def plot(base: ExperimentConfig, rows: list[dict[str, Any]], out_dir: Any) -> list[Any]:
    """Per model: test accuracy and noisy_memorized vs weights remaining, per variant and
    rewind round."""
    from pathlib import Path

    from fedmem.reporting.plots import xy_lines

    colors = {"ticket": "b", "reinit": "r", "random mask": "g"}
    paths = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for column, label in (("test_acc", "test accuracy"), ("noisy_memorized", "memorized")):
            series = {}
            for k, style in ((0, "-"), (EARLY_ROUND, "--")):
                for variant, color in colors.items():
                    rr = [
                        r
                        for r in rows
                        if r["model"] == model
                        and r["rewind_round"] == k
                        and r["variant"] == variant
                        and r[column] is not None
                    ]
                    series[f"{variant}, rewind {k}"] = (
                        [r["weights_remaining"] for r in rr],
                        [r[column] for r in rr],
                        f"{color}{style}",
                    )
            paths.append(
                xy_lines(
                    series,
                    Path(out_dir) / f"{column}_by_weights_{model}.png",
                    "share of weights remaining (log scale)",
                    label,
                    f"lottery tickets ({model})",
                    logx=True,
                )
            )
    return paths
