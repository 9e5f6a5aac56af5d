"""``--recipe``: every named recipe runs its grid on a tiny config and writes its table."""

from __future__ import annotations

import csv
import json

import pytest

from fedmem.simulate import main
from tests.conftest import REPO, small_overrides

LOCAL = ["federation.backend=local", "analysis.gradients.enabled=false"]


def _table(tmp_path, name):
    (out,) = (tmp_path / "runs" / "recipes").glob(f"{name}-*")
    with open(out / "table.csv") as f:
        return list(csv.DictReader(f))


def test_unknown_recipe_is_an_input_error(tmp_path, capsys):
    assert main([*small_overrides(tmp_path), "--recipe", "nope"]) == 2
    assert "--recipe: unknown 'nope'; allowed: central_vs_federated" in capsys.readouterr().err


def test_privacy_audit_needs_audit_records_before_training(tmp_path, capsys):
    assert main([*small_overrides(tmp_path), "--recipe", "privacy_audit"]) == 2
    assert capsys.readouterr().err.startswith("error: audit.pool:")
    assert not (tmp_path / "runs").exists()


def test_privacy_audit_recipe(tmp_path, monkeypatch):
    import simulations.privacy_audit as recipe

    monkeypatch.setattr(recipe, "NOISE_MULTIPLIERS", (0.0, 2.0))
    args = [
        *small_overrides(tmp_path),
        *LOCAL,
        "federation.enabled=false",
        "audit.pool=200",
        "audit.canaries=60",
        "audit.attack.shadows=4",
        "--recipe",
        "privacy_audit",
    ]
    assert main(args) == 0
    rows = _table(tmp_path, "privacy_audit")
    assert [(r["noise_multiplier"], r["run"]) for r in rows] == [
        ("0.0", "central"),
        ("2.0", "central"),
    ]
    assert rows[0]["eps accountant"] == "inf"
    eps = float(rows[1]["eps accountant"])
    assert 0 < eps < 50 and float(rows[1]["eps >= (one run)"]) <= eps


def test_dp_memorization_recipe(tmp_path, monkeypatch):
    import simulations.dp_memorization as recipe

    monkeypatch.setattr(recipe, "NOISE_MULTIPLIERS", (0.0, 1.0))
    args = [
        "--config",
        str(REPO / "configs" / "dp.yaml"),
        *small_overrides(tmp_path),
        *LOCAL,
        "--recipe",
        "dp_memorization",
    ]
    assert main(args) == 0
    rows = _table(tmp_path, "dp_memorization")
    assert [r["setting"] for r in rows] == [
        "central",
        "federated record-level",
        "federated user-level",
    ] * 2
    assert {r["epsilon"] for r in rows[:3]} == {"inf"}
    assert all(float(r["epsilon"]) > 0 for r in rows[3:])


def test_central_vs_federated_recipe(tmp_path):
    assert main([*small_overrides(tmp_path), *LOCAL, "--recipe", "central_vs_federated"]) == 0
    rows = _table(tmp_path, "central_vs_federated")
    assert len(rows) == 9 and {r["setting"] for r in rows} >= {"central"}


def test_central_gap_recipe_changes_one_cause_per_row(tmp_path):
    args = [*small_overrides(tmp_path), *LOCAL, "data.noise.rate=0.2", "--recipe", "central_gap"]
    assert main(args) == 0
    rows = _table(tmp_path, "central_gap")
    assert [r["cause"] for r in rows] == [
        "-",
        "optimizer reset",
        "fewer sequential steps",
        "averaging",
        "heterogeneity",
    ]
    steps = [int(r["steps/round"]) for r in rows]
    # visits-matched central steps over all rows; then a client's steps (~1/4 with 4 clients)
    assert steps[0] == steps[1] > 2 * steps[2]
    assert steps[2] == steps[3]
    # each delta column is the difference to the previous row
    for a, b in zip(rows, rows[1:], strict=False):
        assert float(b["d test_acc"]) == pytest.approx(
            float(b["test_acc"]) - float(a["test_acc"]), abs=1e-9
        )
    # optimizer reset changes training (momentum 0.9 lost every round)
    assert rows[0]["test_acc"] != rows[1]["test_acc"]


def test_early_learning_recipe(tmp_path, monkeypatch):
    import simulations.early_learning as recipe

    monkeypatch.setattr(recipe, "NOISE_RATES", (0.4,))
    assert main([*small_overrides(tmp_path), *LOCAL, "--recipe", "early_learning"]) == 0
    rows = _table(tmp_path, "early_learning")
    (out,) = (tmp_path / "runs" / "recipes").glob("early_learning-*")
    assert (out / "central_noise0.4.png").stat().st_size > 1000
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("CE", "central"),
        ("CE", "federated iid"),
        ("CE", "federated dirichlet"),
        ("ELR", "central"),
        ("ELR", "federated iid"),
        ("ELR", "federated dirichlet"),
    ]
    for r in rows:
        assert float(r["best_test_acc"]) >= float(r["test_acc"])
    # ELR changes training: the central runs differ
    assert (
        rows[0]["test_acc"] != rows[3]["test_acc"]
        or rows[0]["noisy_memorized"] != rows[3]["noisy_memorized"]
    )
    # the ELR cells record the plug-in in their lineage
    runs = tmp_path / "runs"
    elr_dirs = [d for d in runs.glob("default-elr-*")]
    models = [json.loads((d / "summary.json").read_text())["models"] for d in elr_dirs]
    assert sum("elr" in m["central"].get("plugins", []) for m in models) == 2


