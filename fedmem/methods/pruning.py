"""Pruning: masks over a model's weights, chosen by magnitude or at random, kept as buffers and
re-applied after every optimizer step.

Frankle & Carbin 2019 ("The Lottery Ticket Hypothesis"), Frankle et al. 2020 ("Linear Mode
Connectivity and the Lottery Ticket Hypothesis"), Hooker et al. 2019 ("What Do Compressed Deep
Neural Networks Forget?"). The structure follows open_lth (``pruning/sparse_global.py``,
``pruning/pruned_model.py``): the prunable tensors are the weights of linear and convolutional
layers (biases and norms stay dense), a mask is a 0/1 tensor per prunable weight, and

- **global magnitude** (default): rank the surviving weights of all prunable layers but the
  output layer together by |w| and remove the smallest; the output layer is pruned on its own
  at ``output_fraction`` times the rate (the paper prunes it at half the rate);
- **layer-wise magnitude**: every layer at the same rate, ranked within the layer;
- **random** (the control): the same counts per layer as the magnitude choice would remove,
  chosen by seeded random scores instead of |w|.

:func:`prune` removes a *fraction of the remaining* weights (iterative magnitude pruning prunes
p% of what is left at each level); with no masks yet it is one-shot pruning to that sparsity.

Masks live on the model as buffers (``pruning_mask__<layer>__weight`` on the root module,
:func:`attach_masks`), so they travel in its state dict (checkpoints; FedAvg averages
identical 0/1 masks to the same mask).
Momentum, weight decay and DP-SGD's noise move pruned weights off zero after every step —
a common bug in public reproductions — so :class:`MaskPlugin` re-zeroes them after each
optimizer step (:func:`apply_masks`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from fedmem.methods.base import BatchContext, Plugin

Scope = Literal["global", "layerwise"]
Method = Literal["magnitude", "random"]


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: weight}`` of every linear and convolutional layer, in model order."""
    out = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            out[f"{mod_name}.weight" if mod_name else "weight"] = module.weight
    return out


def _counts(
    weights: dict[str, torch.Tensor],
    alive: dict[str, torch.Tensor],
    fraction: float,
    scope: Scope,
    output: str,
    output_fraction: float,
) -> dict[str, int]:
    """How many surviving weights each layer loses (by magnitude, as ``scope`` says)."""
    remove = {n: 0 for n in weights}
    out_alive = int(alive[output].sum())
    remove[output] = int(round(fraction * output_fraction * out_alive))
    hidden = [n for n in weights if n != output]
    if scope == "layerwise":
        for n in hidden:
            remove[n] = int(round(fraction * int(alive[n].sum())))
        return remove
    if hidden:
        mags = torch.cat([weights[n].abs().flatten()[alive[n].flatten()] for n in hidden])
        k = int(round(fraction * len(mags)))
        if k > 0:
            threshold = torch.kthvalue(mags, k).values
            for n in hidden:
                w = weights[n].abs()[alive[n]]
                remove[n] = int((w <= threshold).sum())
            # ties at the threshold: trim the excess from the last layers
            excess = sum(remove[n] for n in hidden) - k
            for n in reversed(hidden):
                take = min(excess, remove[n])
                remove[n] -= take
                excess -= take
    return remove


