"""Bad input and failures at run time (issue 11): each ends with one line naming the key or
file and the fix, the documented exit code, no traceback, and no run directory that looks
complete (``COMPLETE``) unless the run really finished.

Runs are tiny (``small_overrides``: 1000 MNIST-1D examples, 3 rounds, 4 clients) on the
in-process federation backend, so no Ray starts.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedmem import audit, report
from fedmem.config import DataConfig
from fedmem.data import table as table_mod
from fedmem.data.sources import load_source
from fedmem.errors import DataError
from fedmem.simulate import main
from tests.conftest import small_overrides
from tests.plugins import InterruptFederatedOnce
from tests.test_sources import N_TRAIN, _write_cifar, _write_idx, _write_mnist

pytestmark = pytest.mark.usefixtures("one_thread")

LOCAL = ["federation.backend=local"]
DIVERGING = ["train.lr=50"]  # the weights become NaN within a round or two


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return [*small_overrides(tmp_path), *LOCAL, *extra]


def _run_dirs(tmp_path: Path) -> list[Path]:
    out = tmp_path / "runs"
    return sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []


def _complete(tmp_path: Path) -> list[Path]:
    return [d for d in _run_dirs(tmp_path) if (d / "COMPLETE").exists()]


def _strict_rows(path: Path) -> list[dict]:
    """JSON lines parsed strictly: NaN / Infinity are not JSON and fail here."""

    def reject(token: str):
        raise AssertionError(f"non-JSON number {token} in {path.name}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def _one_error_line(err: str, *needles: str) -> str:
    """The single ``error: ...`` line on stderr, containing every needle; no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One complete small run (central and federated); tests copy it before changing it."""
    base = tmp_path_factory.mktemp("finished")
    assert main(_args(base)) == 0
    (run,) = _run_dirs(base)
    return run


def _copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` under ``tmp_path/runs``, its config.yaml's output.dir moved along
    (so ``_args(tmp_path)`` is the copy's own command)."""
    import yaml

    dest = tmp_path / "runs" / run.name
    shutil.copytree(run, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["output"]["dir"] = str(tmp_path / "runs")
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


# ---------------------------------------------------------------------------------------------
# 1. a diverging run
# ---------------------------------------------------------------------------------------------
def test_diverging_run_stops_and_is_marked(tmp_path, capsys):
    assert main(_args(tmp_path, *DIVERGING)) == 0  # a finished run with its result
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    (run,) = _complete(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    rows = _strict_rows(run / "metrics.jsonl")
    _strict_rows(run / "gradients.jsonl")  # the probe's NaN norms were the first crash
    _strict_rows(run / "clients.jsonl")
    for name in ("central", "federated"):
        at = summary["runs"][name]["diverged_at_round"]
        assert isinstance(at, int) and 1 <= at <= 3
        mine = [r for r in rows if r["run"] == name]
        assert [r["round"] for r in mine] == list(range(at + 1))  # stopped there
        assert mine[-1]["diverged"] is True and mine[-1]["test_loss"] is None
        assert not any(r.get("diverged") for r in mine[:-1])
        assert summary["runs"][name]["rounds"] == at
        assert f"warning: {name} diverged at round {at}" in out
        assert f"{name} (diverged at round {at})" in out  # marked in the table
        assert f"{name} (diverged at round {at})" in (run / "report.md").read_text()
    assert "train.on_divergence=stop" in out

    # cached: the same command reuses the run, still marked
    assert main(_args(tmp_path, *DIVERGING)) == 0
    again = capsys.readouterr().out
    assert "cached" in again and "diverged at round" in again

    # a diverged model has nothing to audit: one line, exit 2 (not a NaN traceback)
    assert audit.main([str(run)]) == 2
    _one_error_line(capsys.readouterr().err, "central model diverged at round", "train.lr")


def test_diverging_run_can_continue(tmp_path, capsys):
    args = _args(tmp_path, *DIVERGING, "train.on_divergence=continue", "federation.enabled=false")
    assert main(args) == 0
    out = capsys.readouterr().out
    (run,) = _complete(tmp_path)
    rows = _strict_rows(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # trained on to the last round
    summary = json.loads((run / "summary.json").read_text())["runs"]["central"]
    assert summary["rounds"] == 3 and summary["diverged_at_round"] is not None
    assert all(r["diverged"] for r in rows if r["round"] >= summary["diverged_at_round"])
    assert "continued to round 3" in out


def test_stopped_run_resumes_without_training_past_divergence(tmp_path, capsys):
    """Interrupted after the central run stopped where it diverged: the rerun keeps it
    stopped there (no rounds appended) and finishes the federated run."""
    args = _args(tmp_path, *DIVERGING, 'plugins.external=["tests.plugins:InterruptFederatedOnce"]')
    InterruptFederatedOnce.armed = True
    assert main(args) == 130
    capsys.readouterr()
    (run,) = _run_dirs(tmp_path)
    assert not (run / "COMPLETE").exists()
    first = [r["round"] for r in _strict_rows(run / "metrics.jsonl") if r["run"] == "central"]
    assert main(args) == 0
    assert "resuming central" in capsys.readouterr().out
    rows = _strict_rows(run / "metrics.jsonl")
    assert [r["round"] for r in rows if r["run"] == "central"] == first
    summary = json.loads((run / "summary.json").read_text())
    assert summary["runs"]["central"]["diverged_at_round"] == first[-1]


# ---------------------------------------------------------------------------------------------
# 2. lost federated rounds
# ---------------------------------------------------------------------------------------------
def test_every_round_lost_fails_with_exit_4(tmp_path, capsys):
    args = _args(tmp_path, 'plugins.external=["tests.plugins:FailingClient"]')
    assert main(args) == 4
    err = capsys.readouterr().err
    _one_error_line(err, "federated: all 3 rounds were lost", "12 client failures", "injected")
    assert not _complete(tmp_path)
    (run,) = _run_dirs(tmp_path)
    assert not (run / "summary.json").exists()
    # the same command retrains the federated run (the central one is kept) and fails again
    assert main(args) == 4
    out, err = capsys.readouterr()
    assert "resuming central" in out and "federated: all 3 rounds were lost" in err
    assert not _complete(tmp_path)


def test_lost_rounds_are_counted_and_said(tmp_path, capsys):
    assert main(_args(tmp_path, 'plugins.external=["tests.plugins:FailingRound2"]')) == 0
    out = capsys.readouterr().out
    (run,) = _complete(tmp_path)
    fed = json.loads((run / "summary.json").read_text())["runs"]["federated"]
    assert fed["lost_rounds"] == 1 and fed["client_failures"] == 4
    assert "warning: federated: 1 of 3 rounds lost (4 client failures" in out
    assert "federated (1 round lost)" in out


# ---------------------------------------------------------------------------------------------
# 3. dataset files that parse but hold bad values
# ---------------------------------------------------------------------------------------------
def test_mnist_label_outside_the_classes(tmp_path):
    data = _write_mnist(tmp_path, "MNIST")
    labels = data["y_train"].copy()
    labels[7] = 12
    _write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    with pytest.raises(DataError) as e:
        load_source(DataConfig(name="mnist", data_dir=tmp_path), seed=0)
    msg = str(e.value)
    assert msg.startswith("data.data_dir: ") and "\n" not in msg
    assert "train-labels-idx1-ubyte" in msg and "label 12 at example 7" in msg


def test_mnist_image_and_label_counts_differ(tmp_path):
    data = _write_mnist(tmp_path, "FashionMNIST")
    _write_idx(tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte", data["y_test"][:-1])
    with pytest.raises(DataError) as e:
        load_source(DataConfig(name="fashionmnist", data_dir=tmp_path), seed=0)
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "10 images but 9 labels" in msg


def test_cifar_label_outside_the_classes_names_the_batch(tmp_path, monkeypatch):
    import os

    import torchvision.datasets.cifar

    monkeypatch.setattr(  # tiny files cannot match the real md5s (see test_sources)
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )
    _write_cifar(tmp_path, 10)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch = pickle.loads(path.read_bytes())
    batch["labels"][0] = 10
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError) as e:
        load_source(DataConfig(name="cifar10", data_dir=tmp_path), seed=0)
    assert str(path) in str(e.value) and "label 10" in str(e.value)


def test_bad_dataset_values_exit_2_before_any_run(tmp_path, capsys):
    data = _write_mnist(tmp_path, "MNIST")
    _write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", data["y_train"][:-2])
    args = [*_args(tmp_path), "data.name=mnist", f"data.data_dir={tmp_path}", "model.name=cnn"]
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, "train-labels-idx1-ubyte", f"{N_TRAIN - 2} labels")
    assert not _run_dirs(tmp_path)


# ---------------------------------------------------------------------------------------------
# 4. a truncated or inconsistent table cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "empty", "mismatched"])
def test_broken_table_cache_is_rebuilt(small_cfg, tmp_path, capsys, damage):
    cfg = small_cfg.model_copy(
        update={"data": small_cfg.data.model_copy(update={"cache_dir": tmp_path / "cache"})}
    )
    first = table_mod.cached_table(cfg)
    (path,) = (tmp_path / "cache" / "tables").glob("*.npz")
    whole = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(whole[: len(whole) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # parses, but the label column is one row short
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["y_obs"] = arrays["y_obs"][:-1]
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    capsys.readouterr()
    again = table_mod.cached_table(cfg)
    err = capsys.readouterr().err
    assert f"the table cache {path} is unreadable" in err and "rebuilding it" in err
    assert len(err.strip().splitlines()) == 1
    assert bool((again.y_obs == first.y_obs).all()) and len(again) == len(first)
    assert path.read_bytes() == whole  # rebuilt in place, identical
    table_mod.cached_table(cfg)
    assert capsys.readouterr().err == ""  # and read from the cache again
    assert not list(path.parent.glob(".*.tmp*"))


# ---------------------------------------------------------------------------------------------
# 5. an audit of a run whose config.yaml was edited
# ---------------------------------------------------------------------------------------------
def test_audit_refuses_an_edited_config(finished_run, tmp_path, capsys):
    import yaml

    run = _copy_run(finished_run, tmp_path)
    from fedmem.privacy.audit.records import open_run

    open_run(run)  # unchanged: accepted
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["lr"] = 0.2
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert audit.main([str(run)]) == 2
    line = _one_error_line(capsys.readouterr().err, str(run / "config.yaml"), "restore it")
    assert "python -m fedmem.simulate" in line
    assert not (run / "audit.json").exists()

    # rewritten with the same values (order, formatting): still the run's config
    original = yaml.safe_load((finished_run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(original, sort_keys=True, indent=4))
    open_run(run)


# ---------------------------------------------------------------------------------------------
# 6. --out, checkpoints, summary.json
# ---------------------------------------------------------------------------------------------
def test_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert main([*_args(tmp_path), "--out", str(target)]) == 2
    _one_error_line(capsys.readouterr().err, "--out", str(target), "is a file")
    assert target.read_text() == "x"


def test_out_below_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main([*_args(tmp_path), "--out", str(tmp_path / "afile" / "runs")]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "afile")


def test_out_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    import fedmem.runs.rundir as rundir

    out = tmp_path / "ro"
    out.mkdir()

    def refuse(*a, **k):  # what a read-only folder or file system answers (also to root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(rundir.tempfile, "mkstemp", refuse)
    assert main([*_args(tmp_path), "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "--out", str(out), "Permission denied")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint"])
def test_unreadable_resume_checkpoint_exits_2_then_force_recovers(
    finished_run, tmp_path, capsys, content
):
    run = _copy_run(finished_run, tmp_path)
    (run / "COMPLETE").unlink()  # an interrupted run ...
    resume = run / "checkpoints" / "resume" / "central.pt"
    resume.parent.mkdir(parents=True, exist_ok=True)
    resume.write_bytes(content)  # ... whose resume state is torn
    args = _args(tmp_path)
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, str(resume), "--force")
    assert not (run / "COMPLETE").exists()
    assert main([*args, "--force"]) == 0
    assert (run / "COMPLETE").is_file()


@pytest.mark.parametrize("content", [None, b"", b"{not json", b"[1, 2]"])
def test_missing_or_corrupt_summary(finished_run, tmp_path, capsys, content):
    run = _copy_run(finished_run, tmp_path)
    summary = run / "summary.json"
    if content is None:
        summary.unlink()
    else:
        summary.write_bytes(content)
    for cli in (audit.main, report.main):
        assert cli([str(run)]) == 2
        _one_error_line(capsys.readouterr().err, "summary.json")
    if content is not None:  # a complete run with a broken summary: simulate says so too
        assert main(_args(tmp_path)) == 2
        _one_error_line(capsys.readouterr().err, str(summary), "--force")


def test_garbage_final_checkpoint_for_the_audit(finished_run, tmp_path):
    import torch

    from fedmem.errors import InputError
    from fedmem.privacy.audit.records import load_model, open_run

    run = _copy_run(finished_run, tmp_path)
    opened = open_run(run)
    (run / "checkpoints" / "central.pt").write_bytes(b"\x00garbage")
    with pytest.raises(InputError) as e:
        load_model(opened, "central", torch.device("cpu"))
    assert "checkpoints/central.pt" in str(e.value) and "\n" not in str(e.value)
