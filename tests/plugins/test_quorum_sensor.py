"""QuorumSensor: defers instead of holding a slot; closes the round on the trigger's event."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from fl_airflow.sensors import QuorumSensor
from fl_airflow.triggers import QuorumTrigger

from fl_tasks.coordinator import RunContext


@pytest.fixture
def prepared(make_federation):
    spec, coordinator, clients = make_federation()
    round_id = coordinator.prepare(RunContext(run_id="sensor-test"))
    coordinator.dispatch(round_id)
    return spec.source, coordinator, round_id, clients


def test_defers_to_the_quorum_trigger_while_clients_train(prepared):
    path, coordinator, round_id, clients = prepared
    sensor = QuorumSensor(task_id="wait_for_quorum", federation_file=str(path), round_id=round_id)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context={})
    trigger = deferred.value.trigger
    assert isinstance(trigger, QuorumTrigger)
    assert deferred.value.method_name == "execute_complete"
    assert trigger.required == 2 and trigger.grace_seconds is None and sorted(trigger.clients) == ["silo-0", "silo-1", "silo-2"]
    federation = coordinator.spec.federation
    assert trigger.clients["silo-1"]["answer_key"] == f"{federation}/rounds/{round_id}/update/manifest.json"
    assert trigger.clients["silo-1"]["decline_key"] == f"{federation}/rounds/{round_id}/update/decline.json"
    assert trigger.clients["silo-1"]["signing_conn_id"] == "fl_signing_silo_1"
    assert coordinator.records.get_json(round_id, "quorum.json") is None


def test_failed_event_fails_the_task_and_records_the_reason(prepared):
    path, coordinator, round_id, clients = prepared
    sensor = QuorumSensor(task_id="wait_for_quorum", federation_file=str(path), round_id=round_id)
    with pytest.raises(AirflowFailException, match="quorum not met"):
        sensor.execute_complete({}, {"state": "failed", "committed": [], "reason": "quorum not met: 0 of 3"})
    record = coordinator.records.get_json(round_id, "quorum.json")
    assert record["state"] == "failed" and record["committed"] == []


def test_met_event_returns_the_committed_clients(prepared):
    path, coordinator, round_id, clients = prepared
    sensor = QuorumSensor(task_id="wait_for_quorum", federation_file=str(path), round_id=round_id)
    for client_id in ("silo-0", "silo-2"):
        clients[client_id].answer(round_id)
    result = sensor.execute_complete({}, {"state": "met", "committed": ["silo-0", "silo-2"], "reason": "deadline"})
    assert result == {"round_id": round_id, "state": "met", "committed": ["silo-0", "silo-2"], "declined": {}}


def test_the_close_keeps_only_what_it_can_verify(prepared):
    """The trigger said silo-1 committed, but what silo-1's bucket holds now is not a manifest
    of this round: the close records what it read, and why silo-1 is not in."""
    path, coordinator, round_id, clients = prepared
    from fl_tasks import protocol

    clients["silo-0"].answer(round_id)
    bucket = coordinator.spec.client("silo-1").bucket_name
    coordinator.store.put_bytes(bucket, protocol.update_manifest_key("", coordinator.spec.federation, round_id),
                                b'{"kind": "update"}')
    sensor = QuorumSensor(task_id="wait_for_quorum", federation_file=str(path), round_id=round_id)
    result = sensor.execute_complete({}, {"state": "met", "committed": ["silo-0", "silo-1"], "reason": "deadline"})
    assert result["committed"] == ["silo-0"]
    record = coordinator.records.get_json(round_id, "quorum.json")
    assert "update manifest rejected" in record["unreadable"]["silo-1"]
