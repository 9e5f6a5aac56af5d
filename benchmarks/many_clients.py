"""Peak memory of a run with 1000 clients, 10% per round, on every backend (issue 16, goal 4).

Each backend runs ``python -m fedmem.simulate`` in a subprocess (MNIST-1D with 12,500 examples:
10 training rows per client, the default MLP, ``--rounds`` rounds, central run included);
a sampler sums the resident memory (VmRSS from /proc) of the process and all its descendants
(Ray's raylet, GCS and actors included) every 0.2 s, and the sum of their proportional set
sizes (Pss from /proc/PID/smaps_rollup: a page shared by n processes counts 1/n in each, so
the sum is the tree's real memory). Reported per backend: the peak of each sum and the wall
seconds. Goal: under 4 GB on every backend. The RSS sum counts shared pages once per process:
every process that imports torch maps its libraries (~0.3 GB resident of CUDA libraries
alone for the CUDA build pip installs here), so with Ray's two actors and the driver the RSS
sum overstates what the run holds.

    python benchmarks/many_clients.py [--rounds 3] [--backends local batched ray]

Writes ``benchmarks/results/many_clients.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """Resident memory and proportional set size (MB), each summed over ``pid`` and every
    process descending from it."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        ppid = int(fields.get("PPid", "0").strip())
        children.setdefault(ppid, []).append(int(entry))
        kb = fields.get("VmRSS", "0 kB").strip().split()[0]
        rss[int(entry)] = int(kb)
    total, pss, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        pss += _pss_kb(p)
        stack.extend(children.get(p, []))
    return total / 1024, pss / 1024


def measure(backend: str, rounds: int, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "fedmem.simulate",
        "--out",
        str(out),
        "data.mnist1d.num_samples=12500",
        "data.canaries.count=0",
        "partition.kind=iid",
        "federation.num_clients=1000",
        "federation.fraction_train=0.1",
        f"federation.backend={backend}",
        f"train.rounds={rounds}",
        "analysis.gradients.enabled=false",
    ]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peak, peak_pss = 0.0, 0.0
    while proc.poll() is None:
        rss, pss = tree_memory_mb(proc.pid)
        peak, peak_pss = max(peak, rss), max(peak_pss, pss)
        time.sleep(0.2)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{backend}: simulate failed: {err[-500:]}")
    return {
        "peak_rss_mb": round(peak, 1),
        "peak_pss_mb": round(peak_pss, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["local", "batched", "ray"])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            results[backend] = measure(backend, args.rounds, Path(tmp) / backend)
            print(backend, results[backend], flush=True)
    out = ROOT / "benchmarks" / "results" / "many_clients.json"
    workload = f"1000 clients x 10 rows, 10% per round, {args.rounds} rounds"
    out.write_text(json.dumps({"workload": workload, "results": results}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
