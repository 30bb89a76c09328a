"""A plain torch training loop for tasks: mini-batches, Adam, optional FedProx term.

Tasks are free to train however they like; this loop is what the built-in and example tasks
use, so that a new task only writes its model, its inputs and its loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from fl_tasks.tasks.api import TrainingSettings


def fit(model: nn.Module, inputs: Sequence[torch.Tensor], target: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], settings: TrainingSettings,
        global_state: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Train `model(*inputs[batch])` against `target[batch]` in place; returns
    {"train_loss": mean batch loss, "train_seconds": ...}.

    With `settings.proximal_mu > 0` the loss adds (mu / 2) * ||w - w_global||^2 (FedProx,
    Li et al. 2020), which keeps silos with skewed data from drifting far from the global
    model; `global_state` is the round's base (default: the model's weights before training).
    Batches of one row are skipped (batch norm needs two).
    """
    rows = len(target)
    if rows == 0:
        raise ValueError("no local rows to train on")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    anchors = None
    if settings.proximal_mu > 0:
        source = global_state if global_state is not None else model.state_dict()
        anchors = [source[name].detach().clone() for name, _ in model.named_parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    model.train()
    total, batches = 0.0, 0
    for _ in range(settings.local_epochs):
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, settings.batch_size):
            index = order[start:start + settings.batch_size]
            if len(index) < 2:
                continue
            optimizer.zero_grad()
            loss = loss_fn(model(*(x[index] for x in inputs)), target[index])
            if anchors is not None:
                loss = loss + settings.proximal_mu / 2 * sum(((p - a) ** 2).sum()
                                                             for p, a in zip(model.parameters(), anchors))
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
    return {"train_loss": total / max(batches, 1), "train_seconds": time.perf_counter() - started}


def predict(model: nn.Module, inputs: Sequence[torch.Tensor], batch_size: int = 65536) -> torch.Tensor:
    """The model's outputs on every row, in eval mode, without gradients."""
    model.eval()
    rows = len(inputs[0]) if inputs else 0
    outputs = []
    with torch.no_grad():
        for start in range(0, rows, batch_size):
            outputs.append(model(*(x[start:start + batch_size] for x in inputs)))
    return torch.cat(outputs) if outputs else torch.zeros(0)
