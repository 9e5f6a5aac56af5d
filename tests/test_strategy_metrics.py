"""fedmem's aggregation of the clients' training metrics equals Flower's, to the bit."""

from __future__ import annotations

import random

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from strategies.metrics import weighted_metrics


def _replies(seed: int) -> list[RecordDict]:
    rng = random.Random(seed)
    out = []
    for _ in range(rng.randint(1, 30)):
        metrics = {
            "num-examples": rng.randint(1, 500),
            "train-loss": rng.random() * 3,
            "steps": rng.randint(0, 40),
            "curve": [rng.random() for _ in range(3)],
        }
        extra = RecordDict({"metrics": MetricRecord(metrics)})
        if rng.random() < 0.3:  # a second metric record in the same reply
            extra["more"] = MetricRecord({"elr/term": rng.random() - 1})
        out.append(extra)
    return out


def test_equals_flowers_aggregation_exactly():
    for seed in range(25):
        replies = _replies(seed)
        for key in ("num-examples", "steps"):
            if key == "steps" and sum(r["metrics"]["steps"] for r in replies) == 0:
                continue
            ours, flowers = weighted_metrics(replies, key), aggregate_metricrecords(replies, key)
            assert dict(ours) == dict(flowers) and list(ours) == list(flowers)
            assert key not in ours


def test_the_strategies_use_it():
    from fedmem.config import load
    from strategies import build_strategy

    for name in ("fedavg", "fedadam", "krum"):
        args = ["federation.strategy_args={num_malicious_nodes: 0}"] if name == "krum" else []
        cfg = load(None, [f"federation.strategy={name}", *args])
        _, core = build_strategy(cfg)
        assert core.train_metrics_aggr_fn is weighted_metrics
