"""Krum and Multi-Krum (Blanchard et al. 2017), and Multi-Krum with an example-weighted average."""

from __future__ import annotations

import numpy as np

from fl_tasks.aggregation import Outcome, robust
from fl_tasks.aggregation.base import RobustStrategy, WeightedRobustStrategy
from fl_tasks.aggregation.parameters import krum_min_updates, multi_krum_min_updates


def require_krum_count(name: str, f: int, n: int) -> None:
    if n < krum_min_updates(f):
        raise ValueError(f"{name} with f={f} needs at least {krum_min_updates(f)} client updates (n >= 2f + 3), "
                         f"got {n}")


def selection_outcome(rule: str, distances: np.ndarray, f: int, chosen: np.ndarray) -> Outcome:
    """The picked updates share the result equally; the others have no influence."""
    picked = sorted(int(i) for i in chosen)
    n = distances.shape[0]
    return Outcome(rule, tuple(1.0 / len(picked) if i in picked else 0.0 for i in range(n)), tuple(picked),
                   tuple(float(s) for s in robust.krum_scores(distances, f)))


class Krum(RobustStrategy):
    """Krum: the one client model whose n - f - 2 nearest other models are closest (sum of
    squared L2 distances over the floating tensors). Tolerates f Byzantine clients; needs
    n >= 2f + 3.

    UNWEIGHTED: example counts are ignored. Integer tensors: rounded coordinate median over
    all n updates (not the chosen model's own). Equal scores go to the earlier update.
    """

    name = "krum"

    def __init__(self, f: int) -> None:
        self.f = f

    @property
    def min_updates(self) -> int:
        return krum_min_updates(self.f)

    def check_count(self, n: int) -> None:
        require_krum_count(self.name, self.f, n)

    def combine(self, matrix: np.ndarray) -> np.ndarray:
        return self.combine_selected(matrix, self.select(robust.pairwise_squared_distances(matrix)))

    def select(self, distances: np.ndarray) -> np.ndarray:
        """The picked rows from the (n, n) squared distances (sets `outcome`); sharded
        aggregation passes the distances summed over its shards."""
        best = robust.krum_select(distances, self.f, 1)
        self.outcome = selection_outcome(f"krum (f={self.f}): the one update with the lowest score",
                                         distances, self.f, best)
        return best

    def combine_selected(self, matrix: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        """The result vector from the rows `select` picked (of all n rows, or of one shard's columns)."""
        return matrix[int(chosen[0])].astype(np.float64)


class MultiKrum(RobustStrategy):
    """Multi-Krum: the plain UNWEIGHTED average of the m client models with the lowest Krum
    scores (default m = n - f; 1 <= m <= n - f). Needs n >= 2f + 3.

    UNWEIGHTED: example counts are ignored, also in the final average. Integer tensors:
    rounded coordinate median over all n updates.
    """

    name = "multi_krum"

    def __init__(self, f: int, m: int | None) -> None:
        self.f, self.m = f, m

    @property
    def min_updates(self) -> int:
        return multi_krum_min_updates(self.f, self.m)

    def selected_count(self, n: int) -> int:
        return n - self.f if self.m is None else self.m

    def check_count(self, n: int) -> None:
        require_krum_count(self.name, self.f, n)
        if self.selected_count(n) > n - self.f:
            raise ValueError(f"{self.name} with f={self.f}, m={self.m} needs m <= n - f = {n - self.f} "
                             f"(n={n} client updates)")

    def combine(self, matrix: np.ndarray) -> np.ndarray:
        return self.combine_selected(matrix, self.select(robust.pairwise_squared_distances(matrix)))

    def select(self, distances: np.ndarray) -> np.ndarray:
        m = self.selected_count(distances.shape[0])
        chosen = robust.krum_select(distances, self.f, m)
        self.outcome = selection_outcome(f"multi_krum (f={self.f}, m={m}): unweighted mean of the {m} updates "
                                         "with the lowest scores", distances, self.f, chosen)
        return chosen

    def combine_selected(self, matrix: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        return robust.row_mean(matrix, np.sort(chosen))


class WeightedMultiKrum(WeightedRobustStrategy, MultiKrum):
    """Multi-Krum's selection (the m lowest UNWEIGHTED Krum scores; default m = n - f, needs
    n >= 2f + 3), then the EXAMPLE-WEIGHTED average of the m selected models, as Flower's Krum
    strategy averages its best results by num_examples. Influence: the selected updates'
    normalised weights, 0 for the others.

    Integer tensors: rounded unweighted coordinate median over all n updates.
    """

    name = "weighted_multi_krum"

    def select(self, distances: np.ndarray) -> np.ndarray:
        n = distances.shape[0]
        m = self.selected_count(n)
        chosen = np.sort(robust.krum_select(distances, self.f, m))
        picked = self.weights[chosen]
        if not picked.sum() > 0:
            raise ValueError(f"{self.name}: the {m} selected updates {chosen.tolist()} all have weight 0")
        shares = np.zeros(n)
        shares[chosen] = picked / picked.sum()
        self.outcome = Outcome(f"weighted_multi_krum (f={self.f}, m={m}): example-weighted mean of the {m} updates "
                               "with the lowest scores", tuple(float(s) for s in shares),
                               tuple(int(i) for i in chosen),
                               tuple(float(s) for s in robust.krum_scores(distances, self.f)))
        return chosen

    def combine_selected(self, matrix: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        return robust.weighted_row_mean(matrix, chosen, self.weights[chosen])
