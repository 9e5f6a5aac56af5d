"""``ascent``: projected gradient ascent on the forgotten client's data, then a few FedAvg
rounds without it (Halimi, Kadhe, Rawat, Baracaldo 2022, "Federated Unlearning: How to
Efficiently Erase a Client in FL?", Sec. 3, Algorithm 1).

1. Reference model: the average of the *other* clients' models of the final round,
   ``w_ref = w_start + sum_{k not in F} p_k delta_k / (1 - p_F)`` with the round's stored
   updates ``delta_k`` (``checkpoints.client_updates``), FedAvg weights ``p_k = n_k / sum n``
   and ``w_start = w_R - sum_k p_k delta_k`` (exact for FedAvg without server noise; for
   other strategies an approximation: ours). The forgotten clients must have trained in the
   final round (``federation.fraction_train=1`` guarantees it).
2. Radius: ``delta = radius_share`` (paper: 1/3) times the mean L2 distance between ``w_ref``
   and ``random_models`` random initializations.
3. Starting from ``w_ref``, SGD *ascent* on the forgotten clients' cross-entropy for up to
   ``epochs`` passes, each step projected onto the L2 ball of radius ``delta`` around
   ``w_ref``; stop as soon as their training accuracy falls to ``stop_acc`` or below (paper: a
   threshold near chance; default ``1 / classes``).
4. ``post_rounds`` federated rounds of the run's strategy without the forgotten clients
   (rounds ``R+1 ..``, the run's sampling minus them) recover the lost utility.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from fedmem.errors import InputError
from fedmem.models.factory import experiment_model
from fedmem.runs.checkpoints import UpdateLog, load
from fedmem.seeding import derive_seed
from fedmem.unlearning.base import Request, Unlearned


@dataclass(frozen=True)
class AscentSettings:
    lr: float = 0.01
    epochs: int = 5
    radius_share: float = 1.0 / 3.0
    random_models: int = 10
    stop_acc: float | None = None  # default: chance, 1 / classes
    post_rounds: int = 2


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.float().reshape(-1) for v in state.values()])


def project(params: list[torch.Tensor], center: list[torch.Tensor], radius: float) -> torch.Tensor:
    """Project ``params`` (in place) onto the L2 ball around ``center``; returns the distance
    after projection."""
    with torch.no_grad():
        diff = [p - c for p, c in zip(params, center, strict=True)]
        norm = torch.sqrt(sum((d**2).sum() for d in diff))  # type: ignore[arg-type]
        if norm > radius:
            for p, c, d in zip(params, center, diff, strict=True):
                p.copy_(c + d * (radius / norm))
            return torch.tensor(radius)
        return norm


def reference_model(req: Request) -> dict[str, torch.Tensor]:
    """``w_ref``: the other clients' average model of the final round (step 1)."""
    rounds = req.cfg.train.rounds
    log = UpdateLog(req.rd.path)
    if not log.path(rounds).is_file():
        raise InputError(
            "checkpoints.client_updates: ascent needs the clients' stored updates of the final "
            "round; rerun the experiment with checkpoints.client_updates=true"
        )
    updates = log.load(rounds)
    missing = [c for c in req.clients if c not in updates]
    if missing:
        raise InputError(
            f"--client: client(s) {missing} did not train in the final round {rounds}; ascent "
            "needs their last update (use federation.fraction_train=1)"
        )
    sizes = torch.bincount(req.table.client, minlength=req.table.num_clients).float()
    total = sum(float(sizes[k]) for k in updates)
    p = {k: float(sizes[k]) / total for k in updates}
    p_f = sum(p[c] for c in req.clients)
    final = load(req.rd.path / "checkpoints" / "federated.pt")
    out = {}
    for key, w in final.items():
        if key not in next(iter(updates.values())):
            out[key] = w.clone()  # integer buffers: not averaged
            continue
        start = w.float() - sum(p[k] * updates[k][key].float() for k in updates)
        rest = sum(p[k] * updates[k][key].float() for k in updates if k not in req.clients)
        out[key] = (start + rest / (1.0 - p_f)).to(w.dtype)
    return out


