"""Early-learning regularization (ELR) as a training plug-in.

Liu, Niles-Weed, Razavian & Fernandez-Granda 2020, "Early-Learning Regularization Prevents
Memorization of Noisy Labels" (NeurIPS), Eq. 6-7 and the reference code
(shengliu66/ELR, ``model/loss.py``). Every training example i keeps a target ``t_i``, a
running average of the model's predictions on it; the loss adds

    lambda * log(1 - <p_i, t_i>)                                  (Eq. 6)

to the cross-entropy, with ``p_i`` the softmax output clamped to ``[1e-4, 1 - 1e-4]`` and the
targets updated before the term is computed, for the examples of the batch only:

    t_i <- beta * t_i + (1 - beta) * p_i / sum(p_i)   (p detached; Eq. 7, "temporal ensembling")

Targets start at zero (as in the reference code). Minimizing the term pushes ``p_i`` towards
``t_i``, which early in training follows the *true* class of a mislabeled example (the early
learning phase), so it counters the later pull of the wrong label.

Federated: each client keeps the targets of its own examples in its plug-in state (Flower
``context.state`` and the client's state file), never in a message to the server; a client not
sampled in a round keeps its targets unchanged. Targets are keyed by the example's table row, so
a client's state is valid only for its own partition (checked).

Record-level DP: the term is returned per example, so DP-SGD clips it with the example's
cross-entropy gradient. It spends no extra privacy: ``t_i`` is a function of example i's own
data and of the model iterates, which DP-SGD's analysis already treats as released, so each
step's gradient is still a sum of per-example terms of which removing example i removes exactly
its own clipped one. The targets themselves are never released (they would leak: they are
the model's past predictions on the private examples).

Noise convention: the reference code's symmetric noise draws the new label uniformly among all
classes *including* the true one, so its "40%" flips 0.4 * 9/10 = 36% of labels on 10 classes;
fedmem's ``data.noise.rate`` is the exact share flipped (to another class). The paper's 40%
is ``data.noise.rate=0.36`` here, and fedmem's 0.4 is the paper's 44.4%.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmem.methods.base import BatchContext, Plugin, RoundContext

if TYPE_CHECKING:
    from fedmem.config import ExperimentConfig

CLAMP = 1e-4
"""Probabilities are clamped to [CLAMP, 1 - CLAMP] (reference code), so the log stays finite."""


def elr_update(targets: torch.Tensor, probs: torch.Tensor, beta: float) -> torch.Tensor:
    """The new targets of a batch: ``beta t + (1 - beta) p / sum(p)`` (Eq. 7; ``probs``
    already clamped and detached)."""
    return beta * targets + (1.0 - beta) * probs / probs.sum(1, keepdim=True)


def elr_term(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per example ``log(1 - <p_i, t_i>)`` (Eq. 6 without lambda)."""
    return torch.log(1.0 - (targets * probs).sum(1))


class ELR(Plugin):
    """ELR's term on every step; one target per training example, kept across rounds."""

    name = "elr"

    def __init__(self, lam: float, beta: float):
        if lam <= 0 or not 0 <= beta < 1:
            raise ValueError(f"elr: need lam > 0 and 0 <= beta < 1, got {lam}, {beta}")
        self.lam, self.beta = float(lam), float(beta)
        self.rows: torch.Tensor | None = None  # table rows of the targets (the trainer's rows)
        self.targets: torch.Tensor | None = None  # (len(rows), classes)
        self._pos: torch.Tensor | None = None  # table row -> position in rows (-1: not held)
        self._sum = 0.0
        self._count = 0

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, run: str) -> ELR | None:
        e = cfg.plugins.elr
        if not e.enabled or e.runs not in ("both", run):
            return None
        return cls(e.lam, e.beta)

    # -- state: the targets, never sent ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.targets is None or self.rows is None:
            return {}
        return {"rows": self.rows.cpu(), "targets": self.targets.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.rows = self.targets = None
            return
        self.rows = torch.as_tensor(state["rows"], dtype=torch.long)
        self.targets = torch.as_tensor(state["targets"], dtype=torch.float32)

    # -- hooks -------------------------------------------------------------------------------
    def begin_round(
        self, ctx: RoundContext, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        rows = ctx.rows.cpu().long()
        if self.rows is not None and not torch.equal(self.rows, rows):
            raise ValueError(
                "elr: the saved targets belong to other rows than this trainer's "
                f"({len(self.rows)} saved vs {len(rows)} held)"
            )
        self.rows = rows
        pos = torch.full((ctx.table_size,), -1, dtype=torch.long)
        pos[rows] = torch.arange(len(rows))
        self._pos = pos
        self._sum, self._count = 0.0, 0
        return model, optimizer

    def extra_loss(
        self, ctx: BatchContext, model: nn.Module, logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        assert self._pos is not None and self.rows is not None, "begin_round first"
        if self.targets is None:
            self.targets = torch.zeros(len(self.rows), logits.shape[1])
        self.targets = self.targets.to(logits.device)
        idx = self._pos[ctx.rows.cpu()].to(logits.device)
        probs = F.softmax(logits.float(), dim=1).clamp(CLAMP, 1.0 - CLAMP)
        with torch.no_grad():
            self.targets[idx] = elr_update(self.targets[idx], probs.detach(), self.beta)
        term = elr_term(probs, self.targets[idx])
        self._sum += float(term.detach().sum())
        self._count += len(idx)
        return self.lam * term  # per example; the loop averages it without DP

    def metrics(self) -> dict[str, float]:
        """``elr/term``: the mean of log(1 - <p, t>) over this round's visits (lower: the
        predictions agree more with the targets)."""
        return {"term": self._sum / self._count} if self._count else {}
