"""Example-tied dropout (Maini et al. 2023, Sec. 5): masks are a fixed function of the example
id (the same on every client, whatever the batch), drop mode switches off exactly the
memorization units, and training only moves the units an example has."""

from __future__ import annotations

import pytest
import torch

from fedmem.config import ModelConfig, TiedDropoutConfig
from fedmem.errors import ConfigError
from fedmem.methods import RoundContext
from fedmem.methods.base import BatchContext
from fedmem.methods.tied_dropout import TiedDropoutPlugin
from fedmem.models.architectures import build_model
from fedmem.models.tied_dropout import TiedDropout, set_mode, tied_modules, unit_uniforms

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(kind="example", p_gen=0.4, p_mem=0.1, hidden=50):
    cfg = ModelConfig(
        hidden=hidden, depth=2, dropout=TiedDropoutConfig(kind=kind, p_gen=p_gen, p_mem=p_mem)
    )
    return build_model(cfg, (40,), 10)


def test_masks_are_a_fixed_function_of_the_example_id():
    a, b = tied_modules(_mlp())[0], tied_modules(_mlp())[0]
    m1 = a.memorization_mask(torch.tensor([5, 9, 7]), 50)
    m2 = b.memorization_mask(torch.tensor([9, 5]), 50)  # another model, another batch
    assert torch.equal(m1[0], m2[1]) and torch.equal(m1[1], m2[0])
    assert not torch.equal(m1[0], m1[1])  # examples differ
    other_layer = tied_modules(_mlp())[1].memorization_mask(torch.tensor([5]), 50)
    assert not torch.equal(other_layer[0], m1[0])  # layers differ


def test_generalization_units_always_on_memorization_units_at_rate_p_mem():
    m = tied_modules(_mlp(p_gen=0.4, p_mem=0.1, hidden=200))[0]
    mask = m.memorization_mask(torch.arange(2000), 200)
    assert mask[:, :80].all()
    share = mask[:, 80:].float().mean().item()
    # 2000 x 120 Bernoulli(0.1) draws: sd 0.0006
    assert share == pytest.approx(0.1, abs=0.004)
    u = unit_uniforms(0, 0, torch.arange(1000), 100)
    assert u.min() >= 0.0 and u.max() < 1.0 and float(u.mean()) == pytest.approx(0.5, abs=0.01)


def test_drop_mode_switches_off_exactly_the_memorization_units():
    m = TiedDropout("example", p_gen=0.4, p_mem=0.1, layer=0).eval()
    x = torch.rand(3, 10) + 0.1  # positive: the ReLU passes it
    out = m(x)
    assert (out[:, 4:] == 0).all()
    assert torch.allclose(out[:, :4], x[:, :4] * (0.4 + 0.1) / 0.4)
    set_mode(m, "all")
    out = m(x)
    assert torch.allclose(out[:, :4], x[:, :4]) and torch.allclose(out[:, 4:], 0.1 * x[:, 4:])
    # all units but one client's: exactly that key's memorization units are off
    set_mode(m, "all", drop_keys=torch.tensor([3]))
    held = m.memorization_mask(torch.tensor([3]), 10)[0]
    out = m(x)
    assert (out[:, 4:][:, held[4:]] == 0).all()
    assert torch.allclose(out[:, 4:][:, ~held[4:]], 0.1 * x[:, 4:][:, ~held[4:]])


def test_training_moves_only_the_units_an_example_has():
    from fedmem.config import TrainConfig
    from fedmem.train import keyed_order, train_epochs

    torch.manual_seed(0)
    model = _mlp(hidden=20)
    before = model.net[1].weight.detach().clone()
    rows = torch.tensor([17])
    ctx = RoundContext("central", 1, None, rows, 100)
    train_epochs(
        model,
        torch.randn(1, 40),
        torch.tensor([3]),
        TrainConfig(batch_size=1, momentum=0.0),
        keyed_order(0, 1, rows, 100),
        rows=rows,
        plugins=[TiedDropoutPlugin("example")],
        context=ctx,
    )
    moved = (model.net[1].weight.detach() != before).any(1)
    on = tied_modules(model)[0].memorization_mask(rows, 20)[0]
    assert not (moved & ~on).any()  # units the example does not have never move
    assert (moved & on)[8:].any()  # some of its memorization units do (8 = p_gen * 20)
    assert tied_modules(model)[0].keys is None  # cleared after the step


