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

Kernels (:mod:`fedmem.federation.batched_kernels`): the MLP uses batched matrix products
(:func:`fedmem.ensemble.kernels._mlp_forward`, a hand-written backward); with plain SGD the
update is fused into the gradient's product, ``W <- W - lr * g^T a`` (``baddbmm_``, after the
input gradient was taken with the old ``W``), and the first step, where all clients still
hold the global weights, runs as single matrix products over all clients' rows. Other models
use ``torch.func`` (:class:`fedmem.ensemble.kernels._VmapKernel`); BatchNorm is not supported.
Results equal per-client training up to float rounding (other product shapes round otherwise).

CPU: the clients are split evenly into one chunk per ``workers`` Python thread (one torch
thread each, also when ``workers`` is 1: the batched products release the GIL; on a busy
machine OpenMP threads wait on each other, see :mod:`fedmem.ensemble`), more chunks only where
a chunk's parameters would pass :data:`CHUNK_BYTES` (:func:`chunk_size`). Few large chunks are
faster than many small ones: every step costs ~40 small tensor operations per chunk whatever
its size (issue 16's 100 MLP clients, one thread: 49 ms per round in chunks of 16, 30 ms in one
chunk of 100). A chunk's numbers depend neither on the other chunks nor on ``workers`` or
torch's thread count. GPU: one chunk of all clients.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from fedmem.config import TrainConfig
from fedmem.ensemble.kernels import _mlp_layers, _VmapKernel
from fedmem.federation.batched_kernels import (
    PrefixOptimizer,
    Tensors,
    generic_step,
    mlp_first_step,
    mlp_sgd_step,
)
from fedmem.seeding import torch_gen

CHUNK_BYTES = 64 * 2**20  # most parameter bytes (weights only) of one chunk trained on CPU


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


def chunk_size(k_total: int, workers: int, client_bytes: int) -> int:
    """Clients per chunk on CPU: an even split over ``workers`` threads, at most as many as
    keep a chunk's parameters (``client_bytes`` each) under :data:`CHUNK_BYTES`."""
    if k_total <= 0:
        return 1  # no clients: no chunks
    per_worker = -(-k_total // max(1, workers))
    by_memory = max(1, CHUNK_BYTES // max(1, client_bytes))
    chunks = -(-k_total // min(per_worker, by_memory))
    return -(-k_total // chunks)  # the same number of chunks, sizes as even as can be


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
    threads = torch.get_num_threads()
    if x.device.type == "cpu":  # one torch thread per worker (fedmem.ensemble: no OpenMP waits)
        torch.set_num_threads(1)
    try:
        return _train_clients(template, start, x, y, client_rows, cfg, seed, round_, mu, workers)
    finally:
        torch.set_num_threads(threads)


def _train_clients(
    template: nn.Module,
    start: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    client_rows: Sequence[torch.Tensor],
    cfg: TrainConfig,
    seed: int,
    round_: int,
    mu: float,
    workers: int,
) -> StackedResult:
    _check_supported(template)
    idx, count = batch_plan(seed, round_, client_rows, len(y), cfg.batch_size, cfg.local_epochs)
    steps = (count > 0).sum(1)
    order = sorted(range(len(client_rows)), key=lambda k: (-int(steps[k]), k))
    device = x.device
    client_bytes = sum(t.numel() * t.element_size() for t in start.values())
    size = len(order) if device.type != "cpu" else chunk_size(len(order), workers, client_bytes)
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
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(run, chunks))
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


# the layers the kernels know (the MLP's bmm backward assumes Linear + ReLU exactly)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d)


def _check_supported(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if not isinstance(m, (*_LAYERS, nn.Sequential)) and m is not model:
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
    opt = PrefixOptimizer(cfg, None if shared else params)
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
                params, ce = mlp_first_step(start, opt, layers, xb, yb, wb)  # type: ignore[arg-type]
            elif fused:
                ce = mlp_sgd_step(p, opt, start, layers, xb, yb, wb, mu, a)  # type: ignore[arg-type]
            else:
                ce = generic_step(p, opt, start, layers, kernel, xb, yb, wb, mu, a, s)
            total[:a] += torch.where(valid, ce, 0.0).sum(1)
    return params, total


__all__ = ["CHUNK_BYTES", "StackedResult", "batch_plan", "chunk_size", "train_clients"]
