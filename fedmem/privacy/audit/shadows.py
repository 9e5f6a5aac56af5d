"""Shadow models for membership-inference audits (LiRA, Carlini et al. 2022).

A shadow model is trained "with the same training recipe as the target" on a random half of
the audit candidates. This module trains K shadows at once with the batched ensemble trainer
(:func:`fedmem.ensemble.train_ensemble`), for the two targets of an experiment:

- :func:`train_central_shadows`, the central recipe (:func:`fedmem.runs.central.run_central`):
  ``train.rounds * train.local_epochs`` epochs over the shadow's rows with one optimizer for
  the whole run. It is one ``train_ensemble`` call and nothing else.
- :func:`train_fedavg_shadows`, the federated recipe, plain FedAvg: each round every shadow
  samples ``strategies.clients_per_round(cfg)`` clients, each sampled client trains
  ``train.local_epochs`` epochs on its rows of the shadow's subset from the shadow's global
  model with a fresh optimizer (as a Flower client does), and the shadow's new global model
  is the average of its clients' models weighted by their row counts (as Flower's FedAvg).

Membership masks: :func:`shadow_masks` puts each candidate in exactly K/2 of the K shadows
(Carlini et al.'s reference code). The masks the trainers take are over the rows of ``(x, y)``
(candidates and any rows every shadow trains on); building them is the caller's job.

What the shadows do *not* reproduce (the attacker knows the recipe, not the run's secrets):

- Init: shadow ``k`` starts from ``member_init_state(model_cfg, ..., seed, k)`` (its own seeded
  init, the same in both recipes for the same ``seed``), not from the experiment's init
  (``fedmem.models.init_model``), which is secret to the attacker.
- Batch order: every shadow (and in FedAvg every (round, shadow, client)) draws its own stream,
  independent of the target's ``keyed_order`` keys.
- FedAvg shadows follow plain FedAvg whatever the experiment's ``federation.strategy``: client
  failures (``client_failure_rate``, ``min_train_clients`` lost rounds), FedProx's proximal
  term, server optimizers / robust aggregators and DP (record-level DP-SGD, user-level
  DP-FedAvg) are not simulated; central shadows do not simulate record-level DP either.
  :func:`recipe_deviations` lists what a config sets that the shadows leave out, so the caller
  can record it.

The module is longer than 400 lines because it is one job, training shadows with the target's
recipe: the FedAvg recipe's round plan and batched averaging make up half of it, and splitting
the two recipes apart would separate :func:`recipe_deviations` from the code it describes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from fedmem.config import ExperimentConfig
from fedmem.ensemble import SIMULATED_PLUGINS, Ensemble, member_init_state, train_ensemble
from fedmem.models.architectures import build_model
from fedmem.runs.records import deviations, experiment_records
from fedmem.seeding import derive_seed, np_rng
from strategies import clients_per_round

Recipe = Literal["central", "fedavg"]
Progress = Callable[[int, int], None]

# FedAvg shadows on the CPU: (shadow, client) trainings of a round are sorted by row count and
# trained in lock-step groups of at most this many (train_ensemble's ``chunk``), so that small
# clients do not wait for the steps of large ones. Batched matmuls are about as fast per model
# from 16 models on, so small groups cost little; benchmarks/shadows.py (default config, K=32):
# 16.3 s with groups of 16 or 32, 17.0 s with 8, 25.1 s with train_ensemble's default of
# pairs / workers. On a GPU (one worker, groups run one after another) all pairs form one group:
# there, fewer and larger kernel launches matter more than lock-step padding (not measured).
FEDAVG_CHUNK = 16


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
def shadow_masks(num_candidates: int, num_shadows: int, seed: int) -> torch.Tensor:
    """(K, M) bool membership of M candidates in K shadows: each candidate in exactly K/2.

    As Carlini et al.'s reference code: for every candidate, a uniformly random choice of K/2
    of the K shadows (rank of i.i.d. uniforms per column). Deterministic from ``seed`` (stream
    ``(seed, "shadow-masks")``). ``num_shadows`` must be even and >= 2.
    """
    if num_shadows < 2 or num_shadows % 2:
        raise ValueError(
            f"audit.attack.shadows: {num_shadows}; must be even and >= 2 (every candidate is "
            "in exactly half the shadows)"
        )
    if num_candidates < 0:
        raise ValueError(f"shadow_masks: num_candidates must be >= 0, got {num_candidates}")
    u = np_rng(seed, "shadow-masks").random((num_shadows, num_candidates))
    rank = u.argsort(axis=0).argsort(axis=0)  # rank of shadow k among the column's K draws
    return torch.from_numpy(rank < num_shadows // 2)


# ---------------------------------------------------------------------------------------------
# the trained shadows
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ShadowModels:
    """K trained shadow models (stacked, as an :class:`Ensemble`) and how they were trained.

    ``masks[k, i]``: whether shadow ``k`` trained on row ``i`` of the ``(x, y)`` it was given
    (CPU, bool). ``recipe``: ``"central"`` or ``"fedavg"``. ``train_s``: wall-clock training
    time. ``ensemble.train_loss`` is (K, rounds x local_epochs): per epoch, the shadow's mean
    training cross-entropy (FedAvg: its clients' epoch losses averaged by row count; NaN in a
    round where the shadow trained on nothing).
    """

    ensemble: Ensemble
    masks: torch.Tensor
    recipe: Recipe
    train_s: float

    def __len__(self) -> int:
        return len(self.ensemble)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Stacked parameters, leading dimension K (on the training device)."""
        return self.ensemble.params

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Shadow ``k``'s state dict (copies), loadable into the experiment's model."""
        return self.ensemble.state_dict(k)

    def logits(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Logits (K, n, C) of every shadow on ``x`` (n, *input_shape), on the CPU."""
        return self.ensemble.logits(x, batch_size).cpu()


