"""DP-SGD planning: Poisson sample rate, steps, delta and the noise multiplier of a trainer.

Pure functions of the config and a trainer's example count; Opacus is imported only to search
the noise multiplier for ``privacy.target_epsilon``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import TYPE_CHECKING

from fedmem.errors import ConfigError

if TYPE_CHECKING:
    from fedmem.config import PrivacyConfig, TrainConfig


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson inclusion probability of Opacus' DPDataLoader over ``n`` examples: 1/ceil(n/B)."""
    if n < 1:
        raise ValueError(f"record-level DP needs at least one local example, got n={n}")
    return 1.0 / math.ceil(n / batch_size)


def steps_per_epoch(q: float) -> int:
    """Steps per epoch at sample rate ``q`` (Opacus: ``1 / q`` batches)."""
    return max(1, round(1.0 / q))


def planned_steps(n: int, train: TrainConfig) -> int:
    """DP steps of a trainer with ``n`` examples that trains in every round of the run.

    A federated client plans for taking part in every round (the worst case for its epsilon);
    with ``federation.fraction_train < 1`` its actual epsilon ends lower.
    """
    return train.rounds * train.local_epochs * steps_per_epoch(sample_rate(n, train.batch_size))


def default_delta(n: int) -> float:
    """delta = 1 / (10 n) for a holder of ``n`` examples."""
    return 1.0 / (10 * n)


def record_delta(privacy: PrivacyConfig, n_local: int, n_dataset: int | None = None) -> float:
    """The record-level delta of a trainer holding ``n_local`` of the run's ``n_dataset``
    training examples.

    ``privacy.delta`` when set; else 1/(10 n) with n from ``privacy.delta_convention``:
    ``dataset`` (default) takes the run's whole training set, so the central run and every
    client report epsilon at one delta and their epsilons can share a table; ``holder`` takes
    the trainer's own examples (a client of n_k examples then reports at 1/(10 n_k), a delta
    N/n_k times larger than the central run's). Either must stay below 1/n_local.
    """
    n = n_local if n_dataset is None or privacy.delta_convention == "holder" else n_dataset
    delta = privacy.delta if privacy.delta is not None else default_delta(max(n, n_local))
    return check_delta(delta, n_local)


def check_delta(delta: float | None, n: int, key: str = "privacy.delta") -> float:
    """The delta to use for a holder of ``n`` examples; ``delta >= 1/n`` is a ConfigError."""
    if delta is None:
        return default_delta(n)
    if not 0 < delta < 1.0 / n:
        raise ConfigError(
            f"{key}: {delta} is too large for a holder of {n} examples; allowed: "
            f"0 < delta < 1/n = {1.0 / n:.3g} (default 1/(10 n) = {default_delta(n):.3g})"
        )
    return float(delta)


@functools.lru_cache(maxsize=256)
def _noise_for_target(
    target_epsilon: float, delta: float, q: float, steps: int, accountant: str
) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            # the search visits extreme noise levels where RDP's best order is the largest alpha
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=q,
                    steps=steps,
                    accountant=accountant,
                )
            )
    except ValueError as e:  # "The privacy budget is too low."
        raise ConfigError(
            f"privacy.target_epsilon: {target_epsilon} cannot be reached in {steps} steps at "
            f"sample rate {q:.3g} and delta {delta:.3g} ({e}); raise it or train fewer steps"
        ) from None


def resolve_noise_multiplier(
    privacy: PrivacyConfig, sample_rate: float, total_steps: int, delta: float
) -> float:
    """``privacy.noise_multiplier``, or the one that spends ``privacy.target_epsilon`` at delta
    after ``total_steps`` steps at ``sample_rate`` (Opacus ``get_noise_multiplier``, its
    accountant ``privacy.accountant``, epsilon within 0.01 below the target).

    ``total_steps`` is the whole run's plan (:func:`planned_steps`): a client plans for taking
    part in every round, the worst case.
    """
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    if privacy.target_epsilon is None:
        raise ConfigError(
            "privacy.noise_multiplier: set exactly one of privacy.noise_multiplier and "
            "privacy.target_epsilon"
        )
    return _noise_for_target(
        float(privacy.target_epsilon),
        float(delta),
        float(sample_rate),
        int(total_steps),
        privacy.accountant,
    )
