"""What checkpoints and resume states cost per round.

    python benchmarks/checkpoints.py [--rounds 20] [--repeats 3]

1. The central run of ``configs/default.yaml`` and of ``configs/noise.yaml`` (MLP 512x2) with
   and without checkpoints (a resume state after every round, rounds 0 and final kept),
   alternating, median of ``--repeats``; the ratio is measured within one run of this script.
2. One ``save_round`` of a resume state (weights + SGD momentum) for each architecture at its
   usual input shape, and one client state file (DP history + ELR-sized plug-in state).

Results go to ``benchmarks/results/checkpoints.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedmem import config
from fedmem.config import ModelConfig, TrainConfig
from fedmem.data.table import cached_table
from fedmem.federation.client_state import ClientState, save_state
from fedmem.models import build_model
from fedmem.observer import Observer
from fedmem.runs.central import run_central
from fedmem.runs.checkpoints import KeepPolicy, ModelCheckpoints, cpu_state
from fedmem.train import make_optimizer

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"mlp": (40,), "cnn1d": (40,), "cnn": (1, 28, 28), "resnet9": (3, 32, 32)}


def central_seconds(cfg: config.ExperimentConfig, checkpoints: bool) -> float:
    table = cached_table(cfg)
    obs = Observer(table, "central", lambda row: None, cfg.train.eval_batch_size)
    with tempfile.TemporaryDirectory() as d:
        ck = ModelCheckpoints(Path(d), "central", KeepPolicy(final=cfg.train.rounds))
        t0 = time.perf_counter()
        run_central(cfg, table, obs, checkpoints=ck if checkpoints else None)
        return time.perf_counter() - t0


def save_round_ms(name: str, repeats: int) -> dict:
    model = build_model(ModelConfig(name=name), SHAPES[name], 10)
    opt = make_optimizer(model, TrainConfig())
    x = torch.randn(8, *SHAPES[name])
    torch.nn.functional.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    opt.step()  # momentum buffers exist
    times = []
    with tempfile.TemporaryDirectory() as d:
        ck = ModelCheckpoints(Path(d), "central", KeepPolicy(final=10**6))
        for r in range(1, repeats + 1):
            state = {"model": cpu_state(model), "optimizer": opt.state_dict(), "plugins": {}}
            t0 = time.perf_counter()
            ck.save_round(r, state, kept_keys=("model",))
            times.append(time.perf_counter() - t0)
        size = ck.resume_path.stat().st_size
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "resume_bytes": size, "ms": 1000 * statistics.median(times)}


def client_state_ms(n_local: int, classes: int, repeats: int) -> dict:
    state = ClientState(
        round=1,
        rounds_trained=1,
        dp={"noise-multiplier": [1.0], "sample-rate": [0.1], "steps": [10]},
        plugins={"elr": {"targets": torch.rand(n_local, classes)}},
    )
    times = []
    with tempfile.TemporaryDirectory() as d:
        for r in range(1, repeats + 1):
            state.round = r
            t0 = time.perf_counter()
            path = save_state(d, 0, state)
            times.append(time.perf_counter() - t0)
        size = path.stat().st_size
    return {"n_local": n_local, "bytes": size, "ms": 1000 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "central": {},
    }
    for preset in ("default", "noise"):
        cfg = config.load(
            REPO / "configs" / f"{preset}.yaml",
            [f"train.rounds={args.rounds}", "analysis.gradients.enabled=false"],
        )
        central_seconds(cfg, False)  # warm-up: table cache, allocator
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for ck in (False, True):
                runs[ck].append(central_seconds(cfg, ck))
        plain, with_ck = statistics.median(runs[False]), statistics.median(runs[True])
        out["central"][preset] = {
            "rounds": args.rounds,
            "plain_s": round(plain, 3),
            "checkpoints_s": round(with_ck, 3),
            "ratio": round(with_ck / plain, 3),
            "per_round_ms": round(1000 * (with_ck - plain) / (args.rounds + 1), 2),
        }
        print(preset, out["central"][preset])
    out["save_round"] = {m: save_round_ms(m, 5) for m in SHAPES}
    out["client_state"] = [client_state_ms(n, 10, 20) for n in (400, 5000)]
    for k, v in out["save_round"].items():
        print(k, v)
    print(out["client_state"])
    path = REPO / "benchmarks" / "results" / "checkpoints.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