def test_resmem_recipe(tmp_path, monkeypatch):
    import simulations.resmem as recipe

    monkeypatch.setattr(recipe, "WIDTHS", (16,))
    monkeypatch.setattr(recipe, "NOISE_RATES", (0.4,))
    assert main([*small_overrides(tmp_path), *LOCAL, "--recipe", "resmem"]) == 0
    rows = _table(tmp_path, "resmem")
    assert [r["run"] for r in rows] == ["central", "federated"]
    (out,) = (tmp_path / "runs" / "recipes").glob("resmem-*")
    assert (out / "test_acc_by_width.png").stat().st_size > 1000
    for r in rows:
        assert float(r["d test"]) == pytest.approx(
            float(r["test resmem"]) - float(r["test base"]), abs=1e-9
        )
        assert float(r["noisy mem resmem"]) > float(r["noisy mem base"])
    assert rows[0]["client-local base"] in ("", "-") and float(rows[1]["client-local base"]) > 0


def test_pruning_sweep_recipe(tmp_path, monkeypatch):
    import simulations.pruning_sweep as recipe

    monkeypatch.setattr(recipe, "SPARSITIES", (0.0, 0.8))
    monkeypatch.setattr(recipe, "POPULATION", 3)
    assert main([*small_overrides(tmp_path), *LOCAL, "--recipe", "pruning_sweep"]) == 0
    rows = _table(tmp_path, "pruning_sweep")
    assert [(r["run"], r["method"], r["sparsity"]) for r in rows] == [
        (run, method, s)
        for run in ("central", "federated")
        for method in ("magnitude", "random")
        for s in ("0.0", "0.8")
    ] + [(f"{p} population", "magnitude", s) for p in ("central", "fedavg") for s in ("0.0", "0.8")]
    population = rows[-4:]
    assert [r["pie_share"] for r in population if r["sparsity"] == "0.0"] == ["0.0", "0.0"]
    assert all(0.0 < float(r["pie_share"]) < 1.0 for r in population if r["sparsity"] == "0.8")
    rows = rows[:-4]
    dense = [r for r in rows if r["sparsity"] == "0.0"]
    assert {r["changed"] for r in dense} == {"0.0"} and {r["weights_remaining"] for r in dense} == {
        "1.0"
    }
    pruned = [r for r in rows if r["sparsity"] == "0.8"]
    # the output layer is pruned at half the rate: a little more than 20% of weights remain
    assert all(0.2 < float(r["weights_remaining"]) < 0.25 for r in pruned)
    (out,) = (tmp_path / "runs" / "recipes").glob("pruning_sweep-*")
    assert (out / "accuracy_by_kind_central.png").is_file()


def test_lottery_recipe(tmp_path, monkeypatch):
    """Central and federated tickets, registered as derived models and audited."""
    import simulations.lottery as recipe

    monkeypatch.setattr(recipe, "LEVELS", 1)
    audit = ["audit.pool=100", "audit.attack.shadows=4", "audit.attack.client_shadows=0"]
    assert main([*small_overrides(tmp_path), *LOCAL, *audit, "--recipe", "lottery"]) == 0
    rows = _table(tmp_path, "lottery")
    per_model = [
        ("-", "dense"),
        ("0", "ticket"),
        ("0", "reinit"),
        ("0", "random mask"),
        ("2", "ticket"),
        ("2", "reinit"),
        ("2", "random mask"),
    ]
    assert [(r["model"], r["rewind_round"], r["variant"]) for r in rows] == [
        (m, *v) for m in ("central", "federated") for v in per_model
    ]
    assert all(0.75 < float(r["weights_remaining"]) < 0.85 for r in rows if r["level"] != "0")
    # the dense models and the two final tickets per model are audited; the others are not
    audited = [(r["model"], r["variant"]) for r in rows if r["mia_auc"]]
    assert audited == [
        (m, v) for m in ("central", "federated") for v in ("dense",) + ("ticket",) * 2
    ]
    assert all(0.0 <= float(r["mia_auc"]) <= 1.0 for r in rows if r["mia_auc"])
    (run_dir,) = (tmp_path / "runs").glob("default-lottery-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    ticket = summary["models"]["federated-ticket-k2"]
    assert ticket["parent"] == "federated@2" and ticket["method"] == "lottery"
    assert set(json.loads((run_dir / "audit.json").read_text())["runs"]) == {
        "central",
        "federated",
        *(f"{m}-ticket-k{k}" for m in ("central", "federated") for k in (0, 2)),
    }
