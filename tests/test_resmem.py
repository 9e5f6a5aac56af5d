"""ResMem (Yang et al. 2023): exact vectorized kNN, the embedding and residuals, the k=1 /
tiny-sigma limit that reproduces the training labels, and the evaluation of a finished run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmem.methods.resmem import (
    ResidualMemory,
    ResMemSettings,
    embed_and_logits,
    knn,
    predict,
    residuals,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(d=8, h=16, c=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, c))


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(500, 6, generator=g), torch.randn(130, 6, generator=g)
    d, idx = knn(queries, keys, k=7, chunk=32)  # several chunks
    brute = ((queries[:, None, :] - keys[None]) ** 2).sum(-1).sqrt()
    ref_d, ref_idx = brute.sort(dim=1)
    assert torch.equal(idx, ref_idx[:, :7])
    assert torch.allclose(d, ref_d[:, :7], atol=1e-5)
    # more neighbours than keys: all keys
    assert knn(queries[:3], keys[:4], k=10)[1].shape == (3, 4)


def test_embedding_is_the_input_of_the_last_linear_and_residuals():
    model = _mlp()
    x = torch.randn(50, 8)
    z, logits = embed_and_logits(model, x, batch_size=16)
    manual = F.normalize(model[:4](x), dim=1)
    assert torch.allclose(z, manual, atol=1e-6)
    assert torch.allclose(logits, model(x), atol=1e-6)
    y = torch.randint(0, 4, (50,))
    r = residuals(logits, y, temperature=2.0)
    assert torch.allclose(r, F.one_hot(y, 4).float() - F.softmax(logits / 2.0, 1))
    assert torch.allclose(r.sum(1), torch.zeros(50), atol=1e-6)  # both sides sum to one


def test_k1_tiny_sigma_reproduces_the_training_labels():
    model = _mlp()
    x = torch.randn(300, 8)
    y = torch.randint(0, 4, (300,))  # random labels: the model alone gets ~1/4
    for rule in ("resmem", "knn_lm"):
        s = ResMemSettings(k=1, sigma=1e-6, rule=rule, lam=1.0)
        memory = ResidualMemory.build(model, x, y, s)
        base, pred = predict(model, x, memory, s)
        assert float((base.argmax(1) == y).float().mean()) < 0.5
        assert torch.equal(pred.argmax(1), y)
        if rule == "resmem":  # model + own residual = the one-hot label exactly
            assert torch.allclose(pred, F.one_hot(y, 4).float(), atol=1e-5)


def test_resmem_weights_are_a_softmax_of_distances():
    model = _mlp()
    x, y = torch.randn(40, 8), torch.randint(0, 4, (40,))
    s = ResMemSettings(k=5, sigma=0.3)
    memory = ResidualMemory.build(model, x, y, s)
    q = torch.randn(6, 8)
    base, pred = predict(model, q, memory, s)
    zq, _ = embed_and_logits(model, q)
    d = torch.cdist(zq, memory.keys)
    dk, ik = d.topk(5, largest=False)
    w = torch.exp(-dk / 0.3)
    w = w / w.sum(1, keepdim=True)
    expected = base + (w[..., None] * memory.values[ik]).sum(1)
    assert torch.allclose(pred, expected, atol=1e-5)


def test_evaluate_a_finished_run(tmp_path):
    from fedmem.methods.resmem_eval import evaluate
    from fedmem.privacy.audit.records import open_run
    from fedmem.simulate import main
    from tests.conftest import small_overrides

    args = [
        *small_overrides(tmp_path),
        "federation.backend=local",
        "data.noise.rate=0.3",
        "audit.pool=200",
    ]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    result = evaluate(open_run(run_dir), ResMemSettings(k=1))
    assert json.loads((run_dir / "resmem.json").read_text()) == json.loads(json.dumps(result))
    for name in ("central", "federated"):
        r = result["runs"][name]
        # every stored example is its own nearest neighbour: its given label comes back,
        # mislabeled ones included (the noise is memorized)
        assert r["noisy_memorized"]["resmem"] == 1.0 and r["train_acc_clean"]["resmem"] == 1.0
        assert r["noisy_memorized"]["base"] < 1.0
        assert 0.0 <= r["test_acc"]["base"] <= 1.0
    local = result["runs"]["federated"]["client_local"]
    assert set(local["per_client"]) == {"0", "1", "2", "3"}
    assert local["base_mean"] == pytest.approx(
        sum(v["base"] for v in local["per_client"].values()) / 4
    )

    # the privacy cost of the memory: a member's own residual comes back (loss 0); a
    # non-member whose nearest stored neighbour has its label may reach loss 0 too (ties), so
    # the loss threshold separates most, not all; the inserted canaries rank near the top
    for name in ("central", "federated"):
        cost = result["runs"][name]["privacy"]
        auc = {k: v["auc"] for k, v in cost["membership_loss"].items()}
        assert auc["resmem"] > max(0.85, auc["base"] + 0.2)
        # (references whose nearest stored example shares their random label tie at loss 0)
        exp = cost["exposure_mean"]
        assert exp["base"] + 1.0 < exp["resmem"] <= math.log2(101) + 1e-9


def test_resmem_models_are_derived_models_the_audit_attacks(tmp_path):
    """evaluate(register=True) adds <name>-resmem to the run's lineage; python -m fedmem.audit
    loads it (weights + memory), attacks it, and says what its shadows do not simulate."""
    from fedmem.audit import main as audit_main
    from fedmem.methods.resmem_eval import evaluate
    from fedmem.privacy.audit.records import load_model, open_run
    from fedmem.simulate import main
    from tests.conftest import small_overrides

    args = [
        *small_overrides(tmp_path),
        "federation.enabled=false",
        "audit.pool=200",
        "audit.attack.shadows=4",
        "train.rounds=6",
        "analysis.gradients.enabled=false",
    ]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    s = ResMemSettings(k=3, sigma=0.05)
    result = evaluate(open_run(run_dir), s, register=True)
    assert result["runs"]["central"]["derived_model"] == "central-resmem"
    run = open_run(run_dir)
    record = run.records["central-resmem"]
    assert (record.method, record.parent, record.trainer) == ("resmem", "central@6", "central")
    # the saved module predicts exactly what evaluate measured
    model = load_model(run, "central-resmem", torch.device("cpu"))
    acc = float((model(run.table.x_test).argmax(1) == run.table.y_test).float().mean())
    assert acc == pytest.approx(result["runs"]["central"]["test_acc"]["resmem"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["runs"]["central-resmem"]["test_acc"] == pytest.approx(acc)
    # the audit attacks it beside the original, and its claims are none (a derived model)
    assert audit_main([str(run_dir)]) == 0
    audit = json.loads((run_dir / "audit.json").read_text())
    assert set(audit["runs"]) == {"central", "central-resmem"}
    notes = audit["shadows"]["central-resmem"]["not_simulated"]
    assert any("resmem" in n for n in notes)
    loss_auc = {n: r["membership"]["attacks"]["loss"]["auc"] for n, r in audit["runs"].items()}
    assert loss_auc["central-resmem"] > loss_auc["central"] + 0.1


def test_resmem_cli(tmp_path, capsys):
    from fedmem.resmem import main as resmem_main
    from fedmem.simulate import main
    from tests.conftest import small_overrides

    assert resmem_main([str(tmp_path / "nope")]) == 2
    assert "RUN_DIR" in capsys.readouterr().err
    assert main([*small_overrides(tmp_path), "federation.enabled=false"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert resmem_main([str(run_dir), "--sigma", "0"]) == 2
    assert "--sigma" in capsys.readouterr().err
    assert resmem_main([str(run_dir), "--k", "1", "--register"]) == 0
    assert "central-resmem" in json.loads((run_dir / "summary.json").read_text())["models"]
    assert json.loads((run_dir / "resmem.json").read_text())["settings"]["k"] == 1
