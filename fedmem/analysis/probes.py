"""Observer probes: what the analysis measures after every round, and the run-level summary.

- :class:`TrajectoryProbe` keeps per-example loss / correctness / margin (``examples.npz``).
- :class:`GradientProbe` measures the per-layer clean-vs-mislabeled gradient geometry
  (Maini et al. 2023) on a fixed seeded subsample, writing rows to ``gradients.jsonl``.
- :class:`LabelGradientProbe` measures the label-dependent and label-independent gradient
  parts (Stephenson et al. 2021) of equal-size clean and mislabeled samples, writing rows of
  ``kind: label_parts`` to ``gradients.jsonl``.
- :func:`trajectory_summary` turns a run's trajectories and metrics rows into onsets, learning
  times and forgetting events per example kind (and per client for federated runs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmem.analysis.gradients import gradient_geometry
from fedmem.analysis.label_gradient import equal_samples, label_gradient_stats
from fedmem.analysis.tracking import TrajectoryRecorder
from fedmem.analysis.trajectories import (
    early_learning_onset,
    forgetting_events,
    group_summary,
    learning_time,
    memorization_onset,
    per_client_onsets,
    table_groups,
)
from fedmem.config import ExperimentConfig, GradientGeometryConfig, LabelGradientConfig
from fedmem.data.table import ExampleTable
from fedmem.runs.checkpoints import save_atomic
from fedmem.seeding import np_rng


class TrajectoryProbe:
    """Records :func:`~fedmem.analysis.tracking.example_stats` of every round.

    With ``spill_dir`` each round's statistics are also written to ``round-XXXXX.pt`` there
    (about 10 bytes per example), so a resumed run reloads the rounds it had
    (:meth:`restore`) instead of rewriting the whole history after every round.
    """

    def __init__(self, table: ExampleTable, spill_dir: Path | None = None):
        self.table = table
        self.recorder = TrajectoryRecorder()
        self.spill_dir = spill_dir

    def _path(self, round_: int) -> Path:
        return self.spill_dir / f"round-{round_:05d}.pt"  # type: ignore[operator]

    def __call__(self, round_: int, model: nn.Module, train_logits: torch.Tensor) -> None:
        stats = self.recorder.record(round_, train_logits, self.table.y_obs, self.table.y_true)
        if self.spill_dir is not None:
            save_atomic(stats, self._path(round_))

    def restore(self, last_round: int) -> None:
        """Reload the spilled rounds ``<= last_round`` (in order); drop later ones."""
        if self.spill_dir is None or not self.spill_dir.is_dir():
            return
        for path in sorted(self.spill_dir.glob("round-*.pt")):
            r = int(path.stem.split("-")[1])
            if r <= last_round:
                self.recorder.add(r, torch.load(path, map_location="cpu", weights_only=True))
            else:
                path.unlink()


class GradientProbe:
    """Clean-vs-mislabeled gradient geometry per layer every ``cfg.every`` rounds.

    Uses at most ``cfg.max_examples`` clean and as many mislabeled rows, chosen once with the
    seed, so every round (and both runs) measure the same examples. The norms are of mean
    gradients (:func:`~fedmem.analysis.gradients.gradient_geometry`), so the cap does not
    scale them; rows also carry each group's size in the table (``population_clean``,
    ``population_noisy``), which the summed gradients Maini et al. (2023) plot grow with.
    """

    def __init__(
        self,
        table: ExampleTable,
        cfg: GradientGeometryConfig,
        seed: int,
        run: str,
        sink: Callable[[dict[str, Any]], None],
        batch_size: int = 1024,
    ):
        rng = np_rng(seed, "gradient-subsample")
        picked = []
        self.population = {"population_clean": int(table.is_clean.sum())}
        self.population["population_noisy"] = int(table.is_noisy.sum())
        for mask in (table.is_clean, table.is_noisy):
            rows = torch.nonzero(mask).flatten().numpy()
            if len(rows) > cfg.max_examples:
                rows = np.sort(rng.choice(rows, size=cfg.max_examples, replace=False))
            picked.append(torch.from_numpy(rows))
        self.rows = torch.cat(picked)
        self.x, self.y = table.x[self.rows], table.y_obs[self.rows]
        self.is_noisy = table.is_noisy[self.rows]
        self.cfg, self.run, self.sink, self.batch_size = cfg, run, sink, batch_size

    def __call__(self, round_: int, model: nn.Module, train_logits: torch.Tensor) -> None:
        if round_ % self.cfg.every != 0 or not bool(self.is_noisy.any()):
            return None
        geo = gradient_geometry(model, self.x, self.y, self.is_noisy, self.batch_size)
        for layer, values in geo.items():
            self.sink(
                {
                    "run": self.run,
                    "round": round_,
                    "kind": "examples",
                    "layer": layer,
                    **values,
                    **self.population,
                }
            )
        return None


class LabelGradientProbe:
    """Label-dependent vs label-independent gradient parts per layer every ``cfg.every``
    rounds (:func:`~fedmem.analysis.label_gradient.label_gradient_stats`).

    Clean (``table.is_clean``) and mislabeled rows are sampled once with the seed, the same
    number of each (:func:`~fedmem.analysis.label_gradient.equal_samples`, at most
    ``cfg.max_examples``), so every round and both runs measure the same examples. One row per
    round, layer and group (``group``: ``clean`` / ``noisy``) with ``kind: label_parts``.
    """

    def __init__(
        self,
        table: ExampleTable,
        cfg: LabelGradientConfig,
        seed: int,
        run: str,
        sink: Callable[[dict[str, Any]], None],
    ):
        rng = np_rng(seed, "label-gradient-subsample")
        clean, noisy = equal_samples([table.is_clean, table.is_noisy], cfg.max_examples, rng)
        self.samples = {"clean": clean, "noisy": noisy}
        self.population = {"clean": int(table.is_clean.sum()), "noisy": int(table.is_noisy.sum())}
        self.table, self.cfg, self.run, self.sink = table, cfg, run, sink

    def __call__(self, round_: int, model: nn.Module, train_logits: torch.Tensor) -> None:
        if round_ % self.cfg.every != 0 or len(self.samples["noisy"]) == 0:
            return None
        for group, rows in self.samples.items():
            stats = label_gradient_stats(model, self.table.x[rows], self.table.y_obs[rows])
            for layer, values in stats.items():
                self.sink(
                    {
                        "run": self.run,
                        "round": round_,
                        "kind": "label_parts",
                        "layer": layer,
                        "group": group,
                        **values,
                        "population": self.population[group],
                    }
                )
        return None


def label_probes(
    cfg: ExperimentConfig, table: ExampleTable, run: str, sink: Callable[[dict[str, Any]], None]
) -> list[LabelGradientProbe]:
    """``[LabelGradientProbe]`` for ``run`` when ``analysis.label_gradient`` is enabled, else
    ``[]`` (what :func:`fedmem.runs.experiment.run_experiment` adds to an observer)."""
    lg = cfg.analysis.label_gradient
    return [LabelGradientProbe(table, lg, cfg.seed, run, sink)] if lg.enabled else []


def trajectory_summary(
    arrays: dict[str, np.ndarray],
    rows: list[dict[str, Any]],
    table: ExampleTable,
    share: float,
    per_client: bool,
) -> dict[str, Any]:
    """Onsets (Liu et al. 2020), learning time and forgetting events (Toneva et al. 2019)."""
    rounds = arrays["rounds"]
    correct = arrays["correct_obs"]
    lt = learning_time(correct, rounds)
    fg = forgetting_events(correct)
    out: dict[str, Any] = {
        "early_learning_onset": early_learning_onset(
            [r["noisy_true_acc"] for r in rows], [r["round"] for r in rows]
        ),
        "memorization_onset": memorization_onset(
            [r["noisy_memorized"] for r in rows], [r["round"] for r in rows], share
        ),
        "groups": group_summary(lt, fg, table_groups(table)),
    }
    if per_client:
        onsets = per_client_onsets(
            correct, arrays["correct_true"], table.is_noisy, table.client, rounds, share
        )
        out["per_client"] = {str(k): v for k, v in sorted(onsets.items())}
    return out
