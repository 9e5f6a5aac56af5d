"""Neuron flipping: how many units must be zeroed before a training example's prediction flips.

Maini, Mozer, Sedghi, Lipton, Kolter, Zhang 2023, "Can Neural Network Memorization Be
Localized?" (ICML), Sec. 4 ("memorization is confined to a few neurons"): for
one training example at a time, units of the trained model are removed greedily, each step
the one a gradient attribution ranks highest, until the model no longer predicts the
example's *given* label. Mislabeled (memorized) examples flip after very few units (about 5
channels of a ResNet), clean examples need many more, and the units sit in several layers.

The rule, as the authors' code does it (``experiments/neuron_flipping/attribution_utils.py``
of pratyushmaini/localizing-memorization; read, not copied):

- Objective. With ``m`` the current keep-mask of the units, ``G(m) = CE(f_m(x), y) -
  population_weight * mean_{j in R} CE(f_m(x_j), y_j)``: raise the loss of the example on its
  given label ``y`` while holding the loss of a reference batch ``R`` of training examples
  (given labels) down, so that the units removed are specific to the example rather than
  ones that break the model. The authors' batch is the training batch holding the example
  (weights ``-1`` for the example, ``1/|batch|`` for the others); ours is a fixed random
  sample of ``reference`` training rows, the same for every example (our choice).
- Attribution. First-order estimate of what zeroing a unit adds to ``G``:
  ``score_u = -dG/dm_u = -sum_positions a_u * dG/da_u`` (activation times gradient; for a
  channel the sum runs over its positions). The authors take ``theta * dG/dtheta`` per
  parameter, summed over a convolution's output channel; for a bias-free convolution followed
  by a ReLU that sum equals ours for the channel it produces.
- Greedy step. Zero the unit with the largest score among those not yet zeroed, only if that
  score is positive (the authors' rule; with no positive score their loop cannot progress, we
  stop and report ``no_positive_attribution``). Recompute the attribution after each step.
- Stop when the argmax of ``f_m(x)`` differs from the given label (a flip to *any* other
  class), or at ``max_units`` zeroed units (``cap``, our safeguard; did not flip).

What a unit is (ours, for the project's models, :mod:`fedmem.models.architectures`): one
output feature of an ``nn.ReLU`` module (dim 1 of its output), i.e. a hidden neuron after a
``Linear`` layer (MLP; the authors zero individual weights there) and a channel after a
convolution (CNNs, the paper's "channels"). Units are zeroed by forward hooks that multiply
the ReLU output by a mask; the model classes are not edited. Each unit's *layer* is the
nearest ``Linear``/``Conv`` module run before its ReLU (a group of
:func:`fedmem.analysis.gradients.layer_groups`).

Only examples the model predicts as their given label are analyzed (others have nothing to
flip; the paper's models fit the whole training set). :func:`min_flip_subsets` is the
exhaustive reference (all ``2^U`` masks) for tiny models.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn

PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class UnitLayer:
    """One hooked ReLU: ``module`` (its name), ``layer`` (the Linear/Conv producing its input),
    ``size`` (units: dim 1 of its output) and ``offset`` (its first unit's global index)."""

    module: str
    layer: str
    size: int
    offset: int


def unit_layers(model: nn.Module, example: torch.Tensor) -> list[UnitLayer]:
    """The units of ``model``, found by one forward pass of ``example`` (a batch of >= 1)."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[nn.Module, torch.Size]] = []

    def record(module: nn.Module, _inp: object, out: torch.Tensor) -> None:
        calls.append((module, out.shape))

    handles = [
        m.register_forward_hook(record)
        for m in model.modules()
        if isinstance(m, (nn.ReLU, *PRODUCERS))
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    out: list[UnitLayer] = []
    producer, offset = "", 0
    for module, shape in calls:
        if isinstance(module, PRODUCERS):
            producer = names[module]
        elif names[module] not in {u.module for u in out}:
            out.append(UnitLayer(names[module], producer, int(shape[1]), offset))
            offset += int(shape[1])
    return out


@contextmanager
def masked_units(
    model: nn.Module, layers: Sequence[UnitLayer], mask: torch.Tensor
) -> Iterator[None]:
    """Within the block, every forward multiplies unit ``u`` of input row ``i`` by
    ``mask[i, u]`` (``mask``: rows x total units; 0 zeroes the unit's whole activation)."""
    modules = dict(model.named_modules())
    handles = []
    for lay in layers:
        cols = mask[:, lay.offset : lay.offset + lay.size]

        def hook(_m: nn.Module, _i: object, out: torch.Tensor, cols=cols) -> torch.Tensor:
            return out * cols.reshape(*cols.shape, *([1] * (out.dim() - 2))).to(out.dtype)

        handles.append(modules[lay.module].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class FlipResult:
    """Per analyzed example (in input order): ``status`` (``flipped``, ``cap``,
    ``no_positive_attribution``, ``not_predicted``: the model did not predict the given label
    to begin with), ``zeroed`` (global unit indices in the order removed) and, for flipped
    examples, ``acc_drop`` (accuracy on the check set before minus after, when one is given)."""

    layers: list[UnitLayer]
    status: list[str]
    zeroed: list[list[int]]
    acc_drop: list[float | None]

    @property
    def units(self) -> list[int | None]:
        """Units zeroed until the flip; None where the example did not flip."""
        return [
            len(z) if s == "flipped" else None
            for s, z in zip(self.status, self.zeroed, strict=True)
        ]

    def layer_of(self, unit: int) -> str:
        return next(u.layer for u in self.layers if u.offset <= unit < u.offset + u.size)


def _objective(
    model: nn.Module,
    layers: Sequence[UnitLayer],
    mask: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    ref_x: torch.Tensor,
    ref_y: torch.Tensor,
    population_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``G`` per example row of ``mask`` and the examples' logits: one forward of
    ``E * (1 + |R|)`` rows (each example followed by the reference batch, under its mask)."""
    e, r = len(x), len(ref_x) if population_weight else 0
    inputs = x.unsqueeze(1)
    if r:
        inputs = torch.cat([inputs, ref_x.unsqueeze(0).expand(e, *ref_x.shape)], 1)
    rows = mask.repeat_interleave(1 + r, dim=0)
    with masked_units(model, layers, rows):
        logits = model(inputs.reshape(e * (1 + r), *x.shape[1:])).reshape(e, 1 + r, -1)
    g = F.cross_entropy(logits[:, 0], y, reduction="none")
    if r:
        ref = F.cross_entropy(logits[:, 1:].reshape(e * r, -1), ref_y.repeat(e), reduction="none")
        g = g - population_weight * ref.reshape(e, r).mean(1)
    return g, logits[:, 0].detach()


def flip_units(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ref_x: torch.Tensor,
    ref_y: torch.Tensor,
    *,
    max_share: float = 0.1,
    population_weight: float = 1.0,
    chunk: int = 64,
    check: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> FlipResult:
    """Greedy neuron flipping (module docstring) of every example ``(x[i], y[i])``.

    Batched: each step, all examples not yet done take one step together, ``chunk`` examples
    per forward/backward (their masks stacked). ``max_units = max(1, round(max_share * U))``.
    ``check``: inputs and labels on which the accuracy drop caused by each flipped example's
    zeroed units is measured (the authors measure it on the training set). The model runs in
    eval mode, on its own device and dtype; it is left unchanged.
    """
    if not 0.0 < max_share <= 1.0:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    x, ref_x = x.to(dev, dtype), ref_x.to(dev, dtype)
    y, ref_y = y.to(dev).long(), ref_y.to(dev).long()
    was_training = model.training
    model.eval()
    layers = unit_layers(model, x[:1])
    total = sum(u.size for u in layers)
    cap = max(1, round(max_share * total))
    n = len(x)
    mask = torch.ones(n, total, device=dev, dtype=dtype)
    status = ["" for _ in range(n)]
    zeroed: list[list[int]] = [[] for _ in range(n)]
    try:
        for step in range(cap + 1):
            todo = [i for i in range(n) if not status[i]]
            for start in range(0, len(todo), chunk):
                idx = torch.tensor(todo[start : start + chunk], device=dev)
                m = mask[idx].clone().requires_grad_(True)
                g, logits = _objective(
                    model, layers, m, x[idx], y[idx], ref_x, ref_y, population_weight
                )
                (grad,) = torch.autograd.grad(g.sum(), m)
                score = (-grad).masked_fill(mask[idx] == 0, -torch.inf)
                best = score.argmax(1)
                for j, i in enumerate(idx.tolist()):
                    if int(logits[j].argmax()) != int(y[i]):
                        status[i] = "flipped" if step else "not_predicted"
                    elif step == cap:
                        status[i] = "cap"
                    elif not bool(score[j, best[j]] > 0):
                        status[i] = "no_positive_attribution"
                    else:
                        mask[i, best[j]] = 0
                        zeroed[i].append(int(best[j]))
        drops = _acc_drops(model, layers, mask, status, check, chunk) if check else [None] * n
    finally:
        model.train(was_training)
    return FlipResult(layers, status, zeroed, drops)


@torch.no_grad()
def _acc_drops(
    model: nn.Module,
    layers: Sequence[UnitLayer],
    mask: torch.Tensor,
    status: Sequence[str],
    check: tuple[torch.Tensor, torch.Tensor],
    chunk: int,
) -> list[float | None]:
    """Per flipped example: accuracy on ``check`` unmasked minus with the example's mask."""
    cx, cy = check[0].to(mask.device, mask.dtype), check[1].to(mask.device).long()
    base = float((model(cx).argmax(1) == cy).float().mean())
    out: list[float | None] = [None] * len(status)
    flipped = [i for i, s in enumerate(status) if s == "flipped"]
    per = max(1, chunk * 16 // max(len(cx), 1))
    for start in range(0, len(flipped), per):
        idx = flipped[start : start + per]
        rows = mask[idx].repeat_interleave(len(cx), dim=0)
        with masked_units(model, layers, rows):
            pred = model(cx.repeat(len(idx), *([1] * (cx.dim() - 1)))).argmax(1)
        acc = (pred.reshape(len(idx), len(cx)) == cy).float().mean(1)
        for i, a in zip(idx, acc.tolist(), strict=True):
            out[i] = base - a
    return out


@torch.no_grad()
def min_flip_subsets(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_units: int = 16
) -> list[tuple[int, ...] | None]:
    """Exhaustive reference: per example, a smallest set of units whose zeroing makes the
    prediction differ from ``y`` (the first in size-then-lexicographic order); ``()`` if the
    model does not predict ``y`` to begin with, None if no subset flips it. All ``2^U`` masks
    in one forward per example; only for models with ``U <= max_units`` units."""
    layers = unit_layers(model, x[:1])
    total = sum(u.size for u in layers)
    if total > max_units:
        raise ValueError(f"{total} units: exhaustive search is limited to {max_units}")
    subsets = [s for k in range(total + 1) for s in combinations(range(total), k)]
    param = next(model.parameters())
    masks = torch.ones(len(subsets), total, dtype=param.dtype, device=param.device)
    for row, s in enumerate(subsets):
        masks[row, list(s)] = 0
    was_training = model.training
    model.eval()
    out: list[tuple[int, ...] | None] = []
    try:
        for xi, yi in zip(x.to(param.device, param.dtype), y.tolist(), strict=True):
            with masked_units(model, layers, masks):
                pred = model(xi.unsqueeze(0).expand(len(subsets), *xi.shape)).argmax(1)
            hits = torch.nonzero(pred != yi).flatten()
            out.append(subsets[int(hits[0])] if len(hits) else None)
    finally:
        model.train(was_training)
    return out
