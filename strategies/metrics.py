"""The strategies' aggregation of the clients' training metrics, faster and to the bit equal.

Flower's default ``train_metrics_aggr_fn`` (``flwr.serverapp.strategy.strategy_utils.
aggregate_metricrecords``) builds its result through a validating ``MetricRecord``, setting
every key once per client reply: at 100 clients with nine metrics each that was a fifth of a
batched-backend round. :func:`weighted_metrics` does the same arithmetic in the same order
(weights ``w_k / sum w``, then ``value * weight`` summed client by client) on a plain dict and
validates the result once; it is handed to the strategies through Flower's own
``train_metrics_aggr_fn`` argument.
"""

from __future__ import annotations

from typing import Any

from flwr.app import MetricRecord, RecordDict


def weighted_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Every metric but the weighting one, averaged with the weighting metric's weights
    (lists elementwise), exactly as Flower's ``aggregate_metricrecords``."""
    metric_sets = [[r for r in rec.values() if isinstance(r, MetricRecord)] for rec in records]
    weights = [ms[0][weighting_metric_name] for ms in metric_sets]
    total = sum(weights)  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    for ms, w in zip(metric_sets, weights, strict=True):
        weight = w / total  # type: ignore[operator]
        for record in ms:
            for key, value in record.items():
                if key == weighting_metric_name:
                    continue
                if key not in out:
                    out[key] = (
                        [v * weight for v in value] if isinstance(value, list) else (value * weight)
                    )
                elif isinstance(value, list):
                    out[key] = [c + v * weight for c, v in zip(out[key], value, strict=True)]
                else:
                    out[key] = out[key] + value * weight
    return MetricRecord(out)
