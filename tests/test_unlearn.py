"""``python -m fedmem.unlearn``: retrain equals a fresh run without the client, ascent stays in
its projection ball, results and derived models are written, bad input exits 2."""

from __future__ import annotations

import json

import pytest
import torch

from fedmem.simulate import main as simulate
from fedmem.unlearn import main as unlearn
from fedmem.unlearning.ascent import project
from tests.conftest import small_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["federation.backend=local", "train.rounds=2", "analysis.gradients.enabled=false"]


def _run(tmp_path, *extra):
    assert simulate([*small_overrides(tmp_path), *BASE, *extra]) == 0
    return max((tmp_path / "runs").glob("default-*"), key=lambda p: p.stat().st_mtime)


def _metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_projection_keeps_parameters_in_the_ball():
    center = [torch.zeros(3), torch.zeros(2)]
    params = [torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])]
    assert float(project(params, center, 1.0)) == pytest.approx(1.0)
    assert torch.allclose(params[0], torch.tensor([0.6, 0, 0])) and torch.allclose(
        params[1], torch.tensor([0, 0.8])
    )
    inside = [torch.tensor([0.1, 0.0, 0.0]), torch.zeros(2)]
    assert float(project(inside, center, 1.0)) == pytest.approx(0.1)
    assert torch.equal(inside[0], torch.tensor([0.1, 0.0, 0.0]))


def test_federaser_calibration_reproduces_a_hand_computed_step():
    from fedmem.unlearning.federaser import aggregate, calibrate

    # Eq. 4: the stored update's norm (5) in the calibration's direction (0, 1)
    stored = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0])}
    cal = {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([0.0])}
    out = calibrate(stored, cal)
    assert torch.allclose(out["w"], torch.tensor([0.0, 5.0]))
    assert torch.equal(out["b"], torch.tensor([0.0]))  # no calibration direction: no step
    # Eq. 5: start + sum_k n_k / n * U_k (client sizes 1 and 3)
    start = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(7)}
    updates = {0: {"w": torch.tensor([2.0, 0.0])}, 4: {"w": torch.tensor([0.0, 4.0])}}
    new = aggregate(start, updates, {0: 1.0, 4: 3.0})
    assert torch.allclose(new["w"], torch.tensor([1.5, 4.0])) and new["n"] == 7


def test_unlearn_retrain_and_ascent(tmp_path):
    run_dir = _run(tmp_path, "checkpoints.client_updates=true")
    args = ["--method", "ascent", "federaser", "ascent.epochs=2", "federaser.interval=1"]
    assert unlearn([str(run_dir), "--client", "1", *args]) == 0
    result = json.loads((run_dir / "unlearning.json").read_text())
    assert set(result["models"]) == {
        "federated",
        "federated-retrain-c1",
        "federated-ascent-c1",
        "federated-federaser-c1",
    }
    federaser = result["models"]["federated-federaser-c1"]
    assert federaser["rounds"] == 2 and federaser["storage_bytes"] > 0
    # ascent needs the final round's updates only, FedEraser every round's
    assert 0 < result["models"]["federated-ascent-c1"]["storage_bytes"] < federaser["storage_bytes"]
    assert 0.0 <= federaser["test_acc"] <= 1.0 and federaser["l2_to_retrain"] > 0
    retrain = result["models"]["federated-retrain-c1"]
    assert retrain["l2_to_retrain"] == 0.0 and retrain["kl_to_retrain"] == pytest.approx(
        0, abs=1e-6
    )
    ascent = result["details"]["ascent"]
    assert ascent["distance_to_reference"] <= ascent["radius"] * (1 + 1e-5)
    assert ascent["post_rounds"] == 2 and result["models"]["federated-ascent-c1"]["rounds"] == 2
    # no state of the forgotten client is left in the run (a finished run keeps no client
    # state files at all; unlearn would delete them)
    assert result["removed_client_state"] == []
    assert not (run_dir / "client_state").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["models"]["federated-ascent-c1"]["parent"] == "federated@2"
    assert "c1" in summary["unlearning"]
    # retrain is exactly a fresh run of the same config without client 1
    (retrain_dir,) = (tmp_path / "runs").glob("default-retrain-*")
    fresh = tmp_path / "fresh"
    assert (
        simulate(
            [
                *small_overrides(fresh),
                *BASE,
                "checkpoints.client_updates=true",
                "federation.excluded_clients=[1]",
            ]
        )
        == 0
    )
    (fresh_dir,) = (fresh / "runs").glob("default-*")
    assert _metrics(retrain_dir) == _metrics(fresh_dir)


def test_bad_requests_exit_2(tmp_path, capsys):
    run_dir = _run(tmp_path)
    assert unlearn([str(run_dir), "--client", "9"]) == 2
    assert "--client: [9] out of range" in capsys.readouterr().err
    assert unlearn([str(run_dir), "--client", "1", "--method", "nope"]) == 2
    assert "--method: unknown ['nope']" in capsys.readouterr().err
    assert unlearn([str(run_dir), "--client", "1", "ascent.nope=1"]) == 2
    assert "ascent.nope: unknown setting" in capsys.readouterr().err
    assert unlearn([str(run_dir), "--client", "1", "--method", "ascent"]) == 2
    assert "checkpoints.client_updates" in capsys.readouterr().err
    assert unlearn([str(tmp_path / "missing"), "--client", "1"]) == 2


def test_unlearning_recipe(tmp_path):
    import csv

    extra = ["data.backdoor.clients=[2]", "federation.backend=local", "train.rounds=2"]
    assert simulate([*small_overrides(tmp_path), *extra, "--recipe", "unlearning"]) == 0
    (out,) = (tmp_path / "runs" / "recipes").glob("unlearning-*")
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == [
        "federated",
        "federated-retrain-c2",
        "federated-ascent-c2",
        "federated-federaser-c2",
        "federated-generator-c2",
    ]
    assert {r["client"] for r in rows} == {"2"}
    assert all(0.0 <= float(r["backdoor_asr"]) <= 1.0 for r in rows)
    assert float(rows[1]["l2_to_retrain"]) == 0.0
