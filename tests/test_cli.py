"""End-to-end CLI: a small real run, caching, --force, determinism and input errors."""

from __future__ import annotations

import json

import pytest

from fedmem.observer import Observer
from fedmem.simulate import main
from tests.conftest import simulate_cli, small_overrides

CENTRAL_ONLY = ["federation.enabled=false"]


def _run_dir(tmp_path):
    (d,) = (tmp_path / "runs").iterdir()
    return d


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_run_cache_and_force(tmp_path, capsys):
    args = small_overrides(tmp_path) + CENTRAL_ONLY
    assert main(args) == 0
    run_dir = _run_dir(tmp_path)
    assert run_dir.name.startswith("default-") and len(run_dir.name) == len("default-") + 8
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "COMPLETE"):
        assert (run_dir / name).is_file(), name
    rows = _metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert {r["run"] for r in rows} == {"central"}
    for key in (
        "test_acc",
        "test_loss",
        "train_acc_clean",
        "noisy_memorized",
        "noisy_true_acc",
        "outlier_acc",
        "canary_acc",
        "wall_s",
    ):
        assert key in rows[-1], key
    # learning happened: test accuracy above chance (10 classes) and above the initial model
    assert rows[-1]["test_acc"] > max(0.2, rows[0]["test_acc"])
    summary = json.loads((run_dir / "summary.json").read_text())
    central = summary["runs"]["central"]
    assert central["test_acc"] == rows[-1]["test_acc"]
    assert central["rounds"] == 3
    assert summary["examples"]["noisy"] == round(0.2 * 800)
    out = capsys.readouterr().out
    assert "central" in out and "test" in out

    # analysis outputs: trajectories, gradient geometry, report with plots
    from fedmem.analysis.tracking import load_trajectories

    traj = load_trajectories(run_dir / "examples.npz")
    assert list(traj["central"]["rounds"]) == [0, 1, 2, 3]
    assert traj["central"]["correct_obs"].shape == (4, summary["examples"]["train"])
    ex, last = summary["examples"], rows[-1]
    n_clean = ex["train"] - ex["noisy"] - ex["canary_copies"]
    expected = (
        last["train_acc_clean"] * n_clean
        + last["noisy_memorized"] * ex["noisy"]
        + last["canary_acc"] * ex["canary_copies"]
    ) / ex["train"]
    assert traj["central"]["correct_obs"][-1].mean() == pytest.approx(expected, abs=1e-6)
    grads = [json.loads(x) for x in (run_dir / "gradients.jsonl").read_text().splitlines()]
    assert {g["round"] for g in grads} == {0, 1, 2, 3}
    assert all(-1.0 <= g["cos"] <= 1.0 for g in grads)
    analysis = summary["analysis"]["central"]
    assert analysis["groups"]["mislabeled"]["count"] == round(0.2 * 800)
    report = (run_dir / "report.md").read_text()
    assert "![learning curves](plots/curves.png)" in report
    assert (run_dir / "plots" / "curves.png").stat().st_size > 10_000
    assert (run_dir / "plots" / "gradient_cosine.png").is_file()

    # python -m fedmem.report re-renders from the files and compares runs
    from fedmem import report as report_mod

    (run_dir / "report.md").unlink()
    assert report_mod.main([str(run_dir), str(run_dir)]) == 0
    assert (run_dir / "report.md").is_file()
    assert "runs compared" in capsys.readouterr().out
    assert report_mod.main([str(tmp_path)]) == 2  # not a run directory

    # a complete run is not recomputed
    mtime = (run_dir / "metrics.jsonl").stat().st_mtime_ns
    assert main(args) == 0
    assert "cached" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == mtime

    # --force recomputes, and gives the same metrics apart from timing
    assert main(["--force", *args]) == 0
    again = _metrics(run_dir)
    strip = [{k: v for k, v in r.items() if k not in Observer.TIMING_FIELDS} for r in rows]
    assert strip == [{k: v for k, v in r.items() if k not in Observer.TIMING_FIELDS} for r in again]


def test_same_config_twice_gives_identical_metrics_bytes(tmp_path):
    outs = []
    for sub in ("a", "b"):
        args = small_overrides(tmp_path / sub) + CENTRAL_ONLY
        assert main(args) == 0
        text = (_run_dir(tmp_path / sub) / "metrics.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines()]
        for r in rows:
            for k in Observer.TIMING_FIELDS:
                r.pop(k)
        outs.append("\n".join(json.dumps(r) for r in rows))
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.noise.rate=1.5", "data.noise.rate"),
        ("train.lr=-1", "train.lr"),
        ("data.canaries.num_clients=50", "data.canaries.num_clients"),
        ("nonsense.key=1", "nonsense"),
    ],
)
def test_config_error_exits_2_and_writes_nothing(tmp_path, override, key):
    args = [*small_overrides(tmp_path), override]
    proc = simulate_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_data_dir_exits_2(tmp_path, capsys):
    args = [
        *small_overrides(tmp_path),
        "data.name=mnist",
        f"data.data_dir={tmp_path / 'none'}",
        "model.name=cnn",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.data_dir") and "train-images-idx3-ubyte" in err
    assert not (tmp_path / "runs").exists()


def test_interrupted_run_is_not_complete_and_is_resumed(tmp_path, monkeypatch, capsys):
    import fedmem.runs.experiment as sim

    args = small_overrides(tmp_path) + CENTRAL_ONLY

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim, "summarize_rows", boom)
    assert main(args) == 130  # Ctrl-C: one line, no traceback
    assert "interrupted" in capsys.readouterr().err
    run_dir = _run_dir(tmp_path)
    assert (run_dir / "metrics.jsonl").is_file() and not (run_dir / "COMPLETE").exists()
    monkeypatch.undo()
    assert main(args) == 0
    assert (run_dir / "COMPLETE").is_file()
    assert len(_metrics(run_dir)) == 4  # resumed after its last round, nothing appended twice


def test_help_lists_config_sections():
    proc = simulate_cli("--help")
    assert proc.returncode == 0
    for key in ("data.noise.rate", "partition.alpha", "train.lr", "federation.num_clients"):
        assert key in proc.stdout


def test_log_output_keeps_run_names_whole(monkeypatch):
    """Written to a file (not a terminal), the final table is not cut to "cent…"/"fede…"."""
    from fedmem.progress import LOG_WIDTH, cli_console
    from fedmem.reporting.tables import runs_table

    monkeypatch.delenv("COLUMNS", raising=False)
    console = cli_console()
    assert console.width == LOG_WIDTH
    row = {"test_acc": 0.5, "noisy_memorized": 0.1, "noisy_true_acc": 0.3, "rounds": 3}
    with console.capture() as cap:
        console.print(runs_table({"central": row, "federated": row}))
    text = cap.get()
    assert "│ central" in text and "│ federated" in text and "…" not in text
