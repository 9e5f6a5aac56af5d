"""THE local training loop, shared by the central run and every federated client.

The fairness of the central-vs-federated comparison rests on both calling :func:`train_epochs`
with the same optimizer settings. Batches index tensors directly (a DataLoader costs about 2x
on small models).

Batch order (:func:`keyed_order`): in each round and epoch every example of the whole table
draws a random key from the stream ``(seed, "order", round, epoch)`` and each trainer visits its
own examples by ascending key. Orders are thus independent across clients, the central and the
federated run see their examples in the same relative order (common random numbers), and a
single client holding all the data trains exactly like the central run.

Hooks (:class:`TrainHook`) are where regularizers plug in: ``prepare`` may wrap the model and
optimizer, ``extra_loss`` adds a term to the mini-batch loss (ELR, penalties), ``after_step``
runs after every optimizer step.

Record-level differential privacy (``dp=``, a :class:`fedmem.privacy.dp.DPSession`) turns the
same loop into DP-SGD through Opacus: batches are Poisson-sampled (:func:`poisson_batch`, keyed
like :func:`keyed_order`, so a single client holding all the data samples exactly like the
central run), each example's gradient is clipped and Gaussian noise is added. See
``fedmem/privacy/dp.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedmem.config import TrainConfig
from fedmem.seeding import torch_gen

if TYPE_CHECKING:
    from fedmem.privacy.dp import DPSession

BatchOrder = Callable[[int], torch.Tensor]  # epoch -> permutation of local positions


class TrainHook:
    """Base class of training-loop plug-ins; override only what you need."""

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        return model, optimizer

    def extra_loss(
        self, model: nn.Module, logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor | None:
        """An additional loss term for the batch of table rows ``rows`` (or None).

        With record-level DP it must be per example (shape ``(batch,)``, added to each
        example's cross-entropy before clipping); a scalar is refused there.
        """
        return None

    def after_step(self, model: nn.Module) -> None:
        return None


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean cross-entropy over every example visited
    examples: int  # example visits (epochs x local examples)
    steps: int  # optimizer steps (with DP: DP-SGD steps, empty Poisson batches included)


def keyed_order(seed: int, round_: int, rows: torch.Tensor, table_size: int) -> BatchOrder:
    """Visit order of the table rows ``rows`` in each epoch of round ``round_`` (see above)."""

    def order(epoch: int) -> torch.Tensor:
        keys = torch.rand(table_size, generator=torch_gen(seed, "order", round_, epoch))
        return torch.argsort(keys[rows], stable=True)

    return order


def poisson_batch(
    seed: int, round_: int, epoch: int, step: int, rows: torch.Tensor, table_size: int, q: float
) -> torch.Tensor:
    """Local positions of the examples in Poisson batch ``step`` of ``epoch`` in ``round_``.

    Each example is included independently with probability ``q`` (Opacus' rule): every row of
    the whole table draws a uniform key from the stream ``(seed, "poisson", round, epoch,
    step)``, and the trainer takes its rows whose key is below ``q``. The batch may be empty.
    """
    keys = torch.rand(table_size, generator=torch_gen(seed, "poisson", round_, epoch, step))
    return torch.nonzero(keys[rows] < q).flatten()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer: unknown {cfg.optimizer!r}")


def proximal_term(model: nn.Module, anchor: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (mu / 2) * ||w - w_global||^2 (Li et al. 2020, Eq. 2)."""
    sq = sum(
        ((p - a) ** 2).sum()
        for p, a in zip((p for p in model.parameters() if p.requires_grad), anchor, strict=True)
    )
    return 0.5 * mu * sq  # type: ignore[return-value]


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    order: BatchOrder,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    rows: torch.Tensor | None = None,
    epochs: int | None = None,
    anchor: Sequence[torch.Tensor] | None = None,
    hooks: Sequence[TrainHook] = (),
    dp: DPSession | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` (default ``cfg.local_epochs``) passes over (x, y).

    ``order(epoch)`` gives the visit order of the local examples (:func:`keyed_order`).
    ``x``/``y`` live on the model's device. ``rows`` are the ExampleTable row ids of ``x`` (for
    hooks keyed by example); ``anchor`` is the global model for the proximal term when
    ``cfg.proximal_mu > 0``. Pass ``optimizer`` to keep its state across calls (central run);
    otherwise a fresh one is made (a federated client starts each round afresh).

    ``dp``: record-level DP-SGD for this call (one trainer, one round): Poisson batches replace
    ``order``, the step is clipped and noised by Opacus, ``dp.steps`` counts the steps taken
    (for the accountant), and ``model`` comes back trained in place without any Opacus hooks.
    """
    n = len(y)
    epochs = cfg.local_epochs if epochs is None else epochs
    optimizer = optimizer if optimizer is not None else make_optimizer(model, cfg)
    for hook in hooks:
        model, optimizer = hook.prepare(model, optimizer)
    if rows is None:
        rows = torch.arange(n)
    use_prox = cfg.proximal_mu > 0 and anchor is not None
    model.train()
    if dp is not None:
        prox_anchor = anchor if use_prox else None
        return _train_dp(model, x, y, cfg, dp, optimizer, rows, epochs, prox_anchor, hooks)
    total = torch.zeros((), device=x.device)
    visits, steps = 0, 0
    for epoch in range(epochs):
        perm = order(epoch)
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            idx_dev = idx.to(x.device)
            xb, yb = x[idx_dev], y[idx_dev]
            logits = model(xb)
            ce = F.cross_entropy(logits, yb)
            loss = ce
            if use_prox:
                loss = loss + proximal_term(model, anchor, cfg.proximal_mu)  # type: ignore[arg-type]
            for hook in hooks:
                extra = hook.extra_loss(model, logits, yb, rows[idx])
                if extra is not None:
                    loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for hook in hooks:
                hook.after_step(model)
            total += ce.detach() * len(idx)
            visits += len(idx)
            steps += 1
    return TrainResult(loss=float(total) / max(visits, 1), examples=visits, steps=steps)


def _poisson_batches(dp: DPSession, rows: torch.Tensor, epochs: int) -> Iterator[torch.Tensor]:
    table_size = dp.table_size if dp.table_size is not None else len(rows)
    for epoch in range(epochs):
        for step in range(dp.steps_per_epoch):
            yield poisson_batch(dp.seed, dp.round, epoch, step, rows, table_size, dp.sample_rate)


def _train_dp(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    dp: DPSession,
    optimizer: torch.optim.Optimizer,
    rows: torch.Tensor,
    epochs: int,
    anchor: Sequence[torch.Tensor] | None,
    hooks: Sequence[TrainHook],
) -> TrainResult:
    """DP-SGD version of the loop body: Poisson batches, per-example clipping, noise."""
    if dp.n_local != len(y):
        raise ValueError(f"DPSession was made for {dp.n_local} examples, got {len(y)}")
    proximal = (anchor, cfg.proximal_mu) if anchor is not None else None
    total = torch.zeros((), device=x.device)
    visits, steps = 0, 0
    with dp.attach(model, optimizer) as private:
        for idx in _poisson_batches(dp, rows, epochs):
            if len(idx) == 0:  # still a step: noise only
                private.empty_step(proximal)
                for hook in hooks:
                    hook.after_step(model)
                steps += 1
                continue
            idx_dev = idx.to(x.device)
            xb, yb = x[idx_dev], y[idx_dev]
            logits = private.forward(xb)
            ce = F.cross_entropy(logits, yb, reduction="none")
            loss = ce
            for hook in hooks:
                extra = hook.extra_loss(model, logits, yb, rows[idx])
                if extra is not None:
                    if extra.shape != ce.shape:
                        raise ValueError(
                            f"{type(hook).__name__}.extra_loss: with record-level DP it must "
                            f"return per-example losses of shape {tuple(ce.shape)}, got "
                            f"{tuple(extra.shape)}"
                        )
                    loss = loss + extra
            private.step(loss, proximal)
            for hook in hooks:
                hook.after_step(model)
            total += ce.detach().sum()
            visits += len(idx)
            steps += 1
    return TrainResult(loss=float(total) / max(visits, 1), examples=visits, steps=steps)
