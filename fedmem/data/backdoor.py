"""Backdoored clients (issue 15's forgetting target): BadNets-style poisoning (Gu,
Dolan-Gavitt, Garg 2017, "BadNets") of a share of chosen clients' examples, and the triggered
test set that measures the attack success rate."""

from __future__ import annotations

import numpy as np

from fedmem.config import ExperimentConfig
from fedmem.data import corrupt
from fedmem.data.sources import Source
from fedmem.errors import ConfigError
from fedmem.seeding import np_rng


def apply_backdoor(
    cfg: ExperimentConfig,
    parts: list[np.ndarray],
    x: np.ndarray,
    y_obs: np.ndarray,
    taken: np.ndarray,
    src: Source,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poison ``data.backdoor.share`` of each backdoor client's rows (never a mislabeled or an
    outlier row) in place: trigger on the input, label set to the target. Returns the
    poisoned-row mask and the triggered test examples whose label is not the target (the
    attack success rate is the share of them predicted as the target)."""
    bd, n = cfg.data.backdoor, len(y_obs)
    is_backdoor = np.zeros(n, dtype=bool)
    shape = tuple(src.input_shape)
    if not bd.clients:
        return is_backdoor, np.zeros((0, *shape), np.float32), np.zeros(0, np.int64)
    if bd.target >= src.num_classes:
        raise ConfigError(
            f"data.backdoor.target: {bd.target} is not a class; allowed: 0..{src.num_classes - 1}"
        )
    for k in bd.clients:
        rows = parts[k]
        try:
            chosen = corrupt.choose_exact(
                rows[~taken[rows]], bd.share, len(rows), np_rng(cfg.seed, "backdoor", k)
            )
        except ValueError as e:
            raise ConfigError(f"data.backdoor.share: {e} at client {k}; lower it") from None
        is_backdoor[chosen] = True
    idx = np.flatnonzero(is_backdoor)
    try:
        x[idx] = corrupt.add_trigger(x[idx], bd.width, bd.strength)
    except ValueError as e:
        raise ConfigError(f"data.backdoor.width: {e}") from None
    y_obs[idx] = bd.target
    y_test = src.y_test.numpy()
    keep = y_test != bd.target
    x_test = corrupt.add_trigger(src.x_test.numpy()[keep], bd.width, bd.strength)
    return is_backdoor, x_test, y_test[keep].astype(np.int64)
