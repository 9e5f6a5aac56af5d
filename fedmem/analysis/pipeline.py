"""The memorization-score stage of an experiment (Feldman & Zhang 2020).

Trains ``analysis.memorization_scores.models`` models at once with the batched ensemble
trainer (same loop semantics as ``train.py``), each on a random subset of the training rows
(``level: example``) or of the clients (``level: client``: whole clients in or out), and derives
per-row memorization scores and Carlini et al. (2019) outlier metrics. Writes
``memscores.npz`` and ``plots/memscores_<level>.png`` into the run directory and returns the
summary that goes into ``summary.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from fedmem.analysis.memorization import client_subset_masks, memorization_report
from fedmem.analysis.trajectories import table_groups
from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable
from fedmem.ensemble import SIMULATED_PLUGINS, train_ensemble
from fedmem.models.factory import resolve_device
from fedmem.progress import counting_bar
from fedmem.runs.records import deviations, experiment_records
from fedmem.runs.rundir import json_safe
from fedmem.seeding import derive_seed, np_rng


def example_units(table: ExampleTable) -> np.ndarray:
    """(N,) the unit each row is included or left out with at the example level.

    Every row is its own unit, except that all copies of one canary form a single unit: the
    example whose memorization we measure is the canary, and a model holding any copy has
    seen it (with copies drawn independently, most "held-out" models would hold another copy
    and the score would be near 0). Units are numbered 0..U-1; without canaries unit = row.
    """
    n = len(table)
    cid = table.canary_id.numpy()
    raw = np.where(cid >= 0, n + cid, np.arange(n))
    return np.unique(raw, return_inverse=True)[1].astype(np.int64)


def _masks(cfg: ExperimentConfig, table: ExampleTable, level: str) -> torch.Tensor:
    ms = cfg.analysis.memorization_scores
    rng = np_rng(cfg.seed, "memscores", level)
    if level == "client":
        return client_subset_masks(table.client, table.num_clients, ms.models, ms.subset, rng)
    units = example_units(table)
    return client_subset_masks(units, int(units.max()) + 1, ms.models, ms.subset, rng)


def memorization_scores_stage(
    cfg: ExperimentConfig, table: ExampleTable, run_dir: Path, console: Console
) -> dict[str, Any]:
    """Run the stage for every configured level; returns ``{level: summary}``."""
    from fedmem.reporting import plots

    ms = cfg.analysis.memorization_scores
    levels = ["example", "client"] if ms.level == "both" else [ms.level]
    epochs = ms.epochs or cfg.train.rounds * cfg.train.local_epochs
    device = resolve_device(cfg.train.device)
    x, y = table.x.to(device), table.y_obs.to(device)
    groups = table_groups(table)
    arrays: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {}
    for level in levels:
        masks = _masks(cfg, table, level)
        t0 = time.perf_counter()
        with counting_bar(console, f"ensemble ({level})") as progress:
            task = progress.add_task("", total=ms.models * epochs)
            ensemble = train_ensemble(
                cfg.model,
                cfg.train,
                table.input_shape,
                table.num_classes,
                x,
                y,
                masks.to(device),
                epochs=epochs,
                seed=derive_seed(cfg.seed, "memscores", level),
                progress=lambda done, t=task: progress.update(t, completed=done),
            )
        train_s = time.perf_counter() - t0
        logits = ensemble.logits(x, cfg.train.eval_batch_size).cpu()
        rep = memorization_report(logits, table.y_obs, masks, groups)
        for name, values in rep["per_row"].items():
            arrays[f"{level}/{name}"] = np.asarray(values)
        arrays[f"{level}/masks"] = masks.numpy()
        hist = plots.score_histograms(
            rep["per_row"]["mem"],
            {k: v.numpy().astype(bool) for k, v in groups.items()},
            run_dir / "plots" / f"memscores_{level}.png",
            f"Feldman-Zhang memorization scores ({level} level, K={ms.models})",
        )
        s = rep["summary"]
        out[level] = json_safe(
            {
                "models": ms.models,
                "subset": ms.subset,
                "epochs": epochs,
                "train_s": round(train_s, 2),
                "auc_mislabeled_vs_clean": s.get("auc_mislabeled_vs_clean"),
                "auc_vs_clean": s.get("auc_vs_clean"),
                "mean_mem": s.get("mem_mean"),
                "spearman_mem_confidence": s.get("spearman_mem_confidence"),
                "spearman_mem_agreement": s.get("spearman_mem_agreement"),
                "histogram": str(hist.relative_to(run_dir)),
                # the ensemble trains like the central run, minus what it cannot simulate
                "not_simulated": deviations(
                    experiment_records(cfg)["central"], "central", SIMULATED_PLUGINS
                ),
            }
        )
        console.print(
            f"memorization scores ({level}): AUC mislabeled vs clean "
            f"{out[level]['auc_mislabeled_vs_clean']}, {train_s:.1f} s for {ms.models} models"
        )
    tmp = run_dir / ".memscores.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(run_dir / "memscores.npz")
    return out
