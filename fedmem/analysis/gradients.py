"""Where memorization lives: per-layer gradients of clean vs mislabeled examples.

Maini, Mozer, Sedghi, Lipton, Kolter, Zhang 2023, "Can Neural Network Memorization Be
Localized?" (ICML), Sec. 3.1 "gradient accounting", Fig. 2: for every layer, the gradient of
the training loss from the clean examples and from the mislabeled examples, their norms divided
by sqrt(#parameters of the layer) (so layers of different size compare) and the cosine between
them. Mislabeled examples are few but contribute gradient norm comparable to the clean ones, in
every layer, and their gradient points against the clean one (negative cosine): memorization is
not confined to the last layers.

Maini et al. sum over all examples of a group. Here a group is a capped subsample, so a sum
would scale with the subsample size; :func:`gradient_geometry` reports the norm of each group's
*mean* gradient instead (``norm_of_mean_*``), estimated without the sampling-noise bias a
sample mean carries (:func:`mean_gradient_norms`). It measures what the examples of a group
share, not how many they are: Maini et al.'s sums grow with the group's size, and their norm
also carries every example's own gradient (``sum_i |g_i|^2``), which the estimate leaves out.

:func:`update_cosine` is the federated analogue: per layer, the cosine between the mean model
update of two groups of clients; :func:`split_clients` defines the groups (clients holding
mislabeled data vs clean clients where both exist, else the noisier vs the cleaner half).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Cosine similarity; None when either vector is zero (undefined).

    Computed on one torch thread: torch's dot product and sums group their partial sums by
    the thread count, so the same float64 vectors gave cosines differing in the last bit with
    one and two threads (a resumed run and an uninterrupted one then wrote different numbers).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        na, nb = float(a.norm()), float(b.norm())
        if na == 0.0 or nb == 0.0 or not (math.isfinite(na) and math.isfinite(nb)):
            return None
        return float(torch.dot(a, b)) / (na * nb)
    finally:
        torch.set_num_threads(before)


def fold_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    folds: int = 8,
    batch_size: int = 1024,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, float], list[int]]:
    """Summed gradients of ``folds`` disjoint random folds of the rows
    (:func:`summed_gradients` each).

    8 folds use 7/8 of all pairs of rows for the estimate at about 1.2x the cost of one summed
    gradient (16 folds: 15/16 at 1.8x; measured on the MLP of the presets, 2048 rows).

    Rows go to folds by a permutation drawn from ``seed``, not by their order (rows in table
    order may be grouped by client or class; pairs across contiguous folds would not be random
    pairs). Returns ``(total, fold_sq, sizes)``: the summed gradient over all rows (as
    :func:`summed_gradients`, float64 on the CPU), ``{name: sum_k |S_k[name]|^2}`` over the
    fold sums ``S_k``, and the fold sizes (``min(folds, len(x))`` folds, sizes within one).
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    parts = [p for p in order.tensor_split(min(folds, len(x))) if len(p)]
    total: dict[str, torch.Tensor] = {}
    fold_sq: dict[str, float] = {}
    for part in parts:
        g = summed_gradients(model, x[part], y[part], batch_size)
        for name, t in g.items():
            t = t.detach().double().cpu()
            total[name] = total[name] + t if name in total else t
            fold_sq[name] = fold_sq.get(name, 0.0) + float(t.pow(2).sum())
    return total, fold_sq, [len(p) for p in parts]


def mean_gradient_norms(
    total: Mapping[str, torch.Tensor],
    fold_sq: Mapping[str, float],
    sizes: Sequence[int],
    groups: Mapping[str, Sequence[str]],
) -> dict[str, float | None]:
    """Per layer group, an unbiased estimate of ``|E g|^2``, the squared norm of the mean
    per-example gradient, from :func:`fold_gradients`.

    The squared norm of a sample mean is biased by the sampling noise, ``E|mean_n|^2 = |E g|^2
    + tr(Cov g) / n``, so it grows as the sample shrinks. Summing over pairs of examples from
    different folds only (a U-statistic, Hoeffding 1948), with ``S = sum_k S_k`` and ``n =
    sum_k n_k``::

        (|S|^2 - sum_k |S_k|^2) / (n^2 - sum_k n_k^2) = mean_{i, j in different folds} <g_i, g_j>

    whose expectation is ``|E g|^2`` for rows drawn at random from a group, whatever their
    number (for a sample without replacement from a finite group: the same statistic over the
    whole group). It can be negative when the mean is below the noise. None with one row, and
    for non-finite gradients (a diverged model).
    """
    n = sum(sizes)
    pairs = n * n - sum(k * k for k in sizes)
    out: dict[str, float | None] = {}
    for group, names in groups.items():
        if pairs <= 0 or not all(name in total for name in names):
            out[group] = None
            continue
        sq = float(_flat(total, names).pow(2).sum()) - sum(fold_sq[name] for name in names)
        out[group] = sq / pairs if math.isfinite(sq) else None
    return out


