"""Pruning-identified exemplars (PIEs) over populations of models (Hooker, Courville, Clark,
Dauphin, Frome 2019, "What Do Compressed Deep Neural Networks Forget?", Sec. 2.2).

A PIE is an example whose *modal* prediction over a population of pruned models differs from
the modal prediction over the population of dense models it was pruned from (Hooker et al.,
Eq. 2: ``y_t* != y_0*`` with ``y* = mode_k f_k(x)``). The paper finds PIEs over-represented
among atypical, mislabeled and hard examples: pruning forgets the long tail first.

Here the population is trained by the batched ensemble trainer (:mod:`fedmem.ensemble`) on
all the run's training rows, one model per seed (central: the central run's training;
federated: plain FedAvg over the run's clients, :mod:`fedmem.privacy.audit.shadows`), and
every member is pruned *one-shot* by magnitude without retraining. Ours, not the paper's: the
paper prunes gradually during training (Zhu & Gupta 2017) and evaluates PIEs on held-out data;
memorization concerns training examples, so PIEs are counted among the training rows here
(mislabeled rows exist only there), and the enrichment of a group is
``P(group | PIE) / P(group)``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedmem.methods.pruning import apply_masks, prune, sparsity


def modal_prediction(preds: torch.Tensor) -> torch.Tensor:
    """(K, N) class predictions of K models -> (N,) the most frequent class per example
    (ties: the smallest class index, as :func:`torch.mode` breaks them)."""
    return torch.mode(preds, dim=0).values


def pie_mask(dense_preds: torch.Tensor, pruned_preds: torch.Tensor) -> torch.Tensor:
    """(N,) bool: examples whose modal prediction differs between the two populations."""
    return modal_prediction(dense_preds) != modal_prediction(pruned_preds)


def enrichment(flags: torch.Tensor, groups: Mapping[str, torch.Tensor]) -> dict[str, float | None]:
    """``P(group | flagged) / P(group)`` per group (None when the group or the flagged set is
    empty): 1 = flagged as often as any other example, above 1 = over-represented."""
    out: dict[str, float | None] = {}
    for name, member in groups.items():
        base = float(member.float().mean())
        out[name] = (
            float(member[flags].float().mean()) / base if base > 0 and bool(flags.any()) else None
        )
    return out


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def population_sweep(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    groups: Mapping[str, torch.Tensor],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    sparsities: Sequence[float],
    method: str = "magnitude",
    seed: int = 0,
    batch_size: int = 4096,
) -> list[dict[str, Any]]:
    """Prune every model of the population one-shot to each sparsity; per sparsity: the share
    of PIEs among the rows ``x``, their enrichment per group (``enrichment_<group>``), and the
    pruned members' mean test accuracy."""
    dense = torch.stack([_predict(m, x, batch_size) for m in models])
    rows = []
    for s in sparsities:
        preds, test_acc, remaining = [], [], 1.0
        for k, model in enumerate(models):
            pruned = copy.deepcopy(model)
            if s > 0:
                masks = prune(pruned, s, method=method, seed=seed + k)  # type: ignore[arg-type]
                apply_masks(pruned, masks)
                remaining = 1.0 - sparsity(masks)
            preds.append(_predict(pruned, x, batch_size))
            test_acc.append(float((_predict(pruned, x_test, batch_size) == y_test).float().mean()))
        pies = pie_mask(dense, torch.stack(preds))
        rows.append(
            {
                "sparsity": s,
                "population": len(models),
                "weights_remaining": remaining,
                "test_acc": sum(test_acc) / len(test_acc),
                "pie_share": float(pies.float().mean()),
                **{f"enrichment_{g}": v for g, v in enrichment(pies, groups).items()},
            }
        )
    return rows
