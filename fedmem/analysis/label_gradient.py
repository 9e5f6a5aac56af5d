"""Where memorization lives: the label-dependent and label-independent parts of the gradient.

Stephenson, Padhy, Ganesh, Hui, Tang, Chung 2021, "On the geometry of generalization and
memorization in deep neural networks" (ICLR), appendix: Eq. 25 and Fig. A.1. For the
cross-entropy loss of an example ``(x, y)`` with logits ``z = f_theta(x)``, ``p = softmax(z)``
and ``J = dz/dtheta``, the gradient splits exactly into::

    grad_theta CE(f_theta(x), y) = J^T (p - e_y) = J^T p  +  (-J^T e_y)
                                   label-independent      label-dependent

The label-independent part depends on the labels only through the model; the label-dependent
part is minus the gradient of the given label's logit. Averaged over a group of examples, the
label-dependent part is a cross-correlation between the examples' features and their labels:
for randomly relabeled (here: mislabeled) examples it averages out early in training, while for
clean examples it does not (Eq. 25); Fig. A.1 plots both parts per layer of VGG-16 on CIFAR-100
over training: the mislabeled examples' label-dependent part stays close to zero early on.
What averages out is the label-feature correlation: for labels independent of the input, the
mean over examples of ``-e_y h^T`` (a layer with input ``h``) tends to ``-E[e_y] E[h]^T``,
which is not zero when the layer's mean input is not (e.g. after a ReLU).

What is computed (:func:`label_gradient_stats`), per layer group
(:func:`fedmem.analysis.gradients.layer_groups`), with the conventions of
:mod:`fedmem.analysis.gradients` (norms divided by ``sqrt(#params of the layer)`` so layers of
different size compare):

- ``indep_norm_of_mean`` / ``dep_norm_of_mean``: the norm of the group's *mean* part, the
  quantity of Eq. 25 and Fig. A.1 (the contribution of the group to the gradient). Estimated
  without the sampling-noise bias of a sample mean: ``u = (|sum_i g_i|^2 - sum_i |g_i|^2) /
  (n (n - 1))`` is unbiased for ``|E g|^2`` (the same U-statistic as
  :func:`~fedmem.analysis.gradients.mean_gradient_norms`, here over pairs of distinct
  examples); reported as ``sqrt(max(u, 0))``, so 0 means below the sampling noise.
- ``indep_norm`` / ``dep_norm``: the mean over examples of each example's own part norm.
  These do *not* vanish for mislabeled examples (``|J^T e_y|`` is the norm of one logit's
  gradient, whatever the label); they show how large the parts are that cancel in the mean.
- ``cos_of_mean_parts``: cosine between the group's mean label-independent and mean
  label-dependent parts. Stephenson et al. plot only norms; they note that the two parts
  have opposite signs and cancel where the loss is minimized: this cosine goes to -1 when the
  group's mean gradient is small next to its parts.
- ``cos_parts``: the per-example cosine between the two parts, averaged over examples (those
  with two non-zero parts): -1 when each example is fit on its own (``p -> e_y``), the
  per-example view of the same cancellation. Both are given because they answer different
  questions (the group's gradient vs each example's), and the paper fixes neither.

Per-example parts come from vector-Jacobian products with the two cotangents ``p`` and
``-e_y`` (:func:`torch.func.vjp`, batched with :func:`torch.func.vmap`), in chunks of examples
to bound memory; no per-example Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from fedmem.analysis.gradients import cosine, layer_groups

STAT_FIELDS = (
    "indep_norm_of_mean",
    "dep_norm_of_mean",
    "indep_norm",
    "dep_norm",
    "cos_of_mean_parts",
    "cos_parts",
)
# Per-example parts of one chunk take at most about this much memory. Small on the CPU, where
# the reductions are memory-bound (the default MLP: 0.7 s for 800 examples in chunks of 50,
# 2 s in chunks of 400, one thread); large on an accelerator.
CHUNK_BYTES = {"cpu": 32 * 2**20, "accelerator": 2**30}


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout; BatchNorm on its running statistics, so examples do not
    interact), restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _parts(
    model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-example ``(J^T p, -J^T e_y)`` of one chunk, ``{name: (n, *param.shape)}`` each."""

    def one(xi: torch.Tensor, yi: torch.Tensor) -> tuple[dict, dict]:
        def logits(p: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(model, dict(p), (xi.unsqueeze(0),)).squeeze(0)

        z, pullback = vjp(logits, dict(params))
        prob = torch.softmax(z.detach(), dim=-1)
        e_y = (torch.arange(z.shape[-1], device=z.device) == yi).to(z.dtype)
        (indep,) = pullback(prob)
        (dep,) = pullback(-e_y)
        return indep, dep

    return vmap(one)(x, y)


def per_example_parts(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every example's label-independent part ``J^T p`` and label-dependent part ``-J^T e_y``
    of the cross-entropy gradient (Stephenson et al. 2021, Eq. 25), for every trainable
    parameter: ``({name: (n, *shape)}, {name: (n, *shape)})``, detached, on the parameters'
    device. Their sum is each example's gradient of ``CE(f(x_i), y_i)``. One batch: for many
    examples use :func:`label_gradient_stats`, which chunks."""
    params = _trainable(model)
    if not params or len(x) == 0:
        return {}, {}
    device = next(iter(params.values())).device
    with _eval_mode(model):
        return _parts(model, params, x.to(device), y.to(device).long())


class _Acc:
    """Running sums over examples for one layer group and one part."""

    def __init__(self, size: int, device: torch.device):
        self.total = torch.zeros(size, dtype=torch.float64, device=device)  # sum_i g_i
        self.sq = 0.0  # sum_i |g_i|^2
        self.norms = 0.0  # sum_i |g_i|

    def add(self, total: torch.Tensor, sq: torch.Tensor) -> None:
        """A chunk's ``sum_i g_i`` and per-example ``|g_i|^2``."""
        self.total += total
        self.sq += float(sq.sum())
        self.norms += float(sq.sqrt().sum())


def _layer_sums(
    indep: Mapping[str, torch.Tensor], dep: Mapping[str, torch.Tensor], names: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk, one layer group: ``(sum_i a_i, sum_i d_i, |a_i|^2, |d_i|^2, <a_i, d_i>)``
    (a: label-independent, d: label-dependent part), parameter by parameter (no copy of the
    chunk's parts); per-example products in the parts' dtype, sums in float64."""
    sums_a, sums_d, sq_a, sq_d, dot = [], [], 0.0, 0.0, 0.0
    for name in names:
        a, d = indep[name].flatten(1), dep[name].flatten(1)
        sums_a.append(a.sum(0, dtype=torch.float64))
        sums_d.append(d.sum(0, dtype=torch.float64))
        sq_a = sq_a + torch.linalg.vecdot(a, a).double()
        sq_d = sq_d + torch.linalg.vecdot(d, d).double()
        dot = dot + torch.linalg.vecdot(a, d).double()
    return torch.cat(sums_a), torch.cat(sums_d), sq_a, sq_d, dot  # type: ignore[return-value]


def _norm_of_mean(acc: _Acc, n: int) -> float | None:
    """``sqrt(max(u, 0))``, ``u`` the unbiased estimate of ``|E g|^2`` over pairs i != j."""
    if n < 2:
        return None
    u = (float(acc.total.pow(2).sum()) - acc.sq) / (n * (n - 1))
    return math.sqrt(max(u, 0.0)) if math.isfinite(u) else None


def _scaled(v: float | None, num_params: int) -> float | None:
    """``v / sqrt(num_params)`` (layers of different size compare); None if not finite."""
    if v is None or not math.isfinite(v) or num_params == 0:
        return None
    return v / math.sqrt(num_params)


def label_gradient_stats(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int | None = None
) -> dict[str, dict[str, float | int | None]]:
    """Per layer group: the two parts' norms and cosines over the examples ``(x, y)`` (one
    group, e.g. the clean or the mislabeled sample; ``y`` the labels training sees).

    Returns ``{layer: {"indep_norm_of_mean", "dep_norm_of_mean", "indep_norm", "dep_norm",
    "cos_of_mean_parts", "cos_parts", "num_params", "num_examples"}}`` (see the module
    docstring); norms are divided by ``sqrt(num_params)``. ``chunk_size``: examples per
    vmap call (default: as many as keep the chunk's parts under :data:`CHUNK_BYTES`). None
    where undefined: fewer than two examples (norms of means), zero vectors (cosines), and
    non-finite gradients (a diverged model).
    """
    params = _trainable(model)
    groups = layer_groups(model)
    numel = {n: p.numel() for n, p in params.items()}
    if not params:
        return {}
    device = next(iter(params.values())).device
    per_example_bytes = 2 * sum(numel.values()) * next(iter(params.values())).element_size()
    budget = CHUNK_BYTES["cpu" if device.type == "cpu" else "accelerator"]
    chunk = chunk_size or max(1, budget // per_example_bytes)
    sizes = {g: sum(numel[n] for n in names) for g, names in groups.items()}
    acc = {g: (_Acc(s, device), _Acc(s, device)) for g, s in sizes.items()}
    cos_sum = dict.fromkeys(groups, 0.0)
    cos_count = dict.fromkeys(groups, 0)
    n = len(x)
    with _eval_mode(model):
        for i in range(0, n, chunk):
            xb, yb = x[i : i + chunk].to(device), y[i : i + chunk].to(device).long()
            indep, dep = _parts(model, params, xb, yb)
            for g, names in groups.items():
                sum_a, sum_d, sq_a, sq_d, dot = _layer_sums(indep, dep, names)
                acc[g][0].add(sum_a, sq_a)
                acc[g][1].add(sum_d, sq_d)
                norms = (sq_a * sq_d).sqrt()
                ok = (norms > 0) & torch.isfinite(norms)
                cos_sum[g] += float((dot[ok] / norms[ok]).sum())
                cos_count[g] += int(ok.sum())
    out: dict[str, dict[str, float | int | None]] = {}
    for g, (ai, ad) in acc.items():
        k = sizes[g]
        out[g] = {
            "indep_norm_of_mean": _scaled(_norm_of_mean(ai, n), k),
            "dep_norm_of_mean": _scaled(_norm_of_mean(ad, n), k),
            "indep_norm": _scaled(ai.norms / n, k) if n else None,
            "dep_norm": _scaled(ad.norms / n, k) if n else None,
            "cos_of_mean_parts": cosine(ai.total, ad.total) if n else None,
            "cos_parts": cos_sum[g] / cos_count[g] if cos_count[g] else None,
            "num_params": sizes[g],
            "num_examples": n,
        }
    return out


def equal_samples(
    masks: Sequence[torch.Tensor], max_examples: int, rng: np.random.Generator
) -> list[torch.Tensor]:
    """The same number of rows from each mask: ``min(max_examples, smallest group)`` drawn
    without replacement by ``rng`` (sorted row indices), so the groups' statistics carry the
    same sampling noise. An empty group gives empty samples for every group."""
    rows = [torch.nonzero(m.bool().cpu()).flatten().numpy() for m in masks]
    size = min([max_examples, *(len(r) for r in rows)])
    return [torch.from_numpy(np.sort(rng.choice(r, size=size, replace=False))) for r in rows]
