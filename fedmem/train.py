"""THE local training loop, shared by the central run and every federated client.

The fairness of the central-vs-federated comparison rests on both calling :func:`train_epochs`
with the same optimizer settings. Batches index tensors directly (a DataLoader costs about 2x
on small models).

Batch order (:func:`keyed_order`): in each round and epoch every example of the whole table
draws a random key from the stream ``(seed, "order", round, epoch)`` and each trainer visits its
own examples by ascending key. Orders are thus independent across clients, the central and the
federated run see their examples in the same relative order (common random numbers), and a
single client holding all the data trains exactly like the central run.

Training plug-ins (:class:`fedmem.methods.Plugin`: FedProx's term, and the methods of the next
issues) are called with a :class:`~fedmem.methods.RoundContext` / ``BatchContext`` saying which
run, round, client, epoch and table rows: ``begin_round`` may wrap the model and optimizer,
``penalty`` adds a data-independent term, ``extra_loss`` a batch term, ``after_step`` runs
after every optimizer step and ``end_round`` after the last one.

Record-level differential privacy (``dp=``, a :class:`fedmem.privacy.dp.DPSession`) turns the
same loop into DP-SGD through Opacus: batches are Poisson-sampled (:func:`poisson_batch`, keyed
like :func:`keyed_order`, so a single client holding all the data samples exactly like the
central run), each example's gradient is clipped and Gaussian noise is added. See
``fedmem/privacy/dp/``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedmem.config import TrainConfig
from fedmem.methods.base import BatchContext, Plugin, RoundContext
from fedmem.seeding import torch_gen

if TYPE_CHECKING:
    from fedmem.privacy.dp import DPSession

BatchOrder = Callable[[int], torch.Tensor]  # epoch -> permutation of local positions


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
    plugins: Sequence[Plugin] = (),
    context: RoundContext | None = None,
    dp: DPSession | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` (default ``cfg.local_epochs``) passes over (x, y).

    ``max_steps``: train exactly this many optimizer steps instead, in the same batch order
    (as many epochs as they need, the last one cut short; the central run matched on steps,
    ``central.match=steps``). Not with ``dp``.

    ``order(epoch)`` gives the visit order of the local examples (:func:`keyed_order`).
    ``x``/``y`` live on the model's device. ``rows`` are the ExampleTable row ids of ``x`` (for
    plug-ins keyed by example). Pass ``optimizer`` to keep its state across calls (central
    run); otherwise a fresh one is made (a federated client starts each round afresh).

    ``plugins`` act in the given order with ``context`` (default: a central round-0 context
    over ``rows``); their loss terms are added to the cross-entropy in that order.

    ``dp``: record-level DP-SGD for this call (one trainer, one round): Poisson batches replace
    ``order``, the step is clipped and noised by Opacus, ``dp.steps`` counts the steps taken
    (for the accountant), and ``model`` comes back trained in place without any Opacus hooks.
    """
    n = len(y)
    epochs = cfg.local_epochs if epochs is None else epochs
    optimizer = optimizer if optimizer is not None else make_optimizer(model, cfg)
    if rows is None:
        rows = torch.arange(n)
    ctx = context if context is not None else RoundContext("central", 0, None, rows, n)
    for plugin in plugins:
        model, optimizer = plugin.begin_round(ctx, model, optimizer)
    model.train()
    if dp is not None:
        if max_steps is not None:
            raise ValueError("train_epochs: max_steps is not supported with DP-SGD")
        result = _train_dp(model, x, y, cfg, dp, optimizer, rows, epochs, plugins, ctx)
    else:
        if max_steps is not None:
            epochs = math.ceil(max_steps / math.ceil(n / cfg.batch_size))
        result = _train(model, x, y, cfg, order, optimizer, rows, epochs, plugins, ctx, max_steps)
    for plugin in plugins:
        plugin.end_round(ctx, model, result)
    return result


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    order: BatchOrder,
    optimizer: torch.optim.Optimizer,
    rows: torch.Tensor,
    epochs: int,
    plugins: Sequence[Plugin],
    ctx: RoundContext,
    max_steps: int | None = None,
) -> TrainResult:
    """The plain loop body: keyed batch order, mean cross-entropy plus plug-in terms."""
    n = len(y)
    total = torch.zeros((), device=x.device)
    visits, steps = 0, 0
    for epoch in range(epochs):
        perm = order(epoch)
        for start in range(0, n, cfg.batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            idx = perm[start : start + cfg.batch_size]
            idx_dev = idx.to(x.device)
            xb, yb = x[idx_dev], y[idx_dev]
            bctx = BatchContext(ctx, epoch, steps, rows[idx]) if plugins else None
            for plugin in plugins:
                plugin.begin_batch(bctx, model)  # type: ignore[arg-type]
            logits = model(xb)
            ce = F.cross_entropy(logits, yb)
            loss = ce
            for plugin in plugins:
                term = plugin.penalty(bctx, model)  # type: ignore[arg-type]
                if term is not None:
                    loss = loss + term
            for plugin in plugins:
                extra = plugin.extra_loss(bctx, model, logits, yb)  # type: ignore[arg-type]
                if extra is not None:
                    # a per-example term (as DP needs) is averaged like the cross-entropy
                    loss = loss + (extra.mean() if extra.dim() else extra)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for plugin in plugins:
                plugin.after_step(bctx, model)  # type: ignore[arg-type]
            total += ce.detach() * len(idx)
            visits += len(idx)
            steps += 1
    return TrainResult(loss=float(total) / max(visits, 1), examples=visits, steps=steps)


def _poisson_batches(
    dp: DPSession, rows: torch.Tensor, epochs: int
) -> Iterator[tuple[int, torch.Tensor]]:
    table_size = dp.table_size if dp.table_size is not None else len(rows)
    for epoch in range(epochs):
        for step in range(dp.steps_per_epoch):
            yield (
                epoch,
                poisson_batch(dp.seed, dp.round, epoch, step, rows, table_size, dp.sample_rate),
            )


def _train_dp(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    dp: DPSession,
    optimizer: torch.optim.Optimizer,
    rows: torch.Tensor,
    epochs: int,
    plugins: Sequence[Plugin],
    ctx: RoundContext,
) -> TrainResult:
    """DP-SGD version of the loop body: Poisson batches, per-example clipping, noise.

    Plug-in penalties depend on no example: their gradients are added after the noise
    (:meth:`~fedmem.methods.Plugin.penalty_grad_`), unclipped. ``extra_loss`` terms must be
    per example and are clipped with the example's cross-entropy.
    """
    if dp.n_local != len(y):
        raise ValueError(f"DPSession was made for {dp.n_local} examples, got {len(y)}")
    total = torch.zeros((), device=x.device)
    visits, steps = 0, 0
    with dp.attach(model, optimizer) as private:
        for epoch, idx in _poisson_batches(dp, rows, epochs):
            bctx = BatchContext(ctx, epoch, steps, rows[idx])

            def after_noise(bctx: BatchContext = bctx) -> None:
                for plugin in plugins:
                    plugin.penalty_grad_(bctx, model)

            if len(idx) == 0:  # still a step: noise only
                private.empty_step(after_noise if plugins else None)
                for plugin in plugins:
                    plugin.after_step(bctx, model)
                steps += 1
                continue
            idx_dev = idx.to(x.device)
            xb, yb = x[idx_dev], y[idx_dev]
            for plugin in plugins:
                plugin.begin_batch(bctx, model)
            logits = private.forward(xb)
            ce = F.cross_entropy(logits, yb, reduction="none")
            loss = ce
            for plugin in plugins:
                extra = plugin.extra_loss(bctx, model, logits, yb)
                if extra is not None:
                    if extra.shape != ce.shape:
                        raise ValueError(
                            f"plug-in {plugin.name!r}: extra_loss with record-level DP must "
                            f"return per-example losses of shape {tuple(ce.shape)}, got "
                            f"{tuple(extra.shape)}"
                        )
                    loss = loss + extra
            private.step(loss, after_noise if plugins else None)
            for plugin in plugins:
                plugin.after_step(bctx, model)
            total += ce.detach().sum()
            visits += len(idx)
            steps += 1
    return TrainResult(loss=float(total) / max(visits, 1), examples=visits, steps=steps)
