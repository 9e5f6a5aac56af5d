"""Neuron flipping, layer rewinding and layer retraining (Maini et al. 2023):
:mod:`fedmem.analysis.localization`, :mod:`fedmem.analysis.layer_rewinding`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmem.analysis.gradients import layer_groups
from fedmem.analysis.layer_rewinding import retrain_layer, rewind_layer
from fedmem.analysis.localization import (
    flip_units,
    masked_units,
    min_flip_subsets,
    unit_layers,
)
from fedmem.models.architectures import CNN, MLP, CNN1d

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_mlp(seed: int, hidden: int = 3, depth: int = 2, d: int = 5, c: int = 3) -> MLP:
    torch.manual_seed(seed)
    return MLP(d, hidden, depth, c).double().eval()


def _data(seed: int, n: int, shape: tuple[int, ...], c: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(
        0, c, (n,), generator=g
    )


def _loop_flip(model, x, y, ref_x, ref_y, cap, weight):
    """The greedy rule written plainly: one example at a time, one step at a time, units
    zeroed by overwriting the ReLU outputs, attribution = sum(activation * dG/dactivation)."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    out = []
    for xi, yi in zip(x, y, strict=True):
        zeroed: list[int] = []
        while True:
            acts = []

            def hook(mod, _i, o, zeroed=zeroed, acts=acts):
                o = o.clone()
                start = sum(a.shape[1] for a in acts)
                for u in zeroed:
                    if start <= u < start + o.shape[1]:
                        o[:, u - start] = 0
                o.retain_grad()
                acts.append(o)
                return o

            handles = [r.register_forward_hook(hook) for r in relus]
            inputs = torch.cat([xi.unsqueeze(0), ref_x]) if weight else xi.unsqueeze(0)
            logits = model(inputs)
            for h in handles:
                h.remove()
            g = F.cross_entropy(logits[:1], yi.view(1))
            if weight:
                g = g - weight * F.cross_entropy(logits[1:], ref_y)
            g.backward()
            pred = int(logits[0].argmax())
            if pred != int(yi):
                out.append(("flipped" if zeroed else "not_predicted", zeroed))
                break
            if len(zeroed) == cap:
                out.append(("cap", zeroed))
                break
            # every row runs under the mask: the reference rows' part of G counts too
            score = torch.cat(
                [-(a * a.grad).reshape(len(a), a.shape[1], -1).sum((0, 2)) for a in acts]
            )
            score[zeroed] = -torch.inf
            best = int(score.argmax())
            if not score[best] > 0:
                out.append(("no_positive_attribution", zeroed))
                break
            zeroed.append(best)
    return out


@pytest.mark.parametrize(("seed", "hidden", "depth"), [(5, 6, 1), (3, 3, 2)])
@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_greedy_never_beats_exhaustive_and_its_units_flip(seed, hidden, depth, weight):
    """Greedy count >= the exhaustive minimum; every greedy set really flips; no greedy flip
    where no subset flips; not-predicted examples agree. Tiny random MLPs with 6 units."""
    model = _tiny_mlp(seed, hidden, depth)
    x, y = _data(2, 60, (5,))
    y = torch.where(torch.arange(60) % 4 == 0, y, model(x).argmax(1))  # mostly predicted
    ref_x, ref_y = _data(3, 8, (5,))
    res = flip_units(model, x, y, ref_x, ref_y, max_share=1.0, population_weight=weight)
    brute = min_flip_subsets(model, x, y)
    total = sum(u.size for u in res.layers)
    assert total == 6
    flipped = 0
    for i, (status, zeroed, best) in enumerate(zip(res.status, res.zeroed, brute, strict=True)):
        assert (status == "not_predicted") == (best == ())
        if best is None:
            assert status != "flipped"
        if status == "flipped":
            flipped += 1
            assert len(zeroed) >= len(best) >= 1
            mask = torch.ones(1, total, dtype=torch.float64)
            mask[0, zeroed] = 0
            with masked_units(model, res.layers, mask):
                assert int(model(x[i : i + 1]).argmax()) != int(y[i])
    assert flipped > 10


