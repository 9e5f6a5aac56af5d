"""The batched federation backend against the plain loop and the local backend (issue 16).

    python benchmarks/batched_backend.py [--clients 100] [--rounds 6] [--repeats 3] [--quick]

Workload (the issue's): the default experiment with ``federation.num_clients=N
partition.kind=iid data.noise.rate=0.2 data.canaries.count=0`` (4000 MNIST-1D training rows: 40
per client at N = 100), MLP 40-256-256-10, SGD lr 0.05 without momentum, batch 10, one local
epoch, every client every round. Three paths, each evaluating the global model with the same
:class:`~fedmem.observer.Observer` after every round:

- **plain**: ``federation_overhead.run_floor``: every client in turn with ``train_epochs`` and
  ``keyed_order`` in one process, FedAvg in plain torch (no Flower);
- **local**: ``run_federated`` with ``federation.backend=local`` (ServerApp, strategy and
  ClientApp in this process, one client after another);
- **batched**: ``run_federated`` with ``federation.backend=batched`` (the same ServerApp and
  strategy, all clients of a round trained at once as stacked models).

The paths run ``--repeats`` times, interleaved (plain, local, batched, plain, ...), so drift of a
shared machine hits all of them alike. Reported per path: the median wall seconds per
steady-state round (rounds 2..R of every repeat) and the median CPU seconds of this process per
round (robust to other users' load, which wall times are not); ratios are plain / path. All
paths run with ``--threads`` torch threads (default 1). The final global weights of the three
paths are compared (max abs difference). Writes ``results/batched_backend.json``
(``--quick``: 10 clients, 3 rounds, ``..._quick.json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from federation_overhead import run_floor  # noqa: E402

from fedmem import config  # noqa: E402
from fedmem.config import ExperimentConfig  # noqa: E402
from fedmem.data.table import ExampleTable, cached_table  # noqa: E402
from fedmem.federation.engine import run_federated  # noqa: E402
from fedmem.federation.server_app import FederatedJob  # noqa: E402
from fedmem.observer import Observer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PATHS = ("plain", "local", "batched")
Row = dict[str, Any]


def make_config(num_clients: int, rounds: int, cache_dir: Path, backend: str) -> ExperimentConfig:
    overrides = [
        f"federation.num_clients={num_clients}",
        "partition.kind=iid",
        "data.noise.rate=0.2",
        "data.canaries.count=0",
        "train.batch_size=10",
        "train.momentum=0",
        "train.lr=0.05",
        "train.local_epochs=1",
        "federation.fraction_train=1.0",
        f"train.rounds={rounds}",
        f"data.cache_dir={cache_dir}",
        f"federation.backend={backend}",
        "output.name=batched_backend",
    ]
    return config.load(REPO / "configs" / "default.yaml", overrides)


def run_path(path: str, cfg: ExperimentConfig, table: ExampleTable) -> Row:
    """One run: per-round wall and CPU seconds (rounds 2..R) and the final weights."""
    if path == "plain":
        rows, final, _, _ = run_floor(cfg, table)
        rows = sorted(rows, key=lambda r: r["round"])
        walls = [r["wall_s"] for r in rows]
        cpus = [r["process_s"] for r in rows[1:]]  # at the end of rounds 1..R
        return {
            "round_s": [b - a for a, b in zip(walls[1:], walls[2:], strict=False)],
            "cpu_s": [b - a for a, b in zip(cpus, cpus[1:], strict=False)],
            "final": final,
        }
    rows: list[Row] = []
    cpu_at: dict[int, float] = {}
    job = FederatedJob(
        cfg,
        table,
        Observer(table, "federated", rows.append, cfg.train.eval_batch_size),
        on_round=lambda r, row: cpu_at.__setitem__(r, time.process_time()),
    )
    run_federated(job)
    assert job.final_state is not None
    walls = [r["wall_s"] for r in sorted(rows, key=lambda r: r["round"])]
    last = max(cpu_at)
    return {
        "round_s": [b - a for a, b in zip(walls[1:], walls[2:], strict=False)],
        "cpu_s": [cpu_at[r] - cpu_at[r - 1] for r in range(2, last + 1)],
        "final": job.final_state,
    }


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def bench(args: argparse.Namespace) -> Row:
    cfgs = {p: make_config(args.clients, args.rounds, args.cache_dir, "local") for p in PATHS}
    cfgs["batched"] = make_config(args.clients, args.rounds, args.cache_dir, "batched")
    table = cached_table(cfgs["plain"])
    found: dict[str, list[Row]] = {p: [] for p in PATHS}
    for rep in range(args.repeats):
        for p in PATHS:
            t = time.perf_counter()
            found[p].append(run_path(p, cfgs[p], table))
            print(
                f"repeat {rep + 1}/{args.repeats} {p}: {time.perf_counter() - t:.1f} s", flush=True
            )
    out: Row = {"clients": args.clients, "rounds": args.rounds, "train_examples": len(table)}
    for p in PATHS:
        rounds = [s for run in found[p] for s in run["round_s"]]
        cpus = [s for run in found[p] for s in run["cpu_s"]]
        out[p] = {
            "median_s_per_round": statistics.median(rounds),
            "median_cpu_s_per_round": statistics.median(cpus),
            "round_s": rounds,
        }
    for p in ("local", "batched"):
        out[f"speedup_{p}_vs_plain"] = {
            "wall": out["plain"]["median_s_per_round"] / out[p]["median_s_per_round"],
            "cpu": out["plain"]["median_cpu_s_per_round"] / out[p]["median_cpu_s_per_round"],
        }
    out["speedup_batched_vs_local"] = (
        out["local"]["median_s_per_round"] / out["batched"]["median_s_per_round"]
    )
    final = {p: found[p][0]["final"] for p in PATHS}
    out["check"] = {
        "max_abs_weight_diff_batched_vs_local": max_diff(final["batched"], final["local"]),
        "max_abs_weight_diff_plain_vs_local": max_diff(final["plain"], final["local"]),
    }
    return out


def workload_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The workload options every interleaved benchmark of the issue-16 workload takes."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=None, help="default 100 (quick: 10)")
    p.add_argument("--rounds", type=int, default=None, help="R >= 3 (default 6; quick 3)")
    p.add_argument("--repeats", type=int, default=None, help=f"interleaved runs ({repeats})")
    p.add_argument("--quick", action="store_true", help="10 clients, 3 rounds, 1 repeat")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "benchmarks")
    p.add_argument("--out", type=Path, default=None)
    return p


def workload_args(
    p: argparse.ArgumentParser, argv: list[str] | None, repeats: int, name: str
) -> argparse.Namespace:
    """Parse, fill the quick / full defaults, check the rounds; ``results/<name>[_quick].json``."""
    args = p.parse_args(argv)
    args.clients = args.clients or (10 if args.quick else 100)
    args.rounds = args.rounds or (3 if args.quick else 6)
    args.repeats = args.repeats or (1 if args.quick else repeats)
    if args.rounds < 3:
        p.error("--rounds must be >= 3 (round 1 is warm-up)")
    args.out = args.out or RESULTS / f"{name}{'_quick' if args.quick else ''}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    p = workload_parser(__doc__, repeats=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = workload_args(p, argv, 3, "batched_backend")
    torch.set_num_threads(args.threads)
    info = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": args.threads,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }
    result = bench(args)
    info["loadavg_end"] = list(os.getloadavg())
    for path in PATHS:
        r = result[path]
        print(
            f"{path:>8}: {r['median_s_per_round']:.3f} s/round (median wall), "
            f"{r['median_cpu_s_per_round']:.3f} CPU-s/round"
        )
    for path in ("local", "batched"):
        s = result[f"speedup_{path}_vs_plain"]
        print(f"plain / {path}: {s['wall']:.2f}x wall, {s['cpu']:.2f}x CPU")
    print(f"local / batched: {result['speedup_batched_vs_local']:.2f}x wall")
    print(
        f"checks: {result['check']}; load average {info['loadavg_start']} -> {info['loadavg_end']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "batched_backend", "machine": info, "result": result}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
