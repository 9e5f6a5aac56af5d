"""Time the privacy audit of the audit preset end to end (``python -m fedmem.audit``).

    python benchmarks/audit.py [--config configs/audit.yaml] [--out-dir .cache/benchmarks/runs]
                               [key=value ...]

Runs ``python -m fedmem.simulate --config configs/audit.yaml`` once (reused when its run
directory is complete; the federated part on the in-process backend), then the audit with
``--force`` and records its wall time, the shadow training time per recipe, the number of
shadows and the headline numbers (AUCs, TPR at 1% FPR, one-run epsilon) in
``benchmarks/results/audit.json``. The issue's budget: under 5 minutes on the 2-core
development machine. Extra ``key=value`` overrides go to the simulated run (e.g.
``privacy.record_level=true privacy.noise_multiplier=2``); ``audit.attack.*`` keys too.
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

from fedmem import config
from fedmem.privacy.audit.engine import run_audit
from fedmem.privacy.audit.records import open_run
from fedmem.privacy.audit.report import audit_table, headline
from fedmem.runs.experiment import run_or_load

LIMIT_S = 300.0
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "audit.yaml")
    parser.add_argument("--out-dir", type=Path, default=REPO / ".cache" / "benchmarks" / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "audit.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    console = Console()
    overrides = [f"output.dir={args.out_dir}", "federation.backend=local", *args.overrides]
    cfg = config.load(args.config, overrides, default_name=args.config.stem)
    t0 = time.perf_counter()
    rd, _ = run_or_load(cfg, console)
    simulate_s = time.perf_counter() - t0

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    result = run_audit(open_run(rd.path), console, force=True)
    audit_s = time.perf_counter() - t0
    console.print(audit_table(result, title=f"audit of {rd.path.name}"))
    console.print(f"audit: {audit_s:.1f} s (limit {LIMIT_S:.0f} s); simulate {simulate_s:.1f} s")

    out = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "loadavg_1_5_15_before": list(load_before),
            "loadavg_1_5_15_after": list(os.getloadavg()),
        },
        "config": str(args.config.relative_to(REPO)),
        "overrides": args.overrides,
        "run_dir": rd.path.name,
        "simulate_s": round(simulate_s, 2),
        "audit_s": round(audit_s, 2),
        "limit_s": LIMIT_S,
        "ok": audit_s < LIMIT_S,
        "shadows": result["shadows"],
        "headline": headline(result),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
