"""Bulyan (El Mhamdi et al. 2018)."""

from __future__ import annotations

import numpy as np

from fl_tasks.aggregation import Outcome, robust
from fl_tasks.aggregation.base import RobustStrategy
from fl_tasks.aggregation.parameters import bulyan_min_updates


class Bulyan(RobustStrategy):
    """Bulyan over Krum: select theta = n - 2f models by iterated Krum (pick the Krum winner,
    remove it, rescore the rest), then per coordinate average the beta = theta - 2f selected
    values closest to the selected models' median. Needs n >= 4f + 3.

    UNWEIGHTED: example counts are ignored. Integer tensors: rounded coordinate median over
    all n updates. Ties (equal Krum scores, equal distances to the median) go to the earlier
    update / earlier pick.
    """

    name = "bulyan"

    def __init__(self, f: int) -> None:
        self.f = f

    @property
    def min_updates(self) -> int:
        return bulyan_min_updates(self.f)

    def check_count(self, n: int) -> None:
        if n < self.min_updates:
            raise ValueError(f"{self.name} with f={self.f} needs at least {self.min_updates} client updates "
                             f"(n >= 4f + 3), got {n}")

    def combine(self, matrix: np.ndarray) -> np.ndarray:
        vector, selected = robust.bulyan(matrix, self.f)
        self._picked(matrix.shape[0], selected)
        return vector

    def _picked(self, n: int, selected: np.ndarray) -> None:
        self.outcome = Outcome(f"bulyan (f={self.f}): {n - 2 * self.f} updates picked by iterated Krum, then per "
                               f"coordinate the mean of the {n - 4 * self.f} picked values closest to their median: "
                               "no update has a weight", None, tuple(sorted(int(i) for i in selected)))

    def select(self, distances: np.ndarray) -> np.ndarray:
        """Iterated Krum's picks (in the order picked) from the (n, n) squared distances; sets
        `outcome`. Sharded aggregation passes the distances summed over its shards."""
        n = distances.shape[0]
        theta, beta = robust.bulyan_counts(n, self.f)
        if beta < 1:
            raise ValueError(f"bulyan with f={self.f} needs at least {4 * self.f + 1} models, got {n}")
        selected = robust.bulyan_select(distances, self.f, theta)
        self._picked(n, selected)
        return selected

    def combine_selected(self, matrix: np.ndarray, selected: np.ndarray) -> np.ndarray:
        """Bulyan's coordinate step on the picked rows (of all columns, or of one shard's)."""
        return robust.mean_closest_to_median(matrix, robust.bulyan_counts(matrix.shape[0], self.f)[1], selected)
