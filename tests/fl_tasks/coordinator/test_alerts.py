"""fl_tasks.coordinator.alerts: which alerts a round raises, at which thresholds, and what they say."""

from __future__ import annotations

import dataclasses

import pytest

from fl_tasks.config import AlertsSpec, DriftSpec, FederationSpec
from fl_tasks.coordinator.alerts import ALERT_KINDS, Alert, circuit_open_alert, round_alerts
from fl_tasks.coordinator.drift import DriftTable
from fl_tasks.coordinator.metrics import RoundMetrics
from fl_tasks.protocol.drift import ColumnDrift, DriftReport

QUIET = AlertsSpec(min_participation=None, max_latency_p95_seconds=None, max_metric_drop=None, on_rollback=False)


def spec(alerts: AlertsSpec = QUIET, drift: DriftSpec | None = None) -> FederationSpec:
    return FederationSpec(federation="banks", coordinator_bucket="coord", clients=(), alerts=alerts, drift=drift)


def metrics(**changes) -> RoundMetrics:
    base = RoundMetrics(federation="banks", round_id="000007", clients_expected=5, clients_committed=5,
                        clients_accepted=5, participation_rate=1.0)
    return dataclasses.replace(base, **changes)


def kinds(alerts: list[Alert]) -> list[str]:
    return [a.kind for a in alerts]


def alerts_of(s: FederationSpec, m: RoundMetrics, decision: str = "promoted", reason: str = "",
              drift: DriftTable | None = None, higher_is_better: bool = True) -> list[Alert]:
    return round_alerts(s, m, decision, reason, drift, higher_is_better)


def test_a_quiet_round_raises_nothing_and_the_defaults_raise_nothing_for_a_good_round():
    assert alerts_of(spec(), metrics()) == []
    assert alerts_of(spec(AlertsSpec()), metrics(primary_metric="auc", candidate={"auc": 0.9},
                                                 champion={"auc": 0.9})) == []


# --- low participation ------------------------------------------------------------------------
def test_participation_exactly_at_the_threshold_does_not_alert_and_below_it_does():
    s = spec(dataclasses.replace(QUIET, min_participation=0.6))
    assert alerts_of(s, metrics(clients_committed=3, participation_rate=3 / 5)) == []
    [alert] = alerts_of(s, metrics(clients_committed=2, participation_rate=2 / 5))
    assert alert.kind == "low_participation"
    assert alert.message == "banks round 000007: 2 of 5 silos sent updates (participation 40%, alert below 60%)"
    assert alert.figures == {"participation_rate": 0.4, "min_participation": 0.6, "clients_committed": 2.0,
                             "clients_expected": 5.0}
    assert alert.subject == "[fl banks] round 000007: low participation"


def test_participation_alert_is_off_when_its_threshold_is_null():
    assert alerts_of(spec(), metrics(clients_committed=0, participation_rate=0.0)) == []


# --- latency ----------------------------------------------------------------------------------
def test_latency_p95_exactly_at_the_threshold_does_not_alert_and_above_it_does():
    s = spec(dataclasses.replace(QUIET, max_latency_p95_seconds=600))
    at = metrics(latency_seconds={"bank-a": 600.0, "bank-b": 600.0})
    assert at.latency_p95 == 600.0 and alerts_of(s, at) == []
    above = metrics(latency_seconds={"bank-a": 100.0, "bank-b": 200.0, "bank-c": 900.0})
    [alert] = alerts_of(s, above)
    assert alert.kind == "high_latency"
    assert alert.message == ("banks round 000007: update latency p95 830s over 3 silos (alert above 600s; "
                             "slowest bank-c 900s)")
    assert alert.figures["latency_p95_seconds"] == pytest.approx(830.0)


def test_latency_alert_needs_latencies_and_a_threshold():
    assert alerts_of(spec(dataclasses.replace(QUIET, max_latency_p95_seconds=1)), metrics()) == []
    assert alerts_of(spec(), metrics(latency_seconds={"bank-a": 10_000.0})) == []


