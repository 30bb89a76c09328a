"""Server optimisers of Reddi et al. 2021, "Adaptive Federated Optimization" (and FedAvgM,
Hsu et al. 2019), as plain functions of one tensor at a time, in float64.

The server treats delta = weighted_mean(client models) - x as a pseudo-gradient (a descent
direction: it points where the clients moved) and applies an optimiser step to x:

    FedAvgM:    v = momentum * v + delta;                      x = x + eta * v
    FedAdam:    m = b1 * m + (1 - b1) * delta
                v = b2 * v + (1 - b2) * delta^2;               x = x + eta * m / (sqrt(v) + tau)
    FedYogi:    v = v - (1 - b2) * delta^2 * sign(v - delta^2)  (m and x as FedAdam)
    FedAdagrad: v = v + delta^2                                 (m and x as FedAdam)

As in the paper and in Flower there is no bias correction.
"""

from __future__ import annotations

import numpy as np


def pseudo_gradient(mean: np.ndarray, base: np.ndarray) -> np.ndarray:
    return np.asarray(mean, dtype=np.float64) - np.asarray(base, dtype=np.float64)


def momentum_buffer(v: np.ndarray, delta: np.ndarray, momentum: float) -> np.ndarray:
    return momentum * v + delta


def momentum_step(x: np.ndarray, v: np.ndarray, eta: float) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) + eta * v


def first_moment(m: np.ndarray, delta: np.ndarray, beta1: float) -> np.ndarray:
    return beta1 * m + (1.0 - beta1) * delta


def adam_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    return beta2 * v + (1.0 - beta2) * np.square(delta)


def yogi_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    square = np.square(delta)
    return v - (1.0 - beta2) * square * np.sign(v - square)


def adagrad_second_moment(v: np.ndarray, delta: np.ndarray) -> np.ndarray:
    return v + np.square(delta)


def adaptive_step(x: np.ndarray, m: np.ndarray, v: np.ndarray, eta: float, tau: float) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) + eta * m / (np.sqrt(v) + tau)
