"""FedAvg (McMahan et al. 2017): the example-weighted mean of the client models."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fl_tasks.aggregation.mean import StateDict, StreamingWeightedMean


class FedAvg:
    """Weighted by example counts: w_i = num_examples_i.

    Streams over the updates, so peak memory is one accumulator plus the update being read.
    The base model is not used by plain FedAvg; it is part of the common signature so that
    server optimisers can take the place of this class.
    """

    name = "fedavg"

    def aggregate(self, base: Mapping[str, np.ndarray],
                  updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> StateDict:
        acc = StreamingWeightedMean()
        for state, num_examples in updates:
            if set(state) != set(base):
                raise ValueError(f"update keys differ from the base model: {sorted(set(state) ^ set(base))}")
            acc.add(state, num_examples)
        return acc.result()
