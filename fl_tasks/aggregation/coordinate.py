"""Coordinate-wise robust strategies: median and trimmed mean (Yin et al. 2018)."""

from __future__ import annotations

import numpy as np

from fl_tasks.aggregation import Outcome, robust
from fl_tasks.aggregation.base import RobustStrategy
from fl_tasks.aggregation.checks import fraction_param


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

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = fraction_param(self.name, "beta", beta, 0.5)

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
