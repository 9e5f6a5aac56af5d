"""Validation of a record-level DP experiment before any training starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from fedmem.errors import ConfigError
from fedmem.privacy.dp.accounting import ACCOUNTANTS, _make_accountant
from fedmem.privacy.dp.models import check_model
from fedmem.privacy.dp.planning import (
    planned_steps,
    record_delta,
    resolve_noise_multiplier,
    sample_rate,
)
from fedmem.privacy.dp.session import resolve_grad_sample_mode

if TYPE_CHECKING:
    from fedmem.config import ExperimentConfig


def validate_record_level(
    cfg: ExperimentConfig,
    holder_sizes: Sequence[int],
    model: nn.Module | None = None,
    dataset_size: int | None = None,
) -> None:
    """Check a record-level DP experiment before training; raise a one-line ConfigError.

    ``holder_sizes``: the example counts of every trainer (central: the table; federated: each
    client); ``dataset_size``: the run's training examples (the n of the default delta under
    ``privacy.delta_convention=dataset``). ``model``: the model as it will be trained (after
    :func:`dp_ready_model`).
    Checks delta against each holder, the grad_sample_mode and accountant names, that Opacus
    can train the model, and that ``target_epsilon`` is reachable for every holder.
    """
    privacy = cfg.privacy
    if not privacy.record_level:
        return
    resolve_grad_sample_mode(privacy.grad_sample_mode, model)
    if privacy.accountant not in ACCOUNTANTS:
        _make_accountant(privacy.accountant)
    if model is not None:
        check_model(model, cfg.model.name)
    for n in sorted(set(int(s) for s in holder_sizes)):
        if n < 1:
            raise ConfigError(f"privacy.record_level: a trainer holds {n} examples; needs >= 1")
        delta = record_delta(privacy, n, dataset_size)
        q = sample_rate(n, cfg.train.batch_size)
        resolve_noise_multiplier(privacy, q, planned_steps(n, cfg.train), delta)
