"""DP-FedAvg (McMahan et al. 2018): the noisy, fixed-denominator mean of clipped updates.

    x = base + (sum_i clip(x_i - base, C) + N(0, sigma^2 I)) / D

D is the expected number of sampled silos, fixed before the round, so that one silo in or
out moves the sum by at most C whatever the others do; sigma is z x C when the coordinator
adds all the noise. Every silo weighs the same: example counts would let a silo's share,
and with it the sensitivity, grow without bound. The noisy model then goes through the
federation's strategy as its one update, so a server optimiser (FedAvgM, FedAdam, ...)
steps on the private mean: post-processing, which spends no budget.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping

import numpy as np

from fl_tasks.aggregation import Outcome
from fl_tasks.aggregation.checks import check_update, floating_names
from fl_tasks.aggregation.clip import StrategyWrapper, clip_update
from fl_tasks.aggregation.mean import StateDict, StreamingWeightedMean, cast_like
from fl_tasks.aggregation.parameters import positive_param


def noisy_mean(base: Mapping[str, np.ndarray], delta_sum: Mapping[str, np.ndarray], denominator: float,
               noise_stddev: float, seed: int) -> StateDict:
    """base + (delta_sum + N(0, noise_stddev^2)) / denominator over the floating tensors, in
    float64; the noise is drawn tensor by tensor in sorted-name order from `seed`, so the same
    seed gives the same model."""
    rng = np.random.default_rng(seed)
    out: StateDict = {}
    for name in floating_names(base):
        noise = rng.normal(0.0, noise_stddev, np.shape(base[name])) if noise_stddev > 0 else 0.0
        out[name] = np.asarray(base[name], dtype=np.float64) + (np.asarray(delta_sum[name]) + noise) / denominator
    return out


def clamp_to_ranges(state: dict[str, np.ndarray], ranges: Mapping[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """Each tensor clamped (in place) into the ranges of the task whose name patterns (fnmatch)
    match it, e.g. variances >= 0: noise would otherwise give a batch-norm variance below zero.
    Post-processing of a private value, so it costs no privacy."""
    for name, value in state.items():
        for pattern, (low, high) in ranges.items():
            if fnmatch.fnmatchcase(name, pattern):
                np.clip(value, low, high, out=value)
    return state


class DPFedAvg(StrategyWrapper):
    """Wraps the federation's strategy: clips (unless the silos clipped and added their noise
    themselves, `clip=False`), sums, adds the coordinator's noise, divides by `denominator`,
    clamps it into the task's tensor ranges, and hands the one noisy model to `inner`. Integer tensors (batch-norm counters) are the
    plain rounded mean: they carry no privacy guarantee and no gradient."""

    def __init__(self, inner, clip_norm: float, denominator: float, noise_stddev: float, seed: int,
                 clip: bool = True, ranges: Mapping[str, tuple[float, float]] | None = None) -> None:
        super().__init__(inner)
        self.clip_norm = positive_param("dp_fedavg", "clip_norm", clip_norm)
        self.denominator = positive_param("dp_fedavg", "denominator", denominator)
        if not (math.isfinite(noise_stddev) and noise_stddev >= 0):
            raise ValueError(f"dp_fedavg: noise_stddev must be a finite number >= 0, got {noise_stddev!r}")
        self.noise_stddev, self.seed, self.clip = float(noise_stddev), int(seed), clip
        self.ranges = dict(ranges or {})
        self.outcome: Outcome | None = None

    @property
    def min_updates(self) -> int:
        return 1

    def aggregate(self, base: Mapping[str, np.ndarray],
                  updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> StateDict:
        acc = StreamingWeightedMean(float64=True)
        for state, _ in updates:  # the weight is ignored: every silo counts once
            check_update(state, base)
            acc.add(clip_update(state, base, self.clip_norm) if self.clip else state, 1.0)
        count = acc.count
        mean = acc.result(cast=False)
        delta_sum = {name: (mean[name] - np.asarray(base[name], dtype=np.float64)) * count
                     for name in floating_names(base)}
        noisy = noisy_mean(base, delta_sum, self.denominator, self.noise_stddev, self.seed)
        model = clamp_to_ranges(cast_like({**mean, **noisy}, base), self.ranges)
        result = self.inner.aggregate(base, [(model, 1)])
        where = "each update clipped to norm" if self.clip else "the silos clipped to norm"
        self.outcome = Outcome(f"DP-FedAvg: {where} {self.clip_norm:g}, summed, Gaussian noise std "
                               f"{self.noise_stddev:.4g} added by the coordinator, divided by {self.denominator:g} "
                               f"expected silos; then {self.inner.name}", tuple([1.0 / self.denominator] * count))
        return result
