"""Reading an audit's results: headline numbers, the console / report table, violations.

Pure functions of ``audit.json``'s content (:func:`fedmem.privacy.audit.engine.run_audit`).
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from fedmem.reporting.tables import cell


def violations(result: dict[str, Any]) -> list[str]:
    """One line per claimed epsilon that a one-run lower bound exceeds."""
    out = []
    for name, res in result["runs"].items():
        for c in (res.get("one_run_epsilon") or {}).get("claims", []):
            if c["violated"]:
                out.append(
                    f"{name}: empirical epsilon >= {c['lower_bound']:.3f} at "
                    f"{res['one_run_epsilon']['confidence']:.0%} confidence exceeds the "
                    f"{c['accountant']} accountant's epsilon {c['epsilon']} "
                    f"(delta {c['delta']:.2e})"
                )
    return out


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The few numbers per model that go into summary.json and the console table."""
    out: dict[str, Any] = {}
    for name, res in result["runs"].items():
        h: dict[str, Any] = {}
        if "exposure" in res:
            h["exposure_mean"] = res["exposure"]["by_group"]["all"]["mean"]
        for a, s in ((res.get("membership") or {}).get("attacks") or {}).items():
            h[f"{a}_auc"] = s["auc"]
            h[f"{a}_tpr_at_1pct_fpr"] = s["tpr_at_1pct_fpr"]
        for a, auc in ((res.get("client_membership") or {}).get("auc_by_attack") or {}).items():
            h["client_auc" if a == "loss" else f"client_{a}_auc"] = auc
        if "one_run_epsilon" in res:
            h["epsilon_lower_bound"] = res["one_run_epsilon"]["lower_bound"]
            h["accountant_epsilon"] = res["one_run_epsilon"]["accountant_epsilon"]
        out[name] = h
    return out


AUDIT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("exposure_mean", "exposure"),
    ("loss_auc", "loss AUC"),
    ("lira_online_auc", "LiRA AUC"),
    ("lira_online_tpr_at_1pct_fpr", "LiRA TPR@1%"),
    ("lira_offline_auc", "LiRA off AUC"),
    ("rmia_auc", "RMIA AUC"),
    ("client_auc", "client loss AUC"),
    ("client_lira_online_auc", "client LiRA AUC"),
    ("epsilon_lower_bound", "eps >= (1 run)"),
    ("accountant_epsilon", "eps accountant"),
)


def audit_rows(result: dict[str, Any]) -> list[list[str]]:
    """The console / report table rows: one per audited model."""
    return [
        [name, *(cell(h.get(key)) for key, _ in AUDIT_COLUMNS)]
        for name, h in headline(result).items()
    ]


def audit_table(result: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("model")
    for _, label in AUDIT_COLUMNS:
        table.add_column(label, justify="right")
    for row in audit_rows(result):
        table.add_row(*row)
    return table
