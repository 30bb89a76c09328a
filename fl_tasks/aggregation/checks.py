"""Checks shared by every strategy: updates against the base model (parameter values:
`parameters`)."""

from __future__ import annotations

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
