"""Iterative magnitude pruning with rewinding: lottery tickets, central and federated
(Frankle & Carbin 2019; rewinding to an early round: Frankle et al. 2020).

Starting from a trained model, each level prunes ``fraction`` of the remaining weights by
global magnitude (:func:`fedmem.methods.pruning.prune`), rewinds the survivors to their values
at round ``k`` of the original run (``checkpoints/<model>/round-0000k.pt``: round 0 is the
initialization), and retrains rounds ``k+1 .. R`` with the original schedule, keeping the
pruned weights at zero. The next level prunes the retrained ticket. Controls at every level,
as in the paper: the same mask with a fresh random initialization (``reinit``), and a random
mask with the same per-layer counts on the rewound weights (``random mask``).

- ``central`` (:func:`retrain`): the central run's loop, same keyed batch order per round, a
  fresh optimizer at the rewind point as open_lth does; :class:`MaskPlugin` re-zeroes.
- ``federated`` (:func:`retrain_federated`): the server prunes the *global* model, rewinds it
  to the global model of round ``k`` and runs rounds ``k+1 .. R`` through the experiment's
  own engine (same strategy, same client sampling per round; fresh strategy and client
  state at the rewind point). The masks travel as buffers in the broadcast weights: every
  client trains only the survivors (re-zeroed after each step) and the server re-zeroes them
  after each aggregation (:func:`fedmem.methods.pruning.enforce_masks`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable
from fedmem.methods import RoundContext
from fedmem.methods.pruning import MaskPlugin, attach_masks, load_pruned, prune, sparsity
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


def retrain_federated(
    cfg: ExperimentConfig,
    table: ExampleTable,
    model: nn.Module,
    start_round: int,
    order_seed: int | None = None,
) -> nn.Module:
    """Federated rounds ``start_round + 1 .. train.rounds`` from ``model``'s weights (masks
    included) on the experiment's backend; returns the final global model. ``order_seed``:
    another batch order on every client (default: the run's)."""
    from fedmem.federation.engine import run_federated
    from fedmem.federation.server_app import FederatedJob
    from fedmem.observer import Observer

    observer = Observer(table, "federated", lambda row: None, cfg.train.eval_batch_size)
    start = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    job = FederatedJob(cfg, table, observer, start=(start_round, start), order_seed=order_seed)
    run_federated(job)
    assert job.final_state is not None
    out = experiment_model(cfg, table.input_shape, table.num_classes)
    load_pruned(out, job.final_state)
    return out


RETRAIN = {"central": retrain, "federated": retrain_federated}


def imp(
    cfg: ExperimentConfig,
    table: ExampleTable,
    trained: dict[str, torch.Tensor],
    rewind_weights: dict[str, torch.Tensor],
    rewind_round: int,
    levels: int,
    fraction: float = 0.2,
    trainer: str = "central",
) -> tuple[list[dict[str, Any]], nn.Module]:
    """``levels`` rounds of prune-rewind-retrain from the ``trained`` weights (of the central
    model or the final global model: ``trainer``); every variant evaluated after retraining
    (:func:`fedmem.observer.evaluate_logits`). Returns the rows and the last level's ticket
    (with its masks)."""
    train = RETRAIN[trainer]
    out: list[dict[str, Any]] = []
    current = experiment_model(cfg, table.input_shape, table.num_classes)
    masks = load_pruned(current, trained) or None  # a pruned start continues from its masks
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
            model = train(cfg, table, rewound(cfg, table, weights, m), rewind_round)
            row, _ = evaluate_logits(model, table, cfg.train.eval_batch_size)
            out.append(
                {
                    "model": trainer,
                    "level": level,
                    "variant": variant,
                    "rewind_round": rewind_round,
                    "weights_remaining": 1.0 - sparsity(m),
                    **row,
                }
            )
            if variant == "ticket":
                current = model
    return out, current


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
    trainer: str = "central",
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
        ends.append(RETRAIN[trainer](cfg, table, model, start_round, order_seed).state_dict())
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


def register_ticket(
    run_dir: Any,
    base: str,
    rewind_round: int,
    ticket: nn.Module,
    row: dict[str, Any],
    details: dict[str, Any],
) -> str:
    """Save ``ticket`` into the run directory and add it to the run's lineage as
    ``<base>-ticket-k<rewind_round>`` (method ``lottery``, parent ``<base>@<k>``), so the
    audit (``python -m fedmem.audit``) and the report see it beside the dense model."""
    from dataclasses import replace

    from fedmem.runs.checkpoints import save_atomic
    from fedmem.runs.records import add_model, read_records
    from fedmem.runs.rundir import RunDir

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    name = f"{base}-ticket-k{rewind_round}"
    checkpoint = f"checkpoints/{name}.pt"
    save_atomic({k: v.detach().cpu() for k, v in ticket.state_dict().items()}, rd.path / checkpoint)
    parent = read_records(rd.read_summary(), rd.read_config())[base]
    record = replace(
        parent,
        name=name,
        checkpoint=checkpoint,
        parent=f"{base}@{rewind_round}",
        method="lottery",
        details={**details, "rewind_round": rewind_round},
    )
    keys = ("test_acc", "train_acc_clean", "noisy_memorized", "noisy_true_acc", "canary_acc")
    add_model(rd, record, {"rounds": parent.rounds, **{k: row.get(k) for k in keys}})
    return name
