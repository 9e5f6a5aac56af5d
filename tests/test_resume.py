"""Checkpoints, resume after SIGKILL / Ctrl-C, and one process per run directory.

Each case runs ``python -m fedmem.simulate`` as a subprocess, kills it part-way, reruns the
same command, and compares every output file with an uninterrupted run (timing fields aside).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmem.runs.lock import RunLock
from tests.conftest import REPO, small_overrides

TIMING = {"wall_s", "train_s", "ray_start_s", "federated_simulation_s"}
BASE = [
    "federation.backend=local",
    "train.rounds=6",
    "analysis.gradients.every=2",
    "checkpoints.rounds=[2]",
]


def _cmd(tmp_path: Path, out: str, extra: list[str]) -> list[str]:
    overrides = [o for o in small_overrides(tmp_path) if not o.startswith("output.dir=")]
    overrides = [o for o in overrides if not o.startswith("train.rounds=")]
    base = [b for b in BASE if not any(b.split("=")[0] == e.split("=")[0] for e in extra)]
    return [sys.executable, "-m", "fedmem.simulate", *overrides, *base, *extra, f"--out={out}"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append({k: v for k, v in json.loads(line).items() if k not in TIMING})
    return out


def _run_dir(out: Path) -> Path:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def _kill_when(cmd: list[str], out: Path, run: str, round_: int, sig: int) -> subprocess.Popen:
    """Start ``cmd``; send ``sig`` to its process group (as Ctrl-C in a terminal does) once
    ``run`` has logged ``round_``. Its stderr ends up in ``<out>.stderr``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.stdout", "w") as so, open(f"{out}.stderr", "w") as se:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_env(),
            stdout=so,
            stderr=se,
            start_new_session=True,
            # a test run launched in the background (`cmd &`) inherits SIGINT ignored; the
            # child must see Ctrl-C as a terminal user's process does
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = [p for p in out.iterdir() if p.is_dir()] if out.is_dir() else []
        if dirs and any(
            r["run"] == run and r["round"] >= round_ for r in _rows(dirs[0] / "metrics.jsonl")
        ):
            os.killpg(proc.pid, sig)
            break
        time.sleep(0.02)
    proc.wait(timeout=120)
    return proc


def _untimed(v):
    if isinstance(v, dict):
        return {k: _untimed(x) for k, x in v.items() if k not in TIMING}
    if isinstance(v, list):
        return [_untimed(x) for x in v]
    return v


def _same_outputs(a: Path, b: Path) -> None:
    for name in ("metrics.jsonl", "clients.jsonl", "gradients.jsonl"):
        assert _rows(a / name) == _rows(b / name), name
    summaries = [_untimed(json.loads((d / "summary.json").read_text())) for d in (a, b)]
    for s in summaries:
        for part in s["checkpoints"].values():
            part.pop("bytes")  # kept rounds must match; byte counts are not results
    assert summaries[0] == summaries[1]
    assert (a / "config.yaml").read_text().replace(str(a.parent), "OUT") == (
        b / "config.yaml"
    ).read_text().replace(str(b.parent), "OUT")
    ea, eb = np.load(a / "examples.npz"), np.load(b / "examples.npz")
    assert sorted(ea.files) == sorted(eb.files)
    for key in ea.files:
        assert np.array_equal(ea[key], eb[key]), key
    for ckpt in sorted((a / "checkpoints").rglob("*.pt")):
        other = b / ckpt.relative_to(a)
        sa = torch.load(ckpt, weights_only=True)
        sb = torch.load(other, weights_only=True)
        weights = sa.get("model", sa)
        for k, v in weights.items():
            assert torch.equal(v, sb.get("model", sb)[k]), (ckpt, k)
    assert (b / "COMPLETE").is_file()
    assert not (b / "checkpoints" / "resume").exists() and not (b / ".partial").exists()


@pytest.mark.parametrize(
    ("extra", "run", "round_"),
    [
        ([], "central", 3),
        ([], "federated", 3),
        (["privacy.record_level=true", "privacy.noise_multiplier=1.0"], "federated", 2),
        (["checkpoints.resume_every=3", "federation.fraction_train=0.5"], "federated", 5),
        (
            ["federation.backend=ray", "federation.strategy=fedadam", "train.proximal_mu=0.01"],
            "federated",
            3,
        ),
    ],
    ids=["central", "federated", "federated-dp", "resume-every-3", "ray-fedadam-prox"],
)
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, extra, run, round_):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = _run(_cmd(tmp_path, str(ref_out), extra))
    assert ref.returncode == 0, ref.stderr
    killed = _kill_when(_cmd(tmp_path, str(out), extra), out, run, round_, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    run_dir = _run_dir(out)
    assert not (run_dir / "COMPLETE").exists()
    again = _run(_cmd(tmp_path, str(out), extra))
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout
    _same_outputs(_run_dir(ref_out), run_dir)
    kept = sorted(p.name for p in (run_dir / "checkpoints" / "federated").iterdir())
    assert kept == ["round-00000.pt", "round-00002.pt", "round-00006.pt"]
    central = torch.load(run_dir / "checkpoints" / "central" / "round-00002.pt", weights_only=True)
    assert set(central) == {"round", "model", "optimizer", "plugins"} and central["round"] == 2


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_ctrl_c_exits_130_with_one_line_and_resumes(tmp_path, backend):
    extra = [f"federation.backend={backend}"]
    ref_out, out = tmp_path / "ref", tmp_path / "int"
    assert _run(_cmd(tmp_path, str(ref_out), extra)).returncode == 0
    started = time.monotonic()
    proc = _kill_when(_cmd(tmp_path, str(out), extra), out, "federated", 2, signal.SIGINT)
    err = Path(f"{out}.stderr").read_text()
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 100  # it stops, it does not hang on Flower's threads
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err
    assert _run(_cmd(tmp_path, str(out), extra)).returncode == 0
    _same_outputs(_run_dir(ref_out), _run_dir(out))


def test_a_second_process_on_the_same_run_exits_2(tmp_path):
    out = tmp_path / "runs"
    cmd = _cmd(tmp_path, str(out), ["federation.enabled=false"])
    first = _run(cmd)
    assert first.returncode == 0, first.stderr
    run_dir = _run_dir(out)
    with RunLock(run_dir):
        busy = _run(cmd + ["--force"])
    assert busy.returncode == 2
    assert busy.stderr.strip().startswith("error: ") and "in use by another" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1
    assert (run_dir / "COMPLETE").is_file()  # untouched


def test_two_concurrent_runs_never_leave_a_corrupted_complete_run(tmp_path):
    out = tmp_path / "runs"
    cmd = _cmd(tmp_path, str(out), ["federation.enabled=false"])
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    codes = sorted(p.wait(timeout=300) for p in procs)
    assert codes in ([0, 0], [0, 2]), codes
    rows = _rows(_run_dir(out) / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(7))
    assert (_run_dir(out) / "COMPLETE").is_file()
