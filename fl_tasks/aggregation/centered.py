"""Centered clipping (Karimireddy, He & Jaggi 2021, "Learning from History for Byzantine Robust
Optimization", ICML): a stateful, example-weighted robust rule (maths in `robust.centered_clipping`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fl_tasks.aggregation import Outcome, robust
from fl_tasks.aggregation.base import WeightedRobustStrategy
from fl_tasks.aggregation.flat import Layout, StateDict, assemble


def center_state(delta: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """The state kept for the next round, 'v/<tensor>' -> the center (a flat delta in the
    layout's order), each in its tensor's shape and dtype, at least float32."""
    return {f"v/{name}": delta[layout.slices[name]].reshape(layout.shapes[name])
            .astype(np.promote_types(np.asarray(layout.base[name]).dtype, np.float32)) for name in layout.names}


def _indices(flags: np.ndarray) -> str:
    return "[" + ", ".join(str(int(i)) for i in np.flatnonzero(flags)) + "]"


NO_CENTER = "from zero (no previous center)"
CENTER_MISMATCH = "from zero (the saved center did not match the model)"
CENTER_NOT_FINITE = "from zero (the saved center was not finite)"
CENTER_SAVED = "from the previous round's delta"


def center_fits(state_shapes: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """A saved center ('v/<tensor>' -> shape) fits a model whose floating tensors have `shapes`."""
    expected = {f"v/{name}": tuple(shape) for name, shape in shapes.items()}
    return set(state_shapes) == set(expected) and all(
        tuple(state_shapes[key]) == shape for key, shape in expected.items())


class CenteredClipping(WeightedRobustStrategy):
    """Centered clipping on the deltas x_i = client_i - base (floating tensors), weights the
    updates' example weights normalised to sum 1 (w_i):

        v_0 = the previous round's aggregated delta (zeros in the first round, or when the saved
              center does not match the model's floating tensors and shapes)
        v_{l+1} = v_l + sum_i w_i (x_i - v_l) min(1, tau / ||x_i - v_l||),   l = 0 .. iterations-1
        result = base + v_L;  v_L is the new state.

    Radius: `tau` > 0 fixes it; `tau` = 0 (default) makes it adaptive, tau_ratio x the
    (unweighted) median over the updates of ||x_i - v_0||, so about half the updates are
    clipped in the first iteration with tau_ratio 1. An update further than tau from the center
    moves it by at most w_i * tau per iteration, whatever its size. Default 3 iterations, as in
    the paper's experiments.

    State: 'v/<tensor>' for each floating tensor (the center, in the tensor's dtype, at least
    float32), kept by the caller between rounds like the server optimisers' moments; {} starts
    from zeros. Outcome: `influence` is each update's effective coefficient e_i in
    v_L = (1 - sum e) v_0 + sum_i e_i x_i (its share of the result; the previous center keeps
    the rest, named in `rule`); `rule` also gives the radius and which updates were clipped.
    After `aggregate`, `radius` is tau as used and `clipped` says, per update, whether it was
    clipped in any iteration. Integer tensors: rounded unweighted coordinate median.
    """

    name = "centered_clipping"
    stateful = True

    def __init__(self, tau: float, tau_ratio: float, iterations: int) -> None:
        self.tau, self.tau_ratio, self.iterations = tau, tau_ratio, iterations
        self._state: dict[str, np.ndarray] = {}
        self.radius: float | None = None
        self.clipped: tuple[bool, ...] | None = None

    # --- state ------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """The center after the last aggregate (or as set), 'v/<tensor>' -> array; {} when fresh."""
        return dict(self._state)

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from a saved center; {} means start from zeros. A center that does not fit
        the next base model (names, shapes) is dropped there for zeros, and `rule` says so."""
        bad = sorted(key for key in state if not key.startswith("v/"))
        if bad:
            raise ValueError(f"{self.name} state has unknown entries {bad}; expected 'v/<tensor>'")
        self._state = {key: np.array(value, copy=True) for key, value in state.items()}

    def _previous(self, layout: Layout) -> tuple[np.ndarray, str]:
        """v_0 as a float64 vector in the layout's order, and where it came from."""
        center = np.zeros(layout.size, dtype=np.float64)
        if not self._state:
            return center, NO_CENTER
        if not center_fits({key: np.shape(value) for key, value in self._state.items()}, layout.shapes):
            return center, CENTER_MISMATCH
        for name in layout.names:
            center[layout.slices[name]] = np.asarray(self._state[f"v/{name}"], dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(center)):
            return np.zeros(layout.size, dtype=np.float64), CENTER_NOT_FINITE
        return center, CENTER_SAVED

    def radius_for(self, first_distances: np.ndarray) -> tuple[float, str]:
        """tau as used, from ||x_i - v_0|| (adaptive) or fixed, and how it was chosen."""
        if self.tau > 0:
            return self.tau, "fixed"
        return (self.tau_ratio * float(np.median(first_distances)),
                f"adaptive: {self.tau_ratio:g} x the median distance to the center")

    def record(self, n: int, origin: str, tau: float, how: str, result: robust.CenteredClip) -> None:
        """Set `radius`, `clipped` and `outcome` from what the rule did."""
        anywhere = result.clipped.any(axis=0)
        self.radius, self.clipped = float(tau), tuple(bool(c) for c in anywhere)
        self.outcome = Outcome(
            f"centered clipping (tau={self.tau:g}, tau_ratio={self.tau_ratio:g}, iterations={self.iterations}) of "
            f"{n} updates, example-weighted, {origin}: radius {tau:.6g} ({how}); clipped in the first iteration "
            f"{_indices(result.clipped[0])}, in any {_indices(anywhere)}; the previous center keeps share "
            f"{result.history_share:.3g}", tuple(float(e) for e in result.influence))

    # --- aggregation ----------------------------------------------------------------------------
    def aggregate(self, base: Mapping[str, np.ndarray],
                  updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> StateDict:
        stacked = self.stack(base, updates)
        layout, matrix = stacked.layout, stacked.matrix
        base_vector = np.empty(layout.size, dtype=np.float64)
        layout.flatten(base, out=base_vector)
        previous, origin = self._previous(layout)
        # The rule commutes with translation: clip the client models around base + v_0 instead
        # of building an (n, d) matrix of deltas.
        center = base_vector + previous
        del previous
        tau, how = self.radius_for(robust.row_distances(matrix, center) if self.tau == 0 else np.zeros(0))
        result = robust.centered_clipping(matrix, self.weights, center, tau, self.iterations)
        delta = result.vector - base_vector
        new_state = center_state(delta, layout)
        del delta
        out = assemble(stacked, result.vector)
        self.record(matrix.shape[0], origin, tau, how, result)
        self._state = new_state  # only once everything succeeded
        return out
