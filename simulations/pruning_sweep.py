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

Then Hooker et al.'s population version (:mod:`fedmem.methods.pies`): ``POPULATION`` models
per trainer (central SGD, and plain FedAvg over the run's clients when the run is federated)
are trained from their own seeds by the batched ensemble trainer, each pruned one-shot by
magnitude; rows ``<run> population`` give the pruned members' mean test accuracy, the share of
pruning-identified exemplars (modal prediction changed) and their enrichment among
mislabeled, outlier, canary and, when the run computed memorization scores
(``analysis.memorization_scores``), the top-decile memorization-score rows (``high_mem``).

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
    "pie_share",
    "enrichment_high_mem",
)
POPULATION = 16


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
    for recipe in ["central", "fedavg"] if base.federation.enabled else ["central"]:
        console.print(f"PIEs: {POPULATION} {recipe} models, each pruned one-shot by magnitude")
        for r in population_rows(run, recipe):
            rows.append({"run": f"{recipe} population", "method": "magnitude", **r})
    return rows


def population_rows(run: Any, recipe: str) -> list[dict[str, Any]]:
    """Hooker et al.'s pruning-identified exemplars over ``POPULATION`` models of ``recipe``
    (``central`` or ``fedavg``) trained on all the run's training rows."""
    import numpy as np
    import torch

    from fedmem.methods.pies import population_sweep
    from fedmem.privacy.audit.shadows import train_central_shadows, train_fedavg_shadows
    from fedmem.seeding import derive_seed

    cfg, table = run.cfg, run.table
    masks = torch.ones(POPULATION, len(table), dtype=torch.bool)
    seed = derive_seed(cfg.seed, "pies", recipe)
    kw = {"seed": seed, "num_classes": table.num_classes}
    if recipe == "central":
        shadows = train_central_shadows(cfg, table.x, table.y_obs, masks, **kw)
    else:
        shadows = train_fedavg_shadows(cfg, table.x, table.y_obs, table.client, masks, **kw)
    models = [shadows.ensemble.model(k) for k in range(POPULATION)]
    groups = {"mislabeled": table.is_noisy, "outlier": table.is_outlier, "canary": table.is_canary}
    scores = run.rd.path / "memscores.npz"
    if scores.is_file():
        data = np.load(scores)
        key = next((k for k in ("example/mem", "client/mem") if k in data), None)
        if key is not None:
            mem = torch.from_numpy(data[key]).float()
            groups["high_mem"] = mem >= torch.nanquantile(mem, 0.9)
    out = population_sweep(
        models, table.x, groups, table.x_test, table.y_test, SPARSITIES, seed=seed
    )
    return [{**{c: r.get(c) for c in COLUMNS}, "sparsity": r["sparsity"]} for r in out]


def plot(base: ExperimentConfig, rows: list[dict[str, Any]], out_dir: Any) -> list[Any]:
    """Per run: accuracy by example kind vs sparsity, magnitude (solid) vs random (dashed)."""
    from pathlib import Path

    from fedmem.reporting.plots import xy_lines

    colors = {"test_acc": "b", "train_acc_clean": "g", "noisy_memorized": "r", "canary_acc": "m"}
    paths = []
    populations = [r for r in rows if r["run"].endswith(" population")]
    rows = [r for r in rows if not r["run"].endswith(" population")]
    if populations:
        series = {}
        for name, color in zip(dict.fromkeys(r["run"] for r in populations), "bgkm", strict=False):
            rr = [r for r in populations if r["run"] == name]
            xs = [r["sparsity"] for r in rr]
            series[f"{name}: PIE share"] = (xs, [r["pie_share"] for r in rr], f"{color}-")
            series[f"{name}: enrichment mislabeled / 10"] = (
                xs,
                [
                    None if r["enrichment_mislabeled"] is None else r["enrichment_mislabeled"] / 10
                    for r in rr
                ],
                f"{color}--",
            )
        paths.append(
            xy_lines(
                series,
                Path(out_dir) / "pies.png",
                "sparsity (share of weights removed)",
                "PIE share; mislabeled enrichment / 10",
                "pruning-identified exemplars over populations (Hooker et al.)",
            )
        )
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
