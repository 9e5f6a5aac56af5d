"""The per-step kernels of :mod:`fedmem.federation.batched_train`: one optimizer step of K
stacked models, updating the clients ``[0, a)`` of the stack in place (prefix views).

- :func:`mlp_first_step`: the first SGD step of K MLPs that all hold the global weights
  (single matrix products over all clients' rows; creates the stack);
- :func:`mlp_sgd_step`: an SGD step of stacked MLPs with a hand-written backward, the update
  fused into the weight gradient's product where the optimizer allows it;
- :func:`generic_step`: gradients (batched MLP backward or ``torch.func``), then
  :class:`PrefixOptimizer` (``torch.optim.SGD`` / ``Adam`` semantics, one per client).
"""

from __future__ import annotations

import torch

from fedmem.config import TrainConfig
from fedmem.ensemble.kernels import _mlp_forward, _VmapKernel

_ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as make_optimizer uses them
_ADAM_EPS = 1e-8

Tensors = dict[str, torch.Tensor]


def mlp_first_step(
    start: Tensors,
    opt: PrefixOptimizer,
    layers: list[str],
    xb: torch.Tensor,
    yb: torch.Tensor,
    wb: torch.Tensor,
) -> tuple[Tensors, torch.Tensor]:
    """The first SGD step of K MLPs that all start from ``start``: forward and input gradients
    as single matrix products over all K x B rows; the updated weights become the stack (and
    the gradients the momentum buffers). Returns the stacked weights and the CE (K, B)."""
    cfg = opt.cfg
    k, b_size = xb.shape[:2]
    h = xb.flatten(2)
    acts = []
    for i, name in enumerate(layers):
        acts.append(h)
        w, b = start[f"{name}.weight"], start[f"{name}.bias"]
        h = torch.addmm(b, h.reshape(k * b_size, -1), w.t()).view(k, b_size, -1)
        if i < len(layers) - 1:
            h = h.relu_()
    ce, g = ce_grad(h, yb, wb)
    params: Tensors = {}
    bufs: Tensors = {}
    for i in range(len(layers) - 1, -1, -1):
        name, h = layers[i], acts[i]
        w, b = f"{name}.weight", f"{name}.bias"
        g_in = None
        if i > 0:
            back = torch.mm(g.reshape(k * b_size, -1), start[w]).view(k, b_size, -1)
            g_in = torch.ops.aten.threshold_backward(back, h, 0)
        if cfg.momentum == 0:
            w0 = start[w].unsqueeze(0).expand(k, -1, -1)
            params[w] = torch.baddbmm(w0, g.transpose(1, 2), h, alpha=-cfg.lr)
            params[b] = torch.add(start[b], g.sum(1), alpha=-cfg.lr)
        else:  # torch.optim.SGD starts the buffer at the first gradient
            bufs[w], bufs[b] = torch.bmm(g.transpose(1, 2), h), g.sum(1)
            params[w] = torch.add(start[w], bufs[w], alpha=-cfg.lr)
            params[b] = torch.add(start[b], bufs[b], alpha=-cfg.lr)
        if g_in is not None:
            g = g_in
    if bufs:
        opt.state["buf"] = {n: bufs[n] for n in start}
    return {n: params[n] for n in start}, ce


def ce_grad(logits: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor):
    """Cross-entropy per example (K, B) and d(sum_j wb_j CE_j)/dlogits."""
    logp = torch.log_softmax(logits, dim=-1)
    ce = -logp.gather(-1, yb.unsqueeze(-1)).squeeze(-1)
    g = logp.exp_()
    g.scatter_add_(-1, yb.unsqueeze(-1), torch.full_like(ce, -1.0).unsqueeze(-1))
    return ce, g.mul_(wb.unsqueeze(-1))


