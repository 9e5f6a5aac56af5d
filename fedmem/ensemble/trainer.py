"""The batched ensemble trainer: :func:`train_ensemble` and the trained :class:`Ensemble`.

Seeds, batch orders and inits of the members, and the training loop over stacked parameters;
the semantics are in :mod:`fedmem.ensemble`'s docstring, the kernels in
:mod:`fedmem.ensemble.kernels`, the optimizer updates in :mod:`fedmem.ensemble.optim`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fedmem.config import ModelConfig, TrainConfig
from fedmem.ensemble.kernels import _mlp_forward, _mlp_grads, _mlp_layers, _VmapKernel
from fedmem.ensemble.optim import _StackedOptimizer
from fedmem.models.architectures import build_model
from fedmem.seeding import derive_seed, torch_gen

Backend = Literal["auto", "bmm", "vmap"]

SIMULATED_PLUGINS: frozenset[str] = frozenset()
"""Training plug-ins (:mod:`fedmem.methods`) that :func:`train_ensemble` reproduces. None yet:
it runs plain SGD / Adam on the cross-entropy. Audits derive what their shadows leave out
from this set (:func:`fedmem.runs.records.deviations`)."""

# (model, example) pairs per forward pass in Ensemble.logits: bounds activation memory.
_EVAL_PAIRS = 1 << 17


# ---------------------------------------------------------------------------------------------
# seeds, orders, init
# ---------------------------------------------------------------------------------------------
def ensemble_keys(seed: int, k: int, epoch: int, table_size: int) -> torch.Tensor:
    """The visit keys of all ``table_size`` rows for model ``k`` in ``epoch`` (CPU)."""
    return torch.rand(table_size, generator=torch_gen(seed, "ensemble", k, epoch))


def ensemble_order(
    seed: int, k: int, epoch: int, rows: torch.Tensor, table_size: int
) -> torch.Tensor:
    """Model ``k``'s visit order in ``epoch`` as a permutation of positions in ``rows``.

    ``rows`` are the (ascending) row ids model ``k`` trains on, out of ``table_size`` rows.
    ``lambda e: ensemble_order(seed, k, e, rows, n)`` is the ``order`` argument with which
    :func:`fedmem.train.train_epochs` on ``(x[rows], y[rows])`` repeats model ``k``'s training.
    """
    keys = ensemble_keys(seed, k, epoch, table_size)
    return torch.argsort(keys[rows.cpu()], stable=True)


def plain_model(model_cfg: ModelConfig) -> ModelConfig:
    """``model_cfg`` without tied dropout (``model.dropout``): the ensemble trains the plain
    architecture (same parameter names and init), so the audit lists the dropout as not
    simulated rather than failing."""
    if model_cfg.dropout.kind == "none":
        return model_cfg
    return model_cfg.model_copy(update={"dropout": type(model_cfg.dropout)()})


def member_init_state(
    model_cfg: ModelConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    k: int,
) -> dict[str, torch.Tensor]:
    """Model ``k``'s initial state: built under the seed ``(seed, "ensemble-init", k)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "ensemble-init", k))
        return build_model(plain_model(model_cfg), input_shape, num_classes).state_dict()


def _check_supported(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"train_ensemble: the model has BatchNorm ({name or 'root'}); batched training "
                "of BatchNorm models is not supported, use model.name=mlp, cnn1d or cnn"
            )
        if isinstance(m, nn.Dropout | nn.modules.dropout._DropoutNd):
            raise ValueError("train_ensemble: models with dropout are not supported")


