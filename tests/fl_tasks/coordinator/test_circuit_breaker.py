"""The circuit breaker on real rounds: K failed rounds, then a refused dispatch with its
reason and alert, then an operator's reset."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from fl_tasks.coordinator import RoundFailed, RunContext


def failed_round(coordinator, run_id: str) -> dict:
    """A round whose silos never answer: its quorum is missed at the deadline."""
    round_id = coordinator.prepare(RunContext(run_id=run_id))
    coordinator.dispatch(round_id)
    late = datetime.fromisoformat(coordinator.load_plan(round_id).deadline) + timedelta(seconds=1)
    coordinator.close_round(round_id, coordinator.check_quorum(round_id, now_=late))
    return coordinator.summarize(round_id)


def test_after_k_failed_rounds_dispatch_is_refused_until_an_operator_resets(make_federation):
    spec, coordinator, _ = make_federation(circuit_breaker={"max_consecutive_failures": 2})
    first, second = failed_round(coordinator, "run-1"), failed_round(coordinator, "run-2")
    assert (first["decision"], second["decision"]) == ("no_model", "no_model")
    # The second failure opens the breaker: the round says so before the next one is refused.
    assert [a["kind"] for a in second["alerts"] if a["kind"] == "circuit_open"] == ["circuit_open"]

    refused_id = coordinator.prepare(RunContext(run_id="run-3"))
    with pytest.raises(RoundFailed, match="circuit breaker open: the last 2 rounds failed"):
        coordinator.dispatch(refused_id)
    for client in spec.clients:  # nothing reached the silos
        assert not coordinator.store.exists(client.bucket_name, f"{spec.federation}/rounds/{refused_id}/global/manifest.json")
    refused = coordinator.summarize(refused_id)
    assert refused["decision"] == "refused" and "reset_circuit_breaker" in refused["reason"]
    assert first["round_id"] in refused["reason"] and second["round_id"] in refused["reason"]
    [alert] = refused["alerts"]  # no participation alert for a round that dispatched nothing
    assert spec.federation in alert["message"] and refused_id in alert["message"]
    events = coordinator.audit.events(refused_id)
    assert any(e["event"] == "round_refused" for e in events)
    # Refused again while nobody resets it: the refusal does not close the streak.
    again = coordinator.prepare(RunContext(run_id="run-4"))
    with pytest.raises(RoundFailed, match="circuit breaker open"):
        coordinator.dispatch(again)
    coordinator.summarize(again)

    reset_id = coordinator.prepare(RunContext(run_id="run-5", params={"reset_circuit_breaker": True},
                                              triggered_by="admin"))
    assert sorted(coordinator.dispatch(reset_id)) == sorted(c.id for c in spec.clients)
    assert any(e["event"] == "circuit_breaker_reset" and e["by"] == "admin" for e in coordinator.audit.events(reset_id))
    decisions = [r.decision for r in coordinator.history.rounds()]
    assert decisions == ["no_model", "no_model", "refused", "refused"]
