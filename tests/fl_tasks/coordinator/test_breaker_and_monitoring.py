"""The circuit breaker's streak and reset, and the monitoring decision to start a round."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from fl_tasks.config import parse_federation
from fl_tasks.coordinator.breaker import BreakerState, CircuitBreaker, streak
from fl_tasks.coordinator.drift import DriftTable
from fl_tasks.coordinator.history import FederationHistory, RoundRecord
from fl_tasks.coordinator.metrics import RoundMetrics
from fl_tasks.coordinator.monitoring import Monitor, retrain_decision
from fl_tasks.protocol.drift import ColumnDrift, DriftReport
from tests.conftest import federation_doc

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def record(n: int, decision: str, candidate=None, champion=None, reason="") -> RoundRecord:
    metrics = RoundMetrics(federation="f", round_id=f"{n:06d}", clients_expected=3, clients_committed=3,
                           clients_accepted=3, participation_rate=1.0, primary_metric="pr_auc",
                           candidate=candidate or {}, champion=champion or {})
    return RoundRecord(round_id=f"{n:06d}", run_id=f"run-{n}", dag_id="fl_round__f", run_type="manual",
                       triggered_by="", decision=decision, version=str(n), base_version=str(n - 1),
                       reason=reason or f"reason {n}", finished_at=(T0 + timedelta(hours=n)).isoformat(), metrics=metrics)


def test_the_streak_counts_failures_since_the_last_promotion_and_skips_refusals():
    history = [record(1, "promoted"), record(2, "rejected"), record(3, "no_model"), record(4, "refused"),
               record(5, "rejected")]
    assert [r.round_id for r in streak(history, None)] == ["000002", "000003", "000005"]
    assert streak(history + [record(6, "promoted")], None) == []


def test_a_reset_starts_the_count_again():
    history = [record(n, "rejected") for n in range(1, 5)]
    assert len(streak(history, None)) == 4
    assert [r.round_id for r in streak(history, (T0 + timedelta(hours=2, minutes=30)).isoformat())] == ["000003", "000004"]


@pytest.mark.parametrize("failures, limit, is_open", [(2, 3, False), (3, 3, True), (5, 3, True), (9, None, False)])
def test_the_breaker_opens_at_k_consecutive_failures(failures, limit, is_open):
    state = BreakerState(limit, [record(n, "rejected") for n in range(failures)], None)
    assert state.open is is_open


def test_the_reason_names_the_rounds_and_the_fix():
    state = BreakerState(2, [record(7, "rejected", reason="min_pr_auc failed"), record(8, "no_model", reason="quorum missed")], None)
    text = state.reason()
    assert "000007 rolled back: min_pr_auc failed" in text and "000008 failed: quorum missed" in text
    assert "max_consecutive_failures is 2" in text and "reset_circuit_breaker" in text


def test_the_reset_is_kept_in_the_coordinator_bucket(s3_server):
    from fl_tasks.protocol.storage import ObjectStore

    store = ObjectStore()
    store.ensure_bucket("breaker-test")
    breaker = CircuitBreaker(store, "breaker-test", "f", 2)
    history = [record(1, "rejected"), record(2, "rejected")]
    assert breaker.state(history).open
    breaker.reset((T0 + timedelta(hours=3)).isoformat(), "admin", "manual__x")
    state = breaker.state(history)
    assert not state.open and state.reset["by"] == "admin"
    assert breaker.state(history + [record(4, "rejected"), record(5, "no_model")]).open


def spec(**monitoring):
    return parse_federation(federation_doc(monitoring=monitoring, drift={}), "f.yaml")


def table(drifted: int, total: int) -> DriftTable:
    cell = ColumnDrift(0.3, True, "Wasserstein distance (normed)")
    silos = {f"silo-{i}": DriftReport("first window", 100, 100, 1.0 if i < drifted else 0.0, i < drifted, {"V1": cell})
             for i in range(total)}
    return DriftTable("000009", ("V1",), silos)


def test_a_round_is_due_when_enough_silos_drifted():
    s = spec(max_drifted_share=0.5)
    assert not retrain_decision(s, [], table(1, 3), None, T0, {}).start
    due = retrain_decision(s, [], table(2, 3), None, T0, {})
    assert due.start and "2 of 3 silos drifted in round 000009" in due.reason and "silo-0, silo-1" in due.reason


def test_a_round_is_due_when_the_champion_falls_below_its_floor():
    s = spec(max_drifted_share=None, min_metrics={"pr_auc": 0.3, "log_loss": 0.5})
    history = [record(1, "promoted", candidate={"pr_auc": 0.5}), record(2, "rejected", candidate={"pr_auc": 0.9},
                                                                         champion={"pr_auc": 0.25, "log_loss": 0.4})]
    due = retrain_decision(s, history, None, None, T0, {"pr_auc": True, "log_loss": False})
    assert due.start and due.champion == {"pr_auc": 0.25, "log_loss": 0.4}
    assert due.reasons == ["quality: champion pr_auc 0.2500 < 0.3 (federated evaluation in round 000002)"]
    # A lower-is-better metric is due above its bound.
    worse = [record(1, "promoted", candidate={"pr_auc": 0.5, "log_loss": 0.7})]
    assert retrain_decision(s, worse, None, None, T0, {"pr_auc": True, "log_loss": False}).reasons == [
        "quality: champion log_loss 0.7000 > 0.5 (federated evaluation in round 000001)"]


def test_an_evaluation_only_run_newer_than_the_last_round_gives_the_champions_figures():
    s = spec(max_drifted_share=None, min_metrics={"pr_auc": 0.3})
    history = [record(1, "promoted", candidate={"pr_auc": 0.5})]  # finished at T0 + 1 h
    later = {"evaluation_id": "eval-000001", "finished_at": (T0 + timedelta(hours=5)).isoformat(), "version": "1",
             "figures": {"pr_auc": 0.2}}
    due = retrain_decision(s, history, None, None, T0, {"pr_auc": True}, later)
    assert due.start and due.champion == {"pr_auc": 0.2}
    assert due.reasons == ["quality: champion pr_auc 0.2000 < 0.3 (federated evaluation in evaluation-only run "
                           "eval-000001)"]
    earlier = {**later, "finished_at": T0.isoformat(), "figures": {"pr_auc": 0.1}}
    assert not retrain_decision(s, history, None, None, T0, {"pr_auc": True}, earlier).start  # the round is newer


def test_the_cooldown_holds_a_due_round_back():
    s = spec(max_drifted_share=0.5, cooldown_minutes=60)
    recent = {"at": (T0 - timedelta(minutes=20)).isoformat()}
    held = retrain_decision(s, [], table(3, 3), recent, T0, {})
    assert not held.start and held.reasons and "20 minutes ago" in held.held_back
    assert retrain_decision(s, [], table(3, 3), {"at": (T0 - timedelta(minutes=61)).isoformat()}, T0, {}).start


def test_the_monitor_reads_the_latest_drift_table_and_records_its_request(s3_server):
    from fl_tasks.protocol.storage import ObjectStore

    s = spec(max_drifted_share=0.5)
    store = ObjectStore()
    store.ensure_bucket(s.coordinator_bucket)
    history = FederationHistory(store, s.coordinator_bucket, s.federation)
    for n in (1, 2):
        history.record(record(n, "promoted", candidate={"pr_auc": 0.5}))
    import json

    store.put_bytes(s.coordinator_bucket, f"{s.federation}/rounds/000001/drift.json",
                    json.dumps({**table(3, 3).as_dict(), "round_id": "000001"}).encode())
    monitor = Monitor(s, store)
    decision = monitor.check(T0, {})
    assert decision.start and decision.drift_round == "000001"
    monitor.record_request(decision, T0, "monitor-run")
    assert monitor.last_request()["reason"] == decision.reason
    assert not monitor.check(T0 + timedelta(minutes=5), {}).start  # cooldown
