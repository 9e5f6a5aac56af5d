"""Federated runs through the real Flower simulation engine on a real (loopback) Ray."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from fedmem import config
from fedmem.federation.client_app import fails
from fedmem.federation.engine import run_federated
from fedmem.observer import Observer
from fedmem.runs.central import run_central
from fedmem.simulate import main
from tests.conftest import REPO, federated_job, small_overrides

pytestmark = pytest.mark.timeout(300)


def _ray_processes() -> set[str]:
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    return set(out.stdout.split())


def _no_new_ray_processes(before: set[str], wait_s: float = 15.0) -> bool:
    """Ray processes started since ``before`` are all gone (they may take a moment to exit)."""
    deadline = time.monotonic() + wait_s
    while _ray_processes() - before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_one_client_fedavg_equals_one_central_round(tmp_path):
    """The shared loop: 1 client, full participation, 1 epoch, FedAvg == 1 central round."""
    cfg = config.load(
        REPO / "configs" / "default.yaml",
        [
            *small_overrides(tmp_path),
            "federation.num_clients=1",
            "data.canaries.num_clients=1",
            "train.rounds=1",
            "partition.kind=iid",
        ],
    )
    job, rows, _ = federated_job(cfg)
    run_federated(job)
    central_rows: list[dict] = []
    model = run_central(cfg, job.table, Observer(job.table, "central", central_rows.append))
    assert job.final_state is not None
    for name, value in model.state_dict().items():
        torch.testing.assert_close(job.final_state[name], value, rtol=1e-5, atol=1e-6)
    # and the initial models were identical too
    assert rows[0]["test_loss"] == central_rows[0]["test_loss"]
    assert abs(rows[1]["test_acc"] - central_rows[1]["test_acc"]) < 1e-6


def test_simulation_with_failing_client_is_deterministic_and_cleans_up(tmp_path):
    overrides = [
        *small_overrides(tmp_path),
        "federation.num_clients=3",
        "data.canaries.num_clients=1",
        "train.rounds=3",
        "federation.client_failure_rate=0.3",
        "federation.min_train_clients=2",
    ]
    cfg = config.load(REPO / "configs" / "default.yaml", overrides)
    expected_failures = {(r, c) for r in (1, 2, 3) for c in range(3) if fails(cfg, r, c)}
    assert expected_failures, "pick a seed/rate where some client fails"

    before = _ray_processes()
    args = [*overrides, "--out", str(tmp_path / "a")]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "a").iterdir()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fed = [r for r in rows if r["run"] == "federated"]
    assert [r["round"] for r in fed] == [0, 1, 2, 3]
    for r in fed[1:]:
        failed = {c for (rr, c) in expected_failures if rr == r["round"]}
        assert r["clients_failed"] == len(failed)
        assert r["clients_ok"] == 3 - len(failed)
        assert r["round_lost"] == (3 - len(failed) < 2)
    clients = [json.loads(x) for x in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert {(c["round"], c["client"]) for c in clients if c.get("failed")} == expected_failures
    trained = [c for c in clients if not c.get("failed")]
    assert len(trained) == 9 - len(expected_failures)
    for c in trained:
        assert c["train_loss"] > 0 and c["examples"] == c["num_examples"] > 0
        assert 0.0 <= c["noisy_share"] <= 1.0
        # per-client state survives rounds: the counter equals the rounds it has trained
        done = sum(
            1 for r in (1, 2, 3) if r <= c["round"] and (r, c["client"]) not in expected_failures
        )
        assert c["rounds_trained"] == done
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"central", "federated"} <= set(summary["runs"])
    assert summary["ray_start_s"] > 0

    # no Ray left behind
    assert _no_new_ray_processes(before)

    # the same config twice gives identical metrics (timing aside)
    assert main([*overrides, "--out", str(tmp_path / "b")]) == 0
    (run_b,) = (tmp_path / "b").iterdir()
    rows_b = [json.loads(x) for x in (run_b / "metrics.jsonl").read_text().splitlines()]

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in Observer.TIMING_FIELDS} for r in rs]

    assert strip(rows) == strip(rows_b)

    # the in-process backend drives the same ServerApp/ClientApp: identical federated rows
    assert main([*overrides, "federation.backend=local", "--out", str(tmp_path / "c")]) == 0
    (run_c,) = (tmp_path / "c").iterdir()
    rows_c = [json.loads(x) for x in (run_c / "metrics.jsonl").read_text().splitlines()]
    assert strip(rows_c) == strip(rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    shutil.which("ray") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "ray")),
    reason="ray CLI not installed",
)
def test_joins_an_existing_ray_cluster(tmp_path):
    """The path users take when they outgrow one machine: federation.ray_address."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    before = _ray_processes()
    port = _free_port()
    tmp_ray = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX paths must stay short
    start = subprocess.run(
        [
            ray_cli,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={tmp_ray}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert start.returncode == 0, start.stderr
    try:
        cfg = config.load(
            REPO / "configs" / "default.yaml",
            [
                *small_overrides(tmp_path),
                "federation.num_clients=2",
                "train.rounds=2",
                f"federation.ray_address=127.0.0.1:{port}",
            ],
        )
        job, rows, clients = federated_job(cfg)
        run_federated(job)
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert len(clients) == 4
        assert {c["client"] for c in clients} == {0, 1}
        assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp_ray, ignore_errors=True)
    assert _no_new_ray_processes(before)
