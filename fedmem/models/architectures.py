"""Model registry: ``build_model(cfg.model, input_shape, num_classes)``.

- ``mlp``: flatten, ``depth`` x (Linear, ReLU) of width ``hidden``, Linear. Any input.
- ``cnn1d``: three strided 1-D convolutions (the MNIST-1D baseline CNN, Greydanus 2020).
- ``cnn``: two conv/pool blocks and a classifier, for (C, H, W) images (28x28, 32x32, 8x8).
- ``resnet9``: the Myrtle.ai / Page (2018) ResNet-9 for CIFAR, with BatchNorm.

``model.dropout`` (mlp, cnn1d, cnn) replaces each hidden ReLU by a
:class:`~fedmem.models.tied_dropout.TiedDropout` (same parameter names as the plain model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedmem.config import ModelConfig
from fedmem.errors import ConfigError

Act = Callable[[int], nn.Module]  # the activation of hidden layer i (0, 1, ...)


def _relu(_layer: int) -> nn.Module:
    return nn.ReLU()


class MLP(nn.Module):
    def __init__(
        self, in_features: int, hidden: int, depth: int, num_classes: int, act: Act = _relu
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for i in range(depth):
            layers += [nn.Linear(width, hidden), act(i)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN1d(nn.Module):
    def __init__(
        self, in_channels: int, length: int, channels: int, num_classes: int, act: Act = _relu
    ):
        super().__init__()
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, stride=2, padding=2),
            act(0),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            act(1),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            act(2),
            nn.Flatten(),
        )
        out_len = length
        for _ in range(3):
            out_len = (out_len + 1) // 2
        self.classifier = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), self.in_channels, -1)
        return self.classifier(self.features(x))


class CNN(nn.Module):
    def __init__(
        self, input_shape: tuple[int, int, int], channels: int, num_classes: int, act: Act = _relu
    ):
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1),
            act(0),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            act(1),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(2 * channels * (h // 4) * (w // 4), 128),
            act(2),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            _conv_bn(in_channels, c),
            _conv_bn(c, 2 * c, pool=True),
            _Residual(2 * c),
            _conv_bn(2 * c, 4 * c, pool=True),
            _conv_bn(4 * c, 8 * c, pool=True),
            _Residual(8 * c),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(8 * c, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _act(cfg: ModelConfig) -> Act:
    """Plain ReLUs, or ReLUs with the configured tied dropout (hidden layer ``i`` is its
    ``layer``)."""
    d = cfg.dropout
    if d.kind == "none":
        return _relu
    from fedmem.models.tied_dropout import TiedDropout

    return lambda layer: TiedDropout(d.kind, d.p_gen, d.p_mem, layer)


def _mlp(cfg: ModelConfig, shape: tuple[int, ...], classes: int) -> nn.Module:
    return MLP(_numel(shape), cfg.hidden, cfg.depth, classes, _act(cfg))


def _cnn1d(cfg: ModelConfig, shape: tuple[int, ...], classes: int) -> nn.Module:
    if len(shape) not in (1, 2):
        raise ConfigError(
            f"model.name=cnn1d needs 1-D inputs (length or channels x length), got {shape}; "
            "use cnn or resnet9 for images"
        )
    in_ch, length = (1, shape[0]) if len(shape) == 1 else shape
    return CNN1d(in_ch, length, cfg.channels, classes, _act(cfg))


def _image(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ConfigError(
            f"model.name={name} needs image inputs (C, H, W), got {shape}; "
            "use mlp or cnn1d for mnist1d"
        )
    return shape  # type: ignore[return-value]


def _cnn(cfg: ModelConfig, shape: tuple[int, ...], classes: int) -> nn.Module:
    c, h, w = _image(shape, "cnn")
    if h < 4 or w < 4:
        raise ConfigError(f"model.name=cnn needs images of at least 4x4, got {h}x{w}")
    return CNN((c, h, w), cfg.channels, classes, _act(cfg))


def _resnet9(cfg: ModelConfig, shape: tuple[int, ...], classes: int) -> nn.Module:
    c, h, w = _image(shape, "resnet9")
    if cfg.dropout.kind != "none":
        raise ConfigError("model.dropout: not available for resnet9; use mlp, cnn1d or cnn")
    if h < 8 or w < 8:
        raise ConfigError(f"model.name=resnet9 needs images of at least 8x8, got {h}x{w}")
    return ResNet9(c, cfg.channels, classes)


REGISTRY: dict[str, Callable[[ModelConfig, tuple[int, ...], int], nn.Module]] = {
    "mlp": _mlp,
    "cnn1d": _cnn1d,
    "cnn": _cnn,
    "resnet9": _resnet9,
}


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A fresh model for inputs of ``input_shape`` (without batch dimension)."""
    try:
        factory = REGISTRY[cfg.name]
    except KeyError:
        raise ConfigError(
            f"model.name: unknown {cfg.name!r}; allowed: {', '.join(REGISTRY)}"
        ) from None
    return factory(cfg, tuple(input_shape), num_classes)
