"""fl_tasks/coordinator/gates.py: thresholds and the regression gate against the champion,
in the terms of the task's own metrics (which way is better comes from the task's `Metric`s,
the regression gate ranks by the task's primary metric)."""

from __future__ import annotations

import pytest

from fl_tasks.config import parse_federation
from fl_tasks.coordinator.gates import evaluate_gates
from fl_tasks.coordinator.plan import round_settings
from fl_tasks.tasks.api import Metric, Task
from tests.conftest import federation_doc

THRESHOLDS = {"roc_auc": 0.90, "pr_auc": 0.30}
MAX_REGRESSION = 0.02


class MetricsOnly(Task):
    """A task that only declares metrics: all the gates read from a task."""

    def build_model(self):
        raise NotImplementedError

    def train(self, model, rows, settings, global_state):
        raise NotImplementedError

    def evaluate(self, model, rows):
        raise NotImplementedError


def task_with(metrics, primary):
    return type("GateTask", (MetricsOnly,), {"metrics": tuple(metrics), "primary_metric": primary})(contract=None)


# The regression gate used to be hard-wired to ROC-AUC; it now ranks by the task's primary
# metric. These cases use a task ranked by roc_auc, so that they check what they always did.
ROC_TASK = task_with([Metric("roc_auc", True, 0.0, 1.0), Metric("pr_auc", True, 0.0, 1.0)], "roc_auc")
# A task where lower is better on its primary metric (thresholds are ceilings, a rise is a regression).
LOSS_TASK = task_with([Metric("log_loss", False, 0.0), Metric("roc_auc", True, 0.0, 1.0)], "log_loss")


def gates_of(candidate, champion, thresholds=THRESHOLDS, max_regression=MAX_REGRESSION, task=ROC_TASK):
    return evaluate_gates(candidate, champion, thresholds, max_regression, task)


def by_name(gates):
    assert [g["name"] for g in gates] == ["min_roc_auc", "min_pr_auc", "max_regression"]
    return {g["name"]: g for g in gates}


def test_all_pass_without_champion():
    gates = by_name(gates_of({"roc_auc": 0.95, "pr_auc": 0.6}, None))
    assert all(g["passed"] is True for g in gates.values())
    assert gates["min_roc_auc"]["value"] == 0.95 and gates["min_roc_auc"]["threshold"] == 0.90
    assert gates["min_roc_auc"]["detail"] == "candidate roc_auc 0.9500 >= 0.9000"
    assert gates["min_pr_auc"]["detail"] == "candidate pr_auc 0.6000 >= 0.3000"


def test_no_champion_regression_gate_not_applicable():
    # Even a terrible candidate passes the regression gate when there is nothing to regress from.
    gate = by_name(gates_of({"roc_auc": 0.1, "pr_auc": 0.0}, None))["max_regression"]
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
    gates = by_name(gates_of({"roc_auc": roc, "pr_auc": pr}, None))
    assert {name for name, g in gates.items() if not g["passed"]} == failed
    if "min_roc_auc" in failed:
        assert gates["min_roc_auc"]["detail"] == f"candidate roc_auc {roc:.4f} < 0.9000"


def test_only_the_metrics_given_a_threshold_are_gated():
    gates = gates_of({"roc_auc": 0.1, "pr_auc": 0.9}, None, thresholds={"pr_auc": 0.5})
    assert [g["name"] for g in gates] == ["min_pr_auc", "max_regression"]
    assert all(g["passed"] for g in gates)


def test_regression_within_limit_passes():
    gate = by_name(gates_of({"roc_auc": 0.94, "pr_auc": 0.5}, {"roc_auc": 0.95, "pr_auc": 0.5}))["max_regression"]
    assert gate["passed"] is True
    assert gate["value"] == pytest.approx(0.01)
    assert gate["detail"] == "roc_auc drop vs champion +0.0100 <= 0.0200"


def test_improvement_passes_with_negative_drop():
    gate = by_name(gates_of({"roc_auc": 0.97, "pr_auc": 0.5}, {"roc_auc": 0.95, "pr_auc": 0.5}))["max_regression"]
    assert gate["passed"] is True
    assert gate["value"] == pytest.approx(-0.02)
    assert gate["detail"].startswith("roc_auc drop vs champion -0.0200 <=")


def test_regression_exactly_at_the_limit_passes_binary_exact():
    # 0.75 - 0.5 == 0.25 exactly in binary floating point.
    gate = by_name(gates_of({"roc_auc": 0.5, "pr_auc": 0.5}, {"roc_auc": 0.75, "pr_auc": 0.5},
                            thresholds={"roc_auc": 0, "pr_auc": 0}, max_regression=0.25))["max_regression"]
    assert gate["value"] == 0.25
    assert gate["passed"] is True


