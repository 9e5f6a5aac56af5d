"""Matplotlib figures of a run directory (PNG files under ``plots/``).

Each function takes plain data (metrics rows, gradient rows, score arrays), draws one figure,
saves it and returns its path; none of them trains or evaluates anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

TRAINER_STYLE = {"central": "-", "federated": "--"}  # line style by how a model was trained
CURVES = (
    ("test_acc", "test accuracy", "tab:blue"),
    ("noisy_true_acc", "mislabeled: predicted true label", "tab:green"),
    ("noisy_memorized", "mislabeled: predicted given (wrong) label", "tab:red"),
)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curves(
    rows: list[dict[str, Any]],
    path: Path,
    title: str = "",
    trainers: dict[str, str] | None = None,
) -> Path:
    """Test accuracy, noisy_true_acc and noisy_memorized over rounds of every model with
    metrics rows, on one axis (Liu et al. 2020, Fig. 1 style). Line style by how the model
    was trained (``trainers``: model -> its lineage record's trainer): central solid,
    federated dashed; a model derived from another (a record with a parent) dotted."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    trainers = trainers or {}
    for run in dict.fromkeys(r["run"] for r in rows):
        rr = [r for r in rows if r["run"] == run]
        style = TRAINER_STYLE.get(trainers.get(run, run), ":")
        rounds = [r["round"] for r in rr]
        for key, label, color in CURVES:
            ys = [np.nan if r.get(key) is None else r[key] for r in rr]
            if np.all(np.isnan(ys)):
                continue
            ax.plot(rounds, ys, style, color=color, label=f"{run}: {label}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (central: same example visits as a federated round)")
    ax.set_ylabel("share")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "early learning, then memorization: central vs federated")
    return _save(fig, path)


