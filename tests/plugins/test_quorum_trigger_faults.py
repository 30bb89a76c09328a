"""QuorumTrigger with S3 failing (fault proxy in front of the moto server): it polls through
transient errors until the manifests appear, and reports what it cannot see instead of
crashing; the sensor turns such a report into a retryable failure that records nothing."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest
from fl_airflow.sensors import QuorumSensor
from fl_airflow.triggers import QuorumTrigger

from fl_tasks.config import load_federation
from fl_tasks.coordinator import Coordinator, RunContext
from devstack.embedded import create_buckets
from fl_tasks.protocol.storage import ObjectStore, StorageUnavailable

MANIFESTS = {"a": ["trigf-a", "m.json"], "b": ["trigf-b", "m.json"], "c": ["trigf-c", "m.json"]}


@pytest.fixture
def buckets(s3_server):
    store = ObjectStore(s3_server.endpoint_url)
    for bucket, key in MANIFESTS.values():
        store.ensure_bucket(bucket)
        store.delete(bucket, key)
    return store


def trigger_via(proxy, deadline: datetime, min_clients: int = 2) -> QuorumTrigger:
    return QuorumTrigger(round_id="000042", manifests=MANIFESTS, deadline=deadline.isoformat(),
                         required=min_clients, poll_interval=0.2, endpoint_url=proxy.url)


async def first_event(trigger, timeout=30):
    async def collect():
        async for event in trigger.run():
            return event.payload

    return await asyncio.wait_for(collect(), timeout)


@pytest.mark.parametrize("fault", ["503", "down"])
def test_keeps_polling_through_s3_errors_and_fires_when_the_manifests_appear(buckets, s3_proxy, fault, capfd):
    trigger = trigger_via(s3_proxy, datetime.now(timezone.utc) + timedelta(hours=1))
    logged: list[str] = []  # the trigger logs through Airflow's structlog, to stdout

    async def until_logged(text: str, timeout: float = 30) -> None:
        for _ in range(int(timeout / 0.1)):
            logged.append("".join(capfd.readouterr()))
            if text in "".join(logged):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"never logged {text!r}: {''.join(logged)[-2000:]}")

    async def scenario():
        if fault == "503":
            s3_proxy.fail(503, times=None)
        else:
            s3_proxy.down()
        task = asyncio.create_task(first_event(trigger))
        await until_logged("round 000042: S3 error while polling (1 in a row)")
        for bucket, key in MANIFESTS.values():
            buckets.put_bytes(bucket, key, b"{}")
        await until_logged("round 000042: S3 error while polling (2 in a row)")
        assert not task.done()  # still polling, not crashed, and blind to the manifests while S3 fails
        s3_proxy.clear()
        s3_proxy.up()
        return await task

    event = asyncio.run(scenario())
    assert event["state"] == "met" and event["committed"] == ["a", "b", "c"]
    logged.append("".join(capfd.readouterr()))
    assert "round 000042: S3 answers again after 2 failed polls" in "".join(logged)
    if fault == "503":
        assert len(s3_proxy.actions("fail")) >= 2 * len(MANIFESTS)


def test_s3_still_failing_at_the_deadline_fires_an_error_not_a_quorum_decision(buckets, s3_proxy):
    buckets.put_bytes("trigf-a", "m.json", b"{}")
    buckets.put_bytes("trigf-b", "m.json", b"{}")
    s3_proxy.down()
    event = asyncio.run(first_event(trigger_via(s3_proxy, datetime.now(timezone.utc) + timedelta(seconds=1.5))))
    assert event["state"] == "error" and event["committed"] == []
    assert "cannot read the update manifests of round 000042 at the deadline" in event["reason"]


def test_access_denied_is_reported_at_once_not_polled_through(buckets, s3_proxy):
    s3_proxy.fail(403, times=None)
    started = datetime.now(timezone.utc)
    event = asyncio.run(first_event(trigger_via(s3_proxy, started + timedelta(hours=1))))
    assert event["state"] == "error" and "(403)" in event["reason"] and "Forbidden" in event["reason"]
    assert "at the deadline" not in event["reason"]
    assert datetime.now(timezone.utc) - started < timedelta(seconds=10)


def test_the_sensor_fails_retryably_on_an_error_event_and_records_nothing(s3_server, mlflow_uri, write_federation):
    path = write_federation()
    coordinator = Coordinator(load_federation(path))
    create_buckets(coordinator.spec, coordinator.store)
    round_id = coordinator.prepare(RunContext(run_id="trigger-faults"))
    sensor = QuorumSensor(task_id="wait_for_quorum", federation_file=str(path), round_id=round_id)
    with pytest.raises(StorageUnavailable, match="at the deadline"):  # not AirflowFailException: retried
        sensor.execute_complete({}, {"state": "error", "committed": [], "reason": "cannot read the update "
                                     "manifests of round x at the deadline (3 failed polls): boom"})
    assert coordinator.store.get_bytes(coordinator.bucket, coordinator.round_key(round_id, "quorum.json")) is None
    assert coordinator.store.get_bytes(coordinator.bucket, coordinator.round_key(round_id, "failure.json")) is None
    # The retry decides from what S3 really holds.
    result = sensor.execute_complete({}, {"state": "met", "committed": ["silo-0", "silo-1"], "reason": "deadline"})
    assert result["committed"] == ["silo-0", "silo-1"]
    record = json.loads(coordinator.store.get_bytes(coordinator.bucket, coordinator.round_key(round_id, "quorum.json")))
    assert record["state"] == "met"
