"""A plain torch training loop for tasks: mini-batches, Adam, optional FedProx term, a
learning-rate schedule, and Adam's moments carried from the silo's previous round.

Tasks are free to train however they like; this loop is what the built-in and example tasks
use, so that a new task only writes its model, its inputs and its loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fl_tasks.tasks.api import TrainingSettings


@dataclass
class FitReport:
    """What `fit` did: {"train_loss", "train_seconds"} and the optimiser's state afterwards
    (for the silo to keep: `TrainResult.optimizer_state`)."""

    metrics: dict[str, float]
    optimizer_state: dict[str, Any] = field(repr=False)


def learning_rate_at(step: int, steps: int, base: float, schedule: str) -> float:
    """The learning rate of local step `step` (0-based) of `steps`: constant, or cosine
    annealing from `base` towards 0 (Loshchilov & Hutter 2017, without restarts)."""
    if schedule == "constant" or steps <= 1:
        return base
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; use constant or cosine")


def fit(model: nn.Module, inputs: Sequence[torch.Tensor], target: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], settings: TrainingSettings,
        global_state: Mapping[str, torch.Tensor] | None = None) -> FitReport:
    """Train `model(*inputs[batch])` against `target[batch]` in place.

    Only parameters with `requires_grad` train (freeze the rest to fine-tune a head). With
    `settings.proximal_mu > 0` the loss adds (mu / 2) * ||w - w_global||^2 (FedProx, Li et al.
    2020; Ditto's personal objective, Li et al. 2021), which keeps silos with skewed data from
    drifting far from the global model; `global_state` is the round's base (default: the
    model's weights before training). Adam starts from `settings.optimizer_state` when given:
    a silo that keeps its moments between rounds trains like one long run instead of
    restarting Adam's bias correction every round. Batches of one row are skipped (batch norm
    needs two).
    """
    rows = len(target)
    if rows == 0:
        raise ValueError("no local rows to train on")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    anchors = None
    if settings.proximal_mu > 0:
        source = global_state if global_state is not None else model.state_dict()
        anchors = [source[name].detach().clone() for name, _ in trainable]
    optimizer = torch.optim.Adam([p for _, p in trainable], lr=settings.learning_rate)
    if settings.optimizer_state:
        restore_optimizer(optimizer, settings.optimizer_state)
    steps = settings.local_epochs * sum(1 for start in range(0, rows, settings.batch_size)
                                        if min(settings.batch_size, rows - start) >= 2)
    model.train()
    total, batches = 0.0, 0
    for _ in range(settings.local_epochs):
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, settings.batch_size):
            index = order[start:start + settings.batch_size]
            if len(index) < 2:
                continue
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(batches, steps, settings.learning_rate, settings.lr_schedule)
            optimizer.zero_grad()
            loss = loss_fn(model(*(x[index] for x in inputs)), target[index])
            if anchors is not None:
                loss = loss + settings.proximal_mu / 2 * sum(((p - a) ** 2).sum()
                                                             for (_, p), a in zip(trainable, anchors))
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
    return FitReport({"train_loss": total / max(batches, 1), "train_seconds": time.perf_counter() - started},
                     {"state": {index: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in slot.items()}
                                for index, slot in optimizer.state_dict()["state"].items()},
                      "shapes": [list(p.shape) for _, p in trainable]})


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> bool:
    """Load a kept optimiser state (from `FitReport.optimizer_state`) into a fresh optimiser
    when it was kept for parameters of the same shapes; False (and the optimiser untouched)
    otherwise. The learning rate and betas stay this round's."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if [list(p.shape) for p in params] != [list(s) for s in saved.get("shapes", [])]:
        return False
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": {int(k): dict(v) for k, v in saved["state"].items()},
                               "param_groups": current["param_groups"]})
    return True


def predict(model: nn.Module, inputs: Sequence[torch.Tensor], batch_size: int = 65536) -> torch.Tensor:
    """The model's outputs on every row, in eval mode, without gradients."""
    model.eval()
    rows = len(inputs[0]) if inputs else 0
    outputs = []
    with torch.no_grad():
        for start in range(0, rows, batch_size):
            outputs.append(model(*(x[start:start + batch_size] for x in inputs)))
    return torch.cat(outputs) if outputs else torch.zeros(0)