def gradient_heatmap(grad_rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Layer x round heatmap of cos(g_clean, g_mislabeled) (Maini et al. 2023, Fig. 2),
    one panel per run."""
    runs = list(
        dict.fromkeys(g["run"] for g in grad_rows if g.get("kind", "examples") == "examples")
    )
    if not runs:
        return None
    fig, axes = plt.subplots(
        1, len(runs), figsize=(5.5 * len(runs) + 1, 3.8), squeeze=False, layout="constrained"
    )
    image = None
    for ax, run in zip(axes[0], runs, strict=True):
        gr = [
            g
            for g in grad_rows
            if g["run"] == run
            and g.get("kind", "examples") == "examples"
            and g.get("cos") is not None
        ]
        layers = list(dict.fromkeys(g["layer"] for g in gr))
        rounds = sorted({g["round"] for g in gr})
        grid = np.full((len(layers), len(rounds)), np.nan)
        for g in gr:
            grid[layers.index(g["layer"]), rounds.index(g["round"])] = g["cos"]
        image = ax.imshow(
            grid, aspect="auto", cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest"
        )
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        step = max(1, len(rounds) // 10)
        ax.set_xticks(range(0, len(rounds), step), [rounds[i] for i in range(0, len(rounds), step)])
        ax.set_xlabel("round")
        ax.set_title(f"{run}: cos(grad clean, grad mislabeled)", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


LABEL_PARTS = (  # (field prefix, what it is, line style)
    ("dep", "label-dependent", "-"),
    ("indep", "label-independent", "--"),
)
GROUP_COLOR = {"clean": "tab:blue", "noisy": "tab:red"}


def _label_parts_panel(
    ax: plt.Axes, rows: list[dict[str, Any]], run: str, layer: str, stat: str
) -> None:
    """Both parts of both groups of one run and layer over rounds (``<part>_<stat>`` fields)."""
    for group, color in GROUP_COLOR.items():
        gr = [g for g in rows if (g["run"], g["layer"], g["group"]) == (run, layer, group)]
        gr.sort(key=lambda g: g["round"])
        for part, label, style in LABEL_PARTS:
            ys = [np.nan if g.get(f"{part}_{stat}") is None else g[f"{part}_{stat}"] for g in gr]
            ax.plot([g["round"] for g in gr], ys, style, color=color, label=f"{group}: {label}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)


def label_parts_curves(grad_rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Label-dependent and label-independent gradient parts over rounds, clean vs mislabeled,
    one column per layer (Stephenson et al. 2021, Fig. A.1). Per run, two rows: the norm of
    the group's mean part (the paper's quantity) and the mean per-example norm, both divided
    by sqrt(#params). From rows of ``kind: label_parts``; None without any."""
    rows = [g for g in grad_rows if g.get("kind") == "label_parts"]
    if not rows:
        return None
    runs = list(dict.fromkeys(g["run"] for g in rows))
    layers = list(dict.fromkeys(g["layer"] for g in rows))
    stats = (("norm_of_mean", "norm of mean part"), ("norm", "mean per-example norm"))
    panels = [(run, stat, what) for run in runs for stat, what in stats]
    fig, axes = plt.subplots(
        len(panels),
        len(layers),
        figsize=(3.3 * len(layers) + 0.5, 2.5 * len(panels)),
        squeeze=False,
    )
    for (run, stat, what), axrow in zip(panels, axes, strict=True):
        for layer, ax in zip(layers, axrow, strict=True):
            _label_parts_panel(ax, rows, run, layer, stat)
            ax.set_title(f"{run}, {layer}: {what}", fontsize=8)
    axes[-1][0].set_xlabel("round")
    axes[0][0].legend(fontsize=6, loc="best")
    return _save(fig, path)


def score_histograms(
    scores: np.ndarray, groups: dict[str, np.ndarray], path: Path, title: str
) -> Path:
    """Histograms of per-example scores (e.g. Feldman-Zhang memorization) by example kind."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(
        np.nanmin(scores) if np.isfinite(scores).any() else -1,
        np.nanmax(scores) if np.isfinite(scores).any() else 1,
        41,
    )
    for name, mask in groups.items():
        vals = scores[mask & np.isfinite(scores)]
        if len(vals):
            ax.hist(vals, bins=bins, alpha=0.5, density=True, label=f"{name} (n={len(vals)})")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """Membership-inference ROC curves on log-log axes (Carlini et al. 2022, Fig. 1 style):
    the low false-positive region, where an attack is confident, is what matters."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo = 1.0
    for label, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
        if len(fpr) == 0:
            continue
        positive = fpr[fpr > 0]
        if len(positive):
            lo = min(lo, float(positive.min()))
        ax.plot(fpr, tpr, label=label)
    lo = max(lo / 2, 1e-5)
    ax.plot([lo, 1], [lo, 1], ":", color="gray", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    return _save(fig, path)


def exposure_bars(
    by_run: dict[str, dict[str, float | None]], max_possible: float, path: Path
) -> Path:
    """Mean canary exposure (Carlini et al. 2019) per canary group, one bar per run (e.g.
    central vs federated: Thakkar et al. 2020 compare them), with the largest exposure the
    reference set allows as a dotted line."""
    groups = list(dict.fromkeys(g for means in by_run.values() for g in means))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) + 2), 4))
    width = 0.8 / max(len(by_run), 1)
    xs = np.arange(len(groups))
    for i, (run, means) in enumerate(by_run.items()):
        vals = [np.nan if means.get(g) is None else means[g] for g in groups]
        ax.bar(xs + i * width - 0.4 + width / 2, vals, width, label=run)
    ax.axhline(max_possible, ls=":", color="gray", label="log2(|R| + 1)")
    ax.set_xticks(xs, groups, fontsize=8)
    ax.set_ylabel("mean exposure (bits)")
    ax.legend(fontsize=8)
    ax.set_title("canary exposure by insertion count and holders")
    return _save(fig, path)


def xy_lines(
    series: dict[str, tuple[list[float], list[float | None], str]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> Path:
    """One line per series ``{label: (xs, ys, matplotlib format)}`` (None: a gap)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, (xs, ys, fmt) in series.items():
        ax.plot(xs, [np.nan if y is None else y for y in ys], fmt, label=label, marker="o")
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title)
    return _save(fig, path)
