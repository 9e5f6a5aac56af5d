"""Tables of finished runs: the final-metrics summary of a run, console and markdown tables,
table cells (a leaf module: it imports nothing from fedmem)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

# (metric key, column title, format)
FINAL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("test_acc", "test", "{:.3f}"),
    ("train_acc_clean", "clean", "{:.3f}"),
    ("noisy_memorized", "noisy mem", "{:.3f}"),
    ("noisy_true_acc", "noisy true", "{:.3f}"),
    ("peak_noisy_true_acc_round", "peak rnd", "{}"),
    ("outlier_acc", "outlier", "{:.3f}"),
    ("canary_acc", "canary", "{:.3f}"),
    ("epsilon", "epsilon", "{:.2f}"),
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
    if value is None:
        return "-"
    if isinstance(value, str):  # e.g. epsilon "inf"
        return value
    return fmt.format(value)


def runs_table(runs: dict[str, dict[str, Any]], title: str = "final metrics") -> Table:
    """Side-by-side table: one row per run (central, federated, ...).

    Columns: final test accuracy, clean-train accuracy, noisy_memorized, noisy_true_acc, the
    round where noisy_true_acc peaked, outlier and canary accuracy, wall time.
    """
    table = Table(
        title=title,
        caption="accuracies at the last round; peak rnd: round where "
        "noisy true acc peaked (early learning)",
    )
    table.add_column("run", style="bold")
    for _, name, _ in FINAL_COLUMNS:
        table.add_column(name, justify="right")
    for run, summary in runs.items():
        table.add_row(run, *(_fmt(summary.get(k), f) for k, _, f in FINAL_COLUMNS))
    return table


def cell(v: Any) -> str:
    """A table cell: None as "-", floats with 3 decimals."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
