"""Per-client dummy-gradient generators ("Learn to Forget"): the pieces, the plug-in during a
federated run (the run's models do not change, the generators stay in the clients' state), and
``python -m fedmem.unlearn --method generator`` (the forgotten client's state is gone after)."""

from __future__ import annotations

import json

import pytest
import torch

from fedmem.methods.forget_generator import (
    DummyGradientGenerator,
    Objective,
    frozen_tail,
    target_names,
    wasserstein2,
)
from fedmem.simulate import main as simulate
from fedmem.unlearn import main as unlearn
from tests.conftest import small_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["federation.backend=local", "train.rounds=2", "analysis.gradients.enabled=false"]
ON = "plugins.forget_generator.enabled=true"


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )


class _Split(torch.nn.Module):
    """Features, then a classifier outside any Sequential (like the project's CNN1d)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
        self.classifier = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_wasserstein_of_a_shift_is_its_square():
    ref = torch.linspace(-1, 1, 1001, dtype=torch.float64)
    values = torch.linspace(-1, 1, 50, dtype=torch.float64) + 0.3
    assert float(wasserstein2(values, ref)) == pytest.approx(0.09, abs=2e-3)
    assert float(wasserstein2(ref[torch.randperm(1001)], ref)) == pytest.approx(0, abs=1e-6)


def test_mean_gradient_equals_the_mean_of_per_example_gradients():
    g = DummyGradientGenerator(3, 7, hidden=5)
    torch.nn.init.normal_(g.net[2].weight)
    probs, labels = torch.softmax(torch.randn(9, 3), 1), torch.randint(0, 3, (9,))
    assert torch.allclose(g.mean_gradient(probs, labels), g(probs, labels).mean(0), atol=1e-6)
    # a fresh generator proposes no change at all
    assert torch.count_nonzero(DummyGradientGenerator(3, 7).mean_gradient(probs, labels)) == 0


@pytest.mark.parametrize("make, layers", [(_mlp, 1), (_mlp, 2), (_Split, 1), (_Split, 2)])
def test_objective_with_frozen_features_equals_the_whole_model(make, layers):
    model = make()
    names = target_names(model, layers)
    x, ref_x = torch.randn(12, 6), torch.randn(10, 6)
    y, ref_y = torch.randint(0, 3, (12,)), torch.randint(0, 3, (10,))
    obj = Objective(model, names, x, y, ref_x, ref_y, 0.5, 0.0, 10.0)
    if make is _Split and layers == 2:
        assert obj.tail is None  # the targets span two modules: the general path
    else:
        assert obj.tail is not None
    size = sum(model.get_parameter(n).numel() for n in names)
    gen = DummyGradientGenerator(3, size, hidden=4)
    torch.nn.init.normal_(gen.net[2].weight, std=0.3)
    fast, terms = obj(gen)
    obj.tail = None
    slow, slow_terms = obj(gen)
    assert float(fast.detach()) == pytest.approx(float(slow.detach()), rel=1e-5)
    assert terms["damage"] > 0 and terms == pytest.approx(slow_terms, rel=1e-5)
    # only the generator gets gradients, never the model
    fast.backward()
    assert all(p.grad is None for p in model.parameters())
    assert gen.net[2].weight.grad is not None


def test_frozen_tail_refuses_a_model_that_is_not_a_chain():
    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.b(x) + x  # the output is not b(its input)

    model = Residual()
    assert frozen_tail(model, ["b.weight", "b.bias"], [torch.randn(3, 4)]) is None


def _run(tmp_path, *extra):
    assert simulate([*small_overrides(tmp_path), *BASE, *extra]) == 0
    return max((tmp_path / "runs").glob("default-*"), key=lambda p: p.stat().st_mtime)


def _rows(run_dir, name):
    rows = [json.loads(x) for x in (run_dir / name).read_text().splitlines()]
    drop = ("wall_s", "train-s")
    return [
        {k: v for k, v in r.items() if k not in drop and "forget_generator" not in k} for r in rows
    ]


def test_generator_run_unlearn_and_private_state(tmp_path):
    plain = _run(tmp_path / "plain")
    run_dir = _run(tmp_path / "gen", ON)
    # the generators never touch the model: the same metrics, round by round
    assert _rows(run_dir, "metrics.jsonl") == _rows(plain, "metrics.jsonl")
    clients = [json.loads(x) for x in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert all("forget_generator/forget" in c for c in clients if "error" not in c)
    # ... and stay with the clients after the run (their own devices), one folder each
    kept = sorted(p.name for p in (run_dir / "client_state").iterdir())
    assert kept == [f"client-{k}" for k in range(4)]
    assert not (plain / "client_state").exists()

    assert (
        unlearn([str(run_dir), "--client", "1", "--method", "generator", "generator.steps=40"]) == 0
    )
    result = json.loads((run_dir / "unlearning.json").read_text())
    row = result["models"]["federated-generator-c1"]
    assert row["rounds"] == 1 and row["storage_bytes"] > 0
    assert 0.0 <= row["forgetting_rate"] <= 1.0
    terms = result["details"]["generator"]["clients"]["1"]
    total = lambda t: t["forget"] + 10.0 * max(0.0, t["damage"] - 0.01)  # noqa: E731
    assert total(terms["after_training"]) < total(terms["before"])  # the request's training
    assert terms["dummy_gradient_norm"] > 0
    # the model changed only in the classifier layer, by the submitted step
    final = torch.load(run_dir / "checkpoints" / "federated.pt", weights_only=True)
    new = torch.load(run_dir / "checkpoints" / "federated-generator-c1.pt", weights_only=True)
    changed = sorted(k for k in final if not torch.equal(final[k], new[k]))
    assert changed == ["net.5.bias", "net.5.weight"]
    # the forgotten client's private state (its generator) is gone; the others' stay
    assert result["removed_client_state"] == ["client_state/client-1"]
    left = sorted(p.name for p in (run_dir / "client_state").iterdir())
    assert left == ["client-0", "client-2", "client-3"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["models"]["federated-generator-c1"]["parent"] == "federated@2"
    report = (run_dir / "report.md").read_text()
    assert "## Unlearning" in report and "| federated-generator-c1 |" in report
    # asking again: its generator is gone
    assert unlearn([str(run_dir), "--client", "1", "--method", "generator"]) == 2


def test_generator_needs_the_plugin_and_the_local_engine(tmp_path, capsys):
    run_dir = _run(tmp_path)
    assert unlearn([str(run_dir), "--client", "0", "--method", "generator"]) == 2
    assert "plugins.forget_generator.enabled" in capsys.readouterr().err
    cfg = [*small_overrides(tmp_path / "b"), *BASE, ON, "federation.backend=batched"]
    assert simulate(cfg) == 2
    assert "plugins.forget_generator.enabled" in capsys.readouterr().err


def test_forgetting_deletes_the_clients_dp_accountant_with_its_generator(tmp_path):
    from fedmem.federation.client_state import load_state

    dp = ["privacy.record_level=true", "privacy.noise_multiplier=1.0", "train.rounds=1"]
    run_dir = _run(tmp_path, ON, *dp)
    state = load_state(run_dir / "client_state", 2, 2)
    assert state.dp is not None and sum(state.dp["steps"]) > 0  # the accountant's history
    assert state.plugins["forget_generator"]  # and the generator
    assert unlearn([str(run_dir), "--client", "2", "--method", "generator"]) == 0
    assert not (run_dir / "client_state" / "client-2").exists()
    assert load_state(run_dir / "client_state", 2, 2).dp is None  # nothing left to read
    assert load_state(run_dir / "client_state", 0, 2).dp is not None  # others keep theirs
