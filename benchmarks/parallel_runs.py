"""Two ``python -m fedmem.simulate`` processes started together vs one alone (issue 16, goal 5).

The workload of the issue: 100 IID MNIST-1D clients (4000 training examples), the default MLP,
20 rounds, ``federation.backend=local``, central run included. For each thread setting
(``train.threads=auto``, the default since issue 16; ``train.threads=null``, torch's own
count; and that with ``OMP_WAIT_POLICY=ACTIVE``: the behaviour before), one run alone, then
two runs with different seeds started at the same moment; wall seconds of each process. A
setting "collapses" when the pair takes far longer than one alone (OpenMP threads
spin-waiting on a descheduled sibling). Each run writes into its own temporary output folder
(nothing cached between them).

    python benchmarks/parallel_runs.py [--rounds 20] [--clients 100]

Writes ``benchmarks/results/parallel_runs.json``. Needs a machine with no other load to mean
anything; ratios within one run only.
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


def command(out: Path, seed: int, threads: str, rounds: int, clients: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedmem.simulate",
        "--out",
        str(out),
        f"seed={seed}",
        f"train.threads={threads}",
        f"train.rounds={rounds}",
        f"federation.num_clients={clients}",
        "federation.backend=local",
        "partition.kind=iid",
        "data.canaries.count=0",
        "analysis.gradients.enabled=false",
    ]


def timed(cmds: list[list[str]], omp: str | None = None) -> list[float]:
    """Start every command at once; wall seconds of each. ``omp``: OMP_WAIT_POLICY to set
    (None: fedmem's default, PASSIVE)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if omp is not None:
        env["OMP_WAIT_POLICY"] = omp
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for c in cmds
    ]
    out = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"simulate failed: {err.decode()[-500:]}")
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # build the data table once (cached), so no run pays for it
        subprocess.run(
            command(Path(tmp) / "warm", 0, "auto", 1, args.clients),
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        # auto (default), torch's threads with passive OpenMP waits (fedmem's default policy),
        # and torch's threads with spinning waits: the behaviour before issue 16
        for threads, omp in (("auto", None), ("null", None), ("null", "ACTIVE")):
            name = f"threads={threads}" + (f", OMP_WAIT_POLICY={omp}" if omp else "")
            tag = f"{threads}-{omp}"
            one = command(Path(tmp) / f"a-{tag}", 1, threads, args.rounds, args.clients)
            alone = timed([one], omp)
            two = [
                command(Path(tmp) / f"p{i}-{tag}", 2 + i, threads, args.rounds, args.clients)
                for i in range(2)
            ]
            pair = timed(two, omp)
            results[name] = {
                "alone_s": round(alone[0], 2),
                "together_s": [round(t, 2) for t in pair],
                "slowdown": round(max(pair) / alone[0], 2),
            }
            print(name, results[name], flush=True)
    out = ROOT / "benchmarks" / "results" / "parallel_runs.json"
    out.write_text(
        json.dumps(
            {
                "workload": f"{args.clients} IID clients, {args.rounds} rounds, backend=local",
                "cpus": os.cpu_count(),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
