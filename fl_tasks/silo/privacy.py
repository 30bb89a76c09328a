"""The silo's part of differential privacy when the federation puts the noise at the silos.

The round's global manifest carries {clip_norm, noise_stddev}: the silo clips its change from
the base to clip_norm and adds Gaussian noise of noise_stddev (z * C / sqrt(sampled silos),
so that the sampled silos' noise sums to the z * C the accountant counts), with fresh
randomness from the operating system, before the update leaves it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import numpy as np

from fl_tasks.aggregation.checks import floating_names
from fl_tasks.aggregation.clip import clip_update
from fl_tasks.aggregation.private import clamp_to_ranges


def noised_update(state: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], clip_norm: float,
                  noise_stddev: float, ranges: Mapping[str, tuple[float, float]] | None = None,
                  rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """base + clip(state - base, clip_norm) + N(0, noise_stddev^2) on every floating tensor,
    clamped into the task's tensor ranges (a noisy variance must not go below zero)."""
    rng = rng or np.random.default_rng(secrets.randbits(128))
    clipped = clip_update(state, base, clip_norm)
    for name in floating_names(base):
        value = clipped[name]
        noisy = np.asarray(value, dtype=np.float64) + rng.normal(0.0, noise_stddev, np.shape(value))
        clipped[name] = noisy.astype(np.asarray(base[name]).dtype)
    return clamp_to_ranges(clipped, ranges or {})