# --- accuracy drop ----------------------------------------------------------------------------
DROP = dataclasses.replace(QUIET, max_metric_drop=0.02)


def test_a_higher_is_better_metric_alerts_when_it_falls_by_more_than_the_allowed_drop():
    s = spec(DROP)
    # 0.85 - 0.83 is 0.020000000000000018 in floats: exactly the threshold on paper, no alert.
    at = metrics(primary_metric="pr_auc", candidate={"pr_auc": 0.83}, champion={"pr_auc": 0.85})
    assert alerts_of(s, at) == []
    better = metrics(primary_metric="pr_auc", candidate={"pr_auc": 0.95}, champion={"pr_auc": 0.85})
    assert alerts_of(s, better) == []
    worse = metrics(primary_metric="pr_auc", candidate={"pr_auc": 0.81}, champion={"pr_auc": 0.85})
    [alert] = alerts_of(s, worse)
    assert alert.kind == "accuracy_drop"
    assert alert.message == ("banks round 000007: candidate pr_auc 0.81 is 0.04 below the champion's 0.85 "
                             "(higher is better; alert when more than 0.02 below)")
    assert alert.figures["metric_drop"] == pytest.approx(0.04)
    assert alert.figures["candidate_pr_auc"] == 0.81 and alert.figures["champion_pr_auc"] == 0.85


def test_a_lower_is_better_metric_alerts_when_it_rises_and_not_when_it_falls():
    s = spec(DROP)
    risen = metrics(primary_metric="log_loss", candidate={"log_loss": 0.35}, champion={"log_loss": 0.30})
    [alert] = alerts_of(s, risen, higher_is_better=False)
    assert alert.message == ("banks round 000007: candidate log_loss 0.35 is 0.05 above the champion's 0.3 "
                             "(lower is better; alert when more than 0.02 above)")
    assert alert.figures["metric_drop"] == pytest.approx(0.05)
    assert alerts_of(s, risen, higher_is_better=True) == []  # the same numbers read the other way: better
    fallen = metrics(primary_metric="log_loss", candidate={"log_loss": 0.20}, champion={"log_loss": 0.30})
    assert alerts_of(s, fallen, higher_is_better=False) == []
    at = metrics(primary_metric="log_loss", candidate={"log_loss": 0.32}, champion={"log_loss": 0.30})
    assert alerts_of(s, at, higher_is_better=False) == []


def test_no_champion_or_no_primary_metric_means_no_drop_alert():
    s = spec(DROP)
    assert alerts_of(s, metrics(primary_metric="auc", candidate={"auc": 0.1})) == []
    assert alerts_of(s, metrics(candidate={"auc": 0.1}, champion={"auc": 0.9})) == []


# --- rollback ---------------------------------------------------------------------------------
def test_a_rejected_round_alerts_with_its_reason_when_on_rollback_is_set():
    s = spec(dataclasses.replace(QUIET, on_rollback=True))
    m = metrics(primary_metric="auc", candidate={"auc": 0.7}, champion={"auc": 0.8})
    [alert] = alerts_of(s, m, "rejected", "gate: auc 0.7 below the champion's 0.8\n(2 silos)")
    assert alert.kind == "rollback"
    assert alert.message == ("banks round 000007: candidate rolled back, the champion stays: gate: auc 0.7 below "
                             "the champion's 0.8 (2 silos)")
    assert alert.figures == {"candidate_auc": 0.7, "champion_auc": 0.8}
    assert alerts_of(s, m, "promoted", "ok") == []
    assert alerts_of(spec(), m, "rejected", "gate") == []  # on_rollback false


# --- drift ------------------------------------------------------------------------------------
def report(drifted: dict[str, bool]) -> DriftReport:
    share = sum(drifted.values()) / len(drifted)
    return DriftReport("first window (round 000001)", 1000, 1000, share, share >= 0.5,
                       {c: ColumnDrift(0.01 if d else 0.9, d, "ks") for c, d in drifted.items()})


