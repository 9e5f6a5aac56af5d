"""Batched ensemble training (fedmem.ensemble) vs the same models one after another.

    python benchmarks/ensemble.py [--ks 16 64 256] [--epochs 2] [--seq-models 8] [--repeats 3]
                                  [--threads 1 2] [--target] [--target-repeats 2] [--merge]

Data: the default experiment's ExampleTable (``configs/default.yaml``: MNIST-1D, 4000 training
examples + 40 canary copies = 4040 rows; tables cached under ``.cache/benchmarks``). Every
model trains on its own random 70% subset of the rows (``subset_masks``, 2828 rows), with the
default model (MLP, hidden 256, depth 2) and training settings (SGD lr 0.05 momentum 0.9,
batch 64) for ``--epochs`` epochs.

- **batched**: ``train_ensemble`` on all K models at once (the MLP's batched-matmul path;
  with T threads it runs T worker threads, each on K/T models with one intra-op thread).
- **sequential**: for each model, ``build_model`` + its ensemble init state, then
  ``fedmem.train.train_epochs`` on its rows with its batch order (``ensemble_order``): exactly
  the same training, one model at a time. Sequential time per model does not depend on K, so it
  is timed on the first ``min(K, --seq-models)`` models and reported per model (extrapolated to
  K models in ``sequential_s_total_extrapolated``). The benchmark checks that these models end
  with the same weights as their batched twins (``max_abs_weight_diff``).

Both run in this process with the same torch intra-op thread count, for each of ``--threads``
(default: torch's default). The machine may be shared: each timing is repeated ``--repeats``
times and the minimum is reported (all runs and the load average are kept in the JSON). With
two threads on two cores, another busy process makes every OpenMP barrier wait for a
descheduled thread: both paths then slow down many times over (seen: sequential 50x), so
two-thread numbers are only meaningful on an otherwise idle machine; one thread is robust.
``speedup`` = sequential s/model / batched s/model.

``--target``: also time the "done when" workload, K=128 models x 20 epochs on the same data
(70% subsets), one ``train_ensemble`` call per run (required: under 3 minutes), at each
thread count, ``--target-repeats`` times.

Results: a rich table on stdout and ``benchmarks/results/ensemble.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedmem import config
from fedmem.analysis.memorization import subset_masks
from fedmem.data.table import cached_table
from fedmem.ensemble import (
    ensemble_order,
    member_init_state,
    train_ensemble,
)
from fedmem.models import build_model
from fedmem.seeding import np_rng
from fedmem.train import train_epochs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ensemble.json"
SEED = 0
SHARE = 0.7


def load_data():
    cfg = config.load(
        REPO / "configs" / "default.yaml", [f"data.cache_dir={REPO / '.cache' / 'benchmarks'}"]
    )
    return cfg, cached_table(cfg)


def time_batched(cfg, table, masks, epochs: int):
    t0 = time.perf_counter()
    ens = train_ensemble(
        cfg.model,
        cfg.train,
        table.input_shape,
        table.num_classes,
        table.x,
        table.y_obs,
        masks,
        epochs=epochs,
        seed=SEED,
    )
    return time.perf_counter() - t0, ens


def time_sequential(cfg, table, masks, epochs: int, models: int):
    x, y, n = table.x, table.y_obs, len(table)
    trained = []
    t0 = time.perf_counter()
    for k in range(models):
        model = build_model(cfg.model, table.input_shape, table.num_classes)
        model.load_state_dict(
            member_init_state(cfg.model, table.input_shape, table.num_classes, SEED, k)
        )
        rows = torch.nonzero(masks[k]).flatten()
        train_epochs(
            model,
            x[rows],
            y[rows],
            cfg.train,
            lambda e, k=k, rows=rows: ensemble_order(SEED, k, e, rows, n),
            epochs=epochs,
        )
        trained.append(model)
    return time.perf_counter() - t0, trained


def max_weight_diff(ens, models) -> float:
    diff = 0.0
    for k, m in enumerate(models):
        sd = ens.state_dict(k)
        for name, v in m.state_dict().items():
            diff = max(diff, float((sd[name] - v).abs().max()))
    return diff


def sweep(cfg, table, ks, epochs, seq_models, repeats, console) -> list[dict]:
    n = len(table)
    rows = []
    for k_models in ks:
        masks = subset_masks(n, k_models, SHARE, np_rng(SEED, "benchmark", k_models))
        s = min(k_models, seq_models)
        batched_runs, seq_runs = [], []
        ens = trained = None
        for _ in range(repeats):
            tb, ens = time_batched(cfg, table, masks, epochs)
            batched_runs.append(tb)
            ts, trained = time_sequential(cfg, table, masks, epochs, s)
            seq_runs.append(ts)
            console.print(
                f"  threads {torch.get_num_threads()} K={k_models}: batched {tb:.2f} s "
                f"({tb / k_models * 1e3:.1f} ms/model), sequential {s} models {ts:.2f} s "
                f"({ts / s * 1e3:.1f} ms/model)"
            )
        b = min(batched_runs) / k_models
        q = min(seq_runs) / s
        rows.append(
            {
                "threads": torch.get_num_threads(),
                "K": k_models,
                "epochs": epochs,
                "batched_s_per_model": b,
                "sequential_s_per_model": q,
                "speedup": q / b,
                "batched_s_total": min(batched_runs),
                "sequential_models_timed": s,
                "sequential_s_total_extrapolated": q * k_models,
                "batched_runs_s": batched_runs,
                "sequential_runs_s": seq_runs,
                "max_abs_weight_diff": max_weight_diff(ens, trained),
            }
        )
    return rows


def target_run(cfg, table, repeats, console) -> dict:
    masks = subset_masks(len(table), 128, SHARE, np_rng(SEED, "benchmark", "target"))
    runs = []
    for _ in range(repeats):
        t, _ens = time_batched(cfg, table, masks, 20)
        runs.append(t)
        console.print(f"  threads {torch.get_num_threads()} target K=128 x 20 epochs: {t:.1f} s")
    return {
        "threads": torch.get_num_threads(),
        "K": 128,
        "epochs": 20,
        "rows_per_model": int(masks[0].sum()),
        "wall_s": min(runs),
        "runs_s": runs,
        "limit_s": 180,
        "ok": min(runs) < 180,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", type=int, nargs="*", default=[16, 64, 256])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seq-models", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[torch.get_num_threads()],
        help="torch intra-op thread counts to measure (default: torch's default)",
    )
    ap.add_argument("--target", action="store_true", help="also time K=128 x 20 epochs")
    ap.add_argument("--target-repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the other (threads, K) rows and targets already in --out (re-measure some)",
    )
    args = ap.parse_args()
    console = Console()
    cfg, table = load_data()
    n = len(table)
    console.print(
        f"data: {cfg.data.name}, {n} rows, subsets of {round(SHARE * n)}; model "
        f"{cfg.model.name} hidden {cfg.model.hidden} depth {cfg.model.depth}; batch "
        f"{cfg.train.batch_size}; threads {args.threads}"
    )
    load_before = os.getloadavg()
    rows, targets = [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        # warm-up: first calls pay lazy initialization in both paths
        warm = subset_masks(n, 2, SHARE, np_rng(SEED, "benchmark", "warmup"))
        time_batched(cfg, table, warm, 1)
        time_sequential(cfg, table, warm, 1, 1)
        rows += sweep(cfg, table, args.ks, args.epochs, args.seq_models, args.repeats, console)
        if args.target:
            targets.append(target_run(cfg, table, args.target_repeats, console))

    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": os.getloadavg(),
        },
        "setup": {
            "data": cfg.data.name,
            "rows": n,
            "subset_share": SHARE,
            "rows_per_model": round(SHARE * n),
            "model": cfg.model.model_dump(),
            "train": {
                k: getattr(cfg.train, k) for k in ("optimizer", "lr", "momentum", "batch_size")
            },
            "threads": args.threads,
            "repeats": args.repeats,
            "timing": "min over repeats; sequential timed on min(K, seq_models) models and "
            "reported per model (per-model time does not depend on K)",
        },
        "results": rows,
        "target": targets,
    }
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        new_keys = {(r["threads"], r["K"]) for r in rows}
        kept = [r for r in old.get("results", []) if (r["threads"], r["K"]) not in new_keys]
        result["results"] = sorted(kept + rows, key=lambda r: (r["threads"], r["K"]))
        new_threads = {t["threads"] for t in targets}
        kept_t = [t for t in old.get("target", []) if t["threads"] not in new_threads]
        result["target"] = sorted(kept_t + targets, key=lambda t: t["threads"])
        result["merged_into"] = {k: old.get(k) for k in ("date", "machine")}
        rows, targets = result["results"], result["target"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    tab = Table(title=f"ensemble training, {args.epochs} epochs, s per model (min of runs)")
    cols = ("threads", "K", "batched s/model", "sequential s/model", "speedup", "seq. timed")
    for col in (*cols, "max |dw|"):
        tab.add_column(col, justify="right")
    for r in rows:
        tab.add_row(
            str(r["threads"]),
            str(r["K"]),
            f"{r['batched_s_per_model']:.4f}",
            f"{r['sequential_s_per_model']:.4f}",
            f"{r['speedup']:.2f}x",
            str(r["sequential_models_timed"]),
            f"{r['max_abs_weight_diff']:.1e}",
        )
    if rows:
        console.print(tab)
    for t in targets:
        console.print(
            f"target K=128 x 20 epochs, {t['threads']} thread(s): {t['wall_s']:.1f} s "
            f"(limit 180 s): {'ok' if t['ok'] else 'TOO SLOW'}"
        )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
