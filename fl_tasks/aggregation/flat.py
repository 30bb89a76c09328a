"""Client models as rows of one (n, d) matrix, and back.

Robust strategies compare whole models, so they stack the floating tensors of every update,
flattened in a fixed (sorted) key order, into one (n, d) array in the models' own floating
dtype (float32 models stay float32: the values are held exactly, and every reduction casts
column blocks to float64). Integer and bool tensors (batch-norm counters, masks) carry no
distance; they are kept apart, stacked per tensor, and combined by the rounded coordinate-wise
median.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fl_tasks.aggregation.checks import check_update, floating_names

StateDict = dict[str, np.ndarray]


class Layout:
    """Where each floating tensor of the base model lives in a flat vector."""

    def __init__(self, base: Mapping[str, np.ndarray]) -> None:
        self.base = base
        self.names = floating_names(base)
        self.shapes = {name: np.shape(base[name]) for name in self.names}
        self.slices: dict[str, slice] = {}
        start = 0
        for name in self.names:
            size = int(np.prod(self.shapes[name], dtype=np.int64))
            self.slices[name] = slice(start, start + size)
            start += size
        self.size = start
        dtypes = [np.asarray(base[name]).dtype for name in self.names]
        self.dtype = np.result_type(np.float32, *dtypes) if dtypes else np.dtype(np.float32)
        self.other_names = sorted(set(base) - set(self.names))

    def flatten(self, state: Mapping[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """The floating tensors of `state` as one vector (written into `out` when given)."""
        row = np.empty(self.size, dtype=self.dtype) if out is None else out
        for name in self.names:
            row[self.slices[name]] = np.asarray(state[name]).reshape(-1)
        return row

    def unflatten(self, vector: np.ndarray) -> StateDict:
        """Floating tensors from a flat vector, each in the base model's dtype and shape."""
        return {name: np.asarray(vector[self.slices[name]]).reshape(self.shapes[name])
                .astype(np.asarray(self.base[name]).dtype) for name in self.names}


@dataclass
class Stacked:
    layout: Layout
    matrix: np.ndarray  # (n, d) floating tensors, one row per update
    others: dict[str, np.ndarray]  # name -> (n, *shape) integer / bool tensors

    @property
    def n(self) -> int:
        return self.matrix.shape[0]


def stack_updates(base: Mapping[str, np.ndarray], updates: Iterable[tuple[Mapping[str, np.ndarray], float]],
                  check_count: Callable[[int], None]) -> Stacked:
    """Read every update (checking names and shapes), call `check_count(n)` before any
    maths, then stack. Example counts are ignored: the robust rules are unweighted.

    The updates are held by reference until n is known (the producer must not reuse their
    arrays), then copied row by row into the matrix, each released once copied.
    """
    layout = Layout(base)
    states: list[Mapping[str, np.ndarray] | None] = []
    for state, _num_examples in updates:
        check_update(state, base)
        states.append(state)  # a reference, not a copy: n is not known yet
    if not states:
        raise ValueError("no updates to aggregate")
    check_count(len(states))
    others = {name: np.stack([np.asarray(s[name]) for s in states]) for name in layout.other_names}
    matrix = np.empty((len(states), layout.size), dtype=layout.dtype)
    for i in range(len(states)):
        layout.flatten(states[i], out=matrix[i])
        states[i] = None  # drop our reference once copied, so read-once updates can be freed
    return Stacked(layout, matrix, others)


def rounded_median(stack: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Coordinate-wise median over axis 0, rounded half to even, in `dtype` (never zeroed)."""
    median = np.median(stack.astype(np.float64), axis=0)
    return np.rint(median).astype(dtype)


def assemble(stacked: Stacked, vector: np.ndarray) -> StateDict:
    """The new model: floating tensors from `vector`, the others by rounded median over all
    n updates."""
    out = stacked.layout.unflatten(vector)
    for name, stack in stacked.others.items():
        out[name] = rounded_median(stack, np.asarray(stacked.layout.base[name]).dtype)
    return {name: out[name] for name in stacked.layout.base}
