"""Local training of many federated clients at once, as stacked models (``backend=batched``).

:func:`train_clients` gives every client exactly the round the ClientApp gives it
(:func:`fedmem.train.train_epochs` as ``client_app.train`` calls it), for K clients side by
side on parameters stacked along a leading client dimension:

- batch order :func:`~fedmem.train.keyed_order` ``(seed, round, rows, table_size)``: one key
  stream per (round, epoch) shared by all clients, each visiting its own rows by ascending key;
  ``train.local_epochs`` passes of ``train.batch_size`` rows, the last batch of an epoch partial;
- loss: mean cross-entropy of the batch, plus FedProx's ``(mu / 2) ||w - w_global||^2`` when
  ``mu > 0`` (``train.proximal_mu``); the reported loss is the mean cross-entropy over all
  visits, as :class:`~fedmem.train.TrainResult` reports it;
- a fresh optimizer per client and round (:func:`~fedmem.train.make_optimizer`): SGD as
  ``torch.optim.SGD`` (weight decay added to the gradient, momentum buffer started at the first
  gradient) or Adam as ``torch.optim.Adam`` (L2 weight decay, bias-corrected moments).

Uneven clients: client k takes ``epochs x ceil(n_k / batch_size)`` steps, its epochs one after
another. Clients are sorted by step count (descending), so at step s the clients still
training are a prefix of the stack, and every update runs on prefix views ``t[:a]``: a client
whose steps are done is not touched again (no weight decay, no momentum or Adam update).

Kernels: the MLP uses batched matrix products (:func:`fedmem.ensemble.kernels._mlp_forward`,
a hand-written backward); with plain SGD the update is fused into the gradient's product,
``W <- W - lr * g^T a`` (``baddbmm_``, after the input gradient was taken with the old ``W``),
and the first step, where all clients still hold the global weights, runs as single matrix
products over all clients' rows. Other models use ``torch.func``
(:class:`fedmem.ensemble.kernels._VmapKernel`); BatchNorm is not supported. Results equal
per-client training up to float rounding (products of other shapes round differently).

CPU: clients are trained in chunks of :data:`CHUNK` (a chunk's weights stay in cache for all
its steps), spread over ``workers`` Python threads with one torch thread each (the batched
products release the GIL; see :mod:`fedmem.ensemble`). A chunk's numbers do not depend on the
other chunks, nor on ``workers``. GPU: one chunk of all clients.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from fedmem.config import TrainConfig
from fedmem.ensemble.kernels import _mlp_forward, _mlp_layers, _VmapKernel
from fedmem.seeding import torch_gen

CHUNK = 16  # clients trained in lock-step on CPU (their weights stay in cache)
_ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as make_optimizer uses them
_ADAM_EPS = 1e-8

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StackedResult:
    """The clients' trained weights and training numbers, in the order they were given."""

    chunks: list[Tensors]  # name -> (K_c, ...) trained parameters of each chunk (CPU)
    where: list[tuple[int, int]]  # client k's (chunk, position in it)
    loss: list[float]  # mean cross-entropy over every visit (0.0 without visits)
    examples: list[int]  # example visits
    steps: list[int]  # optimizer steps

    def weights(self, k: int) -> Tensors:
        """Client ``k``'s trained parameters (views into its chunk)."""
        c, i = self.where[k]
        return {n: t[i] for n, t in self.chunks[c].items()}