@pytest.mark.parametrize("arch", ["mlp", "cnn1d"])
@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_batched_greedy_equals_plain_loop(arch, weight):
    """Same zeroed units in the same order and the same status, example by example."""
    if arch == "mlp":
        model, shape = _tiny_mlp(4, hidden=5), (5,)
    else:
        torch.manual_seed(2)
        model, shape = CNN1d(1, 12, 3, 3).double().eval(), (12,)
    x, y = _data(6, 17, shape)
    y = torch.where(torch.arange(17) % 5 == 0, y, model(x).argmax(1))
    ref_x, ref_y = _data(7, 6, shape)
    res = flip_units(model, x, y, ref_x, ref_y, max_share=0.5, population_weight=weight, chunk=4)
    cap = round(0.5 * sum(u.size for u in res.layers))
    expected = _loop_flip(model, x, y, ref_x, ref_y, cap, weight)
    assert list(zip(res.status, res.zeroed, strict=True)) == expected
    assert {"flipped", "not_predicted"} <= set(res.status)
    if arch == "cnn1d":  # this random network also stops at the cap
        assert "cap" in res.status


def _constructed(out_weights: list[list[float]]) -> MLP:
    """One hidden layer of 4 units with identity input weights: hidden = relu(x)."""
    model = MLP(4, 4, 1, 3).double()
    with torch.no_grad():
        model.net[1].weight.copy_(torch.eye(4))
        model.net[1].bias.zero_()
        model.net[3].weight.copy_(torch.tensor(out_weights))
        model.net[3].bias.zero_()
    return model.eval()


@pytest.mark.parametrize(
    ("out_weights", "answer"),
    [
        # class 0 rests on unit 0 alone: one unit flips it
        ([[3.0, 0.1, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 0]], (0,)),
        # class 0 rests on units 0 and 1 equally, against 0.5 for class 1: both are needed
        ([[1.0, 1.0, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 0]], (0, 1)),
    ],
)
def test_known_answer(out_weights, answer):
    model = _constructed(out_weights)
    x, y = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64), torch.tensor([0])
    assert min_flip_subsets(model, x, y) == [answer]
    res = flip_units(model, x, y, x[:0], y[:0], max_share=1.0, population_weight=0.0)
    assert res.status == ["flipped"] and tuple(res.zeroed[0]) == answer
    assert res.units == [len(answer)] and res.layer_of(answer[0]) == "net.1"


def test_cap_is_reported_as_not_flipped():
    model = _constructed([[1.0, 1.0, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 0]])
    x, y = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64), torch.tensor([0])
    res = flip_units(model, x, y, x[:0], y[:0], max_share=0.25, population_weight=0.0)
    assert res.status == ["cap"] and res.units == [None] and res.zeroed == [[0]]


@pytest.mark.parametrize("arch", ["mlp", "cnn1d", "cnn"])
def test_masking_zeroes_exactly_the_chosen_units(arch):
    torch.manual_seed(0)
    if arch == "mlp":
        model, x = MLP(7, 8, 2, 3), torch.randn(5, 7)
    elif arch == "cnn1d":
        model, x = CNN1d(1, 16, 8, 3), torch.randn(16, 16)
    else:
        model, x = CNN((1, 8, 8), 2, 3), torch.randn(5, 1, 8, 8)
    model.eval()
    layers = unit_layers(model, x)
    assert {u.layer for u in layers} <= set(layer_groups(model))
    total = sum(u.size for u in layers)
    modules = dict(model.named_modules())

    def run(mask: torch.Tensor) -> dict[str, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}
        with masked_units(model, layers, mask):  # hooks added inside see the masked output
            hs = [
                modules[u.module].register_forward_hook(
                    lambda _m, _i, o, name=u.module: store.__setitem__(name, o)
                )
                for u in layers
            ]
            model(x)
            for h in hs:
                h.remove()
        return store

    plain = run(torch.ones(len(x), total))
    for lay in layers:  # zero units of one layer: earlier layers and the other units untouched
        alive = (plain[lay.module] != 0).reshape(len(x), lay.size, -1).any(2).any(0)
        local = torch.nonzero(alive).flatten()[[0, -1]].tolist()
        mask = torch.ones(len(x), total)
        mask[:, [lay.offset + c for c in local]] = 0
        masked = run(mask)
        for u in layers[: layers.index(lay)]:
            assert torch.equal(plain[u.module], masked[u.module])
        assert bool((masked[lay.module][:, local] == 0).all())
        keep = [c for c in range(lay.size) if c not in local]
        assert torch.equal(masked[lay.module][:, keep], plain[lay.module][:, keep])


