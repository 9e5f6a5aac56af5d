"""Devices a config asks for, checked against this machine before any work starts.

Without this check, ``train.device=cuda`` on a machine without a GPU fails mid-run with a
traceback, and ``federation.client_resources.num_gpus`` above what exists leaves Ray unable
to place a single client: Flower prints its error and the process hangs for minutes.
:func:`check_devices` turns both into one :class:`~fedmem.errors.ConfigError` line (exit 2).

With ``federation.ray_address`` set, the clients run on a cluster whose nodes may hold GPUs
this machine lacks, so ``num_gpus`` is not checked against local GPUs (Ray then schedules
against the cluster's own resources). ``train.device`` is always checked: the central run
trains in this process.

:func:`training_threads`: torch threads of the central training loop. On a busy machine
(another run, a sweep) OpenMP threads that spin-wait on a descheduled sibling make small
models many times slower (measured on this 2-core machine under load: an MLP epoch loop
0.39 s with 1 thread, 20.7 s with 2); so ``train.threads=auto`` (default) uses one thread
for the small models (mlp, cnn1d), where a second thread gains little even alone, and
torch's default for the image convnets (cnn, resnet9). ``fedmem/__init__.py`` also asks
OpenMP to sleep rather than spin while waiting (``OMP_WAIT_POLICY=PASSIVE``) unless set.
"""

from __future__ import annotations

import torch

from fedmem.config import ExperimentConfig
from fedmem.errors import ConfigError
from fedmem.models.factory import resolve_device


def local_gpus() -> int:
    """GPUs torch can use in this process (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_devices(cfg: ExperimentConfig) -> None:
    """Raise a one-line ConfigError when the config asks for GPUs this machine does not have."""
    resolve_device(cfg.train.device)  # cuda without a GPU: ConfigError naming train.device
    gpus = local_gpus()
    fed = cfg.federation
    wanted = fed.client_resources.num_gpus
    if not fed.enabled or fed.backend != "ray" or fed.ray_address is not None or wanted == 0:
        return
    if wanted > gpus:
        have = "no GPU" if gpus == 0 else f"{gpus} GPU{'s' if gpus > 1 else ''}"
        fix = "federation.client_resources.num_gpus=0" + (f" (or at most {gpus})" if gpus else "")
        raise ConfigError(
            f"federation.client_resources.num_gpus: {wanted:g} GPUs per client, but torch sees "
            f"{have} here, so Ray could place no client; set {fix}, or join a cluster with "
            "GPUs through federation.ray_address"
        )


SMALL_MODELS = ("mlp", "cnn1d")


def training_threads(cfg: ExperimentConfig, default: int) -> int:
    """Torch threads of the central training loop: ``train.threads`` (``None``: ``default``,
    torch's own; ``auto``: 1 for :data:`SMALL_MODELS`, else ``default``)."""
    threads = cfg.train.threads
    if threads == "auto":
        return 1 if cfg.model.name in SMALL_MODELS else default
    return default if threads is None else int(threads)
