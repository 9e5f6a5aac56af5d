"""Forward and gradient kernels of the batched ensemble trainer over stacked parameters.

``bmm`` (MLP only): forward and a hand-written backward with batched matrix products.
``vmap`` (any model without BatchNorm): ``torch.func.vmap(grad(loss))`` over
``functional_call``. See :mod:`fedmem.ensemble` for the semantics.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedmem.models.architectures import MLP


def _mlp_layers(model: nn.Module) -> list[str] | None:
    """Module names of the MLP's linear layers in order, or None for other models."""
    if not isinstance(model, MLP):
        return None
    return [f"net.{i}" for i, m in enumerate(model.net) if isinstance(m, nn.Linear)]


def _mlp_forward(
    params: Mapping[str, torch.Tensor], layers: list[str], x: torch.Tensor, keep: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (K, B, C) of stacked MLPs on x (K, B, D); with ``keep`` the layer inputs too."""
    acts: list[torch.Tensor] = []
    h = x
    last = len(layers) - 1
    for i, name in enumerate(layers):
        if keep:
            acts.append(h)
        w, b = params[f"{name}.weight"], params[f"{name}.bias"]
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if i < last:
            h = h.relu_()
    return h, acts


def _mlp_grads(
    params: Mapping[str, torch.Tensor],
    layers: list[str],
    xb: torch.Tensor,
    yb: torch.Tensor,
    wb: torch.Tensor,
    accumulate: dict[str, torch.Tensor] | None = None,
    beta: float = 0.0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradients of sum_j wb[k, j] * CE_kj per model, and the CE values (K, B).

    Hand-written backward: dlogits = (softmax - onehot) * w; for each linear layer
    dW = dout^T @ in, db = sum dout, din = dout @ W masked by the ReLU (output > 0).
    With ``accumulate`` (e.g. SGD momentum buffers), ``accumulate <- beta * accumulate + grad``
    in place, inside the matrix product for the weights (``baddbmm_``), and it is returned.
    """
    logits, acts = _mlp_forward(params, layers, xb.flatten(2), keep=True)
    logp = torch.log_softmax(logits, dim=-1)
    ce = -logp.gather(-1, yb.unsqueeze(-1)).squeeze(-1)
    g = logp.exp_()
    g.scatter_add_(-1, yb.unsqueeze(-1), torch.full_like(ce, -1.0).unsqueeze(-1))
    g.mul_(wb.unsqueeze(-1))
    grads: dict[str, torch.Tensor] = {}
    for i in range(len(layers) - 1, -1, -1):
        name, a = layers[i], acts[i]
        if accumulate is None:
            grads[f"{name}.weight"] = torch.bmm(g.transpose(1, 2), a)
            grads[f"{name}.bias"] = g.sum(1)
        else:
            grads[f"{name}.weight"] = accumulate[f"{name}.weight"].baddbmm_(
                g.transpose(1, 2), a, beta=beta
            )
            grads[f"{name}.bias"] = accumulate[f"{name}.bias"].mul_(beta).add_(g.sum(1))
        if i > 0:
            g = torch.ops.aten.threshold_backward(torch.bmm(g, params[f"{name}.weight"]), a, 0)
    return grads, ce


class _VmapKernel:
    """Per-model gradients of the weighted cross-entropy with torch.func over stacked params."""

    def __init__(self, template: nn.Module, buffers: Mapping[str, torch.Tensor]):
        self.base = template.to("meta")
        self.buffers = dict(buffers)

        def loss(params, buffers, xb, yb, wb):
            logits = functional_call(self.base, (params, buffers), (xb,))
            ce = F.cross_entropy(logits, yb, reduction="none")
            return (ce * wb).sum(), ce.detach()

        self._grad = vmap(grad(loss, has_aux=True), in_dims=(0, 0, 0, 0, 0))
        self._fwd = vmap(
            lambda p, b, xb: functional_call(self.base, (p, b), (xb,)), in_dims=(0, 0, None)
        )

    def grads(self, params, xb, yb, wb):
        return self._grad(params, self.buffers, xb, yb, wb)

    def logits(self, params, buffers, x):
        return self._fwd(params, buffers, x)