def gradient_geometry(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    is_noisy: torch.Tensor,
    batch_size: int = 1024,
    is_clean: torch.Tensor | None = None,
    folds: int = 8,
) -> dict[str, dict[str, float | int | None]]:
    """Per layer group: clean vs mislabeled gradient geometry (Maini et al. 2023, Fig. 2).

    ``y`` holds the labels training sees (``table.y_obs``). Clean examples are ``~is_noisy``
    unless ``is_clean`` is given (e.g. ``table.is_clean``, which also leaves out outliers and
    canaries). Returns ``{group: {"cos", "norm_of_mean_clean", "norm_of_mean_noisy",
    "num_params", "num_clean", "num_noisy"}}``:

    - ``cos``: cosine between the clean and the mislabeled summed (equivalently, mean)
      gradients over the group's parameters, as in Maini et al.;
    - ``norm_of_mean_*``: ``sqrt(max(0, u)) / sqrt(num_params)`` with ``u`` the unbiased
      estimate of the squared norm of the side's mean per-example gradient
      (:func:`mean_gradient_norms`, over ``folds`` folds). A mean, not a sum: sides with
      different numbers of examples (and a capped subsample) compare; 0 means the mean
      gradient is below the sampling noise of the estimate.

    A side without examples gives None norms and a None cosine, one example a None norm; a
    zero gradient gives a None cosine.
    """
    noisy = is_noisy.bool().cpu()
    clean = (~noisy) if is_clean is None else is_clean.bool().cpu()
    groups = layer_groups(model)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    sums: dict[str, dict[str, torch.Tensor] | None] = {}
    norms: dict[str, dict[str, float | None]] = {}
    for side, mask in (("clean", clean), ("noisy", noisy)):
        idx = torch.nonzero(mask).flatten()
        if len(idx) == 0:
            sums[side], norms[side] = None, dict.fromkeys(groups)
            continue
        total, fold_sq, sizes = fold_gradients(model, x[idx], y[idx], folds, batch_size)
        sums[side], norms[side] = total, mean_gradient_norms(total, fold_sq, sizes, groups)
    counts = {"clean": int(clean.sum()), "noisy": int(noisy.sum())}

    out: dict[str, dict[str, float | int | None]] = {}
    for group, names in groups.items():
        num_params = sum(numel[n] for n in names)
        scale = math.sqrt(num_params) if num_params else math.nan
        gc, gn = (_flat(s, names) if s is not None else None for s in sums.values())
        row: dict[str, float | int | None] = {
            "cos": cosine(gc, gn) if gc is not None and gn is not None else None
        }
        for side in ("clean", "noisy"):
            u = norms[side][group]
            row[f"norm_of_mean_{side}"] = None if u is None else math.sqrt(max(u, 0.0)) / scale
        row.update(num_params=num_params, num_clean=counts["clean"], num_noisy=counts["noisy"])
        out[group] = row
    return out


@dataclass
class ClientSplit:
    """Two groups of a round's clients for :func:`update_cosine`, and how they were drawn."""

    split: str  # "mislabeled_vs_clean" or "noisy_share_above_median"
    threshold: float  # noisier: noisy share > threshold; cleaner: <= threshold
    noisier: list[int]
    cleaner: list[int]
    noisy_share: dict[int, float]

    def record(self) -> dict[str, Any]:
        """The split as output columns: definition, threshold, group sizes and mean shares."""

        def mean(ids: list[int]) -> float | None:
            return sum(self.noisy_share[i] for i in ids) / len(ids) if ids else None

        return {
            "split": self.split,
            "threshold": self.threshold,
            "noisier_clients": len(self.noisier),
            "cleaner_clients": len(self.cleaner),
            "noisier_mean_share": mean(self.noisier),
            "cleaner_mean_share": mean(self.cleaner),
        }


def split_clients(noisy_share: Mapping[int, float]) -> ClientSplit:
    """Split clients by the share of mislabeled examples they hold.

    Where clean clients (share 0) and clients holding mislabeled data both exist (e.g.
    ``data.noise.client_rates``), the groups are those (``"mislabeled_vs_clean"``, threshold
    0). Otherwise (e.g. symmetric noise on every client), the noisier group holds the clients
    whose share is above the median share of these clients, the cleaner group the others
    (``"noisy_share_above_median"``): with distinct shares, two halves. Every client is in
    exactly one group; a group is empty only when all shares are equal.
    """
    shares = {int(k): float(v) for k, v in noisy_share.items()}
    values = sorted(shares.values())
    if values and values[0] == 0.0 < values[-1]:
        split, threshold = "mislabeled_vs_clean", 0.0
    else:
        split = "noisy_share_above_median"
        mid = len(values) // 2
        threshold = (
            (values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2)
            if values
            else 0.0
        )
    ids = sorted(shares)
    return ClientSplit(
        split,
        threshold,
        noisier=[i for i in ids if shares[i] > threshold],
        cleaner=[i for i in ids if shares[i] <= threshold],
        noisy_share=shares,
    )


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
    not in it). Typically ``a`` / ``b`` = the noisier / cleaner clients of
    :func:`split_clients`.
    None for every group when either list is empty, and for a group whose mean update is zero.
    """
    out: dict[str, float | None] = {}
    for group, names in groups.items():
        if not updates_a or not updates_b:
            out[group] = None
            continue
        out[group] = cosine(_mean_update(updates_a, names), _mean_update(updates_b, names))
    return out