def prune(
    model: nn.Module,
    fraction: float,
    masks: dict[str, torch.Tensor] | None = None,
    method: Method = "magnitude",
    scope: Scope = "global",
    output_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """New masks that remove ``fraction`` of the weights ``masks`` keep (all, if None).

    Magnitude: the smallest surviving |w| go, globally or per layer (``scope``), the output
    layer at ``fraction * output_fraction`` on its own. Random: per layer the same numbers,
    chosen by random scores from ``seed``. Returns bool masks keyed like :func:`prunable`.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"prune: fraction must be in [0, 1), got {fraction}")
    weights = {n: p.detach().cpu() for n, p in prunable(model).items()}
    if not weights:
        raise ValueError(f"{type(model).__name__} has no prunable layers")
    alive = {
        n: (masks[n].bool().cpu() if masks is not None else torch.ones_like(w, dtype=torch.bool))
        for n, w in weights.items()
    }
    output = list(weights)[-1]
    remove = _counts(weights, alive, fraction, scope, output, output_fraction)
    gen = torch.Generator().manual_seed(seed)
    new = {}
    for n, w in weights.items():
        score = w.abs() if method == "magnitude" else torch.rand(w.shape, generator=gen)
        score = torch.where(alive[n], score, torch.full_like(score, float("inf")))
        mask = alive[n].clone()
        if remove[n] > 0:
            # stable order on ties: the lowest scores, then the lowest positions
            drop = torch.argsort(score.flatten(), stable=True)[: remove[n]]
            mask.view(-1)[drop] = False
        new[n] = mask
    return new


def sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Share of prunable weights removed."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place."""
    for n, p in prunable(model).items():
        if n in masks:
            p.mul_(masks[n].to(p.device, p.dtype))


MASK_PREFIX = "pruning_mask__"


def _buffer_name(weight: str) -> str:
    return MASK_PREFIX + weight.replace(".", "__")


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Register every mask as a buffer of the model itself (``pruning_mask__<layer>__weight``,
    so it is saved, loaded and averaged with the model) and zero the pruned weights.

    On the root module rather than on each layer: Opacus refuses trainable layers that hold
    buffers. Returns ``model``.
    """
    for n, m in masks.items():
        name = _buffer_name(n)
        if name in dict(model.named_buffers(recurse=False)):
            getattr(model, name).copy_(m.float())
        else:
            model.register_buffer(name, m.float().to(prunable(model)[n].device))
    apply_masks(model, masks)
    return model


def attached_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks :func:`attach_masks` put on ``model`` (thresholded at 0.5: an average of
    identical 0/1 masks is the same mask)."""
    return {
        name[len(MASK_PREFIX) :].replace("__", "."): buf > 0.5
        for name, buf in model.named_buffers(recurse=False)
        if name.startswith(MASK_PREFIX)
    }


def masks_in_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{weight name: bool mask}`` of the mask buffers a state dict carries (empty: dense)."""
    return {
        k[len(MASK_PREFIX) :].replace("__", "."): v > 0.5
        for k, v in state.items()
        if k.startswith(MASK_PREFIX)
    }


def load_pruned(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load ``state`` into a freshly built ``model``, first attaching the masks it carries
    (so a pruned model's state dict loads strictly, and the model stays pruned). Returns the
    masks (empty for a dense state). Clients, the server and the audit load weights this way.
    """
    masks = masks_in_state(state)
    if masks:
        attach_masks(model, masks)
    model.load_state_dict(state)
    if masks:
        apply_masks(model, masks)
    return masks


@torch.no_grad()
def enforce_masks(
    state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` with the pruned weights set to exactly zero and the mask buffers restored to
    ``masks`` (in each tensor's own dtype). The server applies it after every aggregation:
    DP-FedAvg's noise and server optimizers (FedAdam's moments) otherwise move pruned weights
    and the averaged mask buffers."""
    out = dict(state)
    for n, m in masks.items():
        out[n] = state[n] * m.to(state[n].device, state[n].dtype)
        buf = _buffer_name(n)
        if buf in state:
            out[buf] = m.to(state[buf].device, state[buf].dtype)
    return out


class MaskPlugin(Plugin):
    """Re-zero the pruned weights after every optimizer step (and at the start of a round:
    weights received from the server or a checkpoint come back masked)."""

    name = "pruning"

    def __init__(self, masks: dict[str, torch.Tensor] | None = None):
        self.masks = masks

    @classmethod
    def from_config(cls, cfg, run):  # type: ignore[no-untyped-def]
        return None  # built by the pruning commands with their masks, not from the config

    def begin_round(self, ctx, model, optimizer):  # type: ignore[no-untyped-def]
        if self.masks is None:
            self.masks = attached_masks(model)
        apply_masks(model, self.masks)
        return model, optimizer

    def after_step(self, ctx: BatchContext, model: nn.Module) -> None:
        if self.masks:
            apply_masks(model, self.masks)


def one_shot(
    model: nn.Module,
    table: Any,
    sparsities: Sequence[float],
    method: Method = "magnitude",
    seed: int = 0,
    batch_size: int = 4096,
) -> list[dict[str, Any]]:
    """Prune a trained ``model`` to each sparsity (no retraining) and evaluate it on the
    table: test accuracy and :func:`fedmem.observer.fit_metrics` by example kind, plus the
    examples whose prediction pruning changed.

    ``changed``: share of training rows whose predicted class differs from the dense model's;
    ``enrichment_<kind>``: P(kind | changed) / P(kind), for mislabeled, outlier and canary
    rows — Hooker et al. 2019's pruning-identified exemplars for ONE dense model (the paper
    compares the modal predictions of populations of independently trained dense and pruned
    models; a run here has one model per trainer, so this is the single-model version).
    """
    from fedmem.observer import evaluate_logits

    dense_row, dense_logits = evaluate_logits(model, table, batch_size)
    dense_pred = dense_logits.argmax(1)
    kinds = {"mislabeled": table.is_noisy, "outlier": table.is_outlier, "canary": table.is_canary}
    rows = []
    for s in sparsities:
        pruned = copy.deepcopy(model)
        masks = prune(pruned, s, method=method, seed=seed) if s > 0 else None
        if masks is not None:
            apply_masks(pruned, masks)
        row, logits = evaluate_logits(pruned, table, batch_size)
        changed = logits.argmax(1) != dense_pred
        out: dict[str, Any] = {
            "method": method,
            "sparsity": s,
            "weights_remaining": 1.0 - (sparsity(masks) if masks is not None else 0.0),
            **{k: row[k] for k in ("test_acc", *dense_row) if k in row},
            "changed": float(changed.float().mean()),
        }
        for kind, mask in kinds.items():
            base = float(mask.float().mean())
            if base > 0 and bool(changed.any()):
                out[f"enrichment_{kind}"] = float(mask[changed].float().mean()) / base
        rows.append(out)
    return rows
