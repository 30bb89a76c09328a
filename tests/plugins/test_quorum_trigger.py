"""QuorumTrigger: serialisation round trip and real async polling against a moto server."""

from __future__ import annotations

import asyncio
import importlib
from datetime import datetime, timedelta, timezone

import pytest
from fl_airflow.triggers import QuorumTrigger

from fl_tasks.protocol.storage import ObjectStore


def make_trigger(manifests, deadline, min_clients=2, endpoint_url=None, poll_interval=0.2, grace_seconds=None):
    return QuorumTrigger(round_id="000007", manifests=manifests, deadline=deadline.isoformat(),
                         required=min_clients, grace_seconds=grace_seconds, poll_interval=poll_interval,
                         endpoint_url=endpoint_url)


def test_serialize_round_trips_through_its_classpath():
    trigger = make_trigger({"a": ["bucket-a", "k/a"], "b": ["bucket-b", "k/b"]},
                           datetime(2030, 1, 1, tzinfo=timezone.utc), endpoint_url="http://127.0.0.1:9")
    classpath, kwargs = trigger.serialize()
    assert classpath == "fl_airflow.triggers.QuorumTrigger"
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs == {"round_id": "000007", "manifests": {"a": ["bucket-a", "k/a"], "b": ["bucket-b", "k/b"]},
                      "deadline": "2030-01-01T00:00:00+00:00", "required": 2, "grace_seconds": None,
                      "poll_interval": 0.2,
                      "endpoint_url": "http://127.0.0.1:9"}


@pytest.fixture
def buckets(s3_server):
    store = ObjectStore(s3_server.endpoint_url)
    for name in ("trig-a", "trig-b", "trig-c"):
        store.ensure_bucket(name)
        store.delete(name, "m.json")
    return store


async def first_event(trigger, timeout=20):
    async def collect():
        async for event in trigger.run():
            return event.payload

    return await asyncio.wait_for(collect(), timeout)


MANIFESTS = {"a": ["trig-a", "m.json"], "b": ["trig-b", "m.json"], "c": ["trig-c", "m.json"]}


def test_all_committed_fires_met_before_the_deadline(buckets, s3_server):
    for bucket in ("trig-a", "trig-b", "trig-c"):
        buckets.put_bytes(bucket, "m.json", b"{}")
    trigger = make_trigger(MANIFESTS, datetime.now(timezone.utc) + timedelta(hours=1), endpoint_url=s3_server.endpoint_url)
    event = asyncio.run(first_event(trigger))
    assert event["state"] == "met" and event["committed"] == ["a", "b", "c"]


def test_deadline_with_too_few_commits_fires_failed(buckets, s3_server):
    buckets.put_bytes("trig-a", "m.json", b"{}")
    trigger = make_trigger(MANIFESTS, datetime.now(timezone.utc) - timedelta(seconds=1), min_clients=2,
                           endpoint_url=s3_server.endpoint_url)
    event = asyncio.run(first_event(trigger))
    assert event["state"] == "failed"
    assert "1 of 3" in event["reason"] and "['b', 'c']" in event["reason"]


def test_waits_then_meets_quorum_at_the_deadline(buckets, s3_server):
    trigger = make_trigger(MANIFESTS, datetime.now(timezone.utc) + timedelta(seconds=2), min_clients=2,
                           endpoint_url=s3_server.endpoint_url)

    async def scenario():
        task = asyncio.create_task(first_event(trigger))
        await asyncio.sleep(0.6)
        assert not task.done()  # nobody committed yet: still waiting
        buckets.put_bytes("trig-b", "m.json", b"{}")
        buckets.put_bytes("trig-c", "m.json", b"{}")
        return await task

    event = asyncio.run(scenario())
    assert event["state"] == "met" and event["committed"] == ["b", "c"]
    assert "deadline passed with 2 of 3" in event["reason"]


def test_grace_period_closes_after_the_quorum_long_before_the_deadline(buckets, s3_server):
    trigger = make_trigger(MANIFESTS, datetime.now(timezone.utc) + timedelta(hours=1), min_clients=2,
                           endpoint_url=s3_server.endpoint_url, grace_seconds=3.0)

    async def scenario():
        task = asyncio.create_task(first_event(trigger))
        buckets.put_bytes("trig-a", "m.json", b"{}")
        buckets.put_bytes("trig-b", "m.json", b"{}")
        await asyncio.sleep(0.5)
        assert not task.done()  # quorum in, but the stragglers' grace period is still running
        return await task

    event = asyncio.run(scenario())
    assert event["state"] == "met" and event["committed"] == ["a", "b"]
    assert "grace period ended with 2 of 3" in event["reason"]
