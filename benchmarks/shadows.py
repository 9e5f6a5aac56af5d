"""Time K shadow models of both recipes (fedmem.privacy.audit.shadows) on the default experiment.

    python benchmarks/shadows.py [--shadows 32] [--repeats 1] [--threads 2] [--chunks 16 1000]

Data: the default experiment's ExampleTable (``configs/default.yaml``: MNIST-1D, 4040 rows over
10 clients with Dirichlet(0.5) label skew, MLP 256x2, SGD batch 64, 20 rounds x 1 local epoch;
tables cached under ``.cache/benchmarks``). Every shadow trains on a random half of the rows
(``shadow_masks`` over all rows: each row in exactly K/2 shadows).

- **central**: ``train_central_shadows``, one ``train_ensemble`` call of K models x 20 epochs.
- **fedavg**: ``train_fedavg_shadows``, 20 rounds, each one ``train_ensemble`` call over the
  round's (shadow, client) pairs (K x 10 here) followed by the stacked FedAvg; timed with
  each ``FEDAVG_CHUNK`` of ``--chunks`` (the lock-step group size; a huge value = groups of
  ``pairs / workers``, the trainer's default). The time spent inside ``train_ensemble`` is
  measured separately (``in_train_ensemble_s``); the rest is planning, mask building, init
  stacking and averaging (``outside_s``).

Both recipes make the same example visits (K x 20 x ~2020). The machine may be shared: each
timing is repeated ``--repeats`` times, the variants interleaved, and the minimum is reported
(wall and process CPU seconds); all runs and the load average are kept in
``benchmarks/results/shadows.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

import fedmem.privacy.audit.shadows as shadows_mod
from fedmem import config
from fedmem.data.table import cached_table
from fedmem.privacy.audit.shadows import shadow_masks, train_central_shadows, train_fedavg_shadows

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "shadows.json"
SEED = 0
LIMIT_S = 120


class _Timed:
    """Wraps ``train_ensemble`` inside the shadows module and adds up the time spent in it."""

    def __init__(self):
        self.inner = shadows_mod.train_ensemble
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def timed(fn, *args, **kwargs) -> tuple[float, float, int, object, float]:
    """(wall s, s inside train_ensemble, train_ensemble calls, result, process CPU s)."""
    wrapper = _Timed()
    shadows_mod.train_ensemble = wrapper  # type: ignore[assignment]
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall, wrapper.seconds, wrapper.calls, out, cpu
    finally:
        shadows_mod.train_ensemble = wrapper.inner  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shadows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--chunks", type=int, nargs="+", default=[shadows_mod.FEDAVG_CHUNK])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    console = Console()
    torch.set_num_threads(args.threads)
    cfg = config.load(
        REPO / "configs" / "default.yaml", [f"data.cache_dir={REPO / '.cache' / 'benchmarks'}"]
    )
    table = cached_table(cfg)
    x, y, client = table.x, table.y_obs, table.client
    masks = shadow_masks(len(table), args.shadows, seed=SEED)
    kw = dict(seed=SEED, num_classes=table.num_classes)
    console.print(
        f"data: {len(table)} rows, {table.num_clients} clients "
        f"{torch.bincount(client).tolist()}; K={args.shadows} shadows of "
        f"{int(masks[0].sum())} rows; {cfg.train.rounds} rounds x {cfg.train.local_epochs} "
        f"epochs; threads {args.threads}"
    )
    # warm-up: lazy initialization of both paths
    small = cfg.model_copy(update={"train": cfg.train.model_copy(update={"rounds": 1})})
    train_central_shadows(small, x, y, masks[:2], **kw)
    train_fedavg_shadows(small, x, y, client, masks[:2], **kw)

    load_before = os.getloadavg()
    central_runs: list[dict] = []
    fedavg_runs: dict[int, list[dict]] = {c: [] for c in args.chunks}
    default_chunk = shadows_mod.FEDAVG_CHUNK
    for rep in range(args.repeats):  # interleaved, so that load drifts hit every variant
        wall, _, _, _, cpu = timed(train_central_shadows, cfg, x, y, masks, **kw)
        central_runs.append({"wall_s": wall, "cpu_s": cpu, "loadavg_1": os.getloadavg()[0]})
        console.print(f"  [{rep}] central: {wall:.1f} s (CPU {cpu:.1f} s)")
        for chunk in args.chunks:
            shadows_mod.FEDAVG_CHUNK = chunk
            try:
                wall, inside, calls, _, cpu = timed(
                    train_fedavg_shadows, cfg, x, y, client, masks, **kw
                )
            finally:
                shadows_mod.FEDAVG_CHUNK = default_chunk
            fedavg_runs[chunk].append(
                {
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "in_train_ensemble_s": inside,
                    "calls": calls,
                    "loadavg_1": os.getloadavg()[0],
                }
            )
            console.print(
                f"  [{rep}] fedavg chunk {chunk}: {wall:.1f} s (CPU {cpu:.1f} s; "
                f"{inside:.1f} s in {calls} train_ensemble calls, {wall - inside:.2f} s outside)"
            )
    fedavg = []
    for chunk, runs in fedavg_runs.items():
        best = min(runs, key=lambda r: r["wall_s"])
        fedavg.append(
            {
                "chunk": chunk,
                "wall_s": best["wall_s"],
                "cpu_s": min(r["cpu_s"] for r in runs),
                "in_train_ensemble_s": best["in_train_ensemble_s"],
                "outside_s": best["wall_s"] - best["in_train_ensemble_s"],
                "train_ensemble_calls": best["calls"],
                "runs": runs,
                "ok": best["wall_s"] < LIMIT_S,
            }
        )
    central_best = min(r["wall_s"] for r in central_runs)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
            "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": os.getloadavg(),
        },
        "setup": {
            "config": "configs/default.yaml",
            "rows": len(table),
            "client_rows": torch.bincount(client).tolist(),
            "shadows": args.shadows,
            "rows_per_shadow": int(masks[0].sum()),
            "rounds": cfg.train.rounds,
            "local_epochs": cfg.train.local_epochs,
            "model": cfg.model.model_dump(),
            "repeats": args.repeats,
            "limit_s": LIMIT_S,
            "timing": "min over interleaved repeats, after a warm-up call of each recipe",
            "command": " ".join(["python", "benchmarks/shadows.py", *sys.argv[1:]]),
        },
        "central": {
            "wall_s": central_best,
            "cpu_s": min(r["cpu_s"] for r in central_runs),
            "runs": central_runs,
            "ok": central_best < LIMIT_S,
        },
        "fedavg": fedavg,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"central K={args.shadows}: {central_best:.1f} s (limit {LIMIT_S} s)")
    for row in fedavg:
        console.print(
            f"fedavg  K={args.shadows} chunk {row['chunk']}: {row['wall_s']:.1f} s "
            f"(outside train_ensemble {row['outside_s']:.2f} s)"
        )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
