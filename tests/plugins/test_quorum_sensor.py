"""QuorumSensor: defers instead of holding a slot; closes the round on the trigger's event."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from fl_airflow.sensors import QuorumSensor
from fl_airflow.triggers import QuorumTrigger

from fl_tasks.config import load_federation
from fl_tasks.coordinator import Coordinator, RunContext
from devstack.embedded import create_buckets


@pytest.fixture
def prepared(s3_server, mlflow_uri, write_federation):
    path = write_federation()
    spec = load_federation(path)
    coordinator = Coordinator(spec)
    create_buckets(spec, coordinator.store)
    round_id = coordinator.prepare(RunContext(run_id="sensor-test"))
    coordinator.dispatch(round_id)
    return path, coordinator, round_id


def test_defers_to_the_quorum_trigger_while_clients_train(prepared):
    path, coordinator, round_id = prepared
    sensor = QuorumSensor(task_id="wait_for_quorum", federation_file=str(path), round_id=round_id)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context={})
    trigger = deferred.value.trigger
    assert isinstance(trigger, QuorumTrigger)
    assert deferred.value.method_name == "execute_complete"
    assert trigger.required == 2 and trigger.grace_seconds is None and sorted(trigger.manifests) == ["silo-0", "silo-1", "silo-2"]
    assert trigger.manifests["silo-1"][1] == f"{coordinator.spec.federation}/rounds/{round_id}/update/manifest.json"
    assert coordinator.store.get_bytes(coordinator.bucket, coordinator.round_key(round_id, "quorum.json")) is None


def test_failed_event_fails_the_task_and_records_the_reason(prepared):
    path, coordinator, round_id = prepared
    sensor = QuorumSensor(task_id="wait_for_quorum", federation_file=str(path), round_id=round_id)
    with pytest.raises(AirflowFailException, match="quorum not met"):
        sensor.execute_complete({}, {"state": "failed", "committed": [], "reason": "quorum not met: 0 of 3"})
    record = json.loads(coordinator.store.get_bytes(coordinator.bucket, coordinator.round_key(round_id, "quorum.json")))
    assert record["state"] == "failed" and record["committed"] == []


def test_met_event_returns_the_committed_clients(prepared):
    path, coordinator, round_id = prepared
    sensor = QuorumSensor(task_id="wait_for_quorum", federation_file=str(path), round_id=round_id)
    result = sensor.execute_complete({}, {"state": "met", "committed": ["silo-0", "silo-2"], "reason": "deadline"})
    assert result == {"round_id": round_id, "committed": ["silo-0", "silo-2"]}
