"""The built-in task: card-fraud detection with a small tabular network.

Its data contract (see federations/banks.yaml): numeric features `V1`..`V28` (the public
dataset's PCA components) and `Amount`, the boolean label `Class` and the event time
`event_time`. The model sees the 28 components, the log-scaled amount and the time of day.
Metrics: ROC-AUC, and PR-AUC (average precision), the one the gates rank by: with a fraud
rate of a fraction of a percent, ROC-AUC saturates for any reasonable model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fl_tasks.tasks.api import Metric, Task, TrainingSettings, TrainResult

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from fl_tasks.contract import DataContract

COMPONENTS = [f"V{i}" for i in range(1, 29)]


class FraudTask(Task):
    """Binary fraud classifier: [Linear -> (BatchNorm) -> ReLU] x len(hidden) -> Linear -> logit.

    params: `hidden` (layer widths, default [64, 32]), `batch_norm` (default true). Batch
    norm brings running statistics and an integer counter, the buffers that naive
    aggregation gets wrong; FedAvg also averages those statistics across silos whose data
    differ, which costs accuracy under strong skew, so it can be switched off.
    """

    version = "2"
    metrics = (Metric("roc_auc", True, 0.0, 1.0), Metric("pr_auc", True, 0.0, 1.0))
    primary_metric = "pr_auc"
    input_dim = len(COMPONENTS) + 2  # + log amount, time of day

    def __init__(self, contract: "DataContract", hidden: list[int] | tuple[int, ...] = (64, 32),
                 batch_norm: bool = True) -> None:
        super().__init__(contract)
        if not hidden or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise ValueError(f"hidden must be a list of positive layer widths, got {hidden!r}")
        if not isinstance(batch_norm, bool):
            raise ValueError(f"batch_norm must be true or false, got {batch_norm!r}")
        self.hidden, self.batch_norm = tuple(hidden), batch_norm
        names = [c.name for c in contract.features]
        missing = [name for name in [*COMPONENTS, "Amount"] if name not in names]
        if missing or contract.event_time is None or contract.label.type != "boolean":
            raise ValueError(f"FraudTask needs numeric features V1..V28 and Amount, a boolean label and an event "
                             f"time in the data contract (missing features: {missing})")

    def build_model(self) -> "nn.Module":
        from torch import nn

        layers: list[nn.Module] = []
        width = self.input_dim
        for size in self.hidden:
            layers += [nn.Linear(width, size), *([nn.BatchNorm1d(size)] if self.batch_norm else []), nn.ReLU()]
            width = size
        layers += [nn.Linear(width, 1), nn.Flatten(0)]
        return nn.Sequential(*layers)

    def features(self, rows: "pd.DataFrame") -> np.ndarray:
        """The 28 components, the log-scaled amount (heavy-tailed) and the time of day (the only
        part of the event time that generalises across days), as float32."""
        import pandas as pd

        components = self.contract.numeric(rows, COMPONENTS)
        log_amount = (np.log1p(rows["Amount"].to_numpy(dtype=np.float64)) - 3.0) / 2.0
        times = pd.to_datetime(rows[self.contract.event_time], utc=True)
        seconds = (times.dt.hour * 3600 + times.dt.minute * 60 + times.dt.second).to_numpy(dtype=np.float64)
        day_phase = seconds / 86400.0 * 2.0 - 1.0
        return np.column_stack([components, log_amount, day_phase]).astype(np.float32)

    def train(self, model: "nn.Module", rows: "pd.DataFrame", settings: TrainingSettings,
              global_state: Mapping[str, "torch.Tensor"]) -> TrainResult:
        import torch
        from torch import nn

        from fl_tasks.tasks.training import fit

        x = torch.from_numpy(self.features(rows))
        y = torch.from_numpy(self.contract.labels(rows).astype(np.float32))
        report = fit(model, [x], y, nn.BCEWithLogitsLoss(), settings, global_state)
        return TrainResult(len(rows), report.metrics, report.optimizer_state)

    def scores(self, model: "nn.Module", rows: "pd.DataFrame") -> np.ndarray:
        import torch

        from fl_tasks.tasks.training import predict

        return torch.sigmoid(predict(model, [torch.from_numpy(self.features(rows))])).numpy()

    def evaluate(self, model: "nn.Module", rows: "pd.DataFrame") -> dict[str, float]:
        from sklearn.metrics import average_precision_score, roc_auc_score

        y = self.contract.labels(rows)
        if len(np.unique(y)) < 2:
            raise ValueError("evaluation rows need both classes to compute ROC-AUC and PR-AUC")
        scores = self.scores(model, rows)
        if not np.all(np.isfinite(scores)):
            return {"roc_auc": 0.0, "pr_auc": 0.0}  # a model that emits NaN is as bad as it gets
        return {"roc_auc": float(roc_auc_score(y, scores)), "pr_auc": float(average_precision_score(y, scores))}

    def example_data(self, source: str, rows: int, seed: int) -> "pd.DataFrame":
        """`creditcard`: the public ULB data set (284,807 rows, downloaded once); `synthetic`:
        a small generated stand-in with the same columns, for fast tests."""
        from fl_tasks.simulation.datasets import creditcard_frame, synthetic_fraud_frame

        if source == "creditcard":
            return creditcard_frame()
        if source == "synthetic":
            return synthetic_fraud_frame(rows, seed)
        raise ValueError(f"unknown example data {source!r}; FraudTask ships 'creditcard' and 'synthetic'")
