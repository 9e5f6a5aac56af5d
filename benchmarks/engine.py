"""Issue 16's workload on the plain loop and every fedmem backend, in one process tree.

    python benchmarks/engine.py [--clients 100] [--rounds 6] [--repeats 5] [--quick]
                                [--paths plain local batched ray]

Workload (the issue's, ``batched_backend.make_config``): 100 IID MNIST-1D clients x 40 training
examples, MLP 40-256-256-10, SGD lr 0.05 without momentum, batch 10, one local epoch, every
client every round; 20% label noise, no canaries. Paths, each evaluating the global model with
the same :class:`~fedmem.observer.Observer` after every round:

- **plain**: ``federation_overhead.run_floor`` (every client in turn with ``train_epochs`` in
  one process, FedAvg in plain torch; no Flower);
- **local**, **batched**: ``run_federated`` with ``federation.backend=local`` / ``batched``
  (``batched_backend.run_path``);
- **ray**: ``run_federated`` with the default backend (Flower's simulation engine, client
  actors on a local Ray with one CPU each: 2 in parallel here), timed by
  ``federation_overhead.run_flower``; Ray is shut down after every run and the benchmark waits
  until its processes are gone.

The paths run ``--repeats`` times, interleaved (plain, local, batched, ray, plain, ...), so a
shared machine's drift hits all alike. Per path: the median wall seconds per steady-state round
(rounds 2..R of every repeat), the ratio to the plain loop's median (and, paired, each
repeat's median over the plain loop's median in the same repeat), and the CPU seconds per
steady-state round (median of this process's per-round CPU time; for Ray the mean over rounds
2..R of every process of its tree: driver, actors, raylet, ...), less sensitive to other
users' load than wall times (but not immune: shared caches and cores slow a process too).
Ray's fixed cost per run is reported apart from its rounds: Ray start, Flower start and the
first message to every node (actor start-up and imports), the first round, and teardown with
``ray.shutdown``. The final weights of every path are compared with the local backend's. All
paths run with one torch thread in this process (the clients' own count on every backend).
Writes ``results/engine.json`` (``--quick``: 10 clients, 3 rounds, one repeat,
``engine_quick.json``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402
import torch  # noqa: E402
from batched_backend import (  # noqa: E402
    make_config,
    max_diff,
    run_path,
    workload_args,
    workload_parser,
)
from federation_overhead import run_flower, wait_gone  # noqa: E402

from fedmem.config import ExperimentConfig  # noqa: E402
from fedmem.data.table import ExampleTable, cached_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PATHS = ("plain", "local", "batched", "ray")
Row = dict[str, Any]


def run_ray(cfg: ExperimentConfig, table: ExampleTable) -> Row:
    """One Flower-on-Ray run: steady rounds, CPU of the whole process tree, fixed costs."""
    fl = run_flower(cfg, table, profile=False)
    left, waited = wait_gone(fl["ray_procs"])
    walls = [r["wall_s"] for r in sorted(fl["rows"], key=lambda r: r["round"])]
    cpu = fl["cpu_per_round"]  # mean over rounds 2..R, by process kind
    ph = fl["phases"]
    return {
        "round_s": [b - a for a, b in zip(walls[1:], walls[2:], strict=False)],
        "cpu_s": [sum(v for k, v in cpu.items() if k not in ("wall", "other_processes"))],
        "cpu_by_process": {k: v for k, v in cpu.items() if k != "wall"},
        "final": fl["final_state"],
        "fixed": {
            "ray_start_s": ph["ray_start_s"],
            "actor_start_s": ph["flower_start_s"] + ph["node_query_s"],
            "first_round_s": ph["first_round_s"],
            "shutdown_s": ph["teardown_s"] + ph["ray_shutdown_s"],
            "total_run_s": ph["total_s"],
        },
        "ray_processes_left": sorted(f"{p}:{n}" for p, n in left.items()),
        "ray_gone_after_s": waited,
    }


def run_one(path: str, cfgs: dict[str, ExperimentConfig], table: ExampleTable) -> Row:
    t = time.perf_counter()
    out = run_ray(cfgs[path], table) if path == "ray" else run_path(path, cfgs[path], table)
    out["run_s"] = time.perf_counter() - t
    return out


def summarize(found: dict[str, list[Row]]) -> Row:
    out: Row = {}
    for p, runs in found.items():
        rounds = [s for run in runs for s in run["round_s"]]
        cpus = [s for run in runs for s in run["cpu_s"]]
        out[p] = {
            "median_s_per_round": statistics.median(rounds),
            "median_cpu_s_per_round": statistics.median(cpus),
            "round_s": rounds,
            "run_s": [run["run_s"] for run in runs],
        }
        if p == "ray":
            fixed = [run["fixed"] for run in runs]
            out[p]["fixed"] = {k: statistics.median(f[k] for f in fixed) for k in fixed[0]}
            out[p]["fixed_runs"] = fixed
            out[p]["cpu_by_process"] = [run["cpu_by_process"] for run in runs]
            out[p]["ray_processes_left"] = sorted(
                {x for r in runs for x in r["ray_processes_left"]}
            )
    if "plain" in out:
        base, base_cpu = out["plain"]["median_s_per_round"], out["plain"]["median_cpu_s_per_round"]
        for p in out:
            out[p]["x_plain"] = out[p]["median_s_per_round"] / base
            out[p]["cpu_x_plain"] = out[p]["median_cpu_s_per_round"] / base_cpu
            # paired: each repeat's median against the plain loop's in the same repeat
            out[p]["x_plain_by_repeat"] = [
                statistics.median(run["round_s"]) / statistics.median(ref["round_s"])
                for run, ref in zip(found[p], found["plain"], strict=True)
            ]
    if "local" in found:
        ref = found["local"][0]["final"]
        out["max_abs_weight_diff_vs_local"] = {
            p: max_diff(found[p][0]["final"], ref) for p in found if p != "local"
        }
    return out


def table_lines(result: Row) -> list[str]:
    """The markdown table of benchmarks/README.md."""
    lines = [
        "| path | s/round | x plain | x plain by repeat | CPU-s/round | CPU x plain |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for p in PATHS:
        if p not in result:
            continue
        r = result[p]
        ratio = f"{r['x_plain']:.2f}x" if "x_plain" in r else "-"
        cpu_ratio = f"{r['cpu_x_plain']:.2f}x" if "cpu_x_plain" in r else "-"
        by_repeat = " / ".join(f"{x:.2f}" for x in r.get("x_plain_by_repeat", []))
        lines.append(
            f"| {p} | {r['median_s_per_round']:.3f} | {ratio} | {by_repeat or '-'} | "
            f"{r['median_cpu_s_per_round']:.3f} | {cpu_ratio} |"
        )
    if "ray" in result:
        f = result["ray"]["fixed"]
        lines.append("")
        lines.append(
            f"Ray fixed cost per run (median): Ray start {f['ray_start_s']:.1f} s, actor start "
            f"{f['actor_start_s']:.1f} s, first round {f['first_round_s']:.1f} s, shutdown "
            f"{f['shutdown_s']:.1f} s; whole run {f['total_run_s']:.1f} s."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = workload_parser(__doc__, repeats=5)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    args = workload_args(p, argv, 5, "engine")
    torch.set_num_threads(1)
    info = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }
    t0 = time.perf_counter()
    cfgs = {
        path: make_config(
            args.clients,
            args.rounds,
            args.cache_dir,
            "local" if path == "plain" else path,
        )
        for path in args.paths
    }
    table = cached_table(next(iter(cfgs.values())))
    found: dict[str, list[Row]] = {path: [] for path in args.paths}
    for rep in range(args.repeats):
        for path in args.paths:
            run = run_one(path, cfgs, table)
            found[path].append(run)
            print(f"repeat {rep + 1}/{args.repeats} {path}: {run['run_s']:.1f} s", flush=True)
    result = {"clients": args.clients, "rounds": args.rounds, "repeats": args.repeats}
    result["train_examples"] = len(table)
    result.update(summarize(found))
    info["loadavg_end"] = list(os.getloadavg())
    info["benchmark_s"] = time.perf_counter() - t0
    print()
    print("\n".join(table_lines(result)))
    print(f"\nweights vs local (max abs diff): {result.get('max_abs_weight_diff_vs_local')}")
    print(
        f"load average {info['loadavg_start']} -> {info['loadavg_end']}; "
        f"benchmark {info['benchmark_s']:.0f} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "engine", "machine": info, "result": result}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    left = result.get("ray", {}).get("ray_processes_left", [])
    if ray.is_initialized() or left:
        print(f"Ray not fully shut down: initialized={ray.is_initialized()} {left}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
