"""Flower records of plain Python values, built without a ``typing`` alias per item.

Flower's ``TypedDict.__setitem__`` checks every key and value (``isinstance``), but through
``cast(Callable[[K], None], ...)`` and ``get_args(...)``, which build ``typing`` objects on
every call: at 100 clients a round sets a few thousand items and that was a tenth of a
batched-backend round. :func:`metric_record` puts values Flower would accept without
question (``str`` keys; exactly ``int`` or ``float``, not ``bool``) straight into the record's
dict, and hands anything else to Flower's own constructor, which checks it as always;
:func:`config_record` does the same for a ``ConfigRecord`` (a client's ``context.state``), and
:func:`put_records` for the records of a ``RecordDict`` (a reply, ``context.state``).
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

_PLAIN = (int, float)
_CONFIG_PLAIN = (int, float, str, bytes, bool)


def metric_record(items: dict[str, Any]) -> MetricRecord:
    """``MetricRecord(items)``: the same record; plain scalars skip the per-item typing."""
    if not all(type(k) is str and type(v) in _PLAIN for k, v in items.items()):
        return MetricRecord(items)  # Flower's checks (lists, numpy scalars, bad values)
    record = MetricRecord()
    record.__dict__["_data"].update(items)
    return record


def config_record(items: dict[str, Any]) -> ConfigRecord:
    """``ConfigRecord(items)``: the same record; plain scalars (``int``, ``float``, ``str``,
    ``bytes``, ``bool``) skip the per-item typing, anything else goes through Flower's checks."""
    if not all(type(k) is str and type(v) in _CONFIG_PLAIN for k, v in items.items()):
        return ConfigRecord(items)
    record = ConfigRecord()
    record.__dict__["_data"].update(items)
    return record


_RECORDS = (ArrayRecord, MetricRecord, ConfigRecord)


def put_records(target: RecordDict, items: dict[str, Any]) -> RecordDict:
    """``target[key] = record`` for each item, as Flower's ``RecordDict.__setitem__`` does for
    records of these types (``str`` keys; a key keeps its record type, else Flower's own
    assignment runs and warns); returns ``target``."""
    data = target.__dict__["_data"]
    for key, value in items.items():
        old = data.get(key)
        if (
            type(key) is str
            and type(value) in _RECORDS
            and (old is None or type(old) is type(value))
        ):
            data[key] = value
        else:
            target[key] = value
    return target
