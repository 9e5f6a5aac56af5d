"""Where memorization lives: per-layer gradients of clean vs mislabeled examples.

Maini, Mozer, Sedghi, Lipton, Kolter, Zhang 2023, "Can Neural Network Memorization Be
Localized?" (ICML), Sec. 3.1 "gradient accounting", Fig. 2: for every layer, the gradient of
the training loss summed over the clean examples and summed over the mislabeled examples; their
norms divided by sqrt(#parameters of the layer) (so layers of different size compare) and the
cosine between them. Mislabeled examples are few but contribute gradient norm comparable to the
clean ones, in every layer, and their gradient points against the clean one (negative cosine):
memorization is not confined to the last layers.

:func:`update_cosine` is the federated analogue: per layer, the cosine between the mean model
update of clients holding mislabeled data and the mean update of clean clients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Trainable parameter names grouped by the module that owns them, in definition order.

    ``net.1.weight``, ``net.1.bias`` -> ``{"net.1": ["net.1.weight", "net.1.bias"]}``. A
    parameter registered on the root module forms its own group named after the parameter.
    """
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rpartition(".")[0] or name
        groups.setdefault(owner, []).append(name)
    return groups


def summed_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> dict[str, torch.Tensor]:
    """``{name: d/dtheta sum_i CE(f(x_i), y_i)}`` for every trainable parameter.

    Batched forward/backward passes whose gradients are accumulated (the sum over batches of
    per-batch summed losses is the summed loss). The model runs in eval mode (no dropout;
    BatchNorm uses its running statistics, so examples do not interact), and is restored to
    its previous mode. Gradients are taken with :func:`torch.autograd.grad`: parameters and
    any existing ``.grad`` are left untouched. Results are detached, on the parameters' device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    if not params:
        return {}
    device = params[0].device
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device)
            yb = y[i : i + batch_size].to(device).long()
            loss = F.cross_entropy(model(xb), yb, reduction="sum")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc.add_(g)
    finally:
        model.train(was_training)
    return dict(zip(names, total, strict=True))


def _flat(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([tensors[n].detach().reshape(-1).double().cpu() for n in names])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Cosine similarity; None when either vector is zero (undefined)."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0 or not (math.isfinite(na) and math.isfinite(nb)):
        return None
    return float(torch.dot(a, b)) / (na * nb)


def gradient_geometry(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    is_noisy: torch.Tensor,
    batch_size: int = 1024,
    is_clean: torch.Tensor | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Per layer group: clean vs mislabeled summed-gradient geometry (Maini et al. 2023, Fig. 2).

    ``g_clean`` / ``g_noisy``: :func:`summed_gradients` over the clean / mislabeled examples,
    with ``y`` the labels training sees (``table.y_obs``), flattened over the group's parameters.
    Returns ``{group: {"cos", "norm_clean", "norm_noisy", "num_params", "num_clean",
    "num_noisy"}}`` with ``cos = <g_clean, g_noisy> / (|g_clean| |g_noisy|)`` and
    ``norm_* = |g_*| / sqrt(num_params)``. Clean examples are ``~is_noisy`` unless ``is_clean``
    is given (e.g. ``table.is_clean``, which also leaves out outliers and canaries). A side
    without examples gives None norms and a None cosine; a zero gradient gives a None cosine.
    """
    noisy = is_noisy.bool().cpu()
    clean = (~noisy) if is_clean is None else is_clean.bool().cpu()
    groups = layer_groups(model)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    sides: dict[str, dict[str, torch.Tensor] | None] = {}
    for side, mask in (("clean", clean), ("noisy", noisy)):
        idx = torch.nonzero(mask).flatten()
        sides[side] = summed_gradients(model, x[idx], y[idx], batch_size) if len(idx) else None
    counts = {"clean": int(clean.sum()), "noisy": int(noisy.sum())}

    out: dict[str, dict[str, float | int | None]] = {}
    for group, names in groups.items():
        flat = {s: (_flat(g, names) if g is not None else None) for s, g in sides.items()}
        num_params = sum(numel[n] for n in names)
        scale = math.sqrt(num_params) if num_params else math.nan
        gc, gn = flat["clean"], flat["noisy"]
        out[group] = {
            "cos": _cos(gc, gn) if gc is not None and gn is not None else None,
            "norm_clean": float(gc.norm()) / scale if gc is not None else None,
            "norm_noisy": float(gn.norm()) / scale if gn is not None else None,
            "num_params": num_params,
            "num_clean": counts["clean"],
            "num_noisy": counts["noisy"],
        }
    return out


def _mean_update(
    updates: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]
) -> torch.Tensor:
    return torch.stack([_flat(u, names) for u in updates]).mean(0)


def update_cosine(
    updates_a: Sequence[Mapping[str, torch.Tensor]],
    updates_b: Sequence[Mapping[str, torch.Tensor]],
    groups: Mapping[str, Sequence[str]],
) -> dict[str, float | None]:
    """Per layer group: cosine between the mean update of clients in ``a`` and of clients in
    ``b`` (the federated analogue of Maini et al. 2023, Fig. 2).

    An update is a state-dict delta ``{name: theta_client - theta_global}``; ``groups`` maps a
    group to parameter names (:func:`layer_groups`; buffers such as BatchNorm statistics are
    not in it). Typically ``a`` = clients holding mislabeled examples, ``b`` = clean clients.
    None for every group when either list is empty, and for a group whose mean update is zero.
    """
    out: dict[str, float | None] = {}
    for group, names in groups.items():
        if not updates_a or not updates_b:
            out[group] = None
            continue
        out[group] = _cos(_mean_update(updates_a, names), _mean_update(updates_b, names))
    return out
