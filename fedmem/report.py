"""Summaries and tables of finished runs (plots and report.md arrive with the analysis module)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

# (metric key, column title, format)
FINAL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("test_acc", "test acc", "{:.3f}"),
    ("train_acc_clean", "clean train acc", "{:.3f}"),
    ("noisy_memorized", "noisy memorized", "{:.3f}"),
    ("noisy_true_acc", "noisy true acc", "{:.3f}"),
    ("peak_noisy_true_acc_round", "peak true-acc round", "{}"),
    ("outlier_acc", "outlier acc", "{:.3f}"),
    ("canary_acc", "canary acc", "{:.3f}"),
    ("wall_s", "wall s", "{:.1f}"),
)


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final metrics of one run plus the early-learning peak (Liu et al. 2020).

    ``peak_noisy_true_acc_round`` is the round where the share of mislabeled examples
    predicted as their true label peaked (the early-learning onset; the first such round on
    ties); it is None when the data have no mislabeled examples.
    """
    if not rows:
        raise ValueError("no metrics rows to summarize")
    final = dict(rows[-1])
    final.pop("run", None)
    out: dict[str, Any] = {"rounds": final.pop("round"), **final}
    scored = [(r["noisy_true_acc"], -r["round"]) for r in rows if r["noisy_true_acc"] is not None]
    if scored:
        best, neg_round = max(scored)
        out["peak_noisy_true_acc"] = best
        out["peak_noisy_true_acc_round"] = -neg_round
    else:
        out["peak_noisy_true_acc"] = out["peak_noisy_true_acc_round"] = None
    mem = [r["noisy_memorized"] for r in rows if r["noisy_memorized"] is not None]
    out["max_noisy_memorized"] = max(mem) if mem else None
    return out


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def runs_table(runs: dict[str, dict[str, Any]], title: str = "final metrics") -> Table:
    """Side-by-side table: one row per run (central, federated, ...)."""
    table = Table(title=title)
    table.add_column("run", style="bold")
    for _, name, _ in FINAL_COLUMNS:
        table.add_column(name, justify="right")
    for run, summary in runs.items():
        table.add_row(run, *(_fmt(summary.get(k), f) for k, _, f in FINAL_COLUMNS))
    return table