def table() -> DriftTable:
    return DriftTable("000007", ("amount", "hour", "merchant", "country", "device"), {
        "bank-a": report({"amount": True, "hour": True, "merchant": True, "country": True, "device": False}),
        "bank-b": report({"amount": False, "hour": False, "merchant": False, "country": False, "device": False}),
        "bank-c": report({"amount": True, "hour": False, "merchant": False, "country": True, "device": True}),
        "bank-d": report({"amount": False, "hour": False, "merchant": False, "country": False, "device": True}),
    })


@pytest.mark.parametrize("action", ["warn", "block"])
def test_drifted_silos_alert_under_warn_and_block_with_their_share_and_top_columns(action):
    [alert] = alerts_of(spec(drift=DriftSpec(action=action)), metrics(), drift=table())
    assert alert.kind == "drift"
    outcome = "the candidate is not promoted" if action == "block" else "recorded, promotion not blocked"
    # amount and country drifted at both drifted silos, so they lead; bank-a's 4th column is counted.
    assert alert.message == ("banks round 000007: data drifted at 2 of 4 silos (50%): bank-a 80% of columns "
                             "(amount, country, hour +1); bank-c 60% of columns (amount, country, device); "
                             f"drift.action {action}: {outcome}")
    assert alert.figures == {"drifted_share": 0.5, "drifted_silos": 2.0, "silos_with_scores": 4.0,
                             "drifted_share_bank-a": 0.8, "drifted_share_bank-c": 0.6}


def test_drift_off_or_absent_or_undrifted_raises_no_drift_alert():
    assert alerts_of(spec(drift=DriftSpec(action="off")), metrics(), drift=table()) == []
    assert alerts_of(spec(drift=None), metrics(), drift=table()) == []
    assert alerts_of(spec(drift=DriftSpec(action="warn")), metrics(), drift=None) == []
    calm = DriftTable("000007", ("amount",), {"bank-a": report({"amount": False})})
    assert alerts_of(spec(drift=DriftSpec(action="block")), metrics(), drift=calm) == []


# --- all together, and the circuit breaker -----------------------------------------------------
def test_every_rule_can_fire_in_one_round_in_kind_order_and_each_names_federation_and_round():
    s = spec(AlertsSpec(min_participation=0.6, max_latency_p95_seconds=60, max_metric_drop=0.02, on_rollback=True),
             DriftSpec(action="warn"))
    m = metrics(clients_committed=2, participation_rate=0.4, latency_seconds={"bank-a": 90.0, "bank-c": 30.0},
                primary_metric="auc", candidate={"auc": 0.5}, champion={"auc": 0.9})
    found = alerts_of(s, m, "rejected", "auc fell", table())
    assert kinds(found) == ["low_participation", "high_latency", "drift", "accuracy_drop", "rollback"]
    for alert in found:
        assert alert.kind in ALERT_KINDS
        assert alert.message.startswith("banks round 000007: ") and "\n" not in alert.message
        assert alert.as_dict()["subject"] == alert.subject


def test_the_circuit_open_alert_names_the_k_rounds_their_reasons_and_the_reset_param():
    failures = [("000004", "no quorum"), ("000005", "gate: auc fell"), ("000006", "no quorum:\n1 of 5")]
    alert = circuit_open_alert("banks", "000007", failures, 3)
    assert alert.kind == "circuit_open" and alert.round_id == "000007"
    assert alert.message == ("banks round 000007: not dispatched, circuit breaker open after 3 consecutive failed "
                             "or rolled-back rounds (circuit_breaker.max_consecutive_failures 3): 000004: no quorum; "
                             "000005: gate: auc fell; 000006: no quorum: 1 of 5. Fix: remove the cause, then trigger "
                             "a round with the param reset_circuit_breaker set to true")
    assert alert.figures == {"consecutive_failures": 3.0, "max_consecutive_failures": 3.0}
    longer = circuit_open_alert("banks", "000009", [("000001", "x")] + failures, 3)
    assert "after 4 consecutive" in longer.message and "000001" not in longer.message
