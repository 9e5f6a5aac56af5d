"""``flwr run .`` (issue 16): the Flower App declared in pyproject.toml runs the same experiment
as ``python -m fedmem.simulate`` into the same run directory.

The end-to-end test starts what Flower's docs start for a local simulation: one
``flower-superlink --simulation`` on a free loopback port, in its own ``FLWR_HOME`` (a
Flower configuration whose default SuperLink connection is that address), with runtime
dependency installation off (otherwise the SuperLink ``uv sync``s the app's dependencies into a
fresh environment for every run, downloading torch). ``flwr run . --stream`` submits the app and
returns when the run has ended. The SuperLink and every process under it are ended afterwards.

The two run directories hold the same files with the same content, except what cannot be equal:
wall times (``wall_s`` in metrics.jsonl and summary.json, clients' ``train_s``,
``federated_simulation_s``, ``ray_start_s``: 0 under ``flwr run``, where Flower starts Ray, and
report.md's "wall s" column), ``output.dir`` in config.yaml (each run writes to its own folder),
and the checkpoints' bytes (torch's zip archives; the tensors are compared, and are equal).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from fedmem.errors import ConfigError
from tests.conftest import REPO, small_overrides

BIN = Path(sys.executable).parent
TIMING = {"wall_s", "train_s", "federated_simulation_s", "ray_start_s"}


def tiny_overrides(tmp_path: Path) -> list[str]:
    """conftest's small config (4 clients, 1000 MNIST-1D examples) with 2 rounds, no output.dir."""
    drop = ("output.dir=", "train.rounds=")
    keep = [o for o in small_overrides(tmp_path) if not o.startswith(drop)]
    return [*keep, "train.rounds=2"]


# ----------------------------------------------------------------------------- fast checks


def test_run_config_gives_simulates_config(tmp_path):
    """The ServerApp's run config maps onto the config ``fedmem.simulate`` would load."""
    from fedmem import simulate
    from fedmem.flwr_app import experiment_config
    from fedmem.runs.rundir import RunDir

    overrides = tiny_overrides(tmp_path)
    out = tmp_path / "out"
    run_config = {"config": "configs/default.yaml", "overrides": " ".join(overrides)}
    cfg, force = experiment_config({**run_config, "out": str(out), "force": True})
    ref = simulate.load_config(
        simulate.parse_args(
            ["--config", str(REPO / "configs/default.yaml"), "--out", str(out), *overrides]
        )
    )
    assert force is True
    assert RunDir.for_config(cfg).path == RunDir.for_config(ref).path
    # relative output.dir / data.cache_dir: absolute against the ServerApp's working directory
    cfg, force = experiment_config({"overrides": "train.rounds=2"}, cwd=tmp_path)
    assert cfg.output.dir == tmp_path / "runs" and cfg.data.cache_dir.is_absolute()
    assert force is False


@pytest.mark.parametrize(
    ("run_config", "needle"),
    [
        ({"overrides": "federation.backend=local"}, "federation.backend=local"),
        ({"overrides": "federation.ray_address=auto"}, "federation.ray_address"),
        ({"rounds": 2}, "unknown run config key"),
        ({"overrides": "train.nope=1"}, "train.nope"),
    ],
)
def test_run_config_errors(run_config, needle):
    from fedmem.flwr_app import experiment_config

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as e:
        experiment_config(run_config)
    assert "\n" not in str(e.value)


def test_federation_size_checked():
    from fedmem.flwr_app import check_federation_size

    class Grid:
        def __init__(self, n: int):
            self.n = n

        def get_node_ids(self) -> list[int]:
            return list(range(self.n))

    check_federation_size(Grid(4), 4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match='has 2 SuperNodes.*"num-supernodes=4"'):
        check_federation_size(Grid(2), 4)  # type: ignore[arg-type]


