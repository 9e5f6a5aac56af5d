"""Checkpoints in a run directory: kept rounds, the resume state, and client updates.

Layout under ``<run>/checkpoints/``:

- ``<model>/round-XXXXX.pt``: the rounds ``checkpoints.rounds`` / ``checkpoints.every`` keep,
  always round 0 (the initialization) and the final round. ``{"round", "model"}`` plus, for a
  central run, ``"optimizer"`` (its momentum persists across rounds) and ``"plugins"`` (each
  training plug-in's state).
- ``<model>.pt``: the final weights (a plain state dict; what the audit and reports load).
- ``resume/<model>.pt``: everything needed to continue after the last completed round (the
  model, optimizer, plug-in and accountant state, strategy state, counters). Rewritten
  atomically after every ``checkpoints.resume_every`` rounds (default 1) and the final one; a
  run killed at any point restarts from it (and redoes the rounds after it).
- ``updates/round-XXXXX.pt`` (``checkpoints.client_updates``): each successful client's update
  ``w_client - w_global`` of that round, ``{partition_id: {key: tensor}}`` in
  ``checkpoints.update_dtype``, for unlearning baselines that replay history (FedEraser).

Every file is written to a temporary name and renamed, so a file is either whole or absent.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmem.errors import InputError

_ROUND_FILE = re.compile(r"^round-(\d+)\.pt$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_atomic(obj: Any, path: Path) -> int:
    """``torch.save`` through a temporary file and a rename; returns the file's bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.state_dict()``."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load(path: Path) -> Any:
    """A checkpoint file (tensors, numbers, strings, lists, dicts only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # a torn or foreign file
        raise InputError(
            f"checkpoint {path}: cannot be read ({type(e).__name__}); delete it, or rerun "
            "with --force to start the run afresh"
        ) from None


def _rounds_in(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _ROUND_FILE.match(p.name)))


@dataclass(frozen=True)
class KeepPolicy:
    """Which rounds' models are kept: 0 and ``final`` always, ``rounds``, every ``every``;
    and after which rounds the resume state is written: every ``resume_every`` rounds (0:
    only after the final round, so a finished model is never retrained) and the final one."""

    final: int
    rounds: frozenset[int] = frozenset()
    every: int = 0
    resume_every: int = 1

    def resumes(self, round_: int) -> bool:
        return round_ == self.final or (self.resume_every > 0 and round_ % self.resume_every == 0)

    def keeps(self, round_: int) -> bool:
        return (
            round_ in (0, self.final)
            or round_ in self.rounds
            or (self.every > 0 and round_ % self.every == 0)
        )


class ModelCheckpoints:
    """The checkpoint files of one trained model (``central``, ``federated``, ...)."""

    def __init__(self, run_dir: Path, model: str, policy: KeepPolicy):
        self.root = Path(run_dir) / "checkpoints"
        self.model, self.policy = model, policy

    @property
    def resume_path(self) -> Path:
        return self.root / "resume" / f"{self.model}.pt"

    def round_path(self, round_: int) -> Path:
        return self.root / self.model / f"round-{round_:05d}.pt"

    @property
    def final_path(self) -> Path:
        return self.root / f"{self.model}.pt"

    def save_round(self, round_: int, resume: dict[str, Any], kept_keys: tuple[str, ...]) -> None:
        """After round ``round_``: keep the round if the policy says so (``kept_keys`` of
        ``resume``: the weights, and centrally the optimizer and plug-in state), then the
        resume state (when the policy says so)."""
        if self.policy.keeps(round_):
            kept = {"round": round_, **{k: resume[k] for k in kept_keys}}
            save_atomic(kept, self.round_path(round_))
        if self.policy.resumes(round_):
            save_atomic({"round": round_, **resume}, self.resume_path)

    def save_final(self, weights: dict[str, torch.Tensor]) -> None:
        save_atomic(weights, self.final_path)

    def load_resume(self) -> dict[str, Any] | None:
        if not self.resume_path.is_file():
            return None
        return load(self.resume_path)

    def resume_round(self) -> int | None:
        """The last round of the resume state (None: no resume state)."""
        state = self.load_resume()
        return None if state is None else int(state["round"])

    def kept_bytes(self) -> int:
        return sum(self.round_path(r).stat().st_size for r in self.kept_rounds())

    def kept_rounds(self) -> list[int]:
        return _rounds_in(self.root / self.model)

    def load_round(self, round_: int) -> dict[str, Any]:
        path = self.round_path(round_)
        if not path.is_file():
            kept = ", ".join(map(str, self.kept_rounds())) or "none"
            raise InputError(
                f"{self.model}: round {round_} was not kept (kept: {kept}); set "
                "checkpoints.rounds or checkpoints.every and rerun"
            )
        return load(path)

    def drop_rounds_after(self, round_: int) -> None:
        """Remove kept rounds past ``round_`` (left by a run killed after saving them)."""
        for r in self.kept_rounds():
            if r > round_:
                self.round_path(r).unlink(missing_ok=True)


class UpdateLog:
    """Per-round client updates kept on the server (``checkpoints.client_updates``)."""

    def __init__(self, run_dir: Path, dtype: str = "float32"):
        self.root = Path(run_dir) / "checkpoints" / "updates"
        self.dtype = DTYPES[dtype]
        self.bytes: dict[int, int] = {}

    def path(self, round_: int) -> Path:
        return self.root / f"round-{round_:05d}.pt"

    def save(
        self,
        round_: int,
        start: dict[str, torch.Tensor],
        clients: dict[int, dict[str, torch.Tensor]],
    ) -> int:
        """Store ``w_client - w_start`` of every floating-point entry; returns bytes on disk."""
        updates = {
            int(pid): {
                k: (v.float() - start[k].float()).to(self.dtype)
                for k, v in state.items()
                if v.is_floating_point()
            }
            for pid, state in sorted(clients.items())
        }
        self.bytes[round_] = save_atomic(updates, self.path(round_))
        return self.bytes[round_]

    def load(self, round_: int) -> dict[int, dict[str, torch.Tensor]]:
        if not self.path(round_).is_file():
            raise InputError(
                f"client updates of round {round_} were not kept; rerun with "
                "checkpoints.client_updates=true"
            )
        return load(self.path(round_))

    def rounds(self) -> list[int]:
        return _rounds_in(self.root)

    def sizes(self) -> dict[int, int]:
        """Bytes on disk per kept round."""
        return {r: self.path(r).stat().st_size for r in self.rounds()}

    def drop_after(self, round_: int) -> None:
        for r in self.rounds():
            if r > round_:
                self.path(r).unlink(missing_ok=True)
