"""Model quality on a labelled table: ROC-AUC and PR-AUC (average precision)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fl_tasks.datasets import Table


def predict_scores(model: nn.Module, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(torch.sigmoid(model(torch.from_numpy(x[start:start + batch_size]))).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def score_metrics(y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    if len(np.unique(y)) < 2:
        raise ValueError("evaluation data needs both classes to compute ROC-AUC and PR-AUC")
    if not np.all(np.isfinite(scores)):
        return {"roc_auc": 0.0, "pr_auc": 0.0}  # a model that emits NaN is as bad as it gets
    return {"roc_auc": float(roc_auc_score(y, scores)), "pr_auc": float(average_precision_score(y, scores))}


def evaluate(model: nn.Module, table: Table) -> dict[str, float]:
    return score_metrics(table.y, predict_scores(model, table.x))
