"""Iterative magnitude pruning with rewinding: lottery tickets of the central run (Frankle &
Carbin 2019; rewinding to an early round: Frankle et al. 2020).

Starting from the trained central model, each level prunes ``fraction`` of the remaining
weights by global magnitude (:func:`fedmem.methods.pruning.prune`), rewinds the survivors to
their values at round ``k`` of the original run (``checkpoints/central/round-0000k.pt``: round
0 is the initialization), and retrains rounds ``k+1 .. R`` with the original schedule (same
keyed batch order per round, a fresh optimizer at the rewind point as open_lth does) while
:class:`~fedmem.methods.pruning.MaskPlugin` keeps the pruned weights at zero. The next level
prunes the retrained ticket. Controls at every level, as in the paper: the same mask with a
fresh random initialization (``reinit``), and a random mask with the same per-layer counts on
the rewound weights (``random mask``).

Central only for now; the federated variant (rewind to the global model of round k, masks
broadcast by the server) is not built yet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable
from fedmem.methods import RoundContext
from fedmem.methods.pruning import MaskPlugin, attach_masks, prune, sparsity
from fedmem.models.factory import experiment_model
from fedmem.observer import evaluate_logits
from fedmem.seeding import derive_seed
from fedmem.train import keyed_order, make_optimizer, train_epochs

VARIANTS = ("ticket", "reinit", "random mask")


def rewound(
    cfg: ExperimentConfig,
    table: ExampleTable,
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
) -> nn.Module:
    """A fresh model holding ``weights`` (a round-k state) with ``masks`` applied."""
    model = experiment_model(cfg, table.input_shape, table.num_classes)
    model.load_state_dict(weights)
    return attach_masks(model, masks)


def retrain(
    cfg: ExperimentConfig,
    table: ExampleTable,
    model: nn.Module,
    start_round: int,
    order_seed: int | None = None,
) -> nn.Module:
    """Train rounds ``start_round + 1 .. train.rounds`` as the central run does (keyed batch
    order per round, one optimizer across them), keeping the model's masks. ``order_seed``:
    another batch order (default: the run's, ``cfg.seed``)."""
    from fedmem.methods.pruning import attached_masks

    plugin = MaskPlugin(attached_masks(model))
    optimizer = make_optimizer(model, cfg.train)
    x, y, rows = table.x, table.y_obs, table.ids
    for r in range(start_round + 1, cfg.train.rounds + 1):
        ctx = RoundContext("central", r, None, rows, len(table), cfg.seed)
        order = keyed_order(cfg.seed if order_seed is None else order_seed, r, rows, len(table))
        train_epochs(
            model,
            x,
            y,
            cfg.train,
            order,
            optimizer=optimizer,
            rows=rows,
            plugins=[plugin],
            context=ctx,
        )
    return model


def imp(
    cfg: ExperimentConfig,
    table: ExampleTable,
    trained: dict[str, torch.Tensor],
    rewind_weights: dict[str, torch.Tensor],
    rewind_round: int,
    levels: int,
    fraction: float = 0.2,
) -> list[dict[str, Any]]:
    """``levels`` rounds of prune-rewind-retrain from the ``trained`` central weights; every
    variant evaluated after retraining (:func:`fedmem.observer.evaluate_logits`)."""
    out: list[dict[str, Any]] = []
    current = experiment_model(cfg, table.input_shape, table.num_classes)
    current.load_state_dict(trained)
    masks = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "lottery", "reinit"))
        reinit_weights = experiment_model(cfg, table.input_shape, table.num_classes).state_dict()
    for level in range(1, levels + 1):
        masks = prune(current, fraction, masks)
        # the random control keeps the ticket's per-layer counts
        seed = derive_seed(cfg.seed, "lottery", "random-mask", level) % 2**31
        random_masks = _same_counts(masks, seed)
        starts = {
            "ticket": (rewind_weights, masks),
            "reinit": (reinit_weights, masks),
            "random mask": (rewind_weights, random_masks),
        }
        for variant, (weights, m) in starts.items():
            model = retrain(cfg, table, rewound(cfg, table, weights, m), rewind_round)
            row, _ = evaluate_logits(model, table, cfg.train.eval_batch_size)
            out.append(
                {
                    "level": level,
                    "variant": variant,
                    "rewind_round": rewind_round,
                    "weights_remaining": 1.0 - sparsity(m),
                    **row,
                }
            )
            if variant == "ticket":
                current = model
    return out


def _same_counts(masks: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random masks with exactly as many survivors per layer as ``masks``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in masks.items():
        keep = int(m.sum())
        order = torch.randperm(m.numel(), generator=gen)[:keep]
        r = torch.zeros(m.numel(), dtype=torch.bool)
        r[order] = True
        out[n] = r.view_as(m)
    return out


def instability(
    cfg: ExperimentConfig,
    table: ExampleTable,
    start: dict[str, torch.Tensor],
    start_round: int,
    points: int = 11,
) -> dict[str, Any]:
    """Frankle et al. 2020's instability analysis of the round-``start_round`` weights: train
    two copies from them with different batch orders, and measure test error along the linear
    path between the two results; the error barrier is the largest error on the path minus
    the mean of the two end points' errors. A small barrier (linear mode connectivity) is the
    round from which rewinding finds tickets in the paper. Dense (no masks); integer buffers
    (e.g. BatchNorm's counter) are interpolated as floats."""
    ends = []
    for order_seed in (cfg.seed, derive_seed(cfg.seed, "instability", "order") % 2**31):
        model = experiment_model(cfg, table.input_shape, table.num_classes)
        model.load_state_dict(start)
        ends.append(retrain(cfg, table, model, start_round, order_seed).state_dict())
    errors = []
    model = experiment_model(cfg, table.input_shape, table.num_classes)
    for i in range(points):
        a = i / (points - 1)
        model.load_state_dict(
            {k: (1 - a) * ends[0][k].float() + a * ends[1][k].float() for k in ends[0]}
        )
        row, _ = evaluate_logits(model, table, cfg.train.eval_batch_size)
        errors.append(1.0 - row["test_acc"])
    return {
        "rewind_round": start_round,
        "path_test_error": errors,
        "barrier": max(errors) - 0.5 * (errors[0] + errors[-1]),
    }
