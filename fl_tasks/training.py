"""Local training, as a silo runs it: a few epochs from the global model on local rows."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fl_tasks.datasets import Table


def train_local(model: nn.Module, table: Table, epochs: int, learning_rate: float, batch_size: int,
                proximal_mu: float = 0.0, seed: int = 0,
                base_state: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Train `model` in place; returns local metrics (loss, rows, seconds).

    With `proximal_mu > 0` the loss adds (mu / 2) * ||w - w_global||^2 (FedProx), which keeps
    silos with skewed data from drifting far from the global model.
    """
    if len(table) == 0:
        raise ValueError("no local rows to train on")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(table.x)
    y = torch.from_numpy(table.y.astype(np.float32))
    anchors = None
    if proximal_mu > 0:
        source = base_state if base_state is not None else model.state_dict()
        anchors = [source[name].detach().clone() for name, _ in model.named_parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            index = order[start:start + batch_size]
            if len(index) < 2:  # batch norm needs two rows
                continue
            optimizer.zero_grad()
            loss = loss_fn(model(x[index]), y[index])
            if anchors is not None:
                loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors))
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
    return {"train_loss": total / max(batches, 1), "train_rows": float(len(table)),
            "train_seconds": time.perf_counter() - started}
