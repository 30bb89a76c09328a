"""Quality gates: the candidate against thresholds and against the champion, in the terms of
the task's own metrics (which way is better comes from the task, never from a metric's name)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REGRESSION_TOLERANCE = 1e-9


def evaluate_gates(candidate: Mapping[str, float], champion: Mapping[str, float] | None,
                   thresholds: Mapping[str, float], max_regression: float, task) -> list[dict[str, Any]]:
    """One record per gate: name, passed, value, threshold and a sentence for humans.

    `thresholds[metric]` is a floor for metrics where higher is better and a ceiling for the
    others. `max_regression` bounds how much worse than the champion the candidate may be on
    the task's primary metric; it is skipped (and says so) when there is no champion yet.
    """
    gates = []
    for name, threshold in thresholds.items():
        metric = task.metric(name)
        value = float(candidate[name])
        passed = value >= threshold if metric.higher_is_better else value <= threshold
        word = (">=" if passed else "<") if metric.higher_is_better else ("<=" if passed else ">")
        gates.append({"name": f"{'min' if metric.higher_is_better else 'max'}_{name}", "passed": passed,
                      "value": value, "threshold": float(threshold),
                      "detail": f"candidate {name} {value:.4f} {word} {float(threshold):.4f}"})
    primary = task.primary
    limit = float(max_regression)
    if champion is None:
        gates.append({"name": "max_regression", "passed": True, "value": None, "threshold": limit,
                      "detail": "no champion yet: regression gate not applicable"})
    else:
        drop = champion[primary.name] - candidate[primary.name]
        if not primary.higher_is_better:
            drop = -drop
        # The subtraction carries float error (0.9 - 0.88 > 0.02): a drop equal to the limit passes.
        passed = drop <= limit + REGRESSION_TOLERANCE
        gates.append({"name": "max_regression", "passed": passed, "value": drop, "threshold": limit,
                      "detail": f"{primary.name} {'drop' if primary.higher_is_better else 'rise'} vs champion "
                                f"{drop:+.4f} {'<=' if passed else '>'} {limit:.4f}"})
    return gates
