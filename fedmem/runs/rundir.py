"""Run directory ``<out>/<name>-<hash8>/``: cached, reproducible, never half-complete.

Files: ``config.yaml`` (resolved config), ``metrics.jsonl`` (one row per run and round),
``summary.json``, ``checkpoints/<run>.pt`` (each run's final weights), and ``COMPLETE``,
written last. A directory without ``COMPLETE`` is an
interrupted run: it is cleared and redone. A complete one is reused unless ``force``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedmem.config import ExperimentConfig, config_hash, to_dict

COMPLETE = "COMPLETE"


def json_safe(v: Any) -> Any:
    """``v`` with NaN / infinity -> None and numpy scalars -> Python numbers (strict JSON)."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a torn file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_path(cfg: ExperimentConfig) -> Path:
    return Path(cfg.output.dir) / f"{cfg.output.name}-{config_hash(cfg)[:8]}"


class RunDir:
    """One experiment's result directory."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def complete(self) -> bool:
        return (self.path / COMPLETE).is_file()

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @classmethod
    def for_config(cls, cfg: ExperimentConfig) -> RunDir:
        return cls(run_path(cfg))

    def start(self, cfg: ExperimentConfig) -> None:
        """Begin a fresh run: clear any earlier (incomplete or forced) results, write config."""
        if self.path.exists():
            (self.path / COMPLETE).unlink(missing_ok=True)  # first: never looks complete
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.metrics_path.touch()

    def append_jsonl(self, name: str, row: dict[str, Any]) -> None:
        """Append one JSON row (flushed, so a crash loses at most the row being written)."""
        with open(self.path / name, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        self.append_jsonl("metrics.jsonl", row)

    def read_metrics(self) -> list[dict[str, Any]]:
        return self.read_jsonl("metrics.jsonl")

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        path = self.path / name
        if not path.is_file():
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2, allow_nan=False) + "\n")

    def read_summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())

    def checkpoint_path(self, run: str) -> Path:
        return self.path / "checkpoints" / f"{run}.pt"

    def save_checkpoint(self, run: str, state: dict[str, Any] | None) -> None:
        """The final weights of ``run`` (a state dict) as ``checkpoints/<run>.pt``."""
        if state is None:
            return
        path = self.checkpoint_path(run)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def load_checkpoint(self, run: str) -> dict[str, Any]:
        """The weights saved by :meth:`save_checkpoint` (FileNotFoundError if absent)."""
        return torch.load(self.checkpoint_path(run), map_location="cpu", weights_only=True)

    def finish(self) -> None:
        """Mark the run complete; call last, after every result file is written."""
        atomic_write_text(self.path / COMPLETE, "")
