"""Run lineage (summary.json["models"]), derived models, kept client updates."""

from __future__ import annotations

import json

import pytest
import torch

from fedmem import config
from fedmem.ensemble import SIMULATED_PLUGINS
from fedmem.runs.records import (
    ModelRecord,
    add_model,
    deviations,
    experiment_records,
    read_records,
    shadow_recipe,
)
from fedmem.simulate import main
from tests.conftest import REPO, small_overrides


def _cfg(*extra):
    return config.load(REPO / "configs" / "default.yaml", list(extra))


def test_records_describe_how_each_model_was_trained():
    cfg = _cfg("federation.strategy=fedprox", "train.proximal_mu=0.1", "privacy.user_level=true")
    rec = experiment_records(cfg)
    assert rec["central"].plugins == () and rec["central"].trainer == "central"
    fed = rec["federated"]
    assert (fed.trainer, fed.strategy, fed.plugins, fed.user_dp) == (
        "federated",
        "fedprox",
        ("proximal",),
        True,
    )
    assert shadow_recipe(fed) == "fedavg" and shadow_recipe(rec["central"]) == "central"
    dev = deviations(fed, "fedavg", SIMULATED_PLUGINS)
    assert any("fedprox" in d for d in dev) and any("proximal" in d for d in dev)
    assert any("user_level" in d for d in dev)
    # what the ensemble trainer declares it simulates is not reported
    assert not any("proximal" in d for d in deviations(fed, "fedavg", frozenset({"proximal"})))
    assert ModelRecord.from_dict(json.loads(json.dumps(fed.to_dict()))) == fed
    assert deviations(rec["central"], "central", SIMULATED_PLUGINS) == []


def test_derived_model_is_added_to_a_finished_run_and_reported(tmp_path):
    args = small_overrides(tmp_path) + ["federation.enabled=false", "checkpoints.every=1"]
    assert main(args) == 0
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["models"]) == ["central"]
    assert summary["models"]["central"]["checkpoint"] == "checkpoints/central.pt"
    assert summary["checkpoints"]["central"]["rounds"] == [0, 1, 2, 3]

    # a "derived" model: round 1's weights, as a prune/unlearn command would add one
    weights = torch.load(run_dir / "checkpoints" / "central" / "round-00001.pt")["model"]
    torch.save(weights, run_dir / "checkpoints" / "rewound.pt")
    record = ModelRecord(
        name="rewound",
        trainer="central",
        rounds=1,
        checkpoint="checkpoints/rewound.pt",
        parent="central@1",
        method="rewind",
        details={"to_round": 1},
    )
    add_model(run_dir, record, {"test_acc": 0.5, "rounds": 1})
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["models"]) == {"central", "rewound"}
    assert summary["runs"]["rewound"]["test_acc"] == 0.5
    records = read_records(summary, config.build(summary_config(run_dir)))
    assert records["rewound"] == record
    dev = deviations(records["rewound"], "central", SIMULATED_PLUGINS)
    assert dev[0].startswith("starts from central@1") and "rewind" in dev[1]
    report = (run_dir / "report.md").read_text()
    assert "rewound" in report and "central@1" in report
    with pytest.raises(ValueError, match="does not exist"):
        add_model(run_dir, ModelRecord("x", "central", 1, "checkpoints/none.pt"), {})


def summary_config(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_old_summaries_without_models_get_records_from_the_config():
    cfg = _cfg()
    recs = read_records({"runs": {"central": {}, "federated": {}}}, cfg)
    assert list(recs) == ["central", "federated"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_client_updates_are_kept_and_replay_the_aggregation(tmp_path, dtype):
    args = small_overrides(tmp_path) + [
        "federation.backend=local",
        "checkpoints.every=1",
        "checkpoints.client_updates=true",
        f"checkpoints.update_dtype={dtype}",
        "analysis.gradients.enabled=false",
        "analysis.track_examples=false",
    ]
    assert main(args) == 0
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    cfg = config.build(summary_config(run_dir))
    from fedmem.data.table import cached_table

    table = cached_table(cfg)
    ck = run_dir / "checkpoints"
    for r in (1, 2, 3):
        updates = torch.load(ck / "updates" / f"round-{r:05d}.pt")
        before = torch.load(ck / "federated" / f"round-{r - 1:05d}.pt")["model"]
        after = torch.load(ck / "federated" / f"round-{r:05d}.pt")["model"]
        n = {pid: len(table.client_rows(pid)) for pid in updates}
        total = sum(n.values())
        for key, w0 in before.items():
            if not w0.is_floating_point():
                continue
            assert updates[0][key].dtype == getattr(torch, dtype)
            avg = sum(n[p] / total * u[key].double() for p, u in updates.items())
            tol = 1e-5 if dtype == "float32" else 2e-3
            assert torch.allclose(w0.double() + avg, after[key].double(), atol=tol), (r, key)
    summary = json.loads((run_dir / "summary.json").read_text())
    cu = summary["checkpoints"]["client_updates"]
    sizes = [(ck / "updates" / f"round-{r:05d}.pt").stat().st_size for r in (1, 2, 3)]
    assert cu["rounds"] == 3 and cu["bytes"] == sum(sizes) and cu["dtype"] == dtype


def test_memorization_stage_lists_what_the_ensemble_does_not_simulate(tmp_path):
    from rich.console import Console

    from fedmem.analysis.pipeline import memorization_scores_stage
    from fedmem.data.table import cached_table

    cfg = config.load(
        REPO / "configs" / "default.yaml",
        small_overrides(tmp_path)
        + [
            "analysis.memorization_scores.models=4",
            "analysis.memorization_scores.epochs=1",
            'plugins.external=["tests.plugins:CallCounter"]',
        ],
    )
    out = memorization_scores_stage(cfg, cached_table(cfg), tmp_path, Console(quiet=True))
    assert out["example"]["not_simulated"] == ["plug-in counter not simulated"]
