"""The common shape of the robust (whole-round) strategies."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fl_tasks.aggregation import Outcome
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

    def aggregate(self, base: Mapping[str, np.ndarray],
                  updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> StateDict:
        stacked: Stacked = stack_updates(base, updates, self.check_count)
        return assemble(stacked, self.combine(stacked.matrix))
