"""Shared fixtures: small, fast experiment configs and tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]

# A shared cache so MNIST-1D is generated once per test session machine.
CACHE = REPO / ".cache" / "fedmem-tests"


def simulate_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m fedmem.simulate ARGS`` in a subprocess from the repo root (the real CLI:
    exit code, stderr as a user sees it)."""
    return subprocess.run(
        [sys.executable, "-m", "fedmem.simulate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def small_overrides(tmp_path: Path) -> list[str]:
    """Overrides that make the default config tiny: 1000 MNIST-1D examples, 3 rounds."""
    return [
        f"data.cache_dir={CACHE}",
        "data.mnist1d.num_samples=1000",
        f"output.dir={tmp_path / 'runs'}",
        "train.rounds=3",
        "model.hidden=64",
        "federation.num_clients=4",
        "data.canaries.num_clients=2",
    ]


@pytest.fixture
def one_thread():
    """Small tensors: one torch thread avoids OpenMP barrier waits on a loaded 2-core machine
    (use as ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_cfg(tmp_path):
    from fedmem import config

    return config.load(REPO / "configs" / "default.yaml", small_overrides(tmp_path))


def federated_job(cfg):
    """A FederatedJob for ``cfg`` that collects its metrics and client rows in lists."""
    from fedmem.data.table import cached_table
    from fedmem.federation.server_app import FederatedJob
    from fedmem.observer import Observer

    table = cached_table(cfg)
    rows: list[dict] = []
    clients: list[dict] = []
    job = FederatedJob(
        cfg, table, Observer(table, "federated", rows.append), client_sink=clients.append
    )
    return job, rows, clients