def recipe_deviations(cfg: ExperimentConfig, recipe: Recipe) -> list[str]:
    """What ``cfg``'s model trained like ``recipe`` does that the ``recipe`` shadows do not
    simulate (may be empty), from its lineage record and :data:`SIMULATED_PLUGINS`."""
    records = experiment_records(cfg)
    record = records.get("central" if recipe == "central" else "federated")
    return [] if record is None else deviations(record, recipe, SIMULATED_PLUGINS)


# ---------------------------------------------------------------------------------------------
# central recipe
# ---------------------------------------------------------------------------------------------
def _check_rows(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    masks = masks.to(torch.bool).cpu()
    if masks.dim() != 2 or masks.shape[1] != len(y) or len(x) != len(y) or len(masks) == 0:
        raise ValueError(
            f"shadows: masks must be (K, N), K >= 1, with N = len(x) = len(y); got masks "
            f"{tuple(masks.shape)}, x {tuple(x.shape)}, y {tuple(y.shape)}"
        )
    return masks


def _num_classes(y: torch.Tensor, num_classes: int | None) -> int:
    return int(y.max()) + 1 if num_classes is None else int(num_classes)


def train_central_shadows(
    cfg: ExperimentConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor,
    *,
    seed: int,
    progress: Progress | None = None,
    num_classes: int | None = None,
    workers: int | None = None,
) -> ShadowModels:
    """K = ``len(masks)`` shadows of the central run, shadow k on the rows ``masks[k]``.

    Exactly ``train_ensemble(cfg.model, cfg.train, ..., masks, epochs=rounds * local_epochs,
    seed=seed)``: one optimizer (and momentum) for the whole run as in the central run, each
    shadow from its own seeded init ``member_init_state(..., seed, k)`` (the target starts
    from the experiment's init, which the attacker does not know) with its own batch order.

    ``x`` (N, *input_shape) and ``y`` (N,) live on the device to train on; ``masks`` (K, N)
    bool. ``num_classes``: the model's output size (pass ``table.num_classes``; default
    ``y.max() + 1``). ``progress(done, total)``: shadow-epochs finished out of
    ``K * rounds * local_epochs`` (the same unit as :func:`train_fedavg_shadows`), possibly
    from a worker thread. ``workers``: see ``train_ensemble``.
    """
    masks = _check_rows(x, y, masks)
    k_total = len(masks)
    epochs = cfg.train.rounds * cfg.train.local_epochs
    total = k_total * epochs
    t0 = time.perf_counter()
    ensemble = train_ensemble(
        cfg.model,
        cfg.train,
        tuple(x.shape[1:]),
        _num_classes(y, num_classes),
        x,
        y,
        masks,
        epochs=epochs,
        seed=seed,
        progress=None if progress is None else (lambda done: progress(done, total)),
        workers=workers,
    )
    return ShadowModels(ensemble, masks, "central", time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# FedAvg recipe
# ---------------------------------------------------------------------------------------------
def fedavg_round_seed(seed: int, round_: int) -> int:
    """The ``train_ensemble`` seed of round ``round_``'s local trainings (batch orders)."""
    return derive_seed(seed, "fedavg-shadows", round_)


def sampled_clients(cfg: ExperimentConfig, seed: int, shadow: int, round_: int) -> list[int]:
    """The clients shadow ``shadow`` trains in ``round_`` (ascending).

    ``strategies.clients_per_round(cfg)`` of ``federation.num_clients``: all of them when
    that is every client, else a uniform choice from the stream
    ``(seed, "fedavg-shadow-sample", shadow, round_)``.
    """
    n = cfg.federation.num_clients
    m = clients_per_round(cfg)
    if m >= n:
        return list(range(n))
    chosen = np_rng(seed, "fedavg-shadow-sample", shadow, round_).choice(n, m, replace=False)
    return sorted(int(c) for c in chosen)


@dataclass(frozen=True)
class RoundPlan:
    """The local trainings of one FedAvg round: pair ``i`` is (``shadow[i]``, ``client[i]``).

    Pairs are the sampled (shadow, client) pairs whose client holds rows of the shadow's
    subset, sorted by that row count (descending; ties by client, then shadow). In
    ``train_ensemble(..., seed=seed)`` pair ``i`` is member ``i``: its batch-order stream is
    ``(seed, "ensemble", i, epoch)``. ``rows[i]`` is the pair's row count (its FedAvg weight).

    Streams are named by position, so which stream a (shadow, client) pair draws depends on
    the whole plan (all shadows' row counts and samples): deterministic from the seed and the
    masks, independent across pairs, but shadow k trained alone would draw other (equally
    distributed) orders. Sorting is what keeps lock-step groups of like sizes.
    """

    shadow: torch.Tensor  # (P,) int64
    client: torch.Tensor  # (P,) int64
    rows: torch.Tensor  # (P,) int64
    seed: int


def fedavg_round_plan(
    cfg: ExperimentConfig, counts: torch.Tensor, seed: int, round_: int
) -> RoundPlan:
    """Who trains in ``round_``: ``counts[k, c]`` = rows of client c in shadow k's subset."""
    k_total, n_clients = counts.shape
    chosen = torch.zeros(k_total, n_clients, dtype=torch.bool)
    for k in range(k_total):
        chosen[k, sampled_clients(cfg, seed, k, round_)] = True
    # client-major, then stable sort by descending row count: lock-step groups of like sizes
    part = (chosen & (counts > 0)).T
    cp, kp = torch.nonzero(part, as_tuple=True)
    rows = counts[kp, cp]
    order = torch.argsort(-rows, stable=True)
    return RoundPlan(kp[order], cp[order], rows[order], fedavg_round_seed(seed, round_))


def train_fedavg_shadows(
    cfg: ExperimentConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    client: torch.Tensor,
    masks: torch.Tensor,
    *,
    seed: int,
    progress: Progress | None = None,
    num_classes: int | None = None,
    workers: int | None = None,
) -> ShadowModels:
    """K = ``len(masks)`` shadows of the federated run (plain FedAvg), batched.

    ``client`` (N,) int64: the client (0 .. ``federation.num_clients`` - 1) of each row of
    ``(x, y)``; shadow k's client c holds the rows ``masks[k] & (client == c)``.

    Shadow k starts from ``member_init_state(..., seed, k)``. In round r = 1 .. ``rounds`` it
    samples clients (:func:`sampled_clients`), and all (shadow, client) local trainings of the
    round run in one ``train_ensemble`` call (:func:`fedavg_round_plan`: seed
    :func:`fedavg_round_seed`, one member per pair, so every (round, shadow, client) has its
    own batch-order stream), each from its shadow's global model for ``local_epochs`` epochs
    with a fresh optimizer. The shadow's new global model is then
    ``sum_c rows_c / sum(rows) * model_c`` over its clients with rows (Flower's FedAvg
    weighting by example counts), computed on the stacked tensors; floating buffers are
    averaged the same way, other buffers keep the shadow's value; a shadow with no rows in a
    round keeps its model. What this leaves out of the target's recipe: module docstring and
    :func:`recipe_deviations`.

    ``progress(done, total)``: shadow-epochs finished out of ``K * rounds * local_epochs``
    (round r's trainings advance it from ``K * (r-1) * E`` to ``K * r * E`` in proportion to
    the (pair, epoch) trainings finished), possibly from a worker thread. ``num_classes`` and
    ``workers``: as in :func:`train_central_shadows`.
    """
    masks = _check_rows(x, y, masks)
    client = client.to(torch.int64).cpu()
    n_clients = cfg.federation.num_clients
    if client.shape != (len(y),):
        raise ValueError(f"shadows: client must be (N,) = ({len(y)},), got {tuple(client.shape)}")
    if len(client) and (int(client.min()) < 0 or int(client.max()) >= n_clients):
        raise ValueError(
            f"shadows: client ids must lie in 0..{n_clients - 1} (federation.num_clients), got "
            f"{int(client.min())}..{int(client.max())}"
        )
    k_total = len(masks)
    epochs = cfg.train.local_epochs
    rounds = cfg.train.rounds
    total = k_total * rounds * epochs
    input_shape = tuple(x.shape[1:])
    n_cls = _num_classes(y, num_classes)
    device = x.device
    t0 = time.perf_counter()

    # counts[k, c]: rows of client c in shadow k's subset (fixed for the whole run)
    counts = torch.zeros(k_total, n_clients, dtype=torch.int64)
    counts.index_add_(1, client, masks.to(torch.int64))

    # the global models, stacked: parameters and buffers as train_ensemble tells them apart
    template = build_model(cfg.model, input_shape, n_cls)
    inits = [member_init_state(cfg.model, input_shape, n_cls, seed, k) for k in range(k_total)]
    params = _stack(inits, [n for n, _ in template.named_parameters()], device)
    buffers = _stack(inits, [n for n, _ in template.named_buffers()], device)
    del inits, template
    losses = torch.full((k_total, rounds * epochs), float("nan"), dtype=torch.float64)

    for r in range(1, rounds + 1):
        base = k_total * (r - 1) * epochs
        plan = fedavg_round_plan(cfg, counts, seed, r)
        n_pairs = len(plan.shadow)
        if n_pairs == 0:
            if progress is not None:
                progress(base + k_total * epochs, total)
            continue
        pair_masks = masks[plan.shadow] & (client.unsqueeze(0) == plan.client.unsqueeze(1))
        views = {n: t.unbind(0) for n, t in (params | buffers).items()}  # no copies
        starts = [{n: v[k] for n, v in views.items()} for k in plan.shadow.tolist()]

        def on_done(done: int, base: int = base, n_pairs: int = n_pairs) -> None:
            progress(base + done * k_total // n_pairs, total)  # type: ignore[misc]

        local = train_ensemble(
            cfg.model,
            cfg.train,
            input_shape,
            n_cls,
            x,
            y,
            pair_masks,
            epochs=epochs,
            seed=plan.seed,
            init_states=starts,
            chunk=FEDAVG_CHUNK if device.type == "cpu" else None,
            progress=None if progress is None else on_done,
            workers=workers,
        )
        del starts, views
        params, buffers, round_loss = _fedavg(params, buffers, local, plan, k_total)
        losses[:, (r - 1) * epochs : r * epochs] = round_loss
    ensemble = Ensemble(
        model_cfg=cfg.model,
        input_shape=input_shape,
        num_classes=n_cls,
        params=params,
        buffers=buffers,
        train_loss=losses,
    )
    return ShadowModels(ensemble, masks, "fedavg", time.perf_counter() - t0)


def _stack(
    states: list[dict[str, torch.Tensor]], names: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    return {n: torch.stack([s[n] for s in states]).to(device) for n in names}


def _fedavg(
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    local: Ensemble,
    plan: RoundPlan,
    k_total: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Each shadow's example-weighted average of its clients' models (stacked, vectorized).

    Returns the new global params and buffers (K, ...) and the round's per-epoch loss (K, E),
    NaN for a shadow without rows this round.
    """
    device = next(iter(params.values())).device
    rows = plan.rows.to(torch.float64)
    total = torch.zeros(k_total, dtype=torch.float64).index_add_(0, plan.shadow, rows)
    factor = rows / total[plan.shadow]  # Flower: w_i / sum(w), then sum of model_i * factor_i
    trained = total > 0
    idx, fac, keep = plan.shadow.to(device), factor.float().to(device), trained.to(device)

    def average(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        # the clients' models are scaled in place (they are not needed afterwards)
        shape = (-1,) + (1,) * (old.dim() - 1)
        acc = torch.zeros_like(old).index_add_(0, idx, new.mul_(fac.view(shape)))
        return torch.where(keep.view(shape), acc, old)

    out_params = {n: average(p, local.params[n]) for n, p in params.items()}
    out_buffers = {
        n: average(b, local.buffers[n]) if b.is_floating_point() else b for n, b in buffers.items()
    }
    loss = torch.zeros(k_total, local.train_loss.shape[1], dtype=torch.float64)
    loss.index_add_(0, plan.shadow, local.train_loss * factor.unsqueeze(1))
    loss[~trained] = float("nan")
    return out_params, out_buffers, loss


__all__ = [
    "FEDAVG_CHUNK",
    "RoundPlan",
    "ShadowModels",
    "fedavg_round_plan",
    "fedavg_round_seed",
    "recipe_deviations",
    "sampled_clients",
    "shadow_masks",
    "train_central_shadows",
    "train_fedavg_shadows",
]
