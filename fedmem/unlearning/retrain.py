"""``retrain``: the reference every unlearning method is judged against.

The run's config with the forgotten clients in ``federation.excluded_clients``: FedAvg (or the
run's strategy) from the same initialization for the same rounds, each round's sample the
original run's minus the forgotten clients (:class:`strategies.sampling.PartitionSampled`),
the same batch orders for everyone else. It is an ordinary experiment with its own cached run
directory (``<name>-retrain-<hash8>``: the central run there also leaves the clients' rows
out); its final global model comes back. Cost: its federated simulation time and all rounds.
"""

from __future__ import annotations

import time

from rich.console import Console

from fedmem.config import build, to_dict
from fedmem.runs.checkpoints import load
from fedmem.unlearning.base import Request, Unlearned


def retrain(req: Request, console: Console) -> Unlearned:
    raw = to_dict(req.cfg)
    raw["federation"]["excluded_clients"] = sorted(
        {*raw["federation"]["excluded_clients"], *req.clients}
    )
    raw["output"]["name"] = f"{req.cfg.output.name}-retrain"
    # the clients' unlearning generators never touch the model: not needed, not timed
    raw["plugins"]["forget_generator"]["enabled"] = False
    from fedmem.runs.experiment import run_or_load

    t0 = time.perf_counter()
    rd, summary = run_or_load(build(raw), console)
    wall = summary.get("federated_simulation_s", time.perf_counter() - t0)
    return Unlearned(
        "retrain",
        load(rd.path / "checkpoints" / "federated.pt"),
        wall_s=float(wall),
        rounds=req.cfg.train.rounds,
        details={"run_dir": str(rd.path)},
    )
