"""Per-layer gradient geometry (Maini et al. 2023) and the federated update cosine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmem.analysis.gradients import (
    gradient_geometry,
    layer_groups,
    summed_gradients,
    update_cosine,
)
from fedmem.config import ModelConfig
from fedmem.models import MLP, build_model


def _mlp(seed: int = 0, dropout: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP(6, 8, 2, 3)
    if dropout:
        model.net.insert(2, nn.Dropout(0.5))
    return model


def _data(n: int = 37, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_layer_groups_definition_order():
    assert layer_groups(_mlp()) == {
        "net.1": ["net.1.weight", "net.1.bias"],
        "net.3": ["net.3.weight", "net.3.bias"],
        "net.5": ["net.5.weight", "net.5.bias"],
    }
    torch.manual_seed(0)
    resnet = build_model(ModelConfig(name="resnet9", channels=4), (3, 8, 8), 10)
    groups = layer_groups(resnet)
    assert sum(len(v) for v in groups.values()) == len(list(resnet.parameters()))
    assert next(iter(groups)) == "net.0.0" and list(groups)[-1] == "net.8"
    assert groups["net.0.1"] == ["net.0.1.weight", "net.0.1.bias"]  # BatchNorm affine


def test_layer_groups_root_parameter():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(()))
            self.lin = nn.Linear(2, 2)
            self.frozen = nn.Linear(2, 2).requires_grad_(False)

    assert layer_groups(Scale()) == {"alpha": ["alpha"], "lin": ["lin.weight", "lin.bias"]}


@pytest.mark.parametrize("batch_size", [1, 5, 37, 1000])
def test_summed_gradients_match_brute_force(batch_size):
    model = _mlp(dropout=True)
    model.train()
    x, y = _data()
    # brute force: one autograd call per example, model in eval mode (dropout off)
    model.eval()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad
    model.zero_grad(set_to_none=True)
    model.train()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = summed_gradients(model, x, y, batch_size)
    assert list(got) == list(expected)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-5, rtol=1e-5), n
    # parameters, .grad and mode untouched
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert p.grad is None
    assert model.training


def test_summed_gradients_keep_existing_grad():
    model = _mlp()
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    summed_gradients(model, x, y, 8)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])


def test_geometry_identical_sets():
    model = _mlp()
    x, y = _data(20)
    xx, yy = torch.cat([x, x]), torch.cat([y, y])
    is_noisy = torch.arange(40) >= 20
    geo = gradient_geometry(model, xx, yy, is_noisy, batch_size=7)
    assert list(geo) == ["net.1", "net.3", "net.5"]
    for g in geo.values():
        assert g["cos"] == pytest.approx(1.0, abs=1e-6)
        assert g["norm_clean"] == pytest.approx(g["norm_noisy"], rel=1e-5)
        assert g["num_clean"] == 20 and g["num_noisy"] == 20
    assert geo["net.1"]["num_params"] == 6 * 8 + 8
    assert geo["net.5"]["num_params"] == 8 * 3 + 3
    # norm is |g| / sqrt(#params)
    g = summed_gradients(model, x, y)
    flat = torch.cat([g["net.5.weight"].flatten(), g["net.5.bias"]])
    assert geo["net.5"]["norm_clean"] == pytest.approx(float(flat.norm()) / math.sqrt(27), 1e-5)


def test_geometry_opposite_labels_cosine_minus_one():
    # Linear model at zero: softmax is uniform, dCE/dz = p - onehot(y) = [-.5, .5] for y=0 and
    # [.5, -.5] for y=1 on the same inputs: the two summed gradients are exactly opposite.
    model = nn.Sequential(nn.Linear(4, 2))
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    xx = torch.cat([x, x])
    yy = torch.cat([torch.zeros(10), torch.ones(10)]).long()
    is_noisy = torch.arange(20) >= 10
    geo = gradient_geometry(model, xx, yy, is_noisy)
    assert geo["0"]["cos"] == pytest.approx(-1.0, abs=1e-6)
    assert geo["0"]["norm_clean"] == pytest.approx(geo["0"]["norm_noisy"], rel=1e-6)


def test_geometry_without_noisy_examples():
    model = _mlp()
    x, y = _data(10)
    geo = gradient_geometry(model, x, y, torch.zeros(10, dtype=torch.bool))
    for g in geo.values():
        assert g["cos"] is None and g["norm_noisy"] is None
        assert g["norm_clean"] > 0 and g["num_noisy"] == 0


def test_geometry_is_clean_mask():
    model = _mlp()
    x, y = _data(30)
    is_noisy = torch.arange(30) < 10
    is_clean = torch.arange(30) >= 20  # 10..19 are e.g. outliers: in neither set
    geo = gradient_geometry(model, x, y, is_noisy, is_clean=is_clean)
    ref = gradient_geometry(
        model, torch.cat([x[20:], x[:10]]), torch.cat([y[20:], y[:10]]), torch.arange(20) >= 10
    )
    for k in geo:
        assert geo[k]["cos"] == pytest.approx(ref[k]["cos"], abs=1e-6)
        assert geo[k]["num_clean"] == 10


def _update(seed: int) -> dict[str, torch.Tensor]:
    model = _mlp(seed)
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_update_cosine():
    groups = layer_groups(_mlp())
    u, v = _update(1), _update(2)
    same = update_cosine([u], [u], groups)
    assert all(c == pytest.approx(1.0, abs=1e-9) for c in same.values())
    neg = {n: -t for n, t in u.items()}
    opposite = update_cosine([u], [neg], groups)
    assert all(c == pytest.approx(-1.0, abs=1e-9) for c in opposite.values())
    # the mean of a and -a is zero: undefined cosine -> None
    assert all(c is None for c in update_cosine([u, neg], [v], groups).values())
    assert update_cosine([], [u], groups) == {g: None for g in groups}
    assert update_cosine([u], [], groups) == {g: None for g in groups}
    # mean over clients: mean(u, v) vs mean(u, v) scaled by 3 -> 1
    scaled = [{n: 3 * t for n, t in w.items()} for w in (u, v)]
    assert all(c == pytest.approx(1.0) for c in update_cosine([u, v], scaled, groups).values())
    # the mean update, not the mean cosine: a = [u, v], b = [u + v] -> cos 1
    both = {n: u[n] + v[n] for n in u}
    assert all(c == pytest.approx(1.0) for c in update_cosine([u, v], [both], groups).values())