def mlp_sgd_step(
    p: Tensors,
    opt: PrefixOptimizer,
    start: Tensors,
    layers: list[str],
    xb: torch.Tensor,
    yb: torch.Tensor,
    wb: torch.Tensor,
    mu: float,
    a: int,
) -> torch.Tensor:
    """One SGD step of the stacked MLPs ``p`` (in place), layer by layer from the output:
    the input gradient with the old weights, then the weights' update."""
    cfg = opt.cfg
    plain = cfg.momentum == 0 and cfg.weight_decay == 0 and mu == 0
    logits, acts = _mlp_forward(p, layers, xb.flatten(2), keep=True)
    ce, g = ce_grad(logits, yb, wb)
    for i in range(len(layers) - 1, -1, -1):
        name, h = layers[i], acts[i]
        w, b = f"{name}.weight", f"{name}.bias"
        g_in = None
        if i > 0:
            g_in = torch.ops.aten.threshold_backward(torch.bmm(g, p[w]), h, 0)
        if plain:
            p[w].baddbmm_(g.transpose(1, 2), h, alpha=-cfg.lr)
            p[b].add_(g.sum(1), alpha=-cfg.lr)
        elif cfg.momentum != 0 and cfg.weight_decay == 0 and mu == 0:
            buf = opt.state["buf"]
            buf[w][:a].baddbmm_(g.transpose(1, 2), h, beta=cfg.momentum)
            buf[b][:a].mul_(cfg.momentum).add_(g.sum(1))
            p[w].add_(buf[w][:a], alpha=-cfg.lr)
            p[b].add_(buf[b][:a], alpha=-cfg.lr)
        else:
            grads = {w: torch.bmm(g.transpose(1, 2), h), b: g.sum(1)}
            opt.update({w: p[w], b: p[b]}, with_proximal(grads, p, start, mu), a, 0)
        if g_in is not None:
            g = g_in
    return ce


def generic_step(
    p: Tensors,
    opt: PrefixOptimizer,
    start: Tensors,
    layers: list[str] | None,
    kernel: _VmapKernel | None,
    xb: torch.Tensor,
    yb: torch.Tensor,
    wb: torch.Tensor,
    mu: float,
    a: int,
    step: int,
) -> torch.Tensor:
    """Gradients of every model (batched MLP backward or torch.func), then the update."""
    if layers is not None:
        logits, acts = _mlp_forward(p, layers, xb.flatten(2), keep=True)
        ce, g = ce_grad(logits, yb, wb)
        grads: Tensors = {}
        for i in range(len(layers) - 1, -1, -1):
            name, h = layers[i], acts[i]
            grads[f"{name}.weight"] = torch.bmm(g.transpose(1, 2), h)
            grads[f"{name}.bias"] = g.sum(1)
            if i > 0:
                g = torch.ops.aten.threshold_backward(torch.bmm(g, p[f"{name}.weight"]), h, 0)
    else:
        with torch.enable_grad():
            grads, ce = kernel.grads(p, xb, yb, wb)  # type: ignore[union-attr]
    opt.update(p, with_proximal(grads, p, start, mu), a, step)
    return ce


def with_proximal(grads: Tensors, p: Tensors, start: Tensors, mu: float) -> Tensors:
    """FedProx: the gradient of ``(mu / 2) ||w - w_global||^2`` added (as autograd sums it)."""
    if mu == 0:
        return grads
    return {n: g.add(p[n] - start[n], alpha=mu) for n, g in grads.items()}


class PrefixOptimizer:
    """A fresh SGD / Adam per client, updating the clients ``[0, a)`` of the stack."""

    def __init__(self, cfg: TrainConfig, params: Tensors | None):
        """Zero state for the stacked ``params`` (None: the first step sets the state)."""
        if cfg.optimizer not in ("sgd", "adam"):
            raise ValueError(f"train.optimizer: unknown {cfg.optimizer!r}")
        self.cfg = cfg
        self.state: dict[str, Tensors] = {}
        if params is None:
            return
        if cfg.optimizer == "sgd" and cfg.momentum != 0:
            self.state["buf"] = {n: torch.zeros_like(t) for n, t in params.items()}
        if cfg.optimizer == "adam":
            self.state["m"] = {n: torch.zeros_like(t) for n, t in params.items()}
            self.state["v"] = {n: torch.zeros_like(t) for n, t in params.items()}

    def update(self, params: Tensors, grads: Tensors, a: int, step: int) -> None:
        """``torch.optim.SGD`` / ``Adam``'s step for the models ``params`` (prefix views of
        ``a`` clients); ``step`` counts the steps taken before (the same for all of them)."""
        cfg = self.cfg
        for n, p in params.items():
            g = grads[n]
            if cfg.weight_decay != 0:
                g = g.add(p, alpha=cfg.weight_decay)
            if cfg.optimizer == "sgd":
                if cfg.momentum != 0:
                    g = self.state["buf"][n][:a].mul_(cfg.momentum).add_(g)
                p.add_(g, alpha=-cfg.lr)
                continue
            beta1, beta2 = _ADAM_BETAS
            t = step + 1
            m, v = self.state["m"][n][:a], self.state["v"][n][:a]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(_ADAM_EPS)
            p.addcdiv_(m, denom, value=-cfg.lr / (1 - beta1**t))
