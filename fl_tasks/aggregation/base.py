"""The common shape of the robust (whole-round) strategies."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from fl_tasks.aggregation import Outcome, robust
from fl_tasks.aggregation.flat import StateDict, Stacked, assemble, stack_updates


class RobustStrategy:
    """Reads all updates into one (n, d) matrix, checks n, combines the rows into one vector.

    Unweighted: the example counts are read and ignored. Integer / bool tensors come out as
    the rounded coordinate-wise median over all n updates. Memory: the n models (floating
    tensors in their own dtype) plus O(n * block) temporaries.
    """

    name = "robust"
    stateful = False
    outcome: Outcome | None = None

    @property
    def min_updates(self) -> int:
        """The fewest client updates this rule accepts with its parameters (any n above works)."""
        return 1

    def check_count(self, n: int) -> None:
        """Raise ValueError, naming the numbers, when n updates are too few for this rule."""

    def combine(self, matrix: np.ndarray) -> np.ndarray:
        """The result's floating tensors as one vector; sets `outcome`."""
        raise NotImplementedError

    def stack(self, base: Mapping[str, np.ndarray],
              updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> Stacked:
        """The updates as rows of one matrix, after the count check."""
        return stack_updates(base, updates, self.check_count)

    def aggregate(self, base: Mapping[str, np.ndarray],
                  updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> StateDict:
        stacked: Stacked = self.stack(base, updates)
        return assemble(stacked, self.combine(stacked.matrix))


class WeightedRobustStrategy(RobustStrategy):
    """A RobustStrategy that keeps each update's weight (num_examples x staleness, as capped
    by the caller) in `self.weights`, normalised to sum 1, for `combine` to use.

    The weights are checked (finite, >= 0, not all 0) together with the count, before any
    maths. Integer / bool tensors stay the rounded UNWEIGHTED coordinate median over all n
    updates, as in the other robust rules.
    """

    weights: np.ndarray | None = None

    def stack(self, base: Mapping[str, np.ndarray],
              updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> Stacked:
        weights: list[float] = []

        def tapped() -> Iterator[tuple[Mapping[str, np.ndarray], float]]:
            for state, weight in updates:
                weights.append(weight)
                yield state, weight

        def check(n: int) -> None:
            self.check_count(n)
            self.weights = robust.normalised_weights(weights, n)

        return stack_updates(base, tapped(), check)

    def aggregate(self, base: Mapping[str, np.ndarray],
                  updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> StateDict:
        stacked = self.stack(base, updates)
        return assemble(stacked, self.combine(stacked.matrix))
