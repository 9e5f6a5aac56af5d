"""Model registry: output shapes, gradient flow and invalid model / input combinations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmem.config import ModelConfig
from fedmem.errors import ConfigError
from fedmem.models import REGISTRY, build_model

CASES = [
    ("mlp", (40,)),
    ("mlp", (1, 8, 8)),
    ("mlp", (1, 28, 28)),
    ("mlp", (3, 32, 32)),
    ("cnn1d", (40,)),
    ("cnn", (1, 8, 8)),
    ("cnn", (1, 28, 28)),
    ("cnn", (3, 32, 32)),
    ("resnet9", (3, 32, 32)),
]


def _model(name: str, shape: tuple[int, ...], num_classes: int = 10, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, channels=kw.pop("channels", 8), hidden=32, **kw)
    return build_model(cfg, shape, num_classes)


def test_registry_covers_config_names():
    from fedmem.config import MODELS

    assert set(REGISTRY) == set(MODELS)
    assert {name for name, _ in CASES} == set(REGISTRY)


@pytest.mark.parametrize(("name", "shape"), CASES)
@pytest.mark.parametrize("num_classes", [10, 3])
def test_output_shape(name, shape, num_classes):
    model = _model(name, shape, num_classes)
    model.eval()
    with torch.no_grad():
        for batch in (1, 5):
            out = model(torch.randn(batch, *shape))
            assert out.shape == (batch, num_classes)
            assert out.dtype == torch.float32
            assert torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_gradients_reach_every_parameter(name, shape):
    model = _model(name, shape)
    model.train()
    params = list(model.parameters())
    assert len(params) > 0
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 10
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads), name
    assert all(g.shape == p.shape for g, p in zip(grads, params, strict=True))
    nonzero = sum(bool(g.abs().sum() > 0) for g in grads)
    # fixed seeds: with these inputs no parameter is dead (every grad is non-zero)
    assert nonzero == len(params), (name, nonzero, len(params))
    # the last layer always gets a gradient
    assert grads[-1].abs().sum() > 0 and grads[-2].abs().sum() > 0


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_one_sgd_step_lowers_loss(name, shape):
    model = _model(name, shape)
    model.eval()  # fixed BatchNorm statistics so both evaluations see the same function
    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(2))
    y = torch.arange(32) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = nn.functional.cross_entropy(model(x), y)
    assert float(after) < float(before.detach())


def test_mlp_width_and_depth():
    model = _model("mlp", (40,), depth=3)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (40, 32),
        (32, 32),
        (32, 32),
        (32, 10),
    ]


def test_channels_scale_parameter_count():
    for name, shape in [("cnn1d", (40,)), ("cnn", (1, 28, 28)), ("resnet9", (3, 32, 32))]:
        small = sum(p.numel() for p in _model(name, shape, channels=4).parameters())
        big = sum(p.numel() for p in _model(name, shape, channels=8).parameters())
        assert big > small, name


def test_models_are_fresh():
    a, b = _model("mlp", (40,)), _model("mlp", (40,))
    assert a is not b
    pa, pb = next(a.parameters()), next(b.parameters())
    assert pa.data_ptr() != pb.data_ptr()


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cnn", (40,)),
        ("cnn1d", (3, 32, 32)),
        ("cnn1d", (1, 8, 8)),
        ("resnet9", (40,)),
        ("resnet9", (1, 4, 4)),
    ],
)
def test_invalid_combinations_raise(name, shape):
    with pytest.raises(ConfigError) as exc:
        _model(name, shape)
    msg = str(exc.value)
    assert msg.startswith(f"model.name={name}"), msg
    assert "model.name" in msg
    assert str(shape) in msg or "x".join(map(str, shape[1:])) in msg, msg
    assert "\n" not in msg
