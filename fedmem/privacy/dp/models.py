"""Models for DP-SGD: check that Opacus can train a model, or make it trainable.

BatchNorm mixes examples within a batch, so per-example gradients do not exist for it:
:func:`dp_ready_model` replaces it with GroupNorm, and every model of a DP experiment is built
through it (:func:`fedmem.models.experiment_model`).
"""

from __future__ import annotations

from torch import nn

from fedmem.errors import ConfigError


def _model_errors(model: nn.Module) -> list[Exception]:
    from opacus.validators import ModuleValidator
    from opacus.validators.errors import IllegalModuleConfigurationError

    errors = ModuleValidator.validate(model, strict=False)
    # eval mode is not a property of the architecture: train_epochs switches to train mode
    return [e for e in errors if not isinstance(e, IllegalModuleConfigurationError)]


def dp_ready_model(model: nn.Module) -> nn.Module:
    """``model`` itself when Opacus can train it, else a copy with BatchNorm -> GroupNorm.

    Opacus' ``ModuleValidator.fix`` replaces each BatchNorm(C) by GroupNorm(gcd(32, C), C)
    (fresh affine weights 1 / 0); other weights are copied. The result depends only on the
    input model, so building every model of a DP experiment as
    ``dp_ready_model(build_model(...))`` (central run, clients, server) gives one architecture
    everywhere. Models without such layers (mlp, cnn1d, cnn) are returned unchanged.
    """
    if not _model_errors(model):
        return model
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(model)


def check_model(model: nn.Module, model_name: str = "model") -> None:
    """Raise ConfigError (``model.name``) when Opacus cannot compute per-example gradients."""
    errors = _model_errors(model)
    if errors:
        what = "; ".join(str(e).strip() for e in errors)[:300].replace("\n", " ")
        raise ConfigError(
            f"model.name: {model_name} cannot be trained with record-level DP "
            f"(privacy.record_level=true): {what}; build it with "
            "fedmem.privacy.dp.dp_ready_model (BatchNorm -> GroupNorm) or use mlp, cnn1d or cnn"
        )
