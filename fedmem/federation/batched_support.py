"""What ``federation.backend=batched`` supports, checked when the config is built.

The batched backend (:mod:`fedmem.federation.batched_grid`) trains all clients of a round at
once with plain SGD / momentum / Adam on the cross-entropy, plus FedProx's proximal term, and
lets the FedAvg family of strategies aggregate. Anything else is refused with a one-line
:class:`~fedmem.errors.ConfigError` naming the setting, never run another way silently.

This module imports nothing heavy: :mod:`fedmem.config` calls :func:`unsupported` from its
cross-section validator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedmem.config import ExperimentConfig

STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
MODELS = ("mlp", "cnn1d", "cnn")  # no BatchNorm (resnet9): its statistics are not stacked
_USE_LOCAL = "or set federation.backend=local"


def unsupported(cfg: ExperimentConfig) -> tuple[str, str] | None:
    """``(dotted key, message)`` of the first setting the batched backend cannot run, or None."""
    fed = cfg.federation
    if fed.strategy not in STRATEGIES:
        return (
            "federation.strategy",
            f"{fed.strategy} is not supported by federation.backend=batched; use one of "
            f"{', '.join(STRATEGIES)} {_USE_LOCAL}",
        )
    if cfg.privacy.record_level:
        return (
            "privacy.record_level",
            f"record-level DP-SGD is not supported by federation.backend=batched; set "
            f"privacy.record_level=false {_USE_LOCAL}",
        )
    if cfg.model.name not in MODELS:
        return (
            "model.name",
            f"{cfg.model.name} (BatchNorm) is not supported by federation.backend=batched; use "
            f"one of {', '.join(MODELS)} {_USE_LOCAL}",
        )
    if cfg.model.dropout.kind != "none":
        return (
            "model.dropout.kind",
            f"{cfg.model.dropout.kind} dropout is not supported by federation.backend=batched; "
            f"set model.dropout.kind=none {_USE_LOCAL}",
        )
    elr = cfg.plugins.elr
    if elr.enabled and elr.runs in ("both", "federated"):
        return (
            "plugins.elr.enabled",
            "ELR is not supported by federation.backend=batched (clients train on the "
            f"cross-entropy and FedProx's term only); set plugins.elr.runs=central {_USE_LOCAL}",
        )
    if cfg.plugins.forget_generator.enabled:
        return (
            "plugins.forget_generator.enabled",
            "per-client generators are not supported by federation.backend=batched (it runs no "
            f"plug-in hooks); set plugins.forget_generator.enabled=false {_USE_LOCAL}",
        )
    if cfg.plugins.external:
        return (
            "plugins.external",
            "training plug-ins are not supported by federation.backend=batched (clients train "
            f"on the cross-entropy and FedProx's term only); remove them {_USE_LOCAL}",
        )
    return None
