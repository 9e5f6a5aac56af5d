"""Issue 16's GPU check: one short script for a machine with a GPU (the ``device`` tool).

    python benchmarks/gpu_check.py [--out DIR] [--clients 16] [--rounds 4]

1. **CPU vs GPU**: the default preset (MNIST-1D MLP, 10 clients, 20% noise) trained for
   ``--rounds`` rounds on the local backend with ``train.device=cpu`` and ``train.device=cuda``
   (central and federated runs alike): the largest absolute difference of the final weights and
   of every metric in ``metrics.jsonl`` (accuracies, losses). They agree "within float
   tolerance" when weights differ by < 1e-3 and accuracies by at most a few examples
   (cuBLAS and CPU kernels sum in different orders, and SGD amplifies it over rounds).
2. **Fractional GPUs**: the same config on the Ray backend with ``--clients`` clients and
   ``federation.client_resources={num_cpus: 1, num_gpus: 0.125}``: at most 8 client actors
   share the GPU. A thread polls ``nvidia-smi`` every 0.2 s; the check records the most
   processes other than this one (the driver) holding GPU memory at once,
   the peak GPU memory in use, and whether any client failed (``clients.jsonl`` error rows:
   an out-of-memory would be one). It passes when >= 8 client processes shared the GPU and none
   failed.

Without a GPU it says so, writes ``{"gpu": false}`` and exits 0, so it runs anywhere. Results go
to ``DIR/gpu_check.json`` (default ``benchmarks/results``; on the device machine pass
``--out $OUT``). The device machine lacks flwr, ray, opacus, mnist1d and pydantic: they travel
as wheels (the ``device`` tool's README); Ray's wheel alone is larger than one call may carry.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _run(workdir: Path, *overrides: str) -> Path:
    from fedmem.simulate import main as simulate

    args = [f"output.dir={workdir}", "data.noise.rate=0.2", *overrides]
    code = simulate(args)
    if code != 0:
        raise SystemExit(f"simulate {' '.join(overrides)} exited {code}")
    return max(workdir.glob("default-*"), key=lambda p: p.stat().st_mtime)


def _rows(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines()]


def compare_devices(tmp: Path, rounds: int) -> dict[str, Any]:
    common = ["federation.backend=local", f"train.rounds={rounds}"]
    t0 = time.perf_counter()
    cpu = _run(tmp / "cpu", *common, "train.device=cpu")
    t1 = time.perf_counter()
    gpu = _run(tmp / "gpu", *common, "train.device=cuda")
    t2 = time.perf_counter()
    out: dict[str, Any] = {"cpu_s": t1 - t0, "gpu_s": t2 - t1, "weights_max_abs_diff": {}}
    for model in ("central", "federated"):
        a = torch.load(cpu / "checkpoints" / f"{model}.pt", map_location="cpu")
        b = torch.load(gpu / "checkpoints" / f"{model}.pt", map_location="cpu")
        out["weights_max_abs_diff"][model] = max(
            float((a[k].float() - b[k].float()).abs().max()) for k in a
        )
    diffs: dict[str, float] = {}
    for ra, rb in zip(_rows(cpu, "metrics.jsonl"), _rows(gpu, "metrics.jsonl"), strict=True):
        for k, v in ra.items():
            if isinstance(v, float) and isinstance(rb.get(k), float) and not k.endswith("_s"):
                diffs[k] = max(diffs.get(k, 0.0), abs(v - rb[k]))
    out["metrics_max_abs_diff"] = dict(sorted(diffs.items(), key=lambda kv: -kv[1])[:12])
    out["agree"] = max(out["weights_max_abs_diff"].values()) < 1e-3
    return out


class GpuPoller(threading.Thread):
    """Polls nvidia-smi: the most processes on the GPU at once, the peak memory in use."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.max_processes, self.peak_mib = 0, 0
        self.own = os.getpid()  # the driver (central run, evaluation) is not a client

    def run(self) -> None:
        while not self.stop.is_set():
            apps = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-compute-apps=pid,used_memory",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
            ).stdout.split("\n")
            apps = [a for a in apps if a.strip() and a.split(",")[0].strip() != str(self.own)]
            used = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
            ).stdout.split()
            self.max_processes = max(self.max_processes, len(apps))
            self.peak_mib = max(self.peak_mib, int(used[0]) if used else 0)
            self.stop.wait(0.2)


def fractional_gpus(tmp: Path, clients: int, rounds: int) -> dict[str, Any]:
    poller = GpuPoller()
    poller.start()
    t0 = time.perf_counter()
    run_dir = _run(
        tmp / "ray",
        f"federation.num_clients={clients}",
        f"train.rounds={rounds}",
        "federation.client_resources={num_cpus: 1, num_gpus: 0.125}",
        "train.device=cuda",
    )
    wall = time.perf_counter() - t0
    poller.stop.set()
    poller.join()
    failures = [r for r in _rows(run_dir, "clients.jsonl") if r.get("error")]
    return {
        "clients": clients,
        "num_gpus_per_client": 0.125,
        "max_client_processes_on_gpu": poller.max_processes,
        "peak_gpu_memory_mib": poller.peak_mib,
        "client_failures": len(failures),
        "wall_s": wall,
        "passes": poller.max_processes >= 8 and not failures,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"gpu": torch.cuda.is_available(), "torch": torch.__version__}
    if not result["gpu"]:
        print("no GPU: nothing to check (run this on the device machine)")
    else:
        result["device_name"] = torch.cuda.get_device_name(0)
        with tempfile.TemporaryDirectory() as tmp:
            result["cpu_vs_gpu"] = compare_devices(Path(tmp), args.rounds)
            print(json.dumps(result["cpu_vs_gpu"], indent=1))
            result["fractional_gpus"] = fractional_gpus(Path(tmp), args.clients, args.rounds)
            print(json.dumps(result["fractional_gpus"], indent=1))
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
