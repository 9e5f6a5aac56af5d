"""Flower server strategies by name: thin wrappers over ``flwr.serverapp.strategy``.

``build_strategy(cfg)`` returns the named Flower strategy with fedmem's
:class:`~strategies.sampling.PartitionSampled` mixin in front (reproducible sampling by
partition id, per-client metrics, lost rounds). Strategy-specific arguments come from
``federation.strategy_args`` (e.g. ``{eta: 0.01}`` for fedadam, ``{num_malicious_nodes: 1}``
for krum); the FedProx mu is ``train.proximal_mu``, applied by the clients' training loop.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from flwr.serverapp import strategy as flwr_strategy

from fedmem.config import ExperimentConfig
from fedmem.errors import ConfigError
from fedmem.seeding import derive_seed
from strategies.metrics import weighted_metrics
from strategies.sampling import (
    PartitionSampled,
    RoundReport,
    sample_partitions,
    with_partition_sampling,
)

REGISTRY: dict[str, type] = {
    "fedavg": flwr_strategy.FedAvg,
    "fedprox": flwr_strategy.FedProx,
    "fedadam": flwr_strategy.FedAdam,
    "fedyogi": flwr_strategy.FedYogi,
    "fedadagrad": flwr_strategy.FedAdagrad,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedmedian": flwr_strategy.FedMedian,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "krum": flwr_strategy.Krum,
    "multikrum": flwr_strategy.MultiKrum,
    "bulyan": flwr_strategy.Bulyan,
}

# Sampling is ours (PartitionSampled); the parent samples every node it is shown.
_FIXED = {
    "fraction_train": 1.0,
    "fraction_evaluate": 0.0,
    "min_train_nodes": 1,
    "min_evaluate_nodes": 0,
    "min_available_nodes": 1,
}


def validate(cfg: ExperimentConfig) -> None:
    """Config errors that would otherwise surface mid-run (or make Flower wait forever)."""
    fed = cfg.federation
    if fed.strategy not in REGISTRY:
        raise ConfigError(
            f"federation.strategy: unknown {fed.strategy!r}; allowed: {', '.join(REGISTRY)}"
        )
    cls = REGISTRY[fed.strategy]
    params = inspect.signature(cls.__init__).parameters
    for key in fed.strategy_args:
        if key not in params or key in _FIXED or key in ("self", "proximal_mu"):
            allowed = sorted(
                k
                for k in params
                if k not in _FIXED
                and k
                not in (
                    "self",
                    "proximal_mu",
                    "train_metrics_aggr_fn",
                    "evaluate_metrics_aggr_fn",
                    "arrayrecord_key",
                    "configrecord_key",
                    "weighted_by_key",
                )
            )
            raise ConfigError(
                f"federation.strategy_args.{key}: not an argument of {fed.strategy}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            )
    if cfg.privacy.user_level and fed.strategy not in ("fedavg", "fedprox"):
        raise ConfigError(
            f"privacy.user_level: DP-FedAvg wraps fedavg or fedprox, not {fed.strategy}"
        )
    if fed.strategy == "fedprox" and cfg.train.proximal_mu <= 0:
        raise ConfigError("train.proximal_mu: federation.strategy=fedprox needs a value > 0")
    per_round = len(
        sample_partitions(cfg.seed, 1, fed.num_clients, fed.fraction_train, fed.min_train_clients)
    )
    f = int(fed.strategy_args.get("num_malicious_nodes", 0))
    if fed.strategy in ("krum", "multikrum") and per_round < 2 * f + 3:
        raise ConfigError(
            f"federation.strategy_args.num_malicious_nodes: {fed.strategy} with f={f} needs at "
            f"least {2 * f + 3} clients per round, the config gives {per_round}"
        )
    if fed.strategy == "bulyan" and per_round < 4 * f + 3:
        raise ConfigError(
            f"federation.strategy_args.num_malicious_nodes: bulyan with f={f} needs at least "
            f"{4 * f + 3} clients per round, the config gives {per_round}"
        )


class SeededServerSideDP(flwr_strategy.DifferentialPrivacyServerSideFixedClipping):
    """Flower's DP-FedAvg wrapper (server-side fixed clipping) with reproducible noise and
    client failures handled.

    Flower draws the Gaussian noise from numpy's global RNG; this seeds it from
    ``(seed, "user-dp", round)`` just before aggregating, so the same config gives the same
    noise. Accounting is fedmem's (Opacus RDP at q = 1, see
    :func:`~strategies.sampling.user_dp_sampling`, over the rounds actually released).

    Failures: Flower's wrapper skips a round's aggregation when any reply is an error, and
    scales the noise by the *planned* number of clients. Here the error replies are recorded
    in the round's report and dropped first; the others are clipped, averaged and noised with
    std ``z * C / n_ok`` (the sensitivity of the average over the ``n_ok`` clients that
    replied), so every released round has noise multiplier z exactly. A client's failure does
    not depend on the data, so q stays an upper bound on its inclusion probability. A round
    with fewer than ``federation.min_train_clients`` replies is lost: nothing is released.
    """

    def __init__(self, *args: Any, seed: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fm_seed = seed

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        ok = self.strategy.record_failures(server_round, replies)
        planned = self.num_sampled_clients
        self.num_sampled_clients = max(len(ok), 1)  # Flower's noise std divides by this
        try:
            np.random.seed(derive_seed(self.fm_seed, "user-dp", server_round) % 2**32)
            return super().aggregate_train(server_round, ok)
        finally:
            self.num_sampled_clients = planned


def clients_per_round(cfg: ExperimentConfig) -> int:
    fed = cfg.federation
    return len(
        sample_partitions(cfg.seed, 1, fed.num_clients, fed.fraction_train, fed.min_train_clients)
    )


def build_strategy(cfg: ExperimentConfig) -> tuple[Any, PartitionSampled]:
    """``(strategy to start, its PartitionSampled core)``; call ``core.set_nodes`` first.

    With ``privacy.user_level`` the core (aggregating uniformly, as DP-FedAvg requires) is
    wrapped in :class:`SeededServerSideDP`: client updates are clipped to
    ``privacy.user_clip_norm`` and Gaussian noise with multiplier
    ``privacy.user_noise_multiplier`` is added to their average (McMahan et al. 2018).
    """
    validate(cfg)
    fed = cfg.federation
    cls = with_partition_sampling(REGISTRY[fed.strategy])
    kwargs: dict[str, Any] = {**_FIXED, **fed.strategy_args}
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = cfg.train.proximal_mu
    if cfg.privacy.user_level:
        kwargs["weighted_by_key"] = "unit-weight"
    if "train_metrics_aggr_fn" in inspect.signature(REGISTRY[fed.strategy].__init__).parameters:
        kwargs["train_metrics_aggr_fn"] = weighted_metrics  # Flower's math, faster
    core = cls(**kwargs)
    core.setup_fedmem(
        seed=cfg.seed,
        num_clients=fed.num_clients,
        fraction_train=fed.fraction_train,
        min_train_clients=fed.min_train_clients,
        excluded=tuple(fed.excluded_clients),
    )
    if not cfg.privacy.user_level:
        return core, core
    outer = SeededServerSideDP(
        core,
        noise_multiplier=cfg.privacy.user_noise_multiplier,
        clipping_norm=cfg.privacy.user_clip_norm,
        num_sampled_clients=clients_per_round(cfg),
        seed=cfg.seed,
    )
    return outer, core


__all__ = ["REGISTRY", "RoundReport", "build_strategy", "sample_partitions", "validate"]
