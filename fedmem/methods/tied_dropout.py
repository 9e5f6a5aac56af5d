"""The training side of example-tied dropout (Maini et al. 2023, Sec. 5): hand each batch's
keys to the model's :class:`~fedmem.models.tied_dropout.TiedDropout` modules.

Keys: the examples' global table rows (``model.dropout.kind=example``; identical on every
client, so a client derives the same memorization units for its examples as the central run),
or their clients (``client``: one set of memorization units per client). ``standard`` dropout
also gets a step counter, so its masks change every step yet are reproducible. The central
run and every federated client use it (it is how the model is trained, not a method of one
trainer); the audit's shadows and the ensemble do not simulate it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmem.methods.base import BatchContext, Plugin
from fedmem.models.tied_dropout import tied_modules

if TYPE_CHECKING:
    from fedmem.config import ExperimentConfig


class TiedDropoutPlugin(Plugin):
    """Sets the batch's keys on every tied-dropout module before the forward pass."""

    name = "tied_dropout"

    def __init__(self, kind: str, row_client: torch.Tensor | None = None):
        self.kind = kind
        self.row_client = row_client  # client of every table row (central, client-tied)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, run: str) -> TiedDropoutPlugin | None:
        kind = cfg.model.dropout.kind
        if kind == "none":
            return None
        row_client = None
        if kind == "client" and run == "central":
            from fedmem.data.table import cached_table

            row_client = cached_table(cfg).client
        return cls(kind, row_client)

    def keys(self, ctx: BatchContext) -> torch.Tensor:
        rows = ctx.rows
        if self.kind != "client":
            return rows
        if ctx.round.client is not None:
            return torch.full_like(rows, ctx.round.client)
        assert self.row_client is not None
        return self.row_client[rows]

    def begin_batch(self, ctx: BatchContext, model: nn.Module) -> None:
        keys = self.keys(ctx)
        step = (ctx.round.round * 7919 + ctx.epoch) * 1_000_003 + ctx.step
        for m in tied_modules(model):
            m.keys = keys.to(next(model.parameters()).device)
            m.step = step

    def after_step(self, ctx: BatchContext, model: nn.Module) -> None:
        for m in tied_modules(model):
            m.keys = None
