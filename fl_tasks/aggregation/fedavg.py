"""FedAvg (McMahan et al. 2017): the example-weighted mean of the client models."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fl_tasks.aggregation import Outcome
from fl_tasks.aggregation.checks import check_update
from fl_tasks.aggregation.mean import StateDict, StreamingWeightedMean, cast_like, weight_shares


class FedAvg:
    """Weighted by example counts: w_i = num_examples_i. Output in the base model's dtypes;
    integer and bool tensors are the weighted mean rounded half to even.

    Streams over the updates: float32 tensors keep a float32 running mean (one fused pass per
    client, within a few float32 ulps of the float64 formula; see `StreamingWeightedMean`),
    which becomes the result, so peak memory is one model plus the update being read. The
    base model only gives the output dtypes; it is part of the common signature so that
    server optimisers can take the place of this class.
    """

    name = "fedavg"
    stateful = False
    min_updates = 1
    outcome: Outcome | None = None

    def aggregate(self, base: Mapping[str, np.ndarray],
                  updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> StateDict:
        acc = StreamingWeightedMean()
        weights = []
        for state, num_examples in updates:
            check_update(state, base)
            acc.add(state, num_examples)
            weights.append(num_examples)
        result = cast_like(acc.result(cast=False), base)
        self.outcome = Outcome("example-weighted mean", weight_shares(weights))
        return result
