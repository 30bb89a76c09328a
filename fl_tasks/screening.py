"""Update checks before aggregation: rejected updates never reach the strategy.

Structure (names, shapes, dtypes, finite values) is checked per update. The statistical
checks need the whole round: the update-norm bound (absolute, and relative to the round's
median norm) and the cosine outlier test (each update's direction against the mean of the
others). Norms and cosines are over the floating tensors of `update - base`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fl_tasks.aggregation.checks import floating_names
from fl_tasks.aggregation.clip import update_norm

__all__ = ["ScreeningError", "check_structure", "delta_vector", "leave_one_out_cosine", "norm_outliers",
           "update_norm"]

StateDict = Mapping[str, np.ndarray]


class ScreeningError(ValueError):
    """An update fails a check; the message is the recorded reason."""


def check_structure(state: StateDict, base: StateDict) -> None:
    """Same tensor names, shapes and dtypes as the base model, and finite values."""
    if set(state) != set(base):
        raise ScreeningError(f"tensor names differ from the base model: {sorted(set(state) ^ set(base))}")
    for name, value in state.items():
        ref = base[name]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise ScreeningError(f"tensor '{name}' is {value.shape} {value.dtype}, expected {ref.shape} {ref.dtype}")
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise ScreeningError(f"tensor '{name}' has NaN or Inf values")


def delta_vector(state: StateDict, base: StateDict) -> np.ndarray:
    """update - base over the floating tensors, as one float64 vector in a fixed order."""
    names = floating_names(base)
    return np.concatenate([(state[n].astype(np.float64) - base[n]).ravel() for n in names]) if names else np.zeros(0)


def norm_outliers(norms: Mapping[str, float], max_norm: float | None,
                  max_ratio: float | None) -> dict[str, str]:
    """Reasons for the clients whose update norm is above `max_norm`, or above
    `max_ratio` times the median norm of the round."""
    reasons = {}
    median = float(np.median(list(norms.values()))) if norms else 0.0
    for client, norm in norms.items():
        if max_norm is not None and norm > max_norm:
            reasons[client] = f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}"
        elif max_ratio is not None and median > 0 and norm > max_ratio * median:
            reasons[client] = (f"update norm {norm:.4g} exceeds {max_ratio:g} x the round's median norm "
                               f"{median:.4g}")
    return reasons


def leave_one_out_cosine(delta: np.ndarray, total: np.ndarray, count: int) -> float:
    """Cosine between one delta and the mean of the other `count - 1` deltas of the round."""
    others = total - delta
    denominator = np.linalg.norm(delta) * np.linalg.norm(others)
    return float(delta @ others / denominator) if denominator > 0 and count > 1 else 1.0
