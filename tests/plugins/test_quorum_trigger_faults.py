"""QuorumTrigger with S3 failing (fault proxy in front of the moto server): it polls through
transient errors until the manifests appear, and reports what it cannot see instead of
crashing; the sensor turns such a report into a retryable failure that records nothing."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from fl_airflow.sensors import QuorumSensor
from fl_airflow.triggers import QuorumTrigger

from fl_tasks import protocol
from fl_tasks.coordinator import RunContext
from fl_tasks.protocol.storage import ObjectStore, StorageUnavailable

from tests.plugins.test_quorum_trigger import CLIENTS, ROUND, make_trigger, update_manifest

ROUND_KEY = protocol.update_manifest_key("", "trig", ROUND)


@pytest.fixture
def buckets(s3_server):
    store = ObjectStore(s3_server.endpoint_url)
    for c in CLIENTS:
        store.ensure_bucket(f"trigf-{c}")
        store.delete(f"trigf-{c}", ROUND_KEY)
    return store


def trigger_via(proxy, deadline: datetime, min_clients: int = 2) -> QuorumTrigger:
    return make_trigger(deadline, min_clients, endpoint_url=proxy.url, bucket_prefix="trigf")


def commit_all(store) -> None:
    for c in CLIENTS:
        store.put_bytes(f"trigf-{c}", ROUND_KEY, update_manifest(c))


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
        await until_logged(f"round {ROUND}: S3 unreachable for every silo (1 polls in a row)")
        commit_all(buckets)
        await until_logged(f"round {ROUND}: S3 unreachable for every silo (2 polls in a row)")
        assert not task.done()  # still polling, not crashed, and blind to the manifests while S3 fails
        s3_proxy.clear()
        s3_proxy.up()
        return await task

    event = asyncio.run(scenario())
    assert event["state"] == "met" and event["committed"] == ["a", "b", "c"]
    logged.append("".join(capfd.readouterr()))
    assert f"round {ROUND}: S3 answers again after 2 failed polls" in "".join(logged)
    if fault == "503":
        assert len(s3_proxy.actions("fail")) >= 2 * len(CLIENTS)


def test_s3_still_failing_at_the_deadline_fires_an_error_not_a_quorum_decision(buckets, s3_proxy):
    commit_all(buckets)
    s3_proxy.down()
    event = asyncio.run(first_event(trigger_via(s3_proxy, datetime.now(timezone.utc) + timedelta(seconds=1.5))))
    assert event["state"] == "error" and event["committed"] == []
    assert f"cannot read the silos' answers of round {ROUND} at the deadline" in event["reason"]


def test_one_silo_that_cannot_be_read_counts_as_not_committed_and_the_others_go_on(buckets, s3_proxy, capfd):
    """Access denied on one silo's bucket (HEAD and GET) is that silo's problem: logged, not
    committed, never an error for the round."""
    commit_all(buckets)
    s3_proxy.fail(403, times=None, match=r"/trigf-b/")
    started = datetime.now(timezone.utc)
    event = asyncio.run(first_event(trigger_via(s3_proxy, started + timedelta(seconds=2))))
    assert event["state"] == "met" and event["committed"] == ["a", "c"]
    assert datetime.now(timezone.utc) - started < timedelta(seconds=15)
    logged = "".join(capfd.readouterr())
    assert f"round {ROUND}: b counts as not committed: update manifest unreadable: storage error 403" in logged


def test_the_sensor_fails_retryably_on_an_error_event_and_records_nothing(make_federation):
    spec, coordinator, clients = make_federation()
    round_id = coordinator.prepare(RunContext(run_id="trigger-faults"))
    coordinator.dispatch(round_id)
    for client_id in ("silo-0", "silo-1"):
        clients[client_id].answer(round_id)
    sensor = QuorumSensor(task_id="wait_for_quorum", federation_file=spec.source, round_id=round_id)
    with pytest.raises(StorageUnavailable, match="at the deadline"):  # not AirflowFailException: retried
        sensor.execute_complete({}, {"state": "error", "committed": [], "reason": "cannot read the update "
                                     "manifests of round x at the deadline (3 failed polls): boom"})
    assert coordinator.records.get_json(round_id, "quorum.json") is None
    assert coordinator.records.get_json(round_id, "failure.json") is None
    # The retry decides from what S3 really holds.
    result = sensor.execute_complete({}, {"state": "met", "committed": ["silo-0", "silo-1"], "reason": "deadline"})
    assert result["committed"] == ["silo-0", "silo-1"]
    record = coordinator.records.get_json(round_id, "quorum.json")
    assert record["state"] == "met" and record["committed"] == ["silo-0", "silo-1"]
