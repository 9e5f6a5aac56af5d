"""Every random number in an experiment derives from ``cfg.seed`` through named streams.

``derive_seed(seed, "noise")`` and ``derive_seed(seed, "batches", round, client)`` give
independent, reproducible 63-bit seeds, so adding a new random consumer never shifts the
numbers another one draws.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed for the stream named by ``keys`` under the root ``seed``."""
    blob = repr((int(seed), *keys)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def np_rng(seed: int, *keys: object) -> np.random.Generator:
    """A numpy Generator for the named stream."""
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_gen(seed: int, *keys: object) -> torch.Generator:
    """A CPU torch.Generator for the named stream."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))
