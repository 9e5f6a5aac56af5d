"""Reading an audit's results: headline numbers, the console / report table, violations.

Pure functions of ``audit.json``'s content (:func:`fedmem.privacy.audit.engine.run_audit`).
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from fedmem.reporting.tables import cell


def violations(result: dict[str, Any]) -> list[str]:
    """One line per tested privacy claim that a one-run lower bound exceeds.

    Only claims the audit canaries can test soundly count (``tested``; see
    :func:`fedmem.privacy.audit.scoring.claimed_privacy`); each line states the claim's level,
    the record-level guarantee tested, the confidence of that test and the number of tests
    (Bonferroni: the family holds at ``audit.attack.confidence``).
    """
    out = []
    for name, res in result["runs"].items():
        one = res.get("one_run_epsilon") or {}
        for c in one.get("claims", []):
            if not c.get("violated"):
                continue
            tested = (
                f"{c['accountant']} claim eps {c['epsilon']} (delta {c['delta']:.2e}, "
                f"{c['level']} level)"
            )
            if c["test_epsilon"] != c["epsilon"]:
                tested += (
                    f" implies eps {c['test_epsilon']:.3g} (delta {c['test_delta']:.2e}) per "
                    f"record ({c['tested_as']})"
                )
            out.append(
                f"{name}: empirical epsilon >= {c['lower_bound']:.3f} exceeds the {tested}; "
                f"{c['confidence']:.2%} confidence per test, {one['tests']} test(s), "
                f"{one['confidence']:.0%} for all together"
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
        client = res.get("client_membership") or {}
        tests = client.get("auc_tests") or {}
        for a, auc in (client.get("auc_by_attack") or {}).items():
            key = "client_auc" if a == "loss" else f"client_{a}_auc"
            h[key] = auc
            if a in tests:
                h[f"{key}_p"] = tests[a]["p_value"]
                h[f"{key}_ci"] = [tests[a]["ci_low"], tests[a]["ci_high"]]
        if "one_run_epsilon" in res:
            one = res["one_run_epsilon"]
            h["epsilon_lower_bound"] = one["lower_bound"]
            h["epsilon_lower_bound_delta"] = one.get("lower_bound_delta")
            h["accountant_epsilon"] = one["accountant_epsilon"]
            h["accountant_delta"] = one.get("accountant_delta")
            h["accountant_level"] = one.get("accountant_level")
            h["claims_tested"] = one.get("tests")
        out[name] = h
    return out


def auc_with_p(h: dict[str, Any], key: str) -> str:
    """A client-level AUC cell: "0.775 (p=0.12)"."""
    if h.get(key) is None:
        return "-"
    p = h.get(f"{key}_p")
    return cell(h[key]) if p is None else f"{cell(h[key])} (p={p:.2g})"


def epsilon_cell(h: dict[str, Any], key: str, delta_key: str) -> str:
    """An epsilon with its delta: "3.69 @1.3e-05"."""
    if h.get(key) is None:
        return "-"
    eps = h[key]
    eps = f"{eps:.3g}" if isinstance(eps, float) else str(eps)
    d = h.get(delta_key)
    return eps if d is None else f"{eps} @{d:.1e}"


AUDIT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("exposure_mean", "exposure"),
    ("loss_auc", "loss AUC"),
    ("lira_online_auc", "LiRA AUC"),
    ("lira_online_tpr_at_1pct_fpr", "LiRA TPR@1%"),
    ("lira_offline_auc", "LiRA off AUC"),
    ("rmia_auc", "RMIA AUC"),
    ("client_auc", "client loss AUC (p)"),
    ("client_lira_online_auc", "client LiRA AUC (p)"),
    ("epsilon_lower_bound", "eps >= (1 run) @delta"),
    ("accountant_epsilon", "eps claimed @delta"),
    ("accountant_level", "claim level"),
)


def _audit_cell(h: dict[str, Any], key: str) -> str:
    if key.startswith("client_"):
        return auc_with_p(h, key)
    if key == "epsilon_lower_bound":
        return epsilon_cell(h, key, "epsilon_lower_bound_delta")
    if key == "accountant_epsilon":
        return epsilon_cell(h, key, "accountant_delta")
    return cell(h.get(key))


def audit_rows(result: dict[str, Any]) -> list[list[str]]:
    """The console / report table rows: one per audited model."""
    return [
        [name, *(_audit_cell(h, key) for key, _ in AUDIT_COLUMNS)]
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
