"""Round metrics: percentiles against numpy, latency from dispatch to commit, bytes, weights,
reasons grouped under stable names, and MLflow names."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from fl_tasks.coordinator.metrics import (DECLINE_CODES, REJECTION_CODES, RoundMetrics, percentile, reason_code,
                                          round_metrics)
from fl_tasks.coordinator.plan import RoundPlan


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0], [5.0, 1.0, 9.5, 2.0, 7.0, 7.0, 0.5]])
@pytest.mark.parametrize("q", [0, 50, 90, 95, 100])
def test_percentile_is_numpys_linear_interpolation(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_none():
    assert percentile([], 95) is None


def plan(clients=("a", "b", "c", "d"), base_bytes=1000) -> RoundPlan:
    return RoundPlan(federation="f", round_id="000004", run_id="r", run_type="manual", triggered_by="", base_version="3",
                     base_origin="champion", base_sha256="0" * 64, base_bytes=base_bytes, deadline="", clients=list(clients),
                     settings={}, aggregation={}, screening={}, base_round_id=None, training={}, data_window={},
                     created_at="", staleness={}, task={}, contract={}, require_signatures=False)


T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


class EvaluationPlanStub:  # the two fields the figures read
    models = {"candidate": {"bytes": 1000}, "champion": {"bytes": 1000}}
    clients = ["a", "b"]


def test_round_figures_come_from_the_records():
    closed = {"committed": ["a", "b", "c"], "commit_times": {"a": at(10), "b": at(40), "c": at(25)},
              "declined": {"d": "column 'Amount' missing"}, "unreadable": {"e": "unsigned update: ..."}}
    summary = {"accepted": [{"client_id": "a", "influence": 0.25}, {"client_id": "b", "influence": 0.75}],
               "rejected": [{"client_id": "c", "reason": "update norm 40 exceeds 5 x the round's median norm 2"}]}
    validation = {"primary_metric": "pr_auc", "candidate": {"pr_auc": 0.5}, "champion": {"pr_auc": 0.4}}
    m = round_metrics(plan(), {"a": at(0), "b": at(0), "c": at(5), "d": at(0)}, closed, {"a": 300, "b": 300, "c": 900},
                      summary, EvaluationPlanStub(), validation, 0.5)
    assert m.participation_rate == 0.75 and (m.clients_committed, m.clients_accepted) == (3, 2)
    assert m.latency_seconds == {"a": 10.0, "b": 40.0, "c": 20.0}
    assert m.latency_p50 == 20.0 and m.latency_max == 40.0
    assert m.latency_p95 == pytest.approx(float(np.percentile([10, 40, 20], 95)))
    assert m.bytes_down == 4 * 1000 + 2 * 2 * 1000 and m.bytes_up == 1500
    assert m.weights == {"a": 0.25, "b": 0.75}
    assert m.rejected_by_reason == {"norm_ratio": 1, "signature": 1}
    assert m.declined_by_reason == {"data_contract": 1}
    flat = m.flat()
    assert flat["participation_rate"] == 0.75 and flat["latency_p95_seconds"] == m.latency_p95
    assert flat["weight_a"] == 0.25 and flat["rejected_norm_ratio"] == 1 and flat["declined_data_contract"] == 1
    assert flat["candidate_pr_auc"] == 0.5 and flat["drifted_share"] == 0.5
    assert RoundMetrics.from_dict(m.as_dict()) == m


def test_a_round_that_stopped_at_dispatch_still_has_figures():
    m = round_metrics(plan(), {}, None, {}, None, None, None, None)
    assert m.participation_rate == 0 and m.latency_p95 is None and m.bytes_down == 0
    assert "latency_p95_seconds" not in m.flat() and "drifted_share" not in m.flat()


@pytest.mark.parametrize("reason, code", [
    ("update norm 12 exceeds the bound 10", "norm_bound"),
    ("num_examples 99999 is over the 500 declared for this client", "example_count"),
    ("cosine -0.900 to the mean of the other updates is below 0.1", "direction"),
    ("stale update: trained on version 3, 2 behind", "stale_base"),
    ("signed update but no signing key for client 'x'", "signature"),
    ("something nobody foresaw", "other"),
])
def test_rejection_reasons_get_stable_names(reason, code):
    assert reason_code(reason, REJECTION_CODES) == code


def test_decline_reasons_get_stable_names():
    assert reason_code("task x version 2 is installed here, the round needs version 3", DECLINE_CODES) == "task_mismatch"
    assert reason_code("data source unreadable: no such file", DECLINE_CODES) == "data_source"
