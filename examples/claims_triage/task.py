"""Claims triage: route each insurance claim to `fast_track`, `standard` or `investigate`.

Its data contract (see federations/claims.yaml): categorical `region`, `channel` and
`product`, boolean `police_report`, numeric `claim_amount`, `policy_age_days` and
`prior_claims`, the event time `submitted_at` and the categorical label `triage`.

Where the built-in fraud task is a binary classifier on numeric columns, this one is a
three-class classifier whose inputs are mostly categorical, so its model learns an embedding
per category, and its vocabulary is the data contract's: a federation adds a region by
adding it to the contract (a new model, since the embedding tables grow).

Unlike the built-in task, this module imports torch at import: it lives in its own package,
which only machines that run the task import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from claims_triage.data import CLASSES, synthetic_claims
from fl_tasks.tasks.api import Metric, Task, TrainingSettings, TrainResult
from fl_tasks.tasks.training import fit, predict

if TYPE_CHECKING:
    import pandas as pd

    from fl_tasks.contract import DataContract

CATEGORICAL = ("region", "channel", "product")
NUMERIC = ("claim_amount", "policy_age_days", "prior_claims")
BOOLEAN = ("police_report",)
LABEL = "triage"
EVENT_TIME = "submitted_at"

# Fixed scaling for log1p of the numeric columns, in NUMERIC order. Statistics of local rows
# would differ between insurers, and every silo must encode a claim the same way for their
# updates to average into one model.
LOG_CENTER = np.array([7.5, 6.0, 0.5])
LOG_SCALE = np.array([1.5, 1.5, 0.5])

# The log-loss of a model that emits NaN: what a confidently wrong prediction costs once
# probabilities are clipped to float64's epsilon (as scikit-learn does).
WORST_LOG_LOSS = -math.log(np.finfo(np.float64).eps)


class TriageNetwork(nn.Module):
    """Embeddings of the categorical columns, concatenated with the scaled numeric and
    boolean features, then [Linear -> ReLU] x len(hidden) -> Linear -> one logit per class."""

    def __init__(self, vocabulary_sizes: Sequence[int], numeric_dim: int, embedding_dim: int,
                 hidden: Sequence[int], classes: int) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(size + 1, embedding_dim) for size in vocabulary_sizes)
        with torch.no_grad():
            # The last row is the contract's code for unknown or missing values: start it at
            # zero, so that a value no silo has seen yet adds nothing rather than a random vector.
            for embedding, size in zip(self.embeddings, vocabulary_sizes):
                embedding.weight[size].zero_()
        layers: list[nn.Module] = []
        width = numeric_dim + embedding_dim * len(vocabulary_sizes)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, numeric: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        embedded = [embedding(codes[:, i]) for i, embedding in enumerate(self.embeddings)]
        return self.mlp(torch.cat([numeric, *embedded], dim=1))


class ClaimsTriageTask(Task):
    """Three-class claims router with categorical embeddings.

    params: `embedding_dim` (width of each category's vector, default 4) and `hidden` (layer
    widths of the MLP, default [32, 16]).
    """

    version = "1"
    metrics = (Metric("log_loss", False, 0.0, math.inf), Metric("accuracy", True, 0.0, 1.0),
               Metric("macro_f1", True, 0.0, 1.0))
    # Log-loss judges the probabilities, which set the queues' thresholds; accuracy only
    # judges the top class and hardly moves once the easy claims are right.
    primary_metric = "log_loss"

    def __init__(self, contract: "DataContract", embedding_dim: int = 4,
                 hidden: list[int] | tuple[int, ...] = (32, 16)) -> None:
        super().__init__(contract)
        if not _positive_int(embedding_dim):
            raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
        if not isinstance(hidden, (list, tuple)) or not hidden or not all(_positive_int(h) for h in hidden):
            raise ValueError(f"hidden must be a list of positive layer widths, got {hidden!r}")
        self.embedding_dim, self.hidden = embedding_dim, tuple(hidden)
        problems = _contract_problems(contract)
        if problems:
            raise ValueError(f"ClaimsTriageTask cannot use this data contract: {'; '.join(problems)}")

    def build_model(self) -> nn.Module:
        sizes = [len(self.contract.feature(name).categories) for name in CATEGORICAL]
        return TriageNetwork(sizes, len(NUMERIC) + len(BOOLEAN), self.embedding_dim, self.hidden, len(CLASSES))

    def inputs(self, rows: "pd.DataFrame") -> tuple[torch.Tensor, torch.Tensor]:
        """(numeric float32 (n, 4), codes int64 (n, 3)): log-scaled amounts and counts (all
        heavy-tailed), the police report as -1/+1, and each categorical column's contract code."""
        counts = np.clip(self.contract.numeric(rows, list(NUMERIC)).astype(np.float64), 0.0, None)
        scaled = (np.log1p(counts) - LOG_CENTER) / LOG_SCALE
        report = self.contract.numeric(rows, list(BOOLEAN)).astype(np.float64) * 2.0 - 1.0
        numeric = np.column_stack([scaled, report]).astype(np.float32)
        codes = np.column_stack([self.contract.codes(rows, name) for name in CATEGORICAL])
        return torch.from_numpy(numeric), torch.from_numpy(codes)

    def targets(self, rows: "pd.DataFrame") -> np.ndarray:
        """Class indices in the contract's order; a label outside the three classes would
        index past the logits, so it is refused here rather than deep inside torch."""
        y = self.contract.labels(rows)
        unknown = int((y >= len(CLASSES)).sum())
        if unknown:
            raise ValueError(f"{unknown} rows have a '{LABEL}' that is not one of {list(CLASSES)} (or none)")
        return y

    def train(self, model: nn.Module, rows: "pd.DataFrame", settings: TrainingSettings,
              global_state: Mapping[str, torch.Tensor]) -> TrainResult:
        target = torch.from_numpy(self.targets(rows))
        report = fit(model, list(self.inputs(rows)), target, nn.CrossEntropyLoss(), settings, global_state)
        return TrainResult(len(rows), report.metrics, report.optimizer_state)

    def probabilities(self, model: nn.Module, rows: "pd.DataFrame") -> np.ndarray:
        """(n, 3) class probabilities, columns in the contract's label order."""
        return torch.softmax(predict(model, list(self.inputs(rows))).double(), dim=1).numpy()

    def evaluate(self, model: nn.Module, rows: "pd.DataFrame") -> dict[str, float]:
        from sklearn.metrics import accuracy_score, f1_score, log_loss

        if len(rows) == 0:
            raise ValueError("no rows to evaluate the claims triage model on")
        y = self.targets(rows)
        probabilities = self.probabilities(model, rows)
        if not np.all(np.isfinite(probabilities)):
            return {"log_loss": WORST_LOG_LOSS, "accuracy": 0.0, "macro_f1": 0.0}  # NaN is as bad as it gets
        labels = list(range(len(CLASSES)))  # rows may lack a class; the metrics still score all three
        predicted = probabilities.argmax(axis=1)
        return {"log_loss": float(log_loss(y, probabilities, labels=labels)),
                "accuracy": float(accuracy_score(y, predicted)),
                "macro_f1": float(f1_score(y, predicted, labels=labels, average="macro", zero_division=0))}

    def example_data(self, source: str, rows: int, seed: int) -> "pd.DataFrame":
        """`synthetic`: generated claims (claims_triage.data); there is no public claims data set."""
        if source == "synthetic":
            return synthetic_claims(rows, seed)
        raise ValueError(f"unknown example data {source!r}; ClaimsTriageTask ships 'synthetic'")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _contract_problems(contract: "DataContract") -> list[str]:
    """Every column the task needs that the contract lacks or types otherwise, by name."""
    types = {column.name: column for column in contract.features}
    needed = ([(name, "categorical") for name in CATEGORICAL] + [(name, "boolean") for name in BOOLEAN]
              + [(name, "numeric") for name in NUMERIC])
    problems = []
    for name, kind in needed:
        column = types.get(name)
        if column is None:
            problems.append(f"feature '{name}' ({kind}) is missing")
        elif column.type != kind:
            problems.append(f"feature '{name}' is {column.type}, needs {kind}")
        elif kind == "categorical" and not column.categories:
            problems.append(f"feature '{name}' lists no categories")
    label = contract.label
    if label.name != LABEL or label.type != "categorical" or set(label.categories) != set(CLASSES) \
            or len(label.categories) != len(CLASSES):
        problems.append(f"the label must be '{LABEL}' (categorical, categories {list(CLASSES)}), got "
                        f"'{label.name}' ({label.type}, {list(label.categories)})")
    if contract.event_time != EVENT_TIME:  # the model ignores it, but the example data carries it
        problems.append(f"the event time must be '{EVENT_TIME}', got {contract.event_time!r}")
    return problems
