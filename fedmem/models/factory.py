"""The experiment's model as every trainer builds it (central run, clients, server, audit).

:func:`init_model` gives the initial weights both runs start from; :func:`experiment_model`
the architecture (with record-level DP, Opacus-ready); :func:`resolve_device` the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmem.config import ExperimentConfig
from fedmem.errors import ConfigError
from fedmem.models.architectures import build_model
from fedmem.seeding import derive_seed

if TYPE_CHECKING:
    from fedmem.data.table import ExampleTable


def resolve_device(name: str) -> torch.device:
    """The torch device of ``train.device``; ``cuda`` without a GPU is a one-line ConfigError
    (``python -m fedmem.simulate`` refuses it earlier, :func:`fedmem.runs.devices.check_devices`;
    this covers the other entry points, e.g. auditing a GPU run on a CPU machine)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "train.device: cuda asked for, but torch sees no GPU on this machine; "
            "set train.device=cpu (or auto: cuda where there is one)"
        )
    return torch.device(name)


def experiment_model(
    cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """The experiment's architecture, as every trainer builds it (central, clients, server).

    With record-level DP, layers Opacus cannot handle are replaced the same way everywhere
    (:func:`fedmem.privacy.dp.dp_ready_model`, BatchNorm -> GroupNorm).
    """
    model = build_model(cfg.model, input_shape, num_classes)
    if cfg.privacy.record_level:
        from fedmem.privacy.dp import dp_ready_model

        model = dp_ready_model(model)
    return model


def init_model(cfg: ExperimentConfig, table: ExampleTable) -> nn.Module:
    """The initial model of both runs, seeded by ``(seed, "init")``; global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        return experiment_model(cfg, table.input_shape, table.num_classes)
