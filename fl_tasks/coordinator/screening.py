"""Update checks before aggregation: rejected updates never reach the strategy.

Per update: structure (names, shapes, dtypes) and values (finite, within a magnitude bound,
integer buffers moved by a plausible increment, the task's own ranges such as non-negative
variances). Over the round: the update-norm bound (absolute, and relative to the round's
median norm), free riders (an update that barely moved the model), example counts that are
implausible for the silo (against its declared size and its own history), and the cosine
outlier test (each update's direction against the mean of the others). Norms and cosines
are over the floating tensors of `update - base`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import numpy as np

from fl_tasks.aggregation.checks import floating_names
from fl_tasks.aggregation.clip import NORM_BLOCK, update_norm

__all__ = ["ScreeningError", "check_structure", "check_values", "delta_vector", "free_riders", "implausible_counts",
           "leave_one_out_cosine", "norm_outliers", "update_norm"]

StateDict = Mapping[str, np.ndarray]


class ScreeningError(ValueError):
    """An update fails a check; the message is the recorded reason."""


def check_structure(state: StateDict, base: StateDict) -> None:
    """Same tensor names, shapes and dtypes as the base model, and finite values."""
    if set(state) != set(base):
        raise ScreeningError(f"tensor names differ from the base model: {sorted(set(state) ^ set(base))[:10]}")
    for name, value in state.items():
        ref = base[name]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise ScreeningError(f"tensor '{name}' is {value.shape} {value.dtype}, expected {ref.shape} {ref.dtype}")
        if np.issubdtype(value.dtype, np.floating) and not _finite(value):
            raise ScreeningError(f"tensor '{name}' has NaN or Inf values")


def _finite(value: np.ndarray) -> bool:
    """No NaN or Inf, checked block by block (a whole-tensor mask would cost a quarter of it)."""
    flat = value.reshape(-1)
    return all(np.isfinite(flat[start:start + NORM_BLOCK]).all() for start in range(0, flat.size, NORM_BLOCK))


def check_values(state: StateDict, base: StateDict, *, max_abs: float, max_increment: int,
                 ranges: Mapping[str, tuple[float, float]]) -> None:
    """Values a trained model can have, whatever the screening settings.

    Floating values stay within +-max_abs (finite values near 3e38 pass the finiteness test
    and still wreck an average). Integer buffers (batch norm's `num_batches_tracked`) may
    only grow, by at most `max_increment` (the round's batches). `ranges` maps tensor-name
    patterns (fnmatch) to the (low, high) their values must stay in, e.g. variances >= 0.
    """
    for name, value in state.items():
        if np.issubdtype(value.dtype, np.floating):
            # max |x| from the extremes: np.abs would copy the whole tensor.
            peak = max(-float(np.min(value)), float(np.max(value))) if value.size else 0.0
            if peak > max_abs:
                raise ScreeningError(f"tensor '{name}' has a value of magnitude {peak:.3g}, over the bound {max_abs:g}")
        elif np.issubdtype(value.dtype, np.integer):
            step = value.astype(np.int64) - base[name].astype(np.int64) if value.size else np.zeros(0, np.int64)
            if step.size and (step.min() < 0 or step.max() > max_increment):
                raise ScreeningError(f"integer tensor '{name}' moved by {int(step.min())}..{int(step.max())} from the "
                                     f"base; a round allows 0..{max_increment}")
        for pattern, (low, high) in ranges.items():
            if fnmatch.fnmatchcase(name, pattern) and value.size:
                if float(np.min(value)) < low or float(np.max(value)) > high:
                    raise ScreeningError(f"tensor '{name}' has values in {float(np.min(value)):.3g}.."
                                         f"{float(np.max(value)):.3g}, outside the task's range {low:g}..{high:g}")


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


def free_riders(norms: Mapping[str, float], min_ratio: float | None) -> dict[str, str]:
    """Reasons for the clients whose update barely moved the model: a norm below
    `min_ratio` times the round's median (a zero update always), i.e. a silo that sends the
    base back, or noise-level changes, to collect its weight without training."""
    if min_ratio is None or len(norms) < 2:
        return {client: "update is identical to the base model (free rider)" for client, norm in norms.items()
                if norm == 0 and min_ratio is not None}
    median = float(np.median(list(norms.values())))
    return {client: (f"update norm {norm:.4g} is below {min_ratio:g} x the round's median norm {median:.4g} "
                     "(free rider: the update barely changes the model)")
            for client, norm in norms.items() if norm == 0 or norm < min_ratio * median}


def implausible_counts(counts: Mapping[str, int], declared: Mapping[str, int | None],
                       history: Mapping[str, list[int]], max_growth: float | None) -> dict[str, str]:
    """Reasons for the clients whose example count is implausible: above the size declared
    for them in the federation file, or above `max_growth` times the median of their own
    recent accepted counts. A silo's count is its weight in FedAvg, so a silo that inflates
    it captures the average."""
    reasons = {}
    for client, count in counts.items():
        cap = declared.get(client)
        past = history.get(client) or []
        if cap is not None and count > cap:
            reasons[client] = f"num_examples {count} is over the {cap} declared for this client in the federation file"
        elif max_growth is not None and past and count > max_growth * float(np.median(past)):
            reasons[client] = (f"num_examples {count} is over {max_growth:g} x this client's recent median "
                               f"{float(np.median(past)):g}")
    return reasons


def leave_one_out_cosine(delta: np.ndarray, total: np.ndarray, count: int) -> float:
    """Cosine between one delta and the mean of the other `count - 1` deltas of the round.
    A zero delta has no direction: its cosine is 0, never a pass."""
    others = total - delta
    denominator = np.linalg.norm(delta) * np.linalg.norm(others)
    if count < 2:
        return 1.0
    return float(delta @ others / denominator) if denominator > 0 else 0.0
