"""Torch model factories and numpy views of their state dicts."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fl_tasks.config import ModelSpec


class FraudMLP(nn.Module):
    """A tabular binary classifier: [Linear -> (BatchNorm) -> ReLU] x len(hidden) -> Linear -> logit.

    Batch norm brings running statistics and an integer counter: the buffers that naive
    aggregation gets wrong. FedAvg also averages those statistics across silos whose data
    differ, which costs accuracy under strong skew, so it can be switched off.
    """

    def __init__(self, input_dim: int, hidden: tuple[int, ...], batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for size in hidden:
            layers += [nn.Linear(width, size), *([nn.BatchNorm1d(size)] if batch_norm else []), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def build_model(spec: ModelSpec, seed: int | None = None) -> FraudMLP:
    """A fresh model; with a seed, the same weights on every machine (the round-0 base)."""
    if spec.factory != "fraud_mlp":
        raise ValueError(f"unknown model factory {spec.factory!r}")
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return FraudMLP(spec.input_dim, tuple(spec.hidden), spec.batch_norm)
    return FraudMLP(spec.input_dim, tuple(spec.hidden), spec.batch_norm)


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy().copy() for name, t in model.state_dict().items()}


def load_numpy_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> nn.Module:
    """Load a numpy state dict; keys, shapes and dtypes must match the model exactly."""
    expected = model.state_dict()
    if set(state) != set(expected):
        raise ValueError(f"state keys differ from the model: {sorted(set(state) ^ set(expected))}")
    tensors = {}
    for name, ref in expected.items():
        value = torch.from_numpy(np.asarray(state[name]).copy())
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise ValueError(f"tensor '{name}' is {tuple(value.shape)} {value.dtype}, "
                             f"expected {tuple(ref.shape)} {ref.dtype}")
        tensors[name] = value
    model.load_state_dict(tensors, strict=True)
    return model


def flatten_state(state: Mapping[str, np.ndarray]) -> np.ndarray:
    """Floating tensors as one float64 vector in key order (for norms and distances)."""
    parts = [np.ravel(v).astype(np.float64, copy=False) for _, v in sorted(state.items())
             if np.issubdtype(v.dtype, np.floating)]
    return np.concatenate(parts) if parts else np.zeros(0)
