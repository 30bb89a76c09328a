"""Checks shared by every strategy: parameter values, and updates against the base model."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def check_update(state: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> None:
    """Same tensor names and shapes as the base model (dtypes are cast to the base's)."""
    if set(state) != set(base):
        raise ValueError(f"update keys differ from the base model: {sorted(set(state) ^ set(base))}")
    for name, value in state.items():
        if np.shape(value) != np.shape(base[name]):
            raise ValueError(f"tensor '{name}' has shape {np.shape(value)}, expected {np.shape(base[name])}")


def is_floating(value: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def floating_names(base: Mapping[str, np.ndarray]) -> list[str]:
    """The optimised / distance-bearing tensors, in the fixed (sorted) order used for flattening."""
    return sorted(name for name, value in base.items() if is_floating(value))


def _number(strategy: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{strategy}: {name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{strategy}: {name} must be finite, got {value!r}")
    return float(value)


def integer_param(strategy: str, name: str, value: object, minimum: int) -> int:
    """An integer >= minimum; 2.0 is accepted as 2 (YAML and JSON forms), 2.5 is not."""
    number = _number(strategy, name, value)
    if not number.is_integer() or number < minimum:
        raise ValueError(f"{strategy}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(number)


def positive_param(strategy: str, name: str, value: object) -> float:
    number = _number(strategy, name, value)
    if not number > 0:
        raise ValueError(f"{strategy}: {name} must be > 0, got {value!r}")
    return number


def unit_interval_param(strategy: str, name: str, value: object) -> float:
    """A decay rate: 0 <= value < 1."""
    number = _number(strategy, name, value)
    if not 0 <= number < 1:
        raise ValueError(f"{strategy}: {name} must satisfy 0 <= {name} < 1, got {value!r}")
    return number


def fraction_param(strategy: str, name: str, value: object, upper: float) -> float:
    """0 <= value < upper."""
    number = _number(strategy, name, value)
    if not 0 <= number < upper:
        raise ValueError(f"{strategy}: {name} must satisfy 0 <= {name} < {upper}, got {value!r}")
    return number
