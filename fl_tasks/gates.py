"""Quality gates: the candidate against absolute thresholds and against the champion."""

from __future__ import annotations

from typing import Any

REGRESSION_TOLERANCE = 1e-9


def evaluate_gates(candidate: dict[str, float], champion: dict[str, float] | None,
                   thresholds: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per gate: name, passed, value, threshold and a sentence for humans.

    `max_regression` bounds how far the candidate's ROC-AUC may fall below the champion's;
    it is skipped (and says so) when there is no champion yet.
    """
    gates = []
    for metric in ("roc_auc", "pr_auc"):
        threshold = float(thresholds[f"min_{metric}"])
        value = candidate[metric]
        gates.append({"name": f"min_{metric}", "passed": value >= threshold, "value": value, "threshold": threshold,
                      "detail": f"candidate {metric} {value:.4f} {'>=' if value >= threshold else '<'} {threshold:.4f}"})
    limit = float(thresholds["max_regression"])
    if champion is None:
        gates.append({"name": "max_regression", "passed": True, "value": None, "threshold": limit,
                      "detail": "no champion yet: regression gate not applicable"})
    else:
        drop = champion["roc_auc"] - candidate["roc_auc"]
        # The subtraction carries float error (0.9 - 0.88 > 0.02): a drop equal to the limit passes.
        passed = drop <= limit + REGRESSION_TOLERANCE
        gates.append({"name": "max_regression", "passed": passed, "value": drop, "threshold": limit,
                      "detail": f"roc_auc drop vs champion {drop:+.4f} {'<=' if passed else '>'} {limit:.4f}"})
    return gates
