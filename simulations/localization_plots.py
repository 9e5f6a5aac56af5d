"""Figures of the localization recipe (:mod:`simulations.localization`): units needed per
example kind, layers of the flipping units, layer rewinding, layer retraining, and the tied
dropout variants, per run. Reads the recipe's rows (and ``flips.json`` next to the table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]


def plot(base: Any, rows: list[Row], out_dir: Any) -> list[Any]:
    """Units needed per example kind (histograms), the layers of the zeroed units, accuracy
    after rewinding each layer group, mislabeled accuracy while retraining, and the tied
    dropout variants (all units / drop mode), per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    runs = list(dict.fromkeys(r["run"] for r in rows))
    paths = []

    def save(fig: Any, name: str) -> Path:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return out / name

    flips_path = out / "flips.json"
    if flips_path.is_file():
        flips = json.loads(flips_path.read_text())
        fig, axes = plt.subplots(1, len(flips), figsize=(5 * len(flips), 3.8), squeeze=False)
        for ax, (run, kinds) in zip(axes[0], flips.items(), strict=True):
            top = max([u for k in kinds.values() for u in k["units"] if u is not None] or [1])
            bins = np.arange(0.5, top + 1.5)
            for kind, k in kinds.items():
                units = [u for u in k["units"] if u is not None]
                if units:
                    label = f"{kind} ({len(units)}/{len(k['units'])} flipped)"
                    ax.hist(units, bins=bins, alpha=0.5, label=label)
            ax.set_xlabel("units zeroed until the prediction flips")
            ax.set_ylabel("examples")
            ax.set_title(f"neuron flipping: {run} model")
            ax.legend(fontsize=7)
        paths.append(save(fig, "units_needed.png"))

    def bars(ax: Any, groups: list[str], series: dict[str, list[Any]], ylabel: str) -> None:
        width = 0.8 / max(len(series), 1)
        xs = np.arange(len(groups))
        for i, (label, vals) in enumerate(series.items()):
            ys = [np.nan if v is None else v for v in vals]
            ax.bar(xs + (i + 0.5) * width - 0.4, ys, width, label=label)
        ax.set_xticks(xs, groups, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        rr = [r for r in rows if r["section"] == "flip-layer" and r["run"] == run]
        layers = list(dict.fromkeys(r["layer"] for r in rr))
        kinds = list(dict.fromkeys(r["setting"] for r in rr))
        share = {(r["setting"], r["layer"]): r["unit_share"] for r in rr}
        series = {k: [share[k, lay] for lay in layers] for k in kinds}
        bars(ax, layers, series, "share of the zeroed units")
        ax.set_title(f"layers of the flipping units: {run}")
    paths.append(save(fig, "layer_share.png"))

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        rr = [r for r in rows if r["section"] == "rewind" and r["run"] == run]
        groups = ["none", *dict.fromkeys(r["layer"] for r in rr if r["layer"] != "none")]
        series = {}
        for setting in dict.fromkeys(r["setting"] for r in rr if r["setting"] != "final"):
            for key, short in (("train_acc_clean", "clean"), ("noisy_memorized", "mislabeled")):
                vals = []
                for g in groups:
                    match = [
                        r for r in rr if r["layer"] == g and r["setting"] in (setting, "final")
                    ]
                    vals.append(match[0][key] if match else None)
                series[f"{short}, {setting}"] = vals
        bars(ax, groups, series, "training accuracy (given labels)")
        ax.set_title(f"layer rewinding: {run} model")
    paths.append(save(fig, "rewinding.png"))

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        rr = [r for r in rows if r["section"] == "retrain" and r["run"] == run]
        for g in dict.fromkeys(r["layer"] for r in rr):
            pts = [(int(r["setting"].split()[1]), r) for r in rr if r["layer"] == g]
            xs = [e for e, _ in pts]
            ax.plot(xs, [r["noisy_memorized"] for _, r in pts], "-o", label=f"{g}: mislabeled")
            ax.plot(xs, [r["train_acc_clean"] for _, r in pts], ":", label=f"{g}: clean")
        ax.set_xlabel("epochs retrained on clean examples")
        ax.set_ylabel("training accuracy (given labels)")
        ax.set_title(f"layer retraining: {run} model")
        ax.legend(fontsize=7)
    paths.append(save(fig, "retraining.png"))

    tied_rows = [r for r in rows if r["section"] == "tied"]
    if tied_rows:
        fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.8), squeeze=False)
        for ax, run in zip(axes[0], runs, strict=True):
            rr = [r for r in tied_rows if r["run"] == run]
            series = {
                label: [r[key] for r in rr]
                for key, label in (
                    ("train_acc_clean", "clean train acc"),
                    ("noisy_memorized", "mislabeled: given label"),
                    ("test_acc", "test acc"),
                )
            }
            bars(ax, [r["setting"] for r in rr], series, "accuracy")
            ax.tick_params(axis="x", labelrotation=30)
            ax.set_title(f"example-tied dropout and baselines: {run}")
        paths.append(save(fig, "tied_dropout.png"))
    return paths