def batch_plan(
    seed: int,
    round_: int,
    client_rows: Sequence[torch.Tensor],
    table_size: int,
    batch_size: int,
    epochs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every client's batches in visit order: table rows ``(K, S, B)`` (padding 0) and the
    number of real rows of each batch ``(K, S)`` (0 after a client's last step)."""
    k_total = len(client_rows)
    sizes = torch.tensor([len(r) for r in client_rows], dtype=torch.long)
    per_epoch = (sizes + batch_size - 1) // batch_size  # steps of each client per epoch
    steps = int(per_epoch.max()) * epochs if k_total else 0
    idx = torch.zeros(k_total, steps, batch_size, dtype=torch.long)
    count = torch.zeros(k_total, steps, dtype=torch.long)
    if steps == 0:
        return idx, count
    rows = torch.cat(list(client_rows))
    owner = torch.repeat_interleave(torch.arange(k_total), sizes)  # grouped, ascending
    rank = torch.arange(len(rows)) - (torch.cumsum(sizes, 0) - sizes)[owner]
    ones = torch.ones(len(rows), dtype=torch.long)
    for e in range(epochs):
        keys = torch.rand(table_size, generator=torch_gen(seed, "order", round_, e))[rows]
        # by key within each client, ties by position: keyed_order's stable argsort
        by_key = torch.argsort(keys, stable=True)
        order = by_key[torch.argsort(owner[by_key], stable=True)]
        step = e * per_epoch[owner] + rank // batch_size  # the client's epochs in turn
        idx[owner, step, rank % batch_size] = rows[order]
        count.index_put_((owner, step), ones, accumulate=True)
    return idx, count


def train_clients(
    template: nn.Module,
    start: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    client_rows: Sequence[torch.Tensor],
    cfg: TrainConfig,
    *,
    seed: int,
    round_: int,
    mu: float = 0.0,
    workers: int = 1,
) -> StackedResult:
    """Train one client per entry of ``client_rows`` (table row ids) from the weights
    ``start`` (the template's parameter names; float32, on ``x``'s device) for one round.

    ``x``/``y``: the whole table's inputs and observed labels on the training device.
    ``mu``: FedProx's proximal coefficient (0: off). See the module docstring.
    """
    _check_supported(template)
    idx, count = batch_plan(seed, round_, client_rows, len(y), cfg.batch_size, cfg.local_epochs)
    steps = (count > 0).sum(1)
    order = sorted(range(len(client_rows)), key=lambda k: (-int(steps[k]), k))
    device = x.device
    size = len(order) if device.type != "cpu" else CHUNK
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    layers = _mlp_layers(template)
    kernel = None if layers is not None else _VmapKernel(copy.deepcopy(template), {})
    names = [n for n, _ in template.named_parameters()]

    def run(chunk: list[int]) -> tuple[Tensors, torch.Tensor]:
        sel, own = torch.tensor(chunk), {n: start[n] for n in names}
        return _train_chunk(own, idx[sel].to(device), count[sel], x, y, cfg, mu, layers, kernel)

    workers = 1 if device.type != "cpu" else max(1, min(workers, len(chunks)))
    if workers == 1:
        parts = [run(c) for c in chunks]
    else:  # one torch thread per worker (see fedmem.ensemble: no OpenMP barriers)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                parts = list(pool.map(run, chunks))
        finally:
            torch.set_num_threads(threads)
    where = [(0, 0)] * len(order)
    for c, chunk in enumerate(chunks):
        for i, k in enumerate(chunk):
            where[k] = (c, i)
    sums = [t.cpu() for _, t in parts]
    totals = [float(sums[c][i]) for c, i in where]
    visits = count.sum(1)
    return StackedResult(
        chunks=[{n: t.cpu() for n, t in p.items()} for p, _ in parts],
        where=where,
        loss=[totals[k] / max(int(visits[k]), 1) for k in range(len(client_rows))],
        examples=[int(v) for v in visits],
        steps=[int(s) for s in steps],
    )


def _check_supported(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout):
            raise ValueError(f"batched training: {type(m).__name__} ({name}) is not supported")
    if any(True for _ in model.buffers()):
        raise ValueError("batched training: models with buffers are not supported")


def _train_chunk(
    start: Tensors,
    idx: torch.Tensor,
    count: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    mu: float,
    layers: list[str] | None,
    kernel: _VmapKernel | None,
) -> tuple[Tensors, torch.Tensor]:
    """Train K clients (sorted by step count, descending); return their weights and their
    summed cross-entropy over all visits ``(K,)``."""
    k_total, n_steps, bs = idx.shape
    active = (count > 0).sum(0).tolist()  # clients still training at each step (a prefix)
    total = torch.zeros(k_total, device=x.device)
    pos = torch.arange(bs, device=x.device)
    count_dev = count.to(x.device, torch.float32)
    fused = layers is not None and cfg.optimizer == "sgd"
    # plain SGD or momentum on the MLP: the first step starts from the shared global weights
    shared = fused and cfg.weight_decay == 0 and mu == 0 and n_steps > 0
    shared = shared and active[0] == k_total
    params: Tensors = {}
    if not shared:
        params = {n: t.unsqueeze(0).repeat(k_total, *([1] * t.dim())) for n, t in start.items()}
    opt = _PrefixOptimizer(cfg, None if shared else params)
    for s in range(n_steps):
        a = active[s]
        p = {n: t[:a] for n, t in params.items()}
        rows = idx[:a, s]
        cnt = count_dev[:a, s]
        valid = pos.unsqueeze(0) < cnt.unsqueeze(1)
        wb = valid / cnt.clamp(min=1).unsqueeze(1)
        xb, yb = x[rows], y[rows]
        with torch.no_grad():
            if shared and s == 0:
                params, ce = _mlp_first_step(start, opt, layers, xb, yb, wb)  # type: ignore[arg-type]
            elif fused:
                ce = _mlp_sgd_step(p, opt, start, layers, xb, yb, wb, mu, a)  # type: ignore[arg-type]
            else:
                ce = _generic_step(p, opt, start, layers, kernel, xb, yb, wb, mu, a, s)
            total[:a] += torch.where(valid, ce, 0.0).sum(1)
    return params, total


def _mlp_first_step(
    start: Tensors,
    opt: _PrefixOptimizer,
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
    ce, g = _ce_grad(h, yb, wb)
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


def _ce_grad(logits: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor):
    """Cross-entropy per example (K, B) and d(sum_j wb_j CE_j)/dlogits."""
    logp = torch.log_softmax(logits, dim=-1)
    ce = -logp.gather(-1, yb.unsqueeze(-1)).squeeze(-1)
    g = logp.exp_()
    g.scatter_add_(-1, yb.unsqueeze(-1), torch.full_like(ce, -1.0).unsqueeze(-1))
    return ce, g.mul_(wb.unsqueeze(-1))


def _mlp_sgd_step(
    p: Tensors,
    opt: _PrefixOptimizer,
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
    ce, g = _ce_grad(logits, yb, wb)
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
            opt.update({w: p[w], b: p[b]}, _with_proximal(grads, p, start, mu), a, 0)
        if g_in is not None:
            g = g_in
    return ce


def _generic_step(
    p: Tensors,
    opt: _PrefixOptimizer,
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
        ce, g = _ce_grad(logits, yb, wb)
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
    opt.update(p, _with_proximal(grads, p, start, mu), a, step)
    return ce


def _with_proximal(grads: Tensors, p: Tensors, start: Tensors, mu: float) -> Tensors:
    """FedProx: the gradient of ``(mu / 2) ||w - w_global||^2`` added (as autograd sums it)."""
    if mu == 0:
        return grads
    return {n: g.add(p[n] - start[n], alpha=mu) for n, g in grads.items()}


class _PrefixOptimizer:
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


__all__ = ["CHUNK", "StackedResult", "batch_plan", "train_clients"]
