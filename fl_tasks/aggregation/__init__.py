"""Aggregation strategies behind one entry point: `build(name, **params)`."""

from __future__ import annotations

from typing import Any, Protocol

from fl_tasks.aggregation.fedavg import FedAvg
from fl_tasks.aggregation.names import STRATEGY_NAMES


class Strategy(Protocol):
    name: str

    def aggregate(self, base, updates):  # (state dict, iterable of (state dict, n)) -> state dict
        ...


def build(name: str, **params: Any) -> Strategy:
    """The strategy called `name`; unknown names and parameters fail with the allowed ones."""
    registry = {"fedavg": FedAvg}
    if name not in registry:
        raise ValueError(f"unknown aggregation strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    try:
        return registry[name](**params)
    except TypeError as exc:
        raise ValueError(f"strategy {name!r} does not take parameters {sorted(params)}: {exc}") from None


__all__ = ["STRATEGY_NAMES", "Strategy", "build"]
