"""Coordinate-wise robust strategies: median and trimmed mean (Yin et al. 2018), unweighted,
and their example-weighted variants."""

from __future__ import annotations

import numpy as np

from fl_tasks.aggregation import Outcome, robust
from fl_tasks.aggregation.base import RobustStrategy, WeightedRobustStrategy


class Median(RobustStrategy):
    """Coordinate-wise median of the client models (mean of the two middle values for even n).

    UNWEIGHTED: example counts are ignored. Integer tensors: rounded coordinate median.
    """

    name = "median"

    def combine(self, matrix: np.ndarray) -> np.ndarray:
        self.outcome = Outcome(f"coordinate-wise median of {matrix.shape[0]} updates, unweighted: no update has "
                               "a weight", None)
        return robust.coordinate_median(matrix)


class TrimmedMean(RobustStrategy):
    """Coordinate-wise trimmed mean: per coordinate, drop the int(beta * n) smallest and
    int(beta * n) largest values and average the rest (0 <= beta < 0.5).

    UNWEIGHTED: example counts are ignored. Integer tensors: rounded coordinate median.
    Note that beta * n < 1 trims nothing (a plain unweighted mean).
    """

    name = "trimmed_mean"

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def check_count(self, n: int) -> None:
        k = robust.trimmed_count(n, self.beta)
        if n - 2 * k < 1:
            raise ValueError(f"trimmed_mean with beta={self.beta} cuts {k} values from each end of "
                             f"{n} client updates, leaving {n - 2 * k}; it needs n - 2*int(beta*n) >= 1")

    def combine(self, matrix: np.ndarray) -> np.ndarray:
        n = matrix.shape[0]
        k = robust.trimmed_count(n, self.beta)
        self.outcome = Outcome(f"coordinate-wise trimmed mean (beta={self.beta}): per coordinate the {k} lowest and "
                               f"{k} highest of {n} values dropped, the rest averaged unweighted: no update has "
                               "a weight", None)
        return robust.trimmed_mean(matrix, self.beta)


class WeightedMedian(WeightedRobustStrategy):
    """Coordinate-wise WEIGHTED median: per coordinate, the smallest value whose cumulative
    weight (values sorted) reaches half the total; at exactly half, the mean of that value and
    the next. Equal weights give `median` exactly. Weights: the updates' example weights.

    A silo holding more than half the total weight decides every coordinate alone: cap the
    shares (aggregation.max_weight_share, default 0.5) to keep the rule robust. Integer
    tensors: rounded unweighted coordinate median.
    """

    name = "weighted_median"

    def combine(self, matrix: np.ndarray) -> np.ndarray:
        self.outcome = Outcome(f"coordinate-wise example-weighted median of {matrix.shape[0]} updates: every "
                               "coordinate picks its own values, no update has one weight", None)
        return robust.weighted_median(matrix, self.weights)


class WeightedTrimmedMean(WeightedRobustStrategy):
    """Coordinate-wise WEIGHTED trimmed mean (0 <= beta < 0.5): per coordinate, sort the values,
    remove weight beta * W from each end (the boundary value fractionally) and take the
    weighted mean of the remaining (1 - 2 beta) * W. With equal weights and integer beta * n it
    is `trimmed_mean`; beta = 0 is the weighted mean. Any n >= 1 works.

    Integer tensors: rounded unweighted coordinate median.
    """

    name = "weighted_trimmed_mean"

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def combine(self, matrix: np.ndarray) -> np.ndarray:
        self.outcome = Outcome(f"coordinate-wise example-weighted trimmed mean (beta={self.beta}): per coordinate "
                               f"weight {self.beta:g} of the total cut from each end of {matrix.shape[0]} values, "
                               "the rest averaged by weight: no update has one weight", None)
        return robust.weighted_trimmed_mean(matrix, self.weights, self.beta)