def radius(req: Request, ref: dict[str, torch.Tensor], s: AscentSettings) -> float:
    """Step 2: ``radius_share`` x the mean distance from ``w_ref`` to random initializations."""
    center = flat({k: v for k, v in ref.items() if v.is_floating_point()})
    dists = []
    for i in range(s.random_models):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(req.cfg.seed, "unlearn", "random-model", i))
            m = experiment_model(req.cfg, req.table.input_shape, req.table.num_classes)
        rand = flat({k: v for k, v in m.state_dict().items() if v.is_floating_point()})
        dists.append(float((rand - center).norm()))
    return s.radius_share * sum(dists) / len(dists)


def ascent(req: Request, console, settings: AscentSettings | None = None) -> Unlearned:  # type: ignore[no-untyped-def]
    s = settings or AscentSettings()
    t0 = time.perf_counter()
    ref = reference_model(req)
    delta = radius(req, ref, s)
    model = experiment_model(req.cfg, req.table.input_shape, req.table.num_classes)
    model.load_state_dict(ref)
    params = [p for p in model.parameters() if p.requires_grad]
    center = [p.detach().clone() for p in params]
    rows = torch.nonzero(req.forgotten_rows()).flatten()
    x, y = req.table.x[rows], req.table.y_obs[rows]
    stop = s.stop_acc if s.stop_acc is not None else 1.0 / req.table.num_classes
    optimizer = torch.optim.SGD(params, lr=s.lr)
    gen = torch.Generator().manual_seed(derive_seed(req.cfg.seed, "unlearn", "ascent") % 2**31)
    steps, dist, acc = 0, 0.0, _accuracy(model, x, y)
    for _ in range(s.epochs):
        if acc <= stop:
            break
        model.train()
        for idx in torch.randperm(len(rows), generator=gen).split(req.cfg.train.batch_size):
            optimizer.zero_grad(set_to_none=True)
            (-F.cross_entropy(model(x[idx]), y[idx])).backward()  # ascent
            optimizer.step()
            dist = float(project(params, center, delta))
            steps += 1
        acc = _accuracy(model, x, y)
    ascent_s = time.perf_counter() - t0
    state = post_train(req, model.state_dict(), s.post_rounds)
    log = UpdateLog(req.rd.path)
    return Unlearned(
        "ascent",
        state,
        wall_s=time.perf_counter() - t0,
        rounds=s.post_rounds,
        storage_bytes=log.sizes()[req.cfg.train.rounds],  # only the final round is needed
        details={
            **asdict(s),
            "radius": delta,
            "distance_to_reference": dist,
            "ascent_steps": steps,
            "forgotten_acc_after_ascent": acc,
            "ascent_s": ascent_s,
        },
    )


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) if len(y) else 0.0


def post_train(
    req: Request, state: dict[str, torch.Tensor], rounds: int
) -> dict[str, torch.Tensor]:
    """Step 4: ``rounds`` federated rounds R+1.. without the forgotten clients."""
    if rounds == 0:
        return state
    from fedmem.config import build, to_dict
    from fedmem.federation.engine import run_federated
    from fedmem.federation.server_app import FederatedJob
    from fedmem.observer import Observer

    raw = to_dict(req.cfg)
    raw["train"]["rounds"] = req.cfg.train.rounds + rounds
    raw["federation"]["excluded_clients"] = sorted(
        {*raw["federation"]["excluded_clients"], *req.clients}
    )
    cfg = build(raw)
    observer = Observer(req.table, "federated", lambda row: None, cfg.train.eval_batch_size)
    job = FederatedJob(cfg, req.table, observer, start=(req.cfg.train.rounds, state))
    run_federated(job)
    assert job.final_state is not None
    return job.final_state
