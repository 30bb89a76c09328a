"""The task API: what one machine-learning problem brings to a federation.

A federation file names its task by import path:

    task:
      entrypoint: "fraud_banks.task:FraudTask"   # module:Class, importable on workers and silos
      params: {hidden: [64, 32]}                 # keyword arguments of the class
      seed: 7                                    # seeds the first round's model

A task is a subclass of `Task`. It builds the model, trains it for one round on a silo's
rows, evaluates it, and names its metrics (which one the gates rank by, and which way is
better). Everything else (protocol, signing, quorum, screening, aggregation, gates,
registry, audit) is the same for every task. Rows reach the task as a pandas DataFrame that
already passed the federation's data contract (`fl_tasks.contract`), with the contract at
hand to encode them.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch and pandas load only where a task runs
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from fl_tasks.contract import DataContract


class TaskError(ValueError):
    """A task entrypoint that does not import, or does not satisfy the task API."""


@dataclass(frozen=True)
class Metric:
    """A metric a task reports: its name, which way is better, and its range."""

    name: str
    higher_is_better: bool = True
    low: float = -math.inf
    high: float = math.inf

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainingSettings:
    """One round's training settings, as the coordinator's plan fixes them.

    `optimizer_state` is the silo's own optimiser state from its previous round (None: a fresh
    optimiser); the training loop starts from it and hands the new one back in `TrainResult`.
    """

    local_epochs: int
    learning_rate: float
    batch_size: int
    proximal_mu: float = 0.0  # FedProx: (mu / 2) * ||w - w_global||^2 added to the loss
    seed: int = 0
    lr_schedule: str = "constant"  # constant | cosine (annealed to 0 over the round's local steps)
    optimizer_state: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TrainResult:
    """What local training reports; metrics travel in the update manifest (numbers only). The
    optimiser state stays at the silo (fl_tasks.silo.optimizer_state), never in an update."""

    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False)


class Task(ABC):
    """Subclass it for your problem. The subclass's `__init__` takes the `params` of the
    federation file as keyword arguments (plus `contract`, the federation's data contract),
    and sets nothing that differs between machines: every silo and the coordinator build
    the same model from the same params.

    Class attributes:
      `version`: bump it when the model or the training changes incompatibly; a silo whose
      installed task has another version declines the round.
      `metrics`: every metric `evaluate` returns; `primary_metric`: the one the gates rank by.
      `tensor_ranges`: value ranges of the model's own tensors, checked on every update.
    """

    version: ClassVar[str] = "1"
    metrics: ClassVar[tuple[Metric, ...]] = ()
    primary_metric: ClassVar[str] = ""
    # Tensor-name pattern (fnmatch) -> the (low, high) its values must stay in: the
    # coordinator rejects an update outside them. Batch norm's variances cannot be negative.
    tensor_ranges: ClassVar[dict[str, tuple[float, float]]] = {"*running_var": (0.0, math.inf)}

    def __init__(self, contract: "DataContract") -> None:
        self.contract = contract

    @abstractmethod
    def build_model(self) -> "nn.Module":
        """A fresh model (the framework seeds torch first for the first round's base)."""

    @abstractmethod
    def train(self, model: "nn.Module", rows: "pd.DataFrame", settings: TrainingSettings,
              global_state: Mapping[str, "torch.Tensor"]) -> TrainResult:
        """Train `model` in place for one round on `rows`; `global_state` is the round's
        base model (for FedProx's proximal term)."""

    @abstractmethod
    def evaluate(self, model: "nn.Module", rows: "pd.DataFrame") -> dict[str, float]:
        """Every metric in `metrics`, on `rows`."""

    def example_data(self, source: str, rows: int, seed: int) -> "pd.DataFrame":
        """Rows that satisfy the contract, for `fl-simulate`, the demo and tests (optional)."""
        raise NotImplementedError(f"{type(self).__name__} ships no example data")

    # --- framework side --------------------------------------------------------------------
    def metric(self, name: str) -> Metric:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise KeyError(f"task {type(self).__name__} has no metric {name!r}; it reports "
                       f"{', '.join(m.name for m in self.metrics)}")

    @property
    def primary(self) -> Metric:
        return self.metric(self.primary_metric)

    def normalization_tensors(self, model: "nn.Module") -> list[str]:
        """State-dict names of the model's batch-norm tensors (weights, biases, running
        statistics, counters): what FedBN keeps at each silo. Override for other layers."""
        from torch.nn.modules.batchnorm import _NormBase

        return sorted(f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
                      if isinstance(module, _NormBase) for name in module.state_dict())

    def head_parameters(self, model: "nn.Module") -> list[str]:
        """Parameter names of the model's head, what `personalization.layers: head` fine-tunes:
        by default the parameters of the last module that has any. Override when the head is
        elsewhere."""
        owners = [(prefix, module) for prefix, module in model.named_modules()
                  if any(True for _ in module.parameters(recurse=False))]
        if not owners:
            return []
        prefix, module = owners[-1]
        return [f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters(recurse=False)]

    def seeded_model(self, seed: int) -> "nn.Module":
        """The same weights on every machine: the first round's base."""
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.build_model()


@dataclass(frozen=True)
class TaskIdentity:
    """What a global manifest says about the task, so that a silo can check its own."""

    entrypoint: str
    version: str
    params_sha256: str

    def as_dict(self) -> dict[str, str]:
        return {"entrypoint": self.entrypoint, "version": self.version, "params_sha256": self.params_sha256}


def params_sha256(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def import_task_class(entrypoint: str) -> type[Task]:
    """The class `module:Class` names; TaskError says what is wrong and how to fix it."""
    module_name, sep, class_name = entrypoint.partition(":")
    if not sep or not module_name or not class_name.isidentifier():
        raise TaskError(f"{entrypoint!r} is not 'module:Class'; write it as e.g. 'fraud_banks.task:FraudTask'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"cannot import {module_name!r} ({exc}); install the task's package on this machine "
                        "(the Airflow workers and every silo) or put its folder on PYTHONPATH") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise TaskError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise TaskError(f"module {module_name!r} has no {class_name!r}; check the class name")
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise TaskError(f"{entrypoint!r} is not a subclass of fl_tasks.tasks.api.Task; derive it from Task")
    missing = sorted(name for name in getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise TaskError(f"{entrypoint!r} does not implement {', '.join(missing)}; add those methods")
    names = [m.name for m in cls.metrics]
    if not names:
        raise TaskError(f"{entrypoint!r} declares no metrics; set `metrics = (Metric('name'), ...)` on the class")
    if cls.primary_metric not in names:
        raise TaskError(f"{entrypoint!r}: primary_metric {cls.primary_metric!r} is not one of its metrics {names}")
    return cls


def load_task(entrypoint: str, params: Mapping[str, Any], contract: "DataContract") -> Task:
    """The task object a federation file names."""
    cls = import_task_class(entrypoint)
    try:
        return cls(contract=contract, **dict(params))
    except TypeError as exc:
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "contract")]
        raise TaskError(f"{entrypoint!r} does not take params {sorted(params)} ({exc}); it accepts "
                        f"{', '.join(accepted) or 'no params'}") from None
    except ValueError as exc:
        raise TaskError(f"{entrypoint!r} refused its params: {exc}") from None


def model_state(model: "nn.Module") -> dict[str, "np.ndarray"]:
    """The model's state dict as numpy arrays (copies): what payloads carry."""
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()}


def load_model_state(model: "nn.Module", state: Mapping[str, "np.ndarray"]) -> "nn.Module":
    """Load a numpy state dict; names, shapes and dtypes must match the model exactly
    (ValueError naming the first tensor that does not)."""
    import numpy as np
    import torch

    expected = model.state_dict()
    if set(state) != set(expected):
        raise ValueError(f"tensor names differ from the task's model: {sorted(set(state) ^ set(expected))[:10]}")
    tensors = {}
    for name, ref in expected.items():
        value = torch.from_numpy(np.asarray(state[name]).copy())
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise ValueError(f"tensor '{name}' is {tuple(value.shape)} {value.dtype}, the task's model has "
                             f"{tuple(ref.shape)} {ref.dtype}")
        tensors[name] = value
    model.load_state_dict(tensors, strict=True)
    return model