def test_pyproject_declares_the_app():
    """pyproject.toml is a valid Flower App whose FAB carries the code and the configs."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    config, warnings = load_and_validate(REPO / "pyproject.toml")
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "fedmem.flwr_app:server_app",
        "clientapp": "fedmem.flwr_app:client_app",
    }
    assert "federations" not in config["tool"]["flwr"]  # Flower would migrate (rewrite) it
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))).namelist()
    for needed in ("fedmem/flwr_app.py", "strategies/__init__.py", "configs/default.yaml"):
        assert needed in names


# ----------------------------------------------------------------------------- flwr run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    """Process ids under ``pid`` (from /proc), children first."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def _end(proc: subprocess.Popen) -> None:
    """End the SuperLink and every process it started (SuperExec, flwr-simulation, Ray)."""
    pids = _descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)
    deadline = time.monotonic() + 20
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)  # they watch their parent and exit on their own
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _compare(a: Path, b: Path) -> None:
    """Assert that run directories ``a`` and ``b`` hold the same results (module docstring)."""
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        fa, fb = a / rel, b / rel
        if rel.endswith(".jsonl"):
            ra = [_drop(json.loads(line)) for line in fa.read_text().splitlines()]
            rb = [_drop(json.loads(line)) for line in fb.read_text().splitlines()]
            assert ra == rb, rel
        elif rel.endswith(".json"):
            assert _drop(json.loads(fa.read_text())) == _drop(json.loads(fb.read_text())), rel
        elif rel == "config.yaml":
            ca, cb = yaml.safe_load(fa.read_text()), yaml.safe_load(fb.read_text())
            ca["output"].pop("dir"), cb["output"].pop("dir")
            assert ca == cb, rel
        elif rel.endswith(".pt"):
            _same_state(torch.load(fa, weights_only=False), torch.load(fb, weights_only=False))
        elif rel.endswith(".npz"):
            xa, xb = np.load(fa), np.load(fb)
            assert sorted(xa.files) == sorted(xb.files), rel
            for k in xa.files:
                np.testing.assert_array_equal(xa[k], xb[k], err_msg=f"{rel}:{k}")
        elif rel == "report.md":
            la, lb = fa.read_text().splitlines(), fb.read_text().splitlines()
            assert len(la) == len(lb)
            for x, y in zip(la, lb, strict=True):
                if x != y:  # a runs-table row: only the last column (wall s) may differ
                    assert x.startswith("|") and x.split("|")[:-2] == y.split("|")[:-2], (x, y)
        else:
            assert fa.read_bytes() == fb.read_bytes(), rel


def _drop(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop(v) for k, v in d.items() if k not in TIMING}
    if isinstance(d, list):
        return [_drop(v) for v in d]
    return d


def _same_state(x: Any, y: Any) -> None:
    if isinstance(x, dict):
        assert set(x) == set(y)
        for k in x:
            _same_state(x[k], y[k])
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y)
    else:
        assert x == y


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process cleanup reads /proc")
def test_flwr_run_writes_the_same_run_directory(tmp_path):
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
    }
    overrides = tiny_overrides(tmp_path)

    sim = subprocess.run(
        [sys.executable, "-m", "fedmem.simulate", "--out", str(tmp_path / "sim"), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert sim.returncode == 0, sim.stderr[-3000:]

    port = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir(exist_ok=True)  # fedmem.simulate (run_simulation) may have made it
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedmem-test"\n\n[superlink.fedmem-test]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log = (tmp_path / "superlink.out").open("w")
    superlink = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(tmp_path / "state.db"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                assert superlink.poll() is None, (tmp_path / "superlink.out").read_text()
                assert time.monotonic() < deadline, "the SuperLink did not start in 60 s"
                time.sleep(0.5)
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                ".",
                "--federation-config",
                "num-supernodes=4 client-resources-num-cpus=1",
                "--run-config",
                f"overrides='{' '.join(overrides)}' out='{tmp_path / 'flwr'}'",
                "--stream",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
        )
    finally:
        _end(superlink)
        log.close()
    output = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, output
    (a,) = (tmp_path / "sim").iterdir()
    flwr_dirs = list((tmp_path / "flwr").iterdir()) if (tmp_path / "flwr").is_dir() else []
    assert [d.name for d in flwr_dirs] == [a.name], output
    assert (flwr_dirs[0] / "COMPLETE").is_file(), output
    _compare(a, flwr_dirs[0])
