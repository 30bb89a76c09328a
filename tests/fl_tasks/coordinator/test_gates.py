"""fl_tasks/gates.py: absolute thresholds and the regression gate against the champion."""

from __future__ import annotations

import pytest

from fl_tasks.coordinator.gates import evaluate_gates

THRESHOLDS = {"min_roc_auc": 0.90, "min_pr_auc": 0.30, "max_regression": 0.02}


def by_name(gates):
    assert [g["name"] for g in gates] == ["min_roc_auc", "min_pr_auc", "max_regression"]
    return {g["name"]: g for g in gates}


def test_all_pass_without_champion():
    gates = by_name(evaluate_gates({"roc_auc": 0.95, "pr_auc": 0.6}, None, THRESHOLDS))
    assert all(g["passed"] is True for g in gates.values())
    assert gates["min_roc_auc"]["value"] == 0.95 and gates["min_roc_auc"]["threshold"] == 0.90
    assert gates["min_roc_auc"]["detail"] == "candidate roc_auc 0.9500 >= 0.9000"
    assert gates["min_pr_auc"]["detail"] == "candidate pr_auc 0.6000 >= 0.3000"


def test_no_champion_regression_gate_not_applicable():
    # Even a terrible candidate passes the regression gate when there is nothing to regress from.
    gate = by_name(evaluate_gates({"roc_auc": 0.1, "pr_auc": 0.0}, None, THRESHOLDS))["max_regression"]
    assert gate["passed"] is True
    assert gate["value"] is None
    assert gate["threshold"] == 0.02
    assert "not applicable" in gate["detail"]


@pytest.mark.parametrize("roc, pr, failed", [
    (0.89, 0.60, {"min_roc_auc"}),
    (0.95, 0.29, {"min_pr_auc"}),
    (0.50, 0.01, {"min_roc_auc", "min_pr_auc"}),
    (0.90, 0.30, set()),  # thresholds are inclusive
])
def test_absolute_thresholds(roc, pr, failed):
    gates = by_name(evaluate_gates({"roc_auc": roc, "pr_auc": pr}, None, THRESHOLDS))
    assert {name for name, g in gates.items() if not g["passed"]} == failed
    if "min_roc_auc" in failed:
        assert gates["min_roc_auc"]["detail"] == f"candidate roc_auc {roc:.4f} < 0.9000"


def test_regression_within_limit_passes():
    gate = by_name(evaluate_gates({"roc_auc": 0.94, "pr_auc": 0.5}, {"roc_auc": 0.95}, THRESHOLDS))["max_regression"]
    assert gate["passed"] is True
    assert gate["value"] == pytest.approx(0.01)
    assert gate["detail"] == "roc_auc drop vs champion +0.0100 <= 0.0200"


def test_improvement_passes_with_negative_drop():
    gate = by_name(evaluate_gates({"roc_auc": 0.97, "pr_auc": 0.5}, {"roc_auc": 0.95}, THRESHOLDS))["max_regression"]
    assert gate["passed"] is True
    assert gate["value"] == pytest.approx(-0.02)
    assert gate["detail"].startswith("roc_auc drop vs champion -0.0200 <=")


def test_regression_exactly_at_the_limit_passes_binary_exact():
    # 0.75 - 0.5 == 0.25 exactly in binary floating point.
    gate = by_name(evaluate_gates({"roc_auc": 0.5, "pr_auc": 0.5}, {"roc_auc": 0.75},
                                  {"min_roc_auc": 0, "min_pr_auc": 0, "max_regression": 0.25}))["max_regression"]
    assert gate["value"] == 0.25
    assert gate["passed"] is True


@pytest.mark.parametrize("champion", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_regression_exactly_at_the_limit_passes_decimal(champion):
    # 0.9 - 0.88 is 0.020000000000000018 in floating point: still "exactly the limit" to a person.
    candidate = round(champion - 0.02, 2)
    gate = by_name(evaluate_gates({"roc_auc": candidate, "pr_auc": 0.5}, {"roc_auc": champion},
                                  THRESHOLDS))["max_regression"]
    assert gate["passed"] is True, gate
    assert gate["detail"] == "roc_auc drop vs champion +0.0200 <= 0.0200"


@pytest.mark.parametrize("candidate", [0.929, 0.9299, 0.90])
def test_regression_beyond_the_limit_fails(candidate):
    gate = by_name(evaluate_gates({"roc_auc": candidate, "pr_auc": 0.5}, {"roc_auc": 0.95},
                                  THRESHOLDS))["max_regression"]
    assert gate["passed"] is False
    assert gate["value"] == pytest.approx(0.95 - candidate)
    assert f"> {0.02:.4f}" in gate["detail"]


def test_thresholds_may_be_strings_or_ints():
    gates = by_name(evaluate_gates({"roc_auc": 0.5, "pr_auc": 0.5}, {"roc_auc": 0.6},
                                   {"min_roc_auc": "0.4", "min_pr_auc": 0, "max_regression": "0.05"}))
    assert gates["min_roc_auc"]["threshold"] == 0.4 and gates["min_roc_auc"]["passed"] is True
    assert gates["max_regression"]["passed"] is False  # drop 0.1 > 0.05
