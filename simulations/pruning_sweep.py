"""One-shot pruning of the trained central and federated models: what is forgotten first
(Hooker et al. 2019, "What Do Compressed Deep Neural Networks Forget?").

The base experiment is trained once (its cached run directory); its final central model and
federated global model are then pruned to each sparsity, by global magnitude (the output layer
at half the rate) and at random with the same per-layer counts (the control), without
retraining (:func:`fedmem.methods.pruning.one_shot`). Per row: weights remaining, test
accuracy, accuracy by example kind (clean, mislabeled on their given label = memorized, on
their true label, outliers, canaries), the share of training predictions pruning changed, and
how over-represented mislabeled examples, outliers and canaries are among those (enrichment;
the single-model version of pruning-identified exemplars).

    python -m fedmem.simulate --recipe pruning_sweep [--config ...]
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fedmem.config import ExperimentConfig

TITLE = "one-shot pruning of the trained models: accuracy by example kind vs sparsity"
SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
METHODS = ("magnitude", "random")
COLUMNS = (
    "weights_remaining",
    "test_acc",
    "train_acc_clean",
    "noisy_memorized",
    "noisy_true_acc",
    "outlier_acc",
    "canary_acc",
    "changed",
    "enrichment_mislabeled",
    "enrichment_outlier",
    "enrichment_canary",
)


def run(base: ExperimentConfig, console: Console, force: bool = False) -> list[dict[str, Any]]:
    import torch

    from fedmem.methods.pruning import one_shot
    from fedmem.privacy.audit.records import load_model, open_run
    from fedmem.runs.experiment import run_or_load

    rd, _ = run_or_load(base, console, force)
    run = open_run(rd.path)
    rows: list[dict[str, Any]] = []
    for name in [n for n in run.runs if run.records[n].method is None]:
        model = load_model(run, name, torch.device("cpu"))
        for method in METHODS:
            console.print(f"pruning {name} ({method})")
            for r in one_shot(model, run.table, SPARSITIES, method, seed=base.seed):
                rows.append(
                    {
                        "run": name,
                        "method": method,
                        "sparsity": r["sparsity"],
                        **{c: r.get(c) for c in COLUMNS},
                    }
                )
    return rows


def plot(base: ExperimentConfig, rows: list[dict[str, Any]], out_dir: Any) -> list[Any]:
    """Per run: accuracy by example kind vs sparsity, magnitude (solid) vs random (dashed)."""
    from pathlib import Path

    from fedmem.reporting.plots import xy_lines

    colors = {"test_acc": "b", "train_acc_clean": "g", "noisy_memorized": "r", "canary_acc": "m"}
    paths = []
    for name in dict.fromkeys(r["run"] for r in rows):
        series = {}
        for method, style in (("magnitude", "-"), ("random", "--")):
            rr = [r for r in rows if r["run"] == name and r["method"] == method]
            xs = [r["sparsity"] for r in rr]
            for key, color in colors.items():
                series[f"{key} ({method})"] = (xs, [r[key] for r in rr], f"{color}{style}")
        paths.append(
            xy_lines(
                series,
                Path(out_dir) / f"accuracy_by_kind_{name}.png",
                "sparsity (share of weights removed)",
                "accuracy (noisy_memorized: on the given wrong label)",
                f"one-shot pruning of the {name} model",
            )
        )
    return paths
