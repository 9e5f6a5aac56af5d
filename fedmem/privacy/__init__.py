"""Differential privacy: record-level DP-SGD through Opacus (:mod:`fedmem.privacy.dp`).

Importing this package is cheap; Opacus is imported when DP training or accounting starts.
"""

from fedmem.privacy.dp import (
    MALLOC_ENV,
    AccountantHistory,
    DPSession,
    PrivateStep,
    check_delta,
    check_model,
    default_delta,
    dp_ready_model,
    planned_steps,
    resolve_grad_sample_mode,
    resolve_noise_multiplier,
    sample_rate,
    steps_per_epoch,
    tune_malloc,
    validate_record_level,
)

__all__ = [
    "MALLOC_ENV",
    "AccountantHistory",
    "DPSession",
    "PrivateStep",
    "check_delta",
    "check_model",
    "default_delta",
    "dp_ready_model",
    "planned_steps",
    "resolve_grad_sample_mode",
    "resolve_noise_multiplier",
    "sample_rate",
    "steps_per_epoch",
    "tune_malloc",
    "validate_record_level",
]
