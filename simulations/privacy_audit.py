"""Empirical privacy vs the accountant's: audit a run at several DP-SGD noise levels.

noise_multiplier in {0, 0.5, 1, 2} (record-level DP-SGD in the central run and every client;
0 = non-private), each run audited with ``python -m fedmem.audit``'s attacks. Per noise level
and model: the accountant's epsilon, the one-run empirical lower bound (Steinke et al. 2023),
membership-inference AUCs (loss, LiRA, RMIA), LiRA's TPR at 1% FPR, mean canary exposure,
client-level AUCs with their permutation p-values, and test accuracy. Every epsilon is stated
with its delta and the level of the claim (record; the one-run bound tests it per record).
The base config must keep audit records (use ``--config configs/audit.yaml``).

    python -m fedmem.simulate --recipe privacy_audit --config configs/audit.yaml
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedmem.config import ExperimentConfig, build, to_dict

TITLE = "Empirical privacy vs the accountant: one-run epsilon, membership inference, exposure"
NOISE_MULTIPLIERS = (0.0, 0.5, 1.0, 2.0)
COLUMNS = (
    ("accountant_epsilon", "eps accountant"),
    ("accountant_delta", "delta"),
    ("accountant_level", "claim level"),
    ("epsilon_lower_bound", "eps >= (one run)"),
    ("loss_auc", "loss AUC"),
    ("lira_online_auc", "LiRA AUC"),
    ("lira_online_tpr_at_1pct_fpr", "LiRA TPR@1%"),
    ("rmia_auc", "RMIA AUC"),
    ("exposure_mean", "exposure"),
    ("client_auc", "client loss AUC"),
    ("client_auc_p", "client AUC p"),
    ("client_lira_online_auc", "client LiRA AUC"),
    ("client_lira_online_auc_p", "client LiRA p"),
)


def cell_config(base: ExperimentConfig, z: float) -> ExperimentConfig:
    raw = to_dict(base)
    p = raw["privacy"]
    p.update(record_level=z > 0, noise_multiplier=z if z > 0 else None, target_epsilon=None)
    raw["output"]["name"] = f"{base.output.name}-privaudit"
    return build(raw)


def run(base: ExperimentConfig, console: Console, force: bool = False) -> list[dict[str, Any]]:
    from fedmem.privacy.audit.engine import run_audit
    from fedmem.privacy.audit.records import check_auditable, open_run
    from fedmem.privacy.audit.report import headline
    from fedmem.runs.experiment import run_or_load

    check_auditable(base)  # before any training: the base must keep audit records
    rows: list[dict[str, Any]] = []
    for z in NOISE_MULTIPLIERS:
        cfg = cell_config(base, z)
        console.rule(f"noise multiplier {z}")
        rd, summary = run_or_load(cfg, console, force)
        result = run_audit(open_run(rd.path), console, force=force)
        for name, h in headline(result).items():
            rows.append(
                {
                    "noise_multiplier": z,
                    "run": name,
                    "test_acc": summary["runs"][name].get("test_acc"),
                    **{label: h.get(key) for key, label in COLUMNS},
                }
            )
    return rows