# ---------------------------------------------------------------------------------------------
# the trained ensemble
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Ensemble:
    """K trained models of one architecture: stacked parameters and how to evaluate them.

    ``params``/``buffers`` map state-dict names to tensors with a leading model dimension K.
    ``train_loss[k, e]`` is model k's mean cross-entropy over its visits in epoch e (measured
    during training, as :class:`fedmem.train.TrainResult.loss`).
    """

    model_cfg: ModelConfig
    input_shape: tuple[int, ...]
    num_classes: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    train_loss: torch.Tensor

    def __len__(self) -> int:
        return int(self.train_loss.shape[0])

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Model ``k``'s state dict (copies), loadable into ``build_model(model_cfg, ...)``."""
        out = {n: t[k].clone() for n, t in self.params.items()}
        out.update({n: t[k].clone() for n, t in self.buffers.items()})
        return out

    def model(self, k: int) -> nn.Module:
        """Model ``k`` as an ordinary module (on the parameters' device)."""
        m = build_model(self.model_cfg, self.input_shape, self.num_classes)
        m.load_state_dict(self.state_dict(k))
        return m.to(next(iter(self.params.values())).device)

    def logits(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Logits (K, N, C) of every model on ``x`` (N, *input_shape); eval mode, no grad.

        ``batch_size`` examples per forward pass; models are grouped so that one pass holds
        at most about 2^17 (model, example) pairs.
        """
        template = build_model(self.model_cfg, self.input_shape, self.num_classes)
        layers = _mlp_layers(template)
        device = next(iter(self.params.values())).device
        k_total, n = len(self), len(x)
        out = torch.empty(k_total, n, self.num_classes, device=device)
        per_pass = max(1, _EVAL_PAIRS // max(1, min(batch_size, n)))
        kernel = None if layers is not None else _VmapKernel(template.eval(), {})
        with torch.no_grad():
            for k0 in range(0, k_total, per_pass):
                ks = slice(k0, min(k0 + per_pass, k_total))
                p = {name: t[ks] for name, t in self.params.items()}
                b = {name: t[ks] for name, t in self.buffers.items()}
                for s in range(0, n, batch_size):
                    xb = x[s : s + batch_size].to(device)
                    if layers is not None:
                        kk = ks.stop - ks.start
                        xk = xb.flatten(1).unsqueeze(0).expand(kk, -1, -1)
                        out[ks, s : s + len(xb)] = _mlp_forward(p, layers, xk, keep=False)[0]
                    else:
                        out[ks, s : s + len(xb)] = kernel.logits(p, b, xb)  # type: ignore[union-attr]
        return out


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def train_ensemble(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    x: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    init_states: list[Mapping[str, torch.Tensor]] | None = None,
    chunk: int | None = None,
    progress: Callable[[int], None] | None = None,
    backend: Backend = "auto",
    first: int = 0,
    workers: int | None = None,
) -> Ensemble:
    """Train K = ``len(masks)`` models, model k on the rows ``masks[k]`` of (x, y).

    See the module docstring for the exact training semantics, batch order and init.
    ``x`` (N, *input_shape) and ``y`` (N,) live on the device to train on; ``masks`` is
    (K, N) bool. ``chunk`` trains the models in groups of at most that size (bounds memory;
    results do not change beyond float rounding). ``progress(done)`` is called after every
    epoch of every group with the number of (model, epoch) pairs finished so far, out of
    K x epochs (from a worker thread when ``workers > 1``). ``backend``: ``bmm`` (MLP
    only), ``vmap`` (any supported model) or ``auto`` (``bmm`` for the MLP). ``first``: the
    member number of ``masks[0]`` (model i is member ``first + i``: its init and batch-order
    streams), so an ensemble can be extended later with more models.

    ``workers`` (CPU only; default ``torch.get_num_threads()``): the models are split into that
    many groups, trained in parallel Python threads with one intra-op thread each (torch's
    thread count is set to 1 for the call and restored). Each group's batched matrix products
    run single-threaded, so no OpenMP barrier waits on a thread that another process has
    descheduled: on a busy 2-core machine two OpenMP threads made training several times
    slower than one, while two workers degrade gracefully to one core's speed.
    """
    model_cfg = plain_model(model_cfg)
    masks = masks.to(torch.bool)
    if masks.dim() != 2 or masks.shape[1] != len(y) or len(x) != len(y):
        raise ValueError(
            f"train_ensemble: masks must be (K, N) with N = len(x) = len(y); got masks "
            f"{tuple(masks.shape)}, x {tuple(x.shape)}, y {tuple(y.shape)}"
        )
    k_total = masks.shape[0]
    if k_total == 0:
        raise ValueError("train_ensemble: no models (masks has 0 rows)")
    if epochs < 1:
        raise ValueError(f"train_ensemble: epochs must be >= 1, got {epochs}")
    if init_states is not None and len(init_states) != k_total:
        raise ValueError(f"train_ensemble: {len(init_states)} init_states for {k_total} models")
    if train_cfg.optimizer not in ("sgd", "adam"):
        raise ValueError(f"train.optimizer: unknown {train_cfg.optimizer!r}")
    input_shape = tuple(input_shape)
    template = build_model(model_cfg, input_shape, num_classes)
    _check_supported(template)
    layers = _mlp_layers(template)
    if backend == "bmm" and layers is None:
        raise ValueError(f"train_ensemble: backend=bmm needs model.name=mlp, not {model_cfg.name}")
    if backend not in ("auto", "bmm", "vmap"):
        raise ValueError(f"train_ensemble: unknown backend {backend!r}")
    use_bmm = layers is not None and backend != "vmap"
    chunk = k_total if chunk is None else max(1, int(chunk))
    workers = torch.get_num_threads() if workers is None else max(1, int(workers))
    if x.device.type != "cpu":
        workers = 1
    size = min(chunk, math.ceil(k_total / workers))
    groups = [list(range(k0, min(k0 + size, k_total))) for k0 in range(0, k_total, size)]
    param_names = [n for n, _ in template.named_parameters()]
    buffer_names = [n for n, _ in template.named_buffers()]
    lock = threading.Lock()
    done = 0

    # built here, in one thread: member_init_state seeds torch's global RNG
    inits = (
        list(init_states)
        if init_states is not None
        else [
            member_init_state(model_cfg, input_shape, num_classes, seed, first + i)
            for i in range(k_total)
        ]
    )

    def run(group: list[int]):
        ks = [first + i for i in group]
        states = [inits[i] for i in group]
        params = {
            n: torch.stack([s[n].detach().to(x.device, torch.float32) for s in states])
            for n in param_names
        }
        buffers = {
            n: torch.stack([s[n].detach().to(x.device) for s in states]) for n in buffer_names
        }
        kernel = (
            None
            if use_bmm
            else _VmapKernel(build_model(model_cfg, input_shape, num_classes), buffers)
        )

        def on_epoch(_epoch: int) -> None:
            nonlocal done
            with lock:
                done += len(ks)
                if progress is not None:
                    progress(done)

        group_masks = masks[group[0] : group[-1] + 1].to(x.device)
        loss = _train_group(
            params,
            ks,
            x,
            y,
            group_masks,
            train_cfg,
            epochs,
            seed,
            layers if use_bmm else None,
            kernel,
            on_epoch,
        )
        return params, buffers, loss

    if workers == 1 or len(groups) == 1:
        parts = [run(g) for g in groups]
    else:  # one intra-op thread per worker: robust to other load, no OpenMP barriers
        threads_before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                parts = list(pool.map(run, groups))
        finally:
            torch.set_num_threads(threads_before)

    return Ensemble(
        model_cfg=model_cfg,
        input_shape=input_shape,
        num_classes=num_classes,
        params={n: torch.cat([p[0][n] for p in parts]) for n in param_names},
        buffers={n: torch.cat([p[1][n] for p in parts]) for n in buffer_names},
        train_loss=torch.cat([p[2] for p in parts]),
    )


def _train_group(
    params: dict[str, torch.Tensor],
    ks: list[int],
    x: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor,
    cfg: TrainConfig,
    epochs: int,
    seed: int,
    layers: list[str] | None,
    kernel: _VmapKernel | None,
    on_epoch: Callable[[int], None],
) -> torch.Tensor:
    """Train one group of stacked models in place; returns their per-epoch mean loss (K, E)."""
    device = x.device
    n_rows = len(y)
    bs = cfg.batch_size
    opt = _StackedOptimizer(cfg, params)
    sizes = masks.sum(1)  # (Kc,) rows per model
    max_n = int(sizes.max())
    steps = math.ceil(max_n / bs)
    sizes_cpu = sizes.cpu()
    pos = torch.arange(bs, device=device)
    losses = torch.zeros(len(ks), epochs, dtype=torch.float64)
    inf = torch.tensor(float("inf"), device=device)
    grad_ctx = torch.no_grad() if layers is not None else contextlib.nullcontext()
    fused = opt.fusable
    for epoch in range(epochs):
        keys = torch.stack([ensemble_keys(seed, k, epoch, n_rows) for k in ks]).to(device)
        keys = torch.where(masks, keys, inf)
        # rows of model k in visit order, then (from sizes[k] on) rows it does not train on
        perm = torch.argsort(keys, dim=1, stable=True)[:, :max_n]
        total = torch.zeros(len(ks), device=device)
        for s in range(steps):
            lo = s * bs
            idx = perm[:, lo : lo + bs]
            b = idx.shape[1]
            count = (sizes - lo).clamp(0, b)  # real examples of each model in this batch
            valid = pos[:b].unsqueeze(0) < count.unsqueeze(1)
            wb = valid / count.clamp(min=1).unsqueeze(1)
            xb, yb = x[idx], y[idx]
            active = (sizes_cpu - lo) > 0
            with grad_ctx:
                if layers is not None and fused and bool(active.all()):
                    _, ce = _mlp_grads(params, layers, xb, yb, wb, opt.state["buf"], cfg.momentum)
                    opt.step_fused(params)
                    total += torch.where(valid, ce, 0.0).sum(1)
                    continue
                if layers is not None:
                    grads, ce = _mlp_grads(params, layers, xb, yb, wb)
                else:
                    grads, ce = kernel.grads(params, xb, yb, wb)  # type: ignore[union-attr]
            with torch.no_grad():
                total += torch.where(valid, ce, 0.0).sum(1)
                opt.step(params, grads, active)
        losses[:, epoch] = total.double().cpu() / sizes_cpu.clamp(min=1).double()
        on_epoch(epoch)
    return losses
