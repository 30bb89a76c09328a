"""Pure maths of weighted averaging over state dicts (name -> numpy array)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

StateDict = dict[str, np.ndarray]


# Elements per step of the scaled add: the float64 temporary stays cache-sized instead of
# costing a second full-size copy of the model.
CHUNK = 1 << 16


def _add_scaled(acc: np.ndarray, value: np.ndarray, weight: float) -> None:
    """acc += weight * value, in float64, chunk by chunk."""
    flat_acc, flat_value = acc.reshape(-1), np.asarray(value).reshape(-1)
    scratch = np.empty(min(CHUNK, flat_acc.size), dtype=np.float64)
    for start in range(0, flat_acc.size, CHUNK):
        stop = min(start + CHUNK, flat_acc.size)
        part = scratch[: stop - start]
        np.multiply(flat_value[start:stop], weight, out=part)
        flat_acc[start:stop] += part


class StreamingWeightedMean:
    """Running sum of w_i * x_i and of w_i, one client at a time.

    Memory is one float64 accumulator per tensor (O(one model)), whatever the number of
    clients. Integer tensors (e.g. batch-norm `num_batches_tracked`) are averaged in float64
    and rounded back to their dtype instead of being truncated or zeroed.
    """

    def __init__(self) -> None:
        self._sums: StateDict = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, state: Mapping[str, np.ndarray], weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if not self._sums:
            for name, value in state.items():
                self._sums[name] = np.zeros(value.shape, dtype=np.float64)
                self._dtypes[name] = value.dtype
                self._shapes[name] = value.shape
        elif set(state) != set(self._sums):
            raise ValueError(f"state keys differ from the first update: {sorted(set(state) ^ set(self._sums))}")
        for name, value in state.items():
            if value.shape != self._shapes[name]:
                raise ValueError(f"tensor '{name}' has shape {value.shape}, expected {self._shapes[name]}")
        for name, value in state.items():
            _add_scaled(self._sums[name], value, float(weight))
        self.total_weight += float(weight)
        self.count += 1

    def result(self, *, keep_float64: bool = False) -> StateDict:
        """The weighted mean. Divides the accumulators in place, so call it once.

        With `keep_float64` every tensor comes back as the unrounded float64 mean (server
        optimisers take their pseudo-gradient from it); otherwise each tensor is cast back to
        its dtype, integer and bool tensors rounded to the nearest value (half to even).
        """
        if self.count == 0:
            raise ValueError("no updates were added")
        out: StateDict = {}
        for name in list(self._sums):
            mean = self._sums.pop(name)
            mean /= self.total_weight
            if keep_float64:
                out[name] = mean
                continue
            dtype = self._dtypes[name]
            if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
                np.rint(mean, out=mean)
            out[name] = mean.astype(dtype)
        return out


def cast_like(mean: StateDict, base: Mapping[str, np.ndarray]) -> StateDict:
    """float64 tensors (popped from `mean`) in the base model's dtypes and key order; integer
    and bool tensors rounded half to even rather than truncated."""
    out: StateDict = {}
    for name, ref in base.items():
        value = mean.pop(name)
        dtype = np.asarray(ref).dtype
        if not np.issubdtype(dtype, np.floating):
            np.rint(value, out=value)
        out[name] = value.astype(dtype)
    return out


def weighted_mean(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> StateDict:
    """sum_i w_i x_i / sum_i w_i, tensor by tensor, streaming over `updates`."""
    acc = StreamingWeightedMean()
    for state, weight in updates:
        acc.add(state, weight)
    return acc.result()
