"""LiRA and client-level inference on the forgotten client (:mod:`fedmem.unlearning.inference`):
the pure measures on constructed scores, the columns of ``python -m fedmem.unlearn`` end to end
(the original model looks more like a member than the retrained one), and the note when the run
kept no held-out clients."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from fedmem.simulate import main as simulate
from fedmem.unlearn import main as unlearn
from fedmem.unlearning.evaluate import COLUMNS
from fedmem.unlearning.inference import MEASURES, forgotten_inference, forgotten_inference_for
from tests.conftest import small_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def test_measures_of_constructed_scores():
    # forgotten client 1; held-out clients 5 and 6; client 0 trained but is not judged
    scores = np.array([3.0, 4.0, 1.0, 2.0, 0.0, 5.0, 100.0])
    client = np.array([1, 1, 5, 5, 6, 6, 0])
    out = forgotten_inference(scores, client, (1,), np.array([5, 6]))
    # rows: 3 and 4 each beat 1, 2, 0 and lose to 5 -> 6 of 8 pairs (client 0 ignored)
    assert out["forgotten_lira_auc"] == pytest.approx(0.75)
    # no threshold lets a forgotten row through without the held-out 5 (FPR 1/4 > 1 %)
    assert out["forgotten_lira_tpr_at_1pct_fpr"] == 0.0
    # client means: 3.5 against 1.5 and 2.5 -> above both; the mean itself
    assert out["forgotten_client_auc"] == 1.0
    assert out["forgotten_client_llr"] == pytest.approx(3.5)

    # a tie with one held-out client's mean counts half; the forgotten rows all on top
    scores = np.array([6.0, 7.0, 6.5, 6.5, 0.0, 1.0])
    client = np.array([2, 2, 5, 5, 6, 6])
    out = forgotten_inference(scores, client, (2,), np.array([5, 6]))
    assert out["forgotten_client_auc"] == pytest.approx(0.75)
    assert out["forgotten_lira_tpr_at_1pct_fpr"] == pytest.approx(0.5)  # only 7 beats 6.5

    # two forgotten clients: the client-level AUC is over clients (2 x 2 pairs)
    scores = np.array([4.0, 0.0, 3.0, 1.0])
    client = np.array([1, 2, 5, 6])
    out = forgotten_inference(scores, client, (1, 2), np.array([5, 6]))
    assert out["forgotten_client_auc"] == pytest.approx(0.5)
    assert out["forgotten_client_llr"] == pytest.approx(2.0)


def test_columns_are_shown():
    assert set(MEASURES) <= set(COLUMNS)


def test_without_heldout_clients_the_measures_are_none():
    att = SimpleNamespace(client_shadows=16)
    cfg = SimpleNamespace(
        audit=SimpleNamespace(heldout_clients=0, attack=att),
        train=SimpleNamespace(eval_batch_size=64),
    )
    out = io.StringIO()
    inference = forgotten_inference_for(
        SimpleNamespace(cfg=cfg, table=None), (1,), Console(file=out)
    )
    assert inference.measure(None) == dict.fromkeys(MEASURES)
    assert "audit.heldout_clients" in out.getvalue()
    assert "audit.attack.client_shadows" in out.getvalue()


def test_unlearn_reports_lira_and_client_inference(tmp_path):
    # a run that memorizes (30 % label noise, 5 local epochs x 8 rounds) and two held-out
    # clients that no model trains on; 16 client-level shadows
    run = [
        *small_overrides(tmp_path),
        "federation.backend=local",
        "analysis.gradients.enabled=false",
        "checkpoints.client_updates=true",
        "train.rounds=8",
        "train.local_epochs=5",
        "data.noise.rate=0.3",
        "audit.heldout_clients=2",
        "audit.attack.client_shadows=16",
    ]
    assert simulate(run) == 0
    (run_dir,) = (tmp_path / "runs").glob("default-*")
    assert unlearn([str(run_dir), "--client", "1", "--method", "ascent", "ascent.epochs=2"]) == 0
    result = json.loads((run_dir / "unlearning.json").read_text())
    assert result["inference"]["shadows"] == 16 and result["inference"]["heldout_clients"] == 2
    assert result["inference"]["not_simulated"] == []  # plain FedAvg: the shadows' recipe
    models = result["models"]
    assert set(models) == {"federated", "federated-retrain-c1", "federated-ascent-c1"}
    for row in models.values():
        for key in ("forgotten_lira_auc", "forgotten_lira_tpr_at_1pct_fpr"):
            assert 0.0 <= row[key] <= 1.0
        assert row["forgotten_client_auc"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 1 vs 2 clients
        assert np.isfinite(row["forgotten_client_llr"])
    # client 1 trained the original model and not the retrained one: on its examples the
    # original looks more like a member, by the shadows' likelihood ratio and against the
    # held-out clients' examples
    original, retrained = models["federated"], models["federated-retrain-c1"]
    assert original["forgotten_client_llr"] > retrained["forgotten_client_llr"]
    assert original["forgotten_lira_auc"] > retrained["forgotten_lira_auc"]
    assert original["forgotten_client_auc"] >= retrained["forgotten_client_auc"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "forgotten_lira_auc" in summary["unlearning"]["c1"]["federated"]
