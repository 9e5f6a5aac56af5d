"""``metric_record`` builds the record Flower's constructor builds, and leaves anything but
plain scalars to Flower's checks."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import MetricRecord

from fedmem.federation.records import metric_record


def test_same_record_as_flowers():
    items = {"num-examples": 40, "train-loss": 0.25, "partition-id": 3, "train-s": 1e-3}
    ours = metric_record(dict(items))
    assert isinstance(ours, MetricRecord) and ours == MetricRecord(items)
    assert list(ours) == list(items) and ours.count_bytes() == MetricRecord(items).count_bytes()
    # lists and numpy scalars go through Flower's constructor (and its checks)
    mixed = {"curve": [0.1, 0.2], "x": np.float64(0.5)}
    assert metric_record(mixed) == MetricRecord(mixed)
    for bad in ({"flag": True}, {"name": "text"}, {3: 1.0}):
        with pytest.raises(TypeError):
            metric_record(bad)


def test_config_record_same_as_flowers():
    from flwr.app import ConfigRecord

    from fedmem.federation.records import config_record

    items = {"round": 3, "rounds-trained": 2, "plugins/elr": True, "name": "x", "lr": 0.1}
    assert config_record(dict(items)) == ConfigRecord(items)
    listed = {"dp/steps": [1, 2], "dp/noise-multiplier": [1.0, 1.0]}
    assert config_record(listed) == ConfigRecord(listed)
    with pytest.raises(TypeError):
        config_record({"bad": object()})


def test_put_records_as_flowers_assignment(caplog):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fedmem.federation.records import put_records

    items = {"arrays": ArrayRecord(), "metrics": MetricRecord({"a": 1}), "c": ConfigRecord()}
    ours = put_records(RecordDict(), dict(items))
    assert ours == RecordDict(items) and list(ours) == list(items)
    assert list(ours.metric_records) == ["metrics"] and list(ours.array_records) == ["arrays"]
    # a key that changes its record type goes through Flower's assignment (and its warning)
    put_records(ours, {"metrics": ConfigRecord({"b": 2})})
    assert isinstance(ours["metrics"], ConfigRecord)
    with pytest.raises(TypeError):
        put_records(RecordDict(), {"x": {"not": "a record"}})
