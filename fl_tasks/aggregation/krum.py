"""Krum and Multi-Krum (Blanchard et al. 2017)."""

from __future__ import annotations

import numpy as np

from fl_tasks.aggregation import robust
from fl_tasks.aggregation.base import RobustStrategy
from fl_tasks.aggregation.checks import integer_param


def require_krum_count(name: str, f: int, n: int) -> None:
    if n < 2 * f + 3:
        raise ValueError(f"{name} with f={f} needs at least {2 * f + 3} client updates (n >= 2f + 3), got {n}")


class Krum(RobustStrategy):
    """Krum: the one client model whose n - f - 2 nearest other models are closest (sum of
    squared L2 distances over the floating tensors). Tolerates f Byzantine clients; needs
    n >= 2f + 3.

    UNWEIGHTED: example counts are ignored. Integer tensors: rounded coordinate median over
    all n updates (not the chosen model's own). Equal scores go to the earlier update.
    """

    name = "krum"

    def __init__(self, f: int = 1) -> None:
        self.f = integer_param(self.name, "f", f, 0)

    @property
    def min_updates(self) -> int:
        return 2 * self.f + 3

    def check_count(self, n: int) -> None:
        require_krum_count(self.name, self.f, n)

    def combine(self, matrix: np.ndarray) -> np.ndarray:
        best = robust.krum_select(robust.pairwise_squared_distances(matrix), self.f, 1)
        return matrix[int(best[0])].astype(np.float64)


class MultiKrum(RobustStrategy):
    """Multi-Krum: the plain UNWEIGHTED average of the m client models with the lowest Krum
    scores (default m = n - f; 1 <= m <= n - f). Needs n >= 2f + 3.

    UNWEIGHTED: example counts are ignored, also in the final average. Integer tensors:
    rounded coordinate median over all n updates.
    """

    name = "multi_krum"

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        self.f = integer_param(self.name, "f", f, 0)
        self.m = None if m is None else integer_param(self.name, "m", m, 1)

    @property
    def min_updates(self) -> int:
        return max(2 * self.f + 3, 0 if self.m is None else self.m + self.f)

    def selected_count(self, n: int) -> int:
        return n - self.f if self.m is None else self.m

    def check_count(self, n: int) -> None:
        require_krum_count(self.name, self.f, n)
        if self.selected_count(n) > n - self.f:
            raise ValueError(f"{self.name} with f={self.f}, m={self.m} needs m <= n - f = {n - self.f} "
                             f"(n={n} client updates)")

    def combine(self, matrix: np.ndarray) -> np.ndarray:
        n = matrix.shape[0]
        chosen = robust.krum_select(robust.pairwise_squared_distances(matrix), self.f, self.selected_count(n))
        return robust.row_mean(matrix, np.sort(chosen))
