"""``federaser``: replay the stored rounds without the forgotten clients, calibrating each
remaining client's stored update by a short local training (Liu, Ma, Yang, Wang, Liu 2021,
"FedEraser: Enabling Efficient Client-Level Data Removal from Federated Learning Models",
IWQoS, Sec. IV, Eq. 3-5).

The server kept every client's update of every round (``checkpoints.client_updates``;
FedEraser's retention interval ``interval``: only every ``interval``-th round is replayed).
Starting from the run's initialization ``w~_1 = w_1``, at each replayed round ``t``:

1. every remaining client that trained in round ``t`` trains from ``w~_t`` for a
   ``calibration_ratio`` share of its local steps (the paper: half its epochs; the same keyed
   batch order as in round ``t``), giving the calibration update ``U^_k``;
2. the calibrated update keeps the stored update's *size* and the calibration's *direction*,
   per tensor: ``U~_k = |U_k| * U^_k / |U^_k|`` (Eq. 4; per state-dict tensor: ours, the paper
   says per layer);
3. ``w~_{t+1} = w~_t + sum_k p_k U~_k`` with FedAvg weights ``p_k`` over the remaining clients
   of the round (Eq. 5).

Calibration trains with the run's optimizer settings but without its training plug-ins
(FedProx's term, ELR: ours). The remaining clients train ``calibration_ratio`` of the
original local steps in each of
``R / interval`` rounds: the speed-up against retraining is about
``interval / calibration_ratio`` in client computation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from fedmem.errors import InputError
from fedmem.models.factory import experiment_model
from fedmem.runs.checkpoints import UpdateLog, load
from fedmem.train import keyed_order, train_epochs
from fedmem.unlearning.base import Request, Unlearned

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class FedEraserSettings:
    interval: int = 1  # replay every interval-th stored round (the paper's delta t)
    calibration_ratio: float = 0.5  # share of a client's local steps spent on calibration


def calibrate(stored: Tensors, calibration: Tensors) -> dict[str, torch.Tensor]:
    """Eq. 4: per tensor, the stored update's norm in the calibration update's direction
    (a zero calibration tensor gives a zero update)."""
    out = {}
    for k, u in stored.items():
        c = calibration[k].float()
        norm = c.norm()
        out[k] = (u.float().norm() / norm) * c if norm > 0 else torch.zeros_like(c)
    return out


def aggregate(
    start: Tensors, updates: Mapping[int, Tensors], sizes: Mapping[int, float]
) -> dict[str, torch.Tensor]:
    """Eq. 5: ``start + sum_k p_k U_k`` with ``p_k = n_k / sum n`` (integer buffers kept)."""
    total = sum(sizes[k] for k in updates)
    out = {}
    for key, w in start.items():
        if not w.is_floating_point():
            out[key] = w.clone()
            continue
        step = sum((sizes[k] / total) * u[key] for k, u in updates.items())
        out[key] = (w.float() + step).to(w.dtype)
    return out


def federaser(req: Request, console, settings: FedEraserSettings | None = None) -> Unlearned:  # type: ignore[no-untyped-def]
    s = settings or FedEraserSettings()
    if s.interval < 1 or not 0 < s.calibration_ratio <= 1:
        raise InputError("federaser.interval >= 1 and 0 < federaser.calibration_ratio <= 1")
    cfg, table = req.cfg, req.table
    log = UpdateLog(req.rd.path)
    stored = log.rounds()
    if not stored:
        raise InputError(
            "checkpoints.client_updates: federaser replays the clients' stored updates; rerun "
            "the experiment with checkpoints.client_updates=true"
        )
    t0 = time.perf_counter()
    state = load(req.rd.path / "checkpoints" / "federated" / "round-00000.pt")["model"]
    sizes = {k: float((table.client == k).sum()) for k in range(table.num_clients)}
    replayed = 0
    for r in stored[:: s.interval]:
        updates = {k: u for k, u in log.load(r).items() if k not in req.clients}
        if not updates:
            continue
        calibrated = {}
        for k, u in updates.items():
            model = experiment_model(cfg, table.input_shape, table.num_classes)
            model.load_state_dict(state)
            rows = table.client_rows(k)
            steps = cfg.train.local_epochs * math.ceil(len(rows) / cfg.train.batch_size)
            train_epochs(
                model,
                table.x[rows],
                table.y_obs[rows],
                cfg.train,
                keyed_order(cfg.seed, r, rows, len(table)),
                rows=rows,
                max_steps=max(1, math.ceil(s.calibration_ratio * steps)),
            )
            new = model.state_dict()
            calibrated[k] = calibrate(u, {key: new[key].float() - state[key].float() for key in u})
        state = aggregate(state, calibrated, sizes)
        replayed += 1
    return Unlearned(
        "federaser",
        state,
        wall_s=time.perf_counter() - t0,
        rounds=replayed,
        storage_bytes=sum(log.sizes().values()),
        details={**asdict(s), "replayed_rounds": replayed},
    )