def test_every_client_derives_the_central_keys():
    rows = torch.tensor([3, 8, 11])
    central = BatchContext(RoundContext("central", 1, None, rows, 20), 0, 0, rows)
    client = BatchContext(RoundContext("federated", 1, 2, rows, 20), 0, 0, rows)
    example = TiedDropoutPlugin("example")
    assert torch.equal(example.keys(central), example.keys(client))
    by_client = TiedDropoutPlugin("client", row_client=torch.arange(20) % 4)
    assert by_client.keys(central).tolist() == [3, 0, 3]
    assert by_client.keys(client).tolist() == [2, 2, 2]


def test_training_without_keys_is_an_error_and_resnet9_is_refused():
    model = _mlp().train()
    with pytest.raises(RuntimeError, match="needs the batch's 2 example keys"):
        model(torch.randn(2, 40))
    cfg = ModelConfig(name="resnet9", dropout=TiedDropoutConfig(kind="example"))
    with pytest.raises(ConfigError, match="model.dropout"):
        build_model(cfg, (3, 32, 32), 10)


def test_baselines_standard_and_fixed():
    std = TiedDropout("standard", 0.4, 0.1, layer=0)
    std.keys, std.step = torch.arange(500), 1
    x = torch.ones(500, 100)
    out = std(x)
    keep = 0.4 + 0.1 * 0.6
    assert float((out > 0).float().mean()) == pytest.approx(keep, abs=0.01)
    assert torch.allclose(out[out > 0], torch.tensor(1 / keep))
    std.step = 2
    assert not torch.equal(std(x), out)  # a new mask every step
    assert torch.equal(std.eval()(x), x)  # identity at evaluation
    fixed = TiedDropout("fixed", 0.4, 0.1, layer=0)
    a, b = fixed.train()(x), fixed.eval()(x)
    assert torch.equal(a, b) and torch.equal(a[0], a[1])  # one sparse network for all
    assert (a[:, :40] == 1).all() and 0.0 < float(a[:, 40:].mean()) < 0.2


def test_state_dicts_match_the_plain_model():
    plain = build_model(ModelConfig(hidden=50, depth=2), (40,), 10)
    assert list(_mlp().state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("kind", ["example", "client"])
def test_central_and_federated_runs_train_with_tied_dropout(tmp_path, kind):
    import json

    from fedmem.simulate import main
    from tests.conftest import small_overrides

    extra = [f"model.dropout.kind={kind}", "federation.backend=local", "train.rounds=2"]
    extra += ["privacy.record_level=true", "privacy.noise_multiplier=0.5"] * (kind == "client")
    assert main([*small_overrides(tmp_path), *extra]) == 0
    (run_dir,) = (tmp_path / "runs").glob("default-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    for run in ("central", "federated"):
        assert 0.1 < summary["runs"][run]["test_acc"] <= 1.0
        assert "tied_dropout" in summary["models"][run]["plugins"]


def test_mode_rows_and_client_forgetting_on_a_trained_client_tied_model(tmp_path):
    from fedmem import config
    from fedmem.data.table import cached_table
    from fedmem.methods.tied_dropout_eval import client_forgetting, mode_rows
    from fedmem.models.factory import init_model
    from fedmem.train import keyed_order, train_epochs
    from tests.conftest import REPO, small_overrides

    cfg = config.load(
        REPO / "configs" / "default.yaml", [*small_overrides(tmp_path), "model.dropout.kind=client"]
    )
    table = cached_table(cfg)
    model = init_model(cfg, table)
    plugin = TiedDropoutPlugin.from_config(cfg, "central")
    ctx = RoundContext("central", 1, None, table.ids, len(table))
    order = keyed_order(0, 1, table.ids, len(table))
    train_epochs(
        model, table.x, table.y_obs, cfg.train, order, rows=table.ids, plugins=[plugin], context=ctx
    )
    rows = mode_rows(model, table)
    assert [r["mode"] for r in rows] == ["all", "drop"]
    assert rows[0]["test_acc"] != rows[1]["test_acc"]
    forget = client_forgetting(model, table, client=1)
    assert [(r["state"], r["group"]) for r in forget] == [
        (s, g)
        for s in ("all units", "client's units off")
        for g in ("forgotten client", "other clients")
    ]
    assert all(0.0 <= r["mia_auc"] <= 1.0 and 0.0 <= r["train_acc"] <= 1.0 for r in forget)
    # switching off client 1's units changes its losses
    assert forget[0]["mia_auc"] != forget[2]["mia_auc"]
    assert tied_modules(model)[0].mode == "drop" and tied_modules(model)[0].drop_keys is None