@pytest.mark.parametrize("champion", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_regression_exactly_at_the_limit_passes_decimal(champion):
    # 0.9 - 0.88 is 0.020000000000000018 in floating point: still "exactly the limit" to a person.
    candidate = round(champion - 0.02, 2)
    gate = by_name(gates_of({"roc_auc": candidate, "pr_auc": 0.5}, {"roc_auc": champion, "pr_auc": 0.5}))[
        "max_regression"]
    assert gate["passed"] is True, gate
    assert gate["detail"] == "roc_auc drop vs champion +0.0200 <= 0.0200"


@pytest.mark.parametrize("candidate", [0.929, 0.9299, 0.90])
def test_regression_beyond_the_limit_fails(candidate):
    gate = by_name(gates_of({"roc_auc": candidate, "pr_auc": 0.5}, {"roc_auc": 0.95, "pr_auc": 0.5}))[
        "max_regression"]
    assert gate["passed"] is False
    assert gate["value"] == pytest.approx(0.95 - candidate)
    assert f"> {0.02:.4f}" in gate["detail"]


def test_thresholds_may_be_ints():
    gates = by_name(gates_of({"roc_auc": 0.5, "pr_auc": 0.5}, {"roc_auc": 0.6, "pr_auc": 0.5},
                             thresholds={"roc_auc": 0, "pr_auc": 1}, max_regression=0))
    assert gates["min_roc_auc"]["threshold"] == 0.0 and gates["min_roc_auc"]["passed"] is True
    assert isinstance(gates["min_pr_auc"]["threshold"], float) and gates["min_pr_auc"]["passed"] is False
    assert gates["max_regression"]["passed"] is False  # drop 0.1 > 0


def test_string_thresholds_are_refused_before_the_round_is_planned():
    # Thresholds used to be parsed with float() inside the gate, so "0.4" passed as 0.4. They
    # are now typed round settings, checked when the round is planned, with the param named.
    spec = parse_federation(federation_doc(), "inline")
    task = spec.load_task()
    with pytest.raises(ValueError, match="'gate_thresholds' gives 'roc_auc' the threshold '0.4'; use a number"):
        round_settings(spec, {"gate_thresholds": {"roc_auc": "0.4"}}, task)
    with pytest.raises(ValueError, match="param 'max_regression' must be a number"):
        round_settings(spec, {"max_regression": "0.05"}, task)
    with pytest.raises(ValueError, match="names metric 'accuracy', which the task"):
        round_settings(spec, {"gate_thresholds": {"accuracy": 0.9}}, task)
    settings = round_settings(spec, {"gate_thresholds": {"roc_auc": 0, "pr_auc": 0.25}, "max_regression": 0}, task)
    assert settings["gate_thresholds"] == {"roc_auc": 0, "pr_auc": 0.25} and settings["max_regression"] == 0


def test_a_metric_the_task_does_not_report_cannot_be_gated():
    with pytest.raises(KeyError, match="has no metric 'accuracy'"):
        gates_of({"roc_auc": 0.9, "pr_auc": 0.5}, None, thresholds={"accuracy": 0.5})


def test_the_fraud_task_ranks_regressions_by_pr_auc():
    # The built-in task's primary metric is PR-AUC (ROC-AUC saturates on rare fraud): a
    # ROC-AUC drop alone is not a regression, a PR-AUC drop is.
    task = parse_federation(federation_doc(), "inline").load_task()
    assert task.primary_metric == "pr_auc"
    champion = {"roc_auc": 0.99, "pr_auc": 0.50}
    steady = by_name(evaluate_gates({"roc_auc": 0.90, "pr_auc": 0.50}, champion, THRESHOLDS, 0.02, task))
    assert steady["max_regression"]["passed"] is True and steady["max_regression"]["value"] == 0.0
    assert steady["max_regression"]["detail"] == "pr_auc drop vs champion +0.0000 <= 0.0200"
    dropped = by_name(evaluate_gates({"roc_auc": 0.99, "pr_auc": 0.40}, champion, THRESHOLDS, 0.02, task))
    assert dropped["max_regression"]["passed"] is False
    assert dropped["max_regression"]["value"] == pytest.approx(0.10)
    assert dropped["max_regression"]["detail"] == "pr_auc drop vs champion +0.1000 > 0.0200"


# --- a metric where lower is better -------------------------------------------------------
@pytest.mark.parametrize("loss, passed", [(0.30, True), (0.40, True), (0.41, False)])
def test_a_lower_is_better_threshold_is_a_ceiling(loss, passed):
    gates = evaluate_gates({"log_loss": loss, "roc_auc": 0.9}, None, {"log_loss": 0.40, "roc_auc": 0.5}, 0.02,
                           LOSS_TASK)
    assert [g["name"] for g in gates] == ["max_log_loss", "min_roc_auc", "max_regression"]
    gate = gates[0]
    assert gate["passed"] is passed and gate["value"] == loss and gate["threshold"] == 0.40
    assert gate["detail"] == f"candidate log_loss {loss:.4f} {'<=' if passed else '>'} 0.4000"


def test_a_lower_is_better_primary_metric_regresses_when_it_rises():
    thresholds = {"log_loss": 1.0}
    better = evaluate_gates({"log_loss": 0.20, "roc_auc": 0.5}, {"log_loss": 0.25, "roc_auc": 0.9}, thresholds,
                            0.02, LOSS_TASK)[-1]
    # A fall in loss is an improvement (negative rise), whatever the other metrics did.
    assert better["passed"] is True and better["value"] == pytest.approx(-0.05)
    assert better["detail"] == "log_loss rise vs champion -0.0500 <= 0.0200"
    at_limit = evaluate_gates({"log_loss": 0.27, "roc_auc": 0.9}, {"log_loss": 0.25, "roc_auc": 0.9}, thresholds,
                              0.02, LOSS_TASK)[-1]
    assert at_limit["passed"] is True  # 0.27 - 0.25 carries float error; the limit is inclusive
    worse = evaluate_gates({"log_loss": 0.30, "roc_auc": 0.9}, {"log_loss": 0.25, "roc_auc": 0.9}, thresholds,
                           0.02, LOSS_TASK)[-1]
    assert worse["name"] == "max_regression" and worse["passed"] is False
    assert worse["value"] == pytest.approx(0.05)
    assert worse["detail"] == "log_loss rise vs champion +0.0500 > 0.0200"
