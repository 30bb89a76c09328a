"""FedAvg (McMahan et al. 2017): the example-weighted mean of the client models."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fl_tasks.aggregation.checks import check_update
from fl_tasks.aggregation.mean import StateDict, StreamingWeightedMean, cast_like


class FedAvg:
    """Weighted by example counts: w_i = num_examples_i. Output in the base model's dtypes;
    integer and bool tensors are the weighted mean rounded half to even.

    Streams over the updates, so peak memory is one accumulator plus the update being read.
    The base model is not used by plain FedAvg; it is part of the common signature so that
    server optimisers can take the place of this class.
    """

    name = "fedavg"
    stateful = False
    min_updates = 1

    def aggregate(self, base: Mapping[str, np.ndarray],
                  updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> StateDict:
        acc = StreamingWeightedMean()
        for state, num_examples in updates:
            check_update(state, base)
            acc.add(state, num_examples)
        return cast_like(acc.result(keep_float64=True), base)
