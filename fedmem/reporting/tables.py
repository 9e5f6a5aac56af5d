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
    ("delta", "delta", "{:.1e}"),
    ("user_epsilon", "user eps", "{:.2f}"),
    ("user_delta", "user delta", "{:.1e}"),
    ("wall_s", "wall s", "{:.1f}"),
)


OPTIONAL_COLUMNS = frozenset({"delta", "user_epsilon", "user_delta"})
"""Columns shown only when some run has a value (DP runs: every epsilon beside its delta)."""


def columns_for(runs: dict[str, dict[str, Any]]) -> tuple[tuple[str, str, str], ...]:
    """:data:`FINAL_COLUMNS` without the optional ones no run fills."""
    return tuple(
        c
        for c in FINAL_COLUMNS
        if c[0] not in OPTIONAL_COLUMNS or any(s.get(c[0]) is not None for s in runs.values())
    )


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final metrics of one run plus the early-learning peak (Liu et al. 2020).

    ``peak_noisy_true_acc_round`` is the round where the share of mislabeled examples
    predicted as their true label peaked (the early-learning onset; the first such round on
    ties); it is None when the data have no mislabeled examples. ``best_test_acc`` and its
    round: the highest test accuracy of any round (first such round on ties).
    ``diverged_at_round``: the first round whose model had non-finite weights or loss (None:
    never). Runs with lost rounds (federated) also total ``lost_rounds`` and
    ``client_failures`` over all rounds. Metrics a diverged model made non-finite are None
    (JSON null).
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
    tested = [(r["test_acc"], -r["round"]) for r in rows if r.get("test_acc") is not None]
    if tested:
        best, neg_round = max(tested)
        out["best_test_acc"], out["best_test_acc_round"] = best, -neg_round
    out.pop("diverged", None)
    out["diverged_at_round"] = next((r["round"] for r in rows if r.get("diverged")), None)
    if any("round_lost" in r for r in rows):
        out["lost_rounds"] = sum(1 for r in rows if r.get("round_lost"))
        out["client_failures"] = sum(int(r.get("clients_failed") or 0) for r in rows)
    return out


def run_label(run: str, summary: dict[str, Any]) -> str:
    """A run's name in tables, marked when its model diverged or rounds were lost."""
    marks = []
    if summary.get("diverged_at_round") is not None:
        marks.append(f"diverged at round {summary['diverged_at_round']}")
    if summary.get("lost_rounds"):
        lost = summary["lost_rounds"]
        marks.append(f"{lost} round{'s' if lost > 1 else ''} lost")
    return f"{run} ({'; '.join(marks)})" if marks else run


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # e.g. epsilon "inf"
        return value
    return fmt.format(value)


def runs_table(runs: dict[str, dict[str, Any]], title: str = "final metrics") -> Table:
    """Side-by-side table: one row per run (central, federated, ...).

    Columns: final test accuracy, clean-train accuracy, noisy_memorized, noisy_true_acc, the
    round where noisy_true_acc peaked, outlier and canary accuracy, wall time. A run that
    diverged or lost rounds is marked beside its name (:func:`run_label`).
    """
    table = Table(
        title=title,
        caption="accuracies at the last round; peak rnd: round where "
        "noisy true acc peaked (early learning)",
    )
    table.add_column("run", style="bold")
    columns = columns_for(runs)
    for _, name, _ in columns:
        table.add_column(name, justify="right")
    for run, summary in runs.items():
        table.add_row(run_label(run, summary), *(_fmt(summary.get(k), f) for k, _, f in columns))
    return table


def cell(v: Any) -> str:
    """A table cell: None as "-", floats with 3 decimals, below 0.001 in scientific notation
    (a delta or a p-value is never shown as 0.000)."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1e}" if 0 < abs(v) < 1e-3 else f"{v:.3f}"
    return str(v)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
