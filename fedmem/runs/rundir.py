"""Run directory ``<out>/<name>-<hash8>/``: cached, reproducible, never half-complete.

Files: ``config.yaml`` (resolved config), ``metrics.jsonl`` (one row per run and round),
``summary.json``, ``checkpoints/`` (:mod:`fedmem.runs.checkpoints`), and ``COMPLETE``,
written last. A directory without ``COMPLETE`` is an interrupted run: :meth:`RunDir.begin`
continues it from its resume states (dropping what the killed process wrote after them), or,
without any, clears it and starts afresh. A complete one is reused unless ``force``.
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
from fedmem.errors import InputError
from fedmem.runs.checkpoints import ModelCheckpoints, UpdateLog

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


def check_output_dir(cfg: ExperimentConfig, create: bool = False) -> None:
    """A one-line :class:`InputError` unless ``output.dir`` (``--out``) is a folder this
    process can write run directories in.

    ``create=False`` writes nothing lasting: no path on the way may be a file, the nearest
    existing folder must be writable, and an existing ``output.dir`` must take a temporary
    file (removed at once; this also catches read-only file systems). ``create=True`` also
    creates ``output.dir``."""
    out, key = Path(cfg.output.dir), "output.dir (--out)"
    for path in (out, run_path(cfg)):
        if path.exists() and not path.is_dir():
            raise InputError(f"{key}: {path} is a file, not a folder; choose another --out")
    existing = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise InputError(f"{key}: {existing} is a file, not a folder; choose another --out")
    try:
        if create:
            out.mkdir(parents=True, exist_ok=True)
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
        if out.is_dir():
            fd, tmp = tempfile.mkstemp(dir=out, prefix=".fedmem-write-test.")
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        raise InputError(
            f"{key}: cannot write in {out} ({e.strerror or type(e).__name__}); choose a "
            "writable folder"
        ) from None


def read_summary(run_dir: Path) -> dict[str, Any]:
    """``run_dir/summary.json`` (a dict with ``runs``), or a one-line :class:`InputError`
    naming the file and the fix (rerun the simulation with ``--force``)."""
    path = Path(run_dir) / "summary.json"
    fix = "rerun python -m fedmem.simulate with --force (same config) to rewrite it"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable ({type(e).__name__}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise InputError(f"{path}: not a fedmem summary (no 'runs' section); {fix}")
    return data


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

    @property
    def partial_dir(self) -> Path:
        """Working files of an unfinished run (per-round trajectories), removed at the end."""
        return self.path / ".partial"

    def clear(self) -> None:
        """Empty the directory (``COMPLETE`` first, so it never looks complete meanwhile).

        The directory itself stays: it carries the run's lock (:mod:`fedmem.runs.lock`)."""
        if not self.path.is_dir():
            return
        (self.path / COMPLETE).unlink(missing_ok=True)
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def begin(
        self, cfg: ExperimentConfig, checkpoints: dict[str, ModelCheckpoints], rounds: int
    ) -> dict[str, int]:
        """Start afresh, or continue an interrupted run of the same config.

        Models are trained in the order of ``checkpoints``. Each one that has a resume state
        continues from it (``{model: last completed round}`` is returned; ``rounds`` means
        finished); rows, kept checkpoints and client updates written after those rounds (by
        the killed process) are dropped so the resumed run appends exactly what an
        uninterrupted one would have. Without any resume state the directory is cleared and
        started afresh.
        """
        states: dict[str, int] = {}
        if self._same_config(cfg):
            for model, ckpt in checkpoints.items():
                r = ckpt.resume_round()
                if r is None:
                    break
                states[model] = r
                if r < rounds:
                    break
        if not states:
            self.start(cfg)
            return {}

        def keep(row: dict[str, Any], default_run: str) -> bool:
            run = row.get("run", default_run)
            return run in states and int(row["round"]) <= states[run]

        for name, default_run in (
            ("metrics.jsonl", ""),
            ("gradients.jsonl", ""),
            ("clients.jsonl", "federated"),
        ):
            self._truncate_jsonl(name, lambda row, d=default_run: keep(row, d))
        for tmp in self.path.rglob(".*.tmp"):  # files the killed process was writing
            tmp.unlink(missing_ok=True)
        for model, ckpt in checkpoints.items():
            ckpt.drop_rounds_after(states.get(model, -1))
        UpdateLog(self.path).drop_after(states.get("federated", -1))
        for path in self.path.glob("client_state/client-*/round-*.pt"):
            if int(path.stem.split("-")[1]) > states.get("federated", -1):
                path.unlink()  # a client's state from a round the server will redo
        return states

    def _same_config(self, cfg: ExperimentConfig) -> bool:
        path = self.path / "config.yaml"
        if self.complete or not path.is_file():
            return False
        try:
            return yaml.safe_load(path.read_text()) == to_dict(cfg)
        except yaml.YAMLError:
            return False

    def _truncate_jsonl(self, name: str, keep: Any) -> None:
        """Rewrite ``name`` with the rows ``keep`` accepts; a torn last line is dropped."""
        path = self.path / name
        if not path.is_file():
            return
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the line a killed process was writing
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows if keep(r))
        atomic_write_text(path, text)

    def start(self, cfg: ExperimentConfig) -> None:
        """Begin a fresh run: clear any earlier (incomplete or forced) results, write config."""
        self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.metrics_path.touch()

    def append_jsonl(self, name: str, row: dict[str, Any]) -> None:
        """Append one JSON row (flushed, so a crash loses at most the row being written);
        NaN / infinity (a diverged model's numbers) are written as null (:func:`json_safe`)."""
        with open(self.path / name, "a") as f:
            f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")

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
        """Write ``data`` as strict JSON (NaN / infinity as null, :func:`json_safe`)."""
        text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
        atomic_write_text(self.path / name, text)

    def read_config(self) -> ExperimentConfig:
        """The run's resolved config (``config.yaml``)."""
        from fedmem.config import build

        return build(yaml.safe_load((self.path / "config.yaml").read_text()))

    def read_summary(self) -> dict[str, Any]:
        """``summary.json``; a missing or unreadable one is a one-line :class:`InputError`."""
        return read_summary(self.path)

    def checkpoint_path(self, run: str) -> Path:
        return self.path / "checkpoints" / f"{run}.pt"

    def load_checkpoint(self, run: str) -> dict[str, Any]:
        """The final weights of model ``run`` (FileNotFoundError if absent)."""
        return torch.load(self.checkpoint_path(run), map_location="cpu", weights_only=True)

    def finish(self, keep_client_state: bool = False) -> None:
        """Mark the run complete; call last, after every result file is written. Working
        files that only served a resume (resume states, client state files, per-round
        trajectories) are removed first. ``keep_client_state``: the clients' state files stay
        (they hold what a client needs later, e.g. its unlearning generator: the files stand
        for the client's own device)."""
        leftovers = [self.partial_dir, self.path / "checkpoints" / "resume"]
        if not keep_client_state:
            leftovers.append(self.path / "client_state")
        for leftover in leftovers:
            shutil.rmtree(leftover, ignore_errors=True)
        atomic_write_text(self.path / COMPLETE, "")
