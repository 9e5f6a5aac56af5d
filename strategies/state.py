"""A strategy's server-side state, as checkpoint data (for resuming a run).

Flower's strategies keep optimizer state between rounds on the strategy object: FedOpt
(FedAdam, FedYogi, FedAdagrad) the moments ``m_t`` / ``v_t`` and ``current_arrays``; FedAvgM
its ``momentum_vector`` and ``current_arrays``. :func:`strategy_state` reads those attributes
(numpy dicts and lists, ArrayRecords) into tensors that ``torch.load(weights_only=True)``
accepts, and :func:`load_strategy_state` puts them back, so a resumed run aggregates exactly
as an uninterrupted one. Strategies without such state give ``{}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

STATEFUL = ("current_arrays", "m_t", "v_t", "momentum_vector")


def _encode(v: Any) -> dict[str, Any]:
    if isinstance(v, ArrayRecord):
        return {"kind": "arrays", "value": v.to_torch_state_dict()}
    if isinstance(v, dict):
        return {"kind": "ndict", "value": {k: torch.from_numpy(np.array(a)) for k, a in v.items()}}
    if isinstance(v, list):
        return {"kind": "nlist", "value": [torch.from_numpy(np.array(a)) for a in v]}
    raise TypeError(f"cannot checkpoint strategy attribute of type {type(v).__name__}")


def _decode(d: dict[str, Any]) -> Any:
    kind, value = d["kind"], d["value"]
    if kind == "arrays":
        return ArrayRecord(value)
    if kind == "ndict":
        return {k: t.numpy() for k, t in value.items()}
    if kind == "nlist":
        return [t.numpy() for t in value]
    raise ValueError(f"unknown strategy state kind {kind!r}")


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The stateful attributes of ``strategy`` (and of a wrapped ``strategy.strategy``)."""
    out: dict[str, Any] = {}
    for prefix, obj in (("", strategy), ("inner.", getattr(strategy, "strategy", None))):
        if obj is None:
            continue
        for name in STATEFUL:
            value = getattr(obj, name, None)
            if value is not None:
                out[prefix + name] = _encode(value)
    return out


def load_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`strategy_state`."""
    for key, value in state.items():
        obj = strategy
        if key.startswith("inner."):
            obj, key = strategy.strategy, key[len("inner.") :]
        setattr(obj, key, _decode(value))
