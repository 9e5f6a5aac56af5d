"""FedProx's proximal term as a training plug-in.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (MLSys), Eq. 2: each client
minimizes ``F_k(w) + (mu / 2) ||w - w^t||^2`` where ``w^t`` is the global model it received.
The term depends on no example, so with record-level DP its gradient ``mu (w - w^t)`` is added
after the noise and costs no privacy.

Its hyperparameter stays ``train.proximal_mu`` (where ``federation.strategy=fedprox`` also
reads it). The central run has no global model to stay close to: the plug-in is active for
federated clients only (as before plug-ins existed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmem.methods.base import BatchContext, Plugin, RoundContext

if TYPE_CHECKING:
    from fedmem.config import ExperimentConfig


def proximal_term(model: nn.Module, anchor: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (mu / 2) * ||w - w_global||^2 (Li et al. 2020, Eq. 2)."""
    sq = sum(
        ((p - a) ** 2).sum()
        for p, a in zip((p for p in model.parameters() if p.requires_grad), anchor, strict=True)
    )
    return 0.5 * mu * sq  # type: ignore[return-value]


class Proximal(Plugin):
    """``(mu / 2) ||w - w_round_start||^2`` on every step of a federated client."""

    name = "proximal"

    def __init__(self, mu: float):
        if mu <= 0:
            raise ValueError(f"proximal: mu must be > 0, got {mu}")
        self.mu = float(mu)
        self.anchor: list[torch.Tensor] = []

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, run: str) -> Proximal | None:
        if run != "federated" or cfg.train.proximal_mu <= 0:
            return None
        return cls(cfg.train.proximal_mu)

    def begin_round(
        self, ctx: RoundContext, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        self.anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        return model, optimizer

    def penalty(self, ctx: BatchContext, model: nn.Module) -> torch.Tensor:
        return proximal_term(model, self.anchor, self.mu)

    def penalty_grad_(self, ctx: BatchContext, model: nn.Module) -> None:
        with torch.no_grad():
            for p, a in zip(
                (p for p in model.parameters() if p.requires_grad), self.anchor, strict=True
            ):
                p.grad.add_(p - a, alpha=self.mu)
