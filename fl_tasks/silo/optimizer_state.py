"""The silo's optimiser state, kept between rounds (`training.optimizer_state: keep`).

Cross-silo silos are long-lived: a bank trains in every round. Starting Adam afresh each round
throws away its moment estimates and restarts its bias correction, so every round begins with
the large, poorly scaled steps of a cold optimiser; on unequal silos that costs the global
model several PR-AUC points against centralized training (benchmarks/quality.py). Keeping the
moments makes each silo's local training one long run, as it is centrally. The state never
leaves the silo:

    <state_dir>/<federation>/optimizer/adam.safetensors   per parameter slot: step, exp_avg, exp_avg_sq
    <state_dir>/<federation>/optimizer/adam.json          the parameter shapes, the round, the sha256

A state kept for a model of other shapes (the task changed) is not used: the round starts
from a fresh optimiser and the log says why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fl_tasks.silo.kept import KeptTensors, state_folder


def optimizer_folder(state_dir: Path, federation: str) -> Path:
    return state_folder(state_dir, federation, "optimizer")


class OptimizerStateStore:
    """One silo's optimiser state for one federation."""

    def __init__(self, folder: Path, log: Callable[[str], None] = print) -> None:
        self.kept, self.log = KeptTensors(folder, "adam"), log

    def load(self) -> dict[str, Any] | None:
        """The state `fit` takes (`TrainingSettings.optimizer_state`), or None: none kept yet,
        or unreadable (logged)."""
        import torch

        if not self.kept.exists():
            return None
        try:
            tensors, record = self.kept.load()
            state: dict[int, dict[str, Any]] = {}
            for name, value in tensors.items():
                slot, _, key = name.partition(".")
                state.setdefault(int(slot), {})[key] = torch.from_numpy(value.copy())
            return {"state": state, "shapes": record["shapes"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.log(f"optimizer state in {self.kept.folder} not used, it cannot be read: {type(exc).__name__}: {exc}; "
                     "starting from a fresh optimizer")
            return None

    def save(self, state: Mapping[str, Any], round_id: str) -> None:
        """Keep `state` (from `TrainResult.optimizer_state`) after `round_id`'s update was committed."""
        import numpy as np
        import torch

        tensors = {f"{slot}.{key}": (value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value))
                   for slot, values in state["state"].items() for key, value in values.items()}
        self.kept.save(tensors, {"shapes": [list(s) for s in state["shapes"]], "round_id": round_id})

    def discard(self) -> None:
        self.kept.discard()
