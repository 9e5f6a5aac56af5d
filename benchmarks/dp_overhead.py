"""What record-level DP-SGD (Opacus, ``train_epochs(..., dp=...)``) costs per training step.

    python benchmarks/dp_overhead.py [--models mlp cnn1d cnn] [--batch-sizes 64 256]
                                     [--modes hooks functorch ew ghost] [--malloc default mallopt]
                                     [--repeats 5] [--threads 1] [--quick]

For each model (default widths: mlp hidden 256 depth 2 on MNIST-1D inputs ``(40,)``, cnn1d on
``(40,)``, cnn on ``(1, 28, 28)``; 10 classes), batch size B and Opacus ``grad_sample_mode`` it
times the shared training loop ``fedmem.train.train_epochs`` on random data of
``n = B x steps`` examples, once without DP (``keyed_order`` batches of B) and once with a
``DPSession`` (noise multiplier 1, clip 1: Poisson batches with q = 1/steps, expected size B,
per-example clipping, noise). Every call is one epoch, i.e. one "round" as a client runs it
(attaching and detaching Opacus included). Each configuration gets one warm-up call, then
``--repeats`` timed calls, interleaved with the non-DP calls so that drift on a shared machine
hits both alike; reported: the median seconds per step, and ``ratio`` = DP / non-DP. ``steps``
per call is chosen so that a non-DP call lasts about 0.3 s (4..16 steps).

Memory allocator. Modes that materialize per-sample gradients (hooks, functorch, ew) allocate
and free large buffers every step; glibc returns freed buffers above its mmap threshold
(dynamic, at most 32 MiB) to the OS and page-faults them in again next step. Each
``--malloc`` setting runs in a fresh child process: ``default`` (glibc defaults), ``env``
(started with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=8589934592``) or ``mallopt``
(``fedmem.privacy.dp.tune_malloc()`` at start: the same two settings through ``mallopt``; it
matches ``env`` and needs no change to how the process is started).

``auto`` is the mode ``resolve_grad_sample_mode("auto", model, B)`` picks; ``requirement``
checks the issue's target: DP step at batch 256 on the default MLP at most 3x the non-DP step.

Results: a rich table per setting on stdout and JSON in ``benchmarks/results/dp_overhead.json``
(``--quick``: mlp only, 3 repeats, into ``dp_overhead_quick.json``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"mlp": (40,), "cnn1d": (40,), "cnn": (1, 28, 28), "resnet9": (3, 32, 32)}
MODES = ("hooks", "functorch", "ew", "ghost")
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "8589934592"}
TARGET_CALL_S = 0.3


# ---------------------------------------------------------------------------------------------
# child: the measurements of one malloc setting
# ---------------------------------------------------------------------------------------------
def _call(model, opt, x, y, cfg, round_, mode):  # one epoch = one round of one trainer
    import torch

    from fedmem.config import PrivacyConfig
    from fedmem.privacy.dp import DPSession
    from fedmem.train import keyed_order, train_epochs

    n = len(y)
    dp = None
    if mode is not None:
        privacy = PrivacyConfig(
            record_level=True, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode
        )
        dp = DPSession.create(privacy, cfg, n_local=n, seed=0, round_=round_, stream=0)
    order = keyed_order(0, round_, torch.arange(n), n)
    t0 = time.perf_counter()
    res = train_epochs(model, x, y, cfg, order, optimizer=opt, epochs=1, dp=dp)
    return (time.perf_counter() - t0) / res.steps


def measure(name: str, batch: int, modes: list[str], repeats: int) -> dict[str, Any]:
    import torch

    from fedmem.config import ModelConfig, TrainConfig
    from fedmem.models import build_model
    from fedmem.privacy.dp import dp_ready_model, resolve_grad_sample_mode

    shape = SHAPES[name]
    torch.manual_seed(0)
    base = dp_ready_model(build_model(ModelConfig(name=name), shape, 10))
    cfg = TrainConfig(batch_size=batch, lr=0.05, momentum=0.9)

    def fresh():
        m = copy.deepcopy(base)
        return m, torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum)

    # size the calls from a rough non-DP step time
    probe_n = 4 * batch
    px, py = torch.randn(probe_n, *shape), torch.randint(0, 10, (probe_n,))
    m, o = fresh()
    _call(m, o, px, py, cfg, 0, None)
    rough = _call(m, o, px, py, cfg, 1, None)
    steps = min(16, max(4, math.ceil(TARGET_CALL_S / rough)))
    n = batch * steps
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)

    runs: dict[str | None, tuple[Any, Any]] = {None: fresh()}
    errors: dict[str, str] = {}
    for mode in modes:
        runs[mode] = fresh()
    times: dict[str | None, list[float]] = {k: [] for k in runs}
    for r in range(repeats + 1):  # r = 0: warm-up
        for key in list(runs):
            if key in errors:
                continue
            model, opt = runs[key]
            try:
                t = _call(model, opt, x, y, cfg, r, key)
            except Exception as e:  # a mode that cannot train this model
                errors[str(key)] = f"{type(e).__name__}: {e}"[:300]
                continue
            if r > 0:
                times[key].append(t)
    plain = statistics.median(times[None])
    rows = {}
    for mode in modes:
        if mode in errors:
            rows[mode] = {"ok": False, "error": errors[mode]}
            continue
        dp_s = statistics.median(times[mode])
        rows[mode] = {
            "ok": True,
            "dp_ms": dp_s * 1e3,
            "ratio": dp_s / plain,
            "dp_ms_all": [t * 1e3 for t in times[mode]],
        }
    ok = [m for m in modes if rows[m]["ok"]]
    fastest = min(ok, key=lambda m: rows[m]["ratio"]) if ok else None
    auto = resolve_grad_sample_mode("auto", base, float(batch))
    return {
        "model": name,
        "input_shape": list(shape),
        "params": sum(p.numel() for p in base.parameters()),
        "batch_size": batch,
        "steps_per_call": steps,
        "repeats": repeats,
        "plain_ms": plain * 1e3,
        "plain_ms_all": [t * 1e3 for t in times[None]],
        "modes": rows,
        "fastest": fastest,
        "auto": auto,
        "auto_ratio": rows[auto]["ratio"] if auto in rows and rows[auto]["ok"] else None,
    }


def child(args: argparse.Namespace) -> int:
    import torch

    warnings.filterwarnings("ignore")
    tuned = False
    if args.malloc == "mallopt":
        from fedmem.privacy.dp import tune_malloc

        tuned = tune_malloc()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"malloc": args.malloc, "mallopt_applied": tuned, "results": []}
    for name in args.models:
        for batch in args.batch_sizes:
            row = measure(name, batch, args.modes, args.repeats)
            out["results"].append(row)
            print(
                f"  [{args.malloc}] {name} B={batch}: plain {row['plain_ms']:.2f} ms, "
                + ", ".join(
                    f"{m} {v['ratio']:.2f}x" if v["ok"] else f"{m} failed"
                    for m, v in row["modes"].items()
                ),
                file=sys.stderr,
                flush=True,
            )
    Path(args.child_out).write_text(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------
# parent: one child per malloc setting, table, JSON
# ---------------------------------------------------------------------------------------------
def run_setting(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    if setting == "env":
        env.update(MALLOC_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child-out",
            str(out),
            "--malloc",
            setting,
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
            "--models",
            *args.models,
            "--batch-sizes",
            *map(str, args.batch_sizes),
            "--modes",
            *args.modes,
        ]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


def render(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(130, Console().width))
    modes = doc["args"]["modes"]
    for setting, res in doc["settings"].items():
        table = Table(
            title=f"DP / non-DP step time, malloc={setting} "
            f"({doc['meta']['threads']} thread(s); x = ratio, bold = fastest)"
        )
        for col in ("model", "batch", "params", "non-DP ms", *modes, "fastest", "auto"):
            table.add_column(
                col, justify="left" if col in ("model", "fastest", "auto") else "right"
            )
        for row in res["results"]:
            cells = []
            for m in modes:
                v = row["modes"].get(m)
                if v is None:
                    cells.append("-")
                elif not v["ok"]:
                    cells.append("[red]fails[/red]")
                else:
                    txt = f"{v['ratio']:.2f}x"
                    cells.append(f"[bold]{txt}[/bold]" if m == row["fastest"] else txt)
            auto = row["auto"] + (
                f" ({row['auto_ratio']:.2f}x)" if row["auto_ratio"] is not None else ""
            )
            table.add_row(
                row["model"],
                str(row["batch_size"]),
                f"{row['params']:,}",
                f"{row['plain_ms']:.2f}",
                *cells,
                row["fastest"] or "-",
                auto,
            )
        console.print(table)
    for setting, req in doc["requirement"].items():
        if req["ratio"] is None:
            continue
        verdict = "[green]met[/green]" if req["met"] else "[red]NOT met[/red]"
        console.print(
            f"requirement (mlp, batch 256, auto={req['mode']}, malloc={setting}): "
            f"{req['ratio']:.2f}x <= 3x: {verdict}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["mlp", "cnn1d", "cnn"], choices=list(SHAPES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument(
        "--malloc",
        nargs="+",
        default=["default", "mallopt"],
        choices=["default", "env", "mallopt"],
        help="allocator settings, each in a fresh process",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a client actor: 1)")
    p.add_argument("--quick", action="store_true", help="mlp only, 3 repeats")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.repeats = ["mlp"], 3
    if args.out is None:
        args.out = RESULTS / ("dp_overhead_quick.json" if args.quick else "dp_overhead.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_out:
        args.malloc = args.malloc[0]
        return child(args)
    import opacus
    import torch

    t0 = time.perf_counter()
    settings = {}
    for setting in args.malloc:
        print(f"malloc={setting}: measuring in a fresh process ...", file=sys.stderr, flush=True)
        settings[setting] = run_setting(setting, args)
    requirement = {}
    for setting, res in settings.items():
        row = next(
            (r for r in res["results"] if r["model"] == "mlp" and r["batch_size"] == 256), None
        )
        ratio = row["auto_ratio"] if row else None
        requirement[setting] = {
            "mode": row["auto"] if row else None,
            "ratio": ratio,
            "max_ratio": 3.0,
            "met": ratio is not None and ratio <= 3.0,
        }
    doc = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "opacus": opacus.__version__,
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "machine": platform.machine(),
            "wall_s": round(time.perf_counter() - t0, 1),
        },
        "args": {
            "models": args.models,
            "batch_sizes": args.batch_sizes,
            "modes": args.modes,
            "malloc": args.malloc,
            "repeats": args.repeats,
        },
        "settings": settings,
        "requirement": requirement,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    render(doc)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