def test_rewind_changes_only_the_group():
    torch.manual_seed(0)
    final, earlier = MLP(5, 4, 2, 3).state_dict(), MLP(5, 4, 2, 3).state_dict()
    group = layer_groups(MLP(5, 4, 2, 3))["net.3"]
    out = rewind_layer(final, earlier, group)
    for k in final:
        assert torch.equal(out[k], earlier[k] if k in group else final[k])
        assert not torch.equal(final[k], earlier[k])
    with pytest.raises(KeyError):
        rewind_layer(final, earlier, ["net.9.weight"])


def test_retraining_leaves_frozen_groups_bit_identical(tmp_path):
    from fedmem.config import load
    from fedmem.data.table import cached_table
    from fedmem.models.factory import init_model
    from tests.conftest import small_overrides

    cfg = load(None, [*small_overrides(tmp_path), "data.noise.rate=0.2"])
    table = cached_table(cfg)
    init = init_model(cfg, table).state_dict()
    torch.manual_seed(1)
    final = init_model(cfg, table)
    with torch.no_grad():
        for p in final.parameters():
            p.add_(0.1 * torch.randn_like(p))
    final_state = final.state_dict()
    groups = layer_groups(final)
    rows, model = retrain_layer(cfg, table, final_state, init, groups["net.3"], epochs=2)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert 0.0 <= rows[-1]["noisy_memorized"] <= 1.0
    state = model.state_dict()
    for k in final_state:
        if k in groups["net.3"]:
            assert not torch.equal(state[k], init[k])  # it trained
        else:
            assert torch.equal(state[k], final_state[k])


def test_localization_recipe(tmp_path, monkeypatch):
    """The recipe on a tiny run: every section for both runs, its figures and flips.json."""
    import csv

    import simulations.localization as recipe
    from fedmem.simulate import main
    from tests.conftest import small_overrides

    monkeypatch.setattr(recipe, "EXAMPLES_PER_KIND", 5)
    monkeypatch.setattr(recipe, "REWIND_ROUNDS", (0, 2))
    monkeypatch.setattr(recipe, "RETRAIN_EPOCHS", 1)
    monkeypatch.setattr(recipe, "REPORT_EPOCHS", (0, 1))
    monkeypatch.setattr(recipe, "TIED_KINDS", ("example", "fixed", "client"))
    args = [
        *small_overrides(tmp_path),
        "federation.backend=local",
        "data.noise.rate=0.2",
        "data.outliers.share=0.05",
        "--recipe",
        "localization",
    ]
    assert main(args) == 0
    (out,) = (tmp_path / "runs" / "recipes").glob("localization-*")
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(recipe.COLUMNS)
    groups = ["net.1", "net.3", "net.5"]
    for run in ("central", "federated"):
        flips = [r for r in rows if r["section"] == "flip" and r["run"] == run]
        assert [r["setting"] for r in flips] == ["mislabeled", "clean", "outlier", "canary"]
        assert all(0 <= int(r["examples"]) <= 5 for r in flips)  # a kind may have none
        assert int(flips[0]["examples"]) > 0 and int(flips[1]["examples"]) > 0
        shares = [r for r in rows if r["section"] == "flip-layer" and r["run"] == run]
        assert {r["layer"] for r in shares} == {"net.1", "net.3"}  # the hidden layers
        rewind = [
            (r["setting"], r["layer"]) for r in rows if r["section"] == "rewind" and r["run"] == run
        ]
        assert rewind == [("final", "none")] + [
            (f"to round {k}", g) for k in (0, 2) for g in groups
        ]
        retrain = [
            (r["layer"], r["setting"])
            for r in rows
            if r["section"] == "retrain" and r["run"] == run
        ]
        assert retrain == [(g, f"epoch {e}") for g in groups for e in (0, 1)]
        tied = [r["setting"] for r in rows if r["section"] == "tied" and r["run"] == run]
        assert tied == [
            "example (all)",
            "example (drop)",
            "fixed",
            "client (all)",
            "client (drop)",
        ]
        forget = [
            (r["setting"], r["layer"])
            for r in rows
            if r["section"] == "client-tied" and r["run"] == run
        ]
        assert forget == [
            (s, g)
            for s in ("all units", "client's units off")
            for g in ("forgotten client", "other clients")
        ]
        assert all(0 <= float(r["mia_auc"]) <= 1 for r in rows if r["section"] == "client-tied")
    final = next(r for r in rows if r["section"] == "rewind" and r["layer"] == "none")
    assert final["noisy_memorized"] not in ("", None)
    for name in ("units_needed", "layer_share", "rewinding", "retraining"):
        assert (out / f"{name}.png").is_file()
    assert set(json.loads((out / "flips.json").read_text())) == {"central", "federated"}
