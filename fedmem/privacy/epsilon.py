"""How epsilon is written in results: a number, or "inf" without DP (a leaf module)."""

from __future__ import annotations

import math

INF = "inf"  # how an infinite epsilon (no DP, or zero noise) is written in JSON results


def json_epsilon(eps: float) -> float | str:
    return eps if math.isfinite(eps) else INF


def privacy_fields(history: object | None, delta: float | None, accountant: str) -> dict:
    """Row fields of a record-level DP trainer: its composed epsilon so far ("inf" without
    DP; never 0), the delta it is stated at, and its DP steps."""
    if history is None:
        return {"epsilon": INF}
    if delta is None:  # nothing trained yet
        return {"epsilon": 0.0, "dp_steps": 0}
    eps = history.epsilon(delta, accountant)  # type: ignore[attr-defined]
    steps = history.steps  # type: ignore[attr-defined]
    return {"epsilon": json_epsilon(eps), "delta": float(delta), "dp_steps": steps}
