"""Per-round, per-example statistics and their storage (``examples.npz``).

After every round the observer has the global model's logits on the whole training table.
:func:`example_stats` turns them into four per-example numbers; :class:`TrajectoryRecorder`
stacks them into ``(rounds, examples)`` trajectories, from which
:mod:`fedmem.analysis.trajectories` derives learning times, forgetting events and onsets.

- ``correct_obs`` / ``correct_true``: the per-example accuracy events of Toneva et al. 2019,
  "An Empirical Study of Example Forgetting during Deep Neural Network Learning" (ICLR), Sec. 2,
  on the observed label and, for mislabeled examples, on the true label (the early-learning vs
  memorization split of Liu et al. 2020, ELR, Fig. 1).
- ``margin``: the logit margin of Pleiss et al. 2020, "Identifying Mislabeled Data using the
  Area Under the Margin Ranking" (NeurIPS), Eq. 1, ``M_t(x, y) = z_y - max_{i != y} z_i`` with
  ``y`` the observed label. AUM is its mean over training (``trajectories['margin'].mean(0)``).
- ``loss``: cross-entropy on the observed label, the per-example loss curves of Arpit et al. 2017.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

STAT_NAMES = ("loss", "correct_obs", "correct_true", "margin")


def example_stats(
    logits: torch.Tensor, y_obs: torch.Tensor, y_true: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-example loss, correctness and margin of ``logits`` (N, C).

    Returns (all shape ``(N,)``, on the CPU):

    - ``loss`` (float32): ``CE(logits_i, y_obs_i)``.
    - ``correct_obs`` (bool): ``argmax_c logits_ic == y_obs_i`` (Toneva et al. 2019, Sec. 2).
    - ``correct_true`` (bool): ``argmax_c logits_ic == y_true_i``.
    - ``margin`` (float32): ``z_{y_obs} - max_{c != y_obs} z_c`` (Pleiss et al. 2020, Eq. 1);
      positive iff the observed label is the unique argmax. ``+inf`` for a single class.
    """
    logits = logits.detach().float().cpu()
    y_obs = y_obs.long().cpu()
    y_true = y_true.long().cpu()
    pred = logits.argmax(1)
    assigned = logits.gather(1, y_obs[:, None]).squeeze(1)
    others = logits.scatter(1, y_obs[:, None], float("-inf"))
    return {
        "loss": F.cross_entropy(logits, y_obs, reduction="none"),
        "correct_obs": pred == y_obs,
        "correct_true": pred == y_true,
        "margin": assigned - others.max(1).values,
    }


class TrajectoryRecorder:
    """Accumulates :func:`example_stats` round by round; :meth:`to_arrays` stacks them.

    Usage::

        rec = TrajectoryRecorder()
        rec.record(r, logits, table.y_obs, table.y_true)  # after every round r
        rec.to_arrays()["correct_obs"].shape              # (R, N)
    """

    def __init__(self) -> None:
        self.rounds: list[int] = []
        self._stats: dict[str, list[torch.Tensor]] = {name: [] for name in STAT_NAMES}

    def __len__(self) -> int:
        return len(self.rounds)

    def add(self, round_: int, stats: Mapping[str, torch.Tensor]) -> None:
        """Append one round of precomputed :func:`example_stats`."""
        if set(stats) != set(STAT_NAMES):
            raise ValueError(f"stats must have keys {STAT_NAMES}, got {sorted(stats)}")
        n = {len(v) for v in stats.values()}
        if self.rounds:
            n.add(len(self._stats["loss"][0]))
        if len(n) != 1:
            raise ValueError(f"every round must cover the same examples; got lengths {sorted(n)}")
        self.rounds.append(int(round_))
        for name in STAT_NAMES:
            self._stats[name].append(stats[name].detach().cpu())

    def record(
        self, round_: int, logits: torch.Tensor, y_obs: torch.Tensor, y_true: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Compute :func:`example_stats` for ``round_``, append and return them."""
        stats = example_stats(logits, y_obs, y_true)
        self.add(round_, stats)
        return stats

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"rounds": (R,) int64, "loss"/"margin": (R, N) float32, "correct_*": (R, N) bool}``.

        With no round recorded, every array has ``R = N = 0``.
        """
        out: dict[str, np.ndarray] = {"rounds": np.asarray(self.rounds, dtype=np.int64)}
        for name in STAT_NAMES:
            dtype = np.bool_ if name.startswith("correct") else np.float32
            rows = self._stats[name]
            out[name] = (
                torch.stack(rows).numpy().astype(dtype, copy=False)
                if rows
                else np.zeros((0, 0), dtype=dtype)
            )
        return out


def save_trajectories(path: str | Path, runs: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Write ``{run: {name: array}}`` to ONE ``.npz`` with keys ``"<run>/<name>"``.

    E.g. ``central/loss``, ``federated/correct_obs``. The write is atomic (a temporary file in
    the same directory, then ``os.replace``): readers see the old file or the new one.
    """
    arrays: dict[str, np.ndarray] = {}
    for run, stats in runs.items():
        if not run or "/" in run:
            raise ValueError(f"run names must be non-empty and contain no '/', got {run!r}")
        for name, value in stats.items():
            arrays[f"{run}/{name}"] = np.asarray(value)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_trajectories(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of :func:`save_trajectories`: ``{run: {name: array}}``."""
    runs: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            run, _, name = key.partition("/")
            runs.setdefault(run, {})[name] = z[key]
    return runs
