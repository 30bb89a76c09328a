"""Server-side norm clipping of each client update, before any strategy sees it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from fl_tasks.aggregation.checks import check_update, floating_names
from fl_tasks.aggregation.mean import StateDict
from fl_tasks.aggregation.parameters import positive_param


# Elements per step of the float64 norm: its temporaries stay cache-sized, never a float64
# copy of a whole (possibly 100M-parameter) tensor.
NORM_BLOCK = 1 << 18


def update_norm(state: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """L2 norm of state - base over the floating tensors, in float64, block by block."""
    total = 0.0
    for name in floating_names(base):
        value, ref = np.asarray(state[name]).reshape(-1), np.asarray(base[name]).reshape(-1)
        for start in range(0, value.size, NORM_BLOCK):
            delta = value[start:start + NORM_BLOCK].astype(np.float64) - ref[start:start + NORM_BLOCK]
            total += float(np.dot(delta, delta))
    return math.sqrt(total)


def clip_update(state: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], max_norm: float) -> StateDict:
    """The client model base + (state - base) * min(1, max_norm / ||state - base||).

    Only floating tensors are scaled (integer / bool tensors pass through unchanged). The
    result is in the base model's dtypes, so the bound holds up to their rounding. A model
    within the bound comes back unchanged (same arrays, new dict).
    """
    max_norm = positive_param("clip_update", "max_norm", max_norm)
    check_update(state, base)
    norm = update_norm(state, base)
    if not math.isfinite(norm):
        raise ValueError(f"update has a non-finite norm ({norm}); it cannot be clipped")
    return scale_update(state, base, clip_scale(norm, max_norm))


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor min(1, max_norm / norm) that clipping applies to an update of that norm."""
    return 1.0 if norm <= max_norm else max_norm / norm


def scale_update(state: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], scale: float) -> StateDict:
    """base + (state - base) * scale on the floating tensors, in the base's dtypes (the others
    unchanged); scale 1 gives the same arrays in a new dict. Sharded aggregation applies the
    scale of the whole update (from its norm over every shard) to one shard's slices."""
    out = dict(state)
    if scale == 1.0:
        return out
    for name in floating_names(base):
        ref = np.asarray(base[name])
        delta = np.asarray(state[name], dtype=np.float64) - ref
        delta *= scale
        delta += ref
        out[name] = delta.astype(ref.dtype)
    return out


class StrategyWrapper:
    """A strategy around another (`inner`): takes its name, statefulness and state methods,
    so callers can treat the wrapper as the strategy itself."""

    def __init__(self, inner) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def stateful(self) -> bool:
        return bool(getattr(self.inner, "stateful", False))

    def get_state(self) -> dict[str, np.ndarray]:
        return self.inner.get_state()

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.set_state(state)


class Clipped(StrategyWrapper):
    """Any strategy, fed updates clipped to `clip_norm` one at a time (streaming is kept)."""

    def __init__(self, inner, clip_norm: float) -> None:
        super().__init__(inner)
        self.clip_norm = positive_param(inner.name, "clip_norm", clip_norm)

    @property
    def min_updates(self) -> int:
        return int(getattr(self.inner, "min_updates", 1))

    @property
    def outcome(self):
        inner = self.inner.outcome
        if inner is None:
            return None
        from dataclasses import replace

        return replace(inner, rule=f"{inner.rule}; every update clipped to norm {self.clip_norm:g} first")

    def aggregate(self, base: Mapping[str, np.ndarray],
                  updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> StateDict:
        def clipped() -> Iterator[tuple[StateDict, int]]:
            for state, num_examples in updates:
                yield clip_update(state, base, self.clip_norm), num_examples

        return self.inner.aggregate(base, clipped())
