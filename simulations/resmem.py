"""ResMem vs the base model across model widths, clean and noisy labels, central and
federated (Yang et al. 2023; :mod:`fedmem.methods.resmem`).

model.hidden in {16, 64, 256} x label noise {0, 0.4}; every experiment's central model and
federated global model, each with and without its residual memory
(:func:`fedmem.methods.resmem_eval.evaluate`, default :class:`ResMemSettings`). Per row:
test accuracy base / ResMem, mislabeled training examples predicted as their given label
(ResMem memorizes the noise too), and for the federated model the client-local test accuracy
(each client's label mix) with the global model alone vs with the client's own memory, and
the privacy cost of the (central / global) memory: canary exposure, and loss-threshold
membership AUC when the base config keeps an audit pool (``audit.pool``).

The paper's pattern to check: ResMem's gain is largest for the smallest models.

    python -m fedmem.simulate --recipe resmem [--config ...]
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedmem.config import ExperimentConfig, build, to_dict

TITLE = "ResMem (explicit residual memory) vs the base model: widths, noise, central/federated"
WIDTHS = (16, 64, 256)
NOISE_RATES = (0.0, 0.4)


def cell_config(base: ExperimentConfig, width: int, noise: float) -> ExperimentConfig:
    raw = to_dict(base)
    raw["model"].update(name="mlp", hidden=width)
    raw["data"]["noise"].update(rate=noise, client_rates=None)
    raw["federation"]["enabled"] = True
    raw["analysis"]["gradients"]["enabled"] = False
    raw["output"]["name"] = f"{base.output.name}-resmem"
    return build(raw)


def run(base: ExperimentConfig, console: Console, force: bool = False) -> list[dict[str, Any]]:
    from fedmem.methods.resmem_eval import evaluate
    from fedmem.privacy.audit.records import open_run
    from fedmem.runs.experiment import run_or_load

    rows: list[dict[str, Any]] = []
    for noise in NOISE_RATES:
        for width in WIDTHS:
            cfg = cell_config(base, width, noise)
            console.rule(f"noise {noise}  mlp width {width}")
            rd, _ = run_or_load(cfg, console, force)
            result = evaluate(open_run(rd.path))
            for name, r in result["runs"].items():
                local = r.get("client_local") or {}
                rows.append(
                    {
                        "noise": noise,
                        "width": width,
                        "run": name,
                        "test base": r["test_acc"]["base"],
                        "test resmem": r["test_acc"]["resmem"],
                        "d test": r["test_acc"]["resmem"] - r["test_acc"]["base"],
                        "noisy mem base": r["noisy_memorized"]["base"],
                        "noisy mem resmem": r["noisy_memorized"]["resmem"],
                        "client-local base": local.get("base_mean"),
                        "client-local resmem": local.get("resmem_mean"),
                        **_privacy_columns(r.get("privacy") or {}),
                    }
                )
    return rows


def _privacy_columns(cost: dict[str, Any]) -> dict[str, Any]:
    """Canary exposure (and loss-threshold membership AUC where the run keeps an audit pool)
    of the model alone vs with its memory."""
    out: dict[str, Any] = {}
    if "exposure_mean" in cost:
        out["exposure base"] = cost["exposure_mean"]["base"]
        out["exposure resmem"] = cost["exposure_mean"]["resmem"]
    if "membership_loss" in cost:
        out["MIA AUC base"] = cost["membership_loss"]["base"]["auc"]
        out["MIA AUC resmem"] = cost["membership_loss"]["resmem"]["auc"]
    return out


def plot(base: ExperimentConfig, rows: list[dict[str, Any]], out_dir: Any) -> list[Any]:
    """Test accuracy vs MLP width: base model (solid) and with ResMem (dashed), one color per
    run and noise rate."""
    from pathlib import Path

    from fedmem.reporting.plots import xy_lines

    colors = {(0.0, "central"): "b", (0.0, "federated"): "r"}
    series = {}
    for noise in sorted({r["noise"] for r in rows}):
        for run_name in ("central", "federated"):
            rr = [r for r in rows if r["noise"] == noise and r["run"] == run_name]
            if not rr:
                continue
            color = colors.get((noise, run_name), "c" if run_name == "central" else "m")
            xs = [r["width"] for r in rr]
            label = f"{run_name}, noise {noise}"
            series[f"{label}: base"] = (xs, [r["test base"] for r in rr], f"{color}-")
            series[f"{label}: ResMem"] = (xs, [r["test resmem"] for r in rr], f"{color}--")
    path = Path(out_dir) / "test_acc_by_width.png"
    title = "ResMem (dashed) vs the base model (solid)"
    return [xy_lines(series, path, "MLP width (model.hidden)", "test accuracy", title, True)]
