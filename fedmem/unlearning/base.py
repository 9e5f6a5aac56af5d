"""What an unlearning method receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable
from fedmem.runs.rundir import RunDir


@dataclass(frozen=True)
class Request:
    """Forget ``clients`` from the finished run in ``rd``."""

    rd: RunDir
    cfg: ExperimentConfig
    table: ExampleTable
    clients: tuple[int, ...]

    @property
    def tag(self) -> str:
        """``c3`` or ``c3-7``: the clients, in derived model names."""
        return "c" + "-".join(str(c) for c in self.clients)

    def forgotten_rows(self) -> torch.Tensor:
        """(N,) bool: training rows held by the forgotten clients."""
        return torch.isin(self.table.client, torch.tensor(self.clients))


@dataclass
class Unlearned:
    """A method's result: the new global model and what it cost."""

    method: str
    state: dict[str, torch.Tensor]
    wall_s: float  # the method's own time (retrain: the federated simulation)
    rounds: int  # federated rounds it ran (communication with the remaining clients)
    storage_bytes: int = 0  # what the method needed kept during training (stored updates)
    details: dict[str, Any] = field(default_factory=dict)
