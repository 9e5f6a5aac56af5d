"""The training plug-in seam: what a method may do inside the one training loop.

A :class:`Plugin` is called by :func:`fedmem.train.train_epochs` for every trainer — the
central run and each federated client — with a context saying where it is:

- :class:`RoundContext` (once per ``train_epochs`` call): which run (``"central"`` /
  ``"federated"``), the round, the client's partition id (``None`` centrally), the table rows
  the trainer holds, and the experiment seed;
- :class:`BatchContext` (every step): the round context plus the epoch, the step and the
  table rows of the batch.

Hooks, in call order (override only what you need; pfl-research's callbacks and open_lth's
strategy classes are the models):

``begin_round``  may wrap or replace the model / optimizer (e.g. snapshot the global weights)
``begin_batch``  before the forward pass of every step (hand the batch's example ids to the
                 model: example-tied dropout)
``penalty``      a data-independent loss term (FedProx's proximal term, L2 to a reference).
                 With record-level DP it costs no privacy: its gradient is added after the
                 noise (:meth:`Plugin.penalty_grad_`), never clipped.
``extra_loss``   a term that depends on the batch (ELR, :mod:`fedmem.methods.elr`): a scalar,
                 or per example (shape ``(batch,)``, averaged like the cross-entropy). With
                 record-level DP it must be per example: it is clipped with the example's
                 gradient.
``after_step``   after every optimizer step (re-apply pruning masks, update running targets)
``end_round``    after the last step of the call
``metrics``      numbers about the round for the results (``<name>/<key>`` columns)

State that must survive rounds is what :meth:`Plugin.state_dict` returns (tensors, numbers,
strings and lists of them). A client's plug-in state lives in its Flower ``context.state``
(and in the client's own state file for resume); it is never sent to the server. The central
run keeps its plug-ins in memory and in its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from fedmem.config import ExperimentConfig
    from fedmem.train import TrainResult


@dataclass(frozen=True)
class RoundContext:
    """Where a ``train_epochs`` call runs: one trainer, one round."""

    run: str  # "central" or "federated"
    round: int
    client: int | None  # partition id; None in the central run
    rows: torch.Tensor  # table rows held by the trainer (local position i -> rows[i])
    table_size: int
    seed: int = 0


@dataclass(frozen=True)
class BatchContext:
    """One optimizer step of a :class:`RoundContext`."""

    round: RoundContext
    epoch: int
    step: int  # step within the call, from 0
    rows: torch.Tensor = field(repr=False)  # table rows of the batch (empty: a DP noise step)


class Plugin:
    """Base class of training plug-ins. Subclasses set :attr:`name` and build themselves from
    the experiment config in :meth:`from_config` (``None``: not active for this run)."""

    name: ClassVar[str] = ""

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, run: str) -> Plugin | None:
        raise NotImplementedError(f"{cls.__name__}.from_config")

    # -- state kept across rounds ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"plug-in {self.name!r} keeps no state, got keys {sorted(state)}")

    # -- hooks -------------------------------------------------------------------------------
    def begin_round(
        self, ctx: RoundContext, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        return model, optimizer

    def begin_batch(self, ctx: BatchContext, model: nn.Module) -> None:
        """Before the step's forward pass (the batch's table rows are ``ctx.rows``)."""
        return None

    def penalty(self, ctx: BatchContext, model: nn.Module) -> torch.Tensor | None:
        """A loss term that depends on the weights only (no example), or None."""
        return None

    def penalty_grad_(self, ctx: BatchContext, model: nn.Module) -> None:
        """Add the gradient of :meth:`penalty` to ``p.grad`` (DP-SGD: after the noise)."""
        term = self.penalty(ctx, model)
        if term is None:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(term, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad.add_(g)

    def extra_loss(
        self, ctx: BatchContext, model: nn.Module, logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor | None:
        """A loss term for the batch (scalar, or per example ``(batch,)``; DP needs the latter)."""
        return None

    def after_step(self, ctx: BatchContext, model: nn.Module) -> None:
        return None

    def end_round(self, ctx: RoundContext, model: nn.Module, result: TrainResult) -> None:
        return None

    # -- reporting ---------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Numbers about the last round, reported as ``<name>/<key>`` in the client's row of
        ``clients.jsonl`` (federated) or the metrics row (central)."""
        return {}


def plugin_metrics(plugins: list[Plugin] | tuple[Plugin, ...]) -> dict[str, float]:
    """Every plug-in's :meth:`Plugin.metrics`, keyed ``<name>/<key>``."""
    return {f"{p.name}/{k}": v for p in plugins for k, v in p.metrics().items()}
