"""Pure maths of weighted averaging over state dicts (name -> numpy array)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np

StateDict = dict[str, np.ndarray]


# Elements per step of the float64 scaled add: the float64 temporary stays cache-sized instead
# of costing a second full-size copy of the model.
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


_torch = None


def _tensor(value: np.ndarray):
    """A flat float32 torch view of `value` (a copy only if it is not float32 and contiguous)."""
    global _torch
    if _torch is None:
        import torch

        _torch = torch
    flat = np.ascontiguousarray(np.asarray(value).reshape(-1), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only client array: it is only read
        return _torch.from_numpy(flat)


def _lerp(mean: np.ndarray, value: np.ndarray, fraction: float) -> None:
    """mean += fraction * (value - mean), in place, in float32: one fused pass (torch.lerp_)
    that reads the mean and the value and writes the mean, with no temporary."""
    _tensor(mean).lerp_(_tensor(value), fraction)


class StreamingWeightedMean:
    """Weighted mean sum_i w_i x_i / sum_i w_i of state dicts, one client at a time.

    float32 tensors (as the first update sends them) keep a float32 running mean,
    m_k = m_{k-1} + (w_k / W_k) (x_k - m_{k-1}) with W_k = w_1 + ... + w_k, updated in place
    by one fused pass per client (torch.lerp_, on torch's threads): 12 bytes of memory traffic
    per 4-byte parameter, a third of a float64 accumulator's, and the result is the buffer
    itself (no final division or cast). The first update is copied into the running mean, so
    that the producer can let every update go once it is added. Memory: one model, two while
    an update is folded in.
    Rounding: one float32 rounding of the mean per client, scaled down by the later steps; on
    random inputs the error stays within a few float32 ulps of sum_i w_i |x_i| / sum_i w_i
    (about 2.5 ulps rms for 200 clients). One client, or clients that all send the same
    tensor, give that tensor back exactly.

    Every other tensor (float64, integer, bool), and every tensor with `float64=True` (server
    optimisers), keeps a float64 running sum of w_i x_i and is divided at the end, so integer
    tensors (e.g. batch-norm `num_batches_tracked`) are averaged in float64 and rounded back
    to their dtype instead of being truncated or zeroed.
    """

    def __init__(self, *, float64: bool = False) -> None:
        self.float64 = float64
        self._acc: StateDict = {}  # float32 running means, float64 running sums
        self._dtypes: dict[str, np.dtype] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, state: Mapping[str, np.ndarray], weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        first = self.count == 0
        if first:
            for name, value in state.items():
                self._dtypes[name] = np.asarray(value).dtype
                self._shapes[name] = np.shape(value)
        elif set(state) != set(self._shapes):
            raise ValueError(f"state keys differ from the first update: {sorted(set(state) ^ set(self._shapes))}")
        for name, value in state.items():
            if np.shape(value) != self._shapes[name]:
                raise ValueError(f"tensor '{name}' has shape {np.shape(value)}, expected {self._shapes[name]}")
        weight = float(weight)
        total = self.total_weight + weight
        for name, value in state.items():
            if first and self._dtypes[name] == np.float32 and not self.float64:
                self._acc[name] = np.array(value, dtype=np.float32)  # m_1 = x_1, in a new array
            elif first:
                self._acc[name] = np.zeros(self._shapes[name], dtype=np.float64)
                _add_scaled(self._acc[name], value, weight)
            elif self._acc[name].dtype == np.float32:
                _lerp(self._acc[name], value, weight / total)
            else:
                _add_scaled(self._acc[name], value, weight)
        self.total_weight = total
        self.count += 1

    def result(self, *, cast: bool = True) -> StateDict:
        """The weighted means. Hands over (or divides in place) the accumulators: call it once.

        float32 running means come back as they are. The float64 sums are divided by the total
        weight; with `cast` each is cast back to its tensor's dtype, integer and bool tensors
        rounded to the nearest value (half to even); without, they stay unrounded float64
        (server optimisers take their pseudo-gradient from it; FedAvg casts to the base model).
        """
        if self.count == 0:
            raise ValueError("no updates were added")
        out: StateDict = {}
        for name in self._shapes:
            mean = self._acc.pop(name)
            if mean.dtype == np.float32:
                out[name] = mean
                continue
            mean /= self.total_weight
            if not cast:
                out[name] = mean
                continue
            dtype = self._dtypes[name]
            if not np.issubdtype(dtype, np.floating):
                np.rint(mean, out=mean)
            out[name] = mean.astype(dtype, copy=False)
        return out


def cap_shares(weights: list[float], max_share: float | None) -> list[float]:
    """Weights scaled so that no one holds more than `max_share` of their sum, the excess
    redistributed to the others in proportion to their weights (water-filling), with the
    sum kept. When n * max_share <= 1 no cap can hold: equal weights."""
    total = float(sum(weights))
    if max_share is None or total <= 0 or not weights:
        return list(weights)
    if len(weights) * max_share <= 1:
        return [total / len(weights)] * len(weights)
    shares = [w / total for w in weights]
    capped = [False] * len(shares)
    while True:
        over = [i for i, s in enumerate(shares) if not capped[i] and s > max_share + 1e-15]
        if not over:
            return [s * total for s in shares]
        for i in over:
            capped[i] = True
        free = 1.0 - max_share * sum(capped)
        rest = sum(w for w, c in zip(weights, capped) if not c)
        if rest <= 0:  # only zero weights left uncapped: they share what is left equally
            left = capped.count(False)
            return [(max_share if c else free / left) * total for c in capped]
        shares = [max_share if c else w / rest * free for w, c in zip(weights, capped)]


def weight_shares(weights: list[float]) -> tuple[float, ...]:
    """Each weight's share of their sum."""
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


def cast_like(mean: StateDict, base: Mapping[str, np.ndarray]) -> StateDict:
    """Tensors (popped from `mean`) in the base model's dtypes and key order; floating values
    bound for integer and bool tensors are rounded half to even rather than truncated. A
    tensor already in the right dtype is passed on without a copy."""
    out: StateDict = {}
    for name, ref in base.items():
        value = mean.pop(name)
        dtype = np.asarray(ref).dtype
        if not np.issubdtype(dtype, np.floating) and np.issubdtype(value.dtype, np.floating):
            np.rint(value, out=value)
        out[name] = value.astype(dtype, copy=False)
    return out


def weighted_mean(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> StateDict:
    """sum_i w_i x_i / sum_i w_i, tensor by tensor, streaming over `updates`."""
    acc = StreamingWeightedMean()
    for state, weight in updates:
        acc.add(state, weight)
    return acc.result()
