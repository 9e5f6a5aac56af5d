"""Strategy registry, deterministic sampling, lost rounds — through the real ServerApp/ClientApp
driven in-process (federation.backend=local), so every strategy runs in seconds."""

from __future__ import annotations

import math

import pytest
import torch

import strategies
from fedmem import config
from fedmem.config import ConfigError
from fedmem.federation.client_app import fails
from fedmem.federation.engine import run_federated
from strategies import sample_partitions
from tests.conftest import REPO, federated_job, small_overrides

STRATEGY_ARGS = {
    "fedprox": ["train.proximal_mu=0.1"],
    "fedadam": ["federation.strategy_args={eta: 0.01, eta_l: 0.01}"],
    "fedyogi": ["federation.strategy_args={eta: 0.01, eta_l: 0.01}"],
    "fedadagrad": ["federation.strategy_args={eta: 0.01, eta_l: 0.01}"],
    "fedavgm": ["federation.strategy_args={server_momentum: 0.5}"],
    "krum": ["federation.strategy_args={num_malicious_nodes: 1}"],
    "multikrum": ["federation.strategy_args={num_malicious_nodes: 1, num_nodes_to_select: 3}"],
}


def _cfg(tmp_path, *extra: str):
    return config.load(
        REPO / "configs" / "default.yaml",
        [
            *small_overrides(tmp_path),
            "federation.num_clients=5",
            "federation.backend=local",
            "train.rounds=2",
            *extra,
        ],
    )


def _run(cfg):
    job, rows, clients = federated_job(cfg)
    run_federated(job)
    return job, rows, clients


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_every_strategy_trains(tmp_path, name):
    cfg = _cfg(tmp_path, f"federation.strategy={name}", *STRATEGY_ARGS.get(name, []))
    job, rows, clients = _run(cfg)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["test_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # the global model learned
    assert sorted((c["round"], c["client"]) for c in clients) == [
        (r, k) for r in (1, 2) for k in range(5)
    ]


def test_fedavg_is_the_example_weighted_mean_of_client_models(tmp_path):
    """One round of FedAvg from the recorded client results, recomputed by hand."""
    from fedmem.models import init_model
    from fedmem.train import keyed_order, train_epochs

    cfg = _cfg(tmp_path, "train.rounds=1")
    job, _, clients = _run(cfg)
    table = job.table
    total = {k: torch.zeros_like(v) for k, v in job.final_state.items()}
    n_all = 0
    for k in range(5):
        model = init_model(cfg, table)
        rows = table.client_rows(k)
        train_epochs(
            model,
            table.x[rows],
            table.y_obs[rows],
            cfg.train,
            keyed_order(cfg.seed, 1, rows, len(table)),
            rows=rows,
        )
        for name, v in model.state_dict().items():
            total[name] += v * len(rows)
        n_all += len(rows)
    for name, v in job.final_state.items():
        torch.testing.assert_close(v, total[name] / n_all, rtol=1e-4, atol=1e-5)
    assert sum(c["num_examples"] for c in clients) == n_all == len(table)


def test_lost_round_keeps_the_model(tmp_path):
    cfg = _cfg(
        tmp_path,
        "train.rounds=3",
        "federation.client_failure_rate=0.5",
        "federation.min_train_clients=4",
    )
    job, rows, _ = _run(cfg)
    for r in rows[1:]:
        failed = sum(fails(cfg, r["round"], k) for k in range(5))
        assert r["clients_failed"] == failed
        assert r["round_lost"] == (5 - failed < 4)
    lost = [r for r in rows[1:] if r["round_lost"]]
    assert lost, "this seed should lose a round"
    for r in lost:
        prev = rows[r["round"] - 1]
        assert r["test_loss"] == prev["test_loss"]  # weights unchanged


def test_partial_participation_is_seeded():
    a = [sample_partitions(0, r, 20, 0.25, 1) for r in range(1, 6)]
    b = [sample_partitions(0, r, 20, 0.25, 1) for r in range(1, 6)]
    c = [sample_partitions(1, r, 20, 0.25, 1) for r in range(1, 6)]
    assert a == b and a != c
    assert all(len(s) == 5 and s == sorted(set(s)) for s in a)
    assert len(set(map(tuple, a))) > 1  # rounds differ
    assert len(sample_partitions(0, 1, 20, 0.05, 3)) == 3  # min clients wins
    assert sample_partitions(0, 1, 7, 1.0, 1) == list(range(7))


def test_client_counter_in_context_state_counts_sampled_rounds(tmp_path):
    cfg = _cfg(tmp_path, "train.rounds=4", "federation.fraction_train=0.4")
    _, _, clients = _run(cfg)
    seen: dict[int, int] = {}
    for c in sorted(clients, key=lambda c: (c["round"], c["client"])):
        seen[c["client"]] = seen.get(c["client"], 0) + 1
        assert c["rounds_trained"] == seen[c["client"]]
    for r in range(1, 5):
        assert sorted(c["client"] for c in clients if c["round"] == r) == sample_partitions(
            cfg.seed, r, 5, 0.4, 1
        )


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["federation.strategy=fedsgd"], "federation.strategy"),
        (["federation.strategy_args={bogus: 1}"], "federation.strategy_args.bogus"),
        (["federation.strategy=fedprox"], "train.proximal_mu"),
        (
            ["federation.strategy=krum", "federation.strategy_args={num_malicious_nodes: 2}"],
            "federation.strategy_args.num_malicious_nodes",
        ),
        (
            ["federation.strategy=bulyan", "federation.strategy_args={num_malicious_nodes: 1}"],
            "federation.strategy_args.num_malicious_nodes",
        ),
    ],
)
def test_invalid_strategy_settings_are_config_errors(tmp_path, overrides, key):
    cfg = _cfg(tmp_path, *overrides)
    with pytest.raises(ConfigError) as exc:
        strategies.validate(cfg)
    assert str(exc.value).startswith(key + ":"), str(exc.value)
