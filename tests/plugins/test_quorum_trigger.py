"""QuorumTrigger: serialisation round trip, and real async polling against a moto server.

A commit counts only as a readable, verified manifest of this round and client; declines
never count, and enough of them end the wait early."""

from __future__ import annotations

import asyncio
import importlib
from datetime import datetime, timedelta, timezone

import pytest
from fl_airflow.triggers import QuorumTrigger

from fl_tasks import protocol
from fl_tasks.protocol import DeclineManifest, UpdateManifest
from fl_tasks.protocol import signing
from fl_tasks.protocol.storage import ObjectStore

ROUND, FEDERATION = "000007", "trig"
CLIENTS = ("a", "b", "c")
KEYS = {c: f"key-of-client-{c}-0123456789" for c in CLIENTS}


def clients(endpoint_url=None, bucket_prefix="trig"):
    return {c: {"bucket": f"{bucket_prefix}-{c}", "answer_key": protocol.update_manifest_key("", FEDERATION, ROUND),
                "decline_key": protocol.decline_key("", FEDERATION, ROUND), "aws_conn_id": None,
                "endpoint_url": endpoint_url, "signing_conn_id": f"fl_signing_{c}"} for c in CLIENTS}


def make_trigger(deadline, min_clients=2, endpoint_url=None, poll_interval=0.2, grace_seconds=None,
                 require_signatures=False, bucket_prefix="trig"):
    return QuorumTrigger(round_id=ROUND, federation=FEDERATION, clients=clients(endpoint_url, bucket_prefix),
                         deadline=deadline.isoformat(), required=min_clients, grace_seconds=grace_seconds,
                         poll_interval=poll_interval, require_signatures=require_signatures)


def update_manifest(client: str, round_id: str = ROUND, sign: bool = False) -> bytes:
    manifest = UpdateManifest(client_id=client, federation=FEDERATION, round_id=round_id, base_model_version="seed",
                              base_sha256="0" * 64, num_examples=10, codec="fp32", payload_sha256="1" * 64,
                              payload_bytes=100)
    return (signing.sign_manifest(manifest, KEYS[client]) if sign else manifest).to_json()


def decline(client: str, reason: str = "column 'amount' missing") -> bytes:
    return DeclineManifest(client_id=client, federation=FEDERATION, round_id=ROUND, reason=reason).to_json()


def test_serialize_round_trips_through_its_classpath():
    trigger = make_trigger(datetime(2030, 1, 1, tzinfo=timezone.utc), endpoint_url="http://127.0.0.1:9",
                           require_signatures=True)
    classpath, kwargs = trigger.serialize()
    assert classpath == "fl_airflow.triggers.QuorumTrigger"
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs == {"round_id": ROUND, "federation": FEDERATION, "clients": clients("http://127.0.0.1:9"),
                      "deadline": "2030-01-01T00:00:00+00:00", "required": 2, "grace_seconds": None,
                      "poll_interval": 0.2, "require_signatures": True, "answers": "update", "binding": {}}
    assert "key-of-client" not in repr(kwargs)  # no secret is ever serialised


@pytest.fixture
def buckets(s3_server):
    store = ObjectStore(s3_server.endpoint_url)
    for c in CLIENTS:
        store.ensure_bucket(f"trig-{c}")
        for key in (protocol.update_manifest_key("", FEDERATION, ROUND), protocol.decline_key("", FEDERATION, ROUND)):
            store.delete(f"trig-{c}", key)
    return store


def commit(store, client: str, data: bytes, kind: str = "update") -> None:
    key = protocol.update_manifest_key("", FEDERATION, ROUND) if kind == "update" else \
        protocol.decline_key("", FEDERATION, ROUND)
    store.put_bytes(f"trig-{client}", key, data)


async def first_event(trigger, timeout=20):
    async def collect():
        async for event in trigger.run():
            return event.payload

    return await asyncio.wait_for(collect(), timeout)


def test_all_committed_fires_met_before_the_deadline(buckets, s3_server):
    for c in CLIENTS:
        commit(buckets, c, update_manifest(c))
    event = asyncio.run(first_event(make_trigger(datetime.now(timezone.utc) + timedelta(hours=1),
                                                 endpoint_url=s3_server.endpoint_url)))
    assert event["state"] == "met" and event["committed"] == ["a", "b", "c"]


def test_deadline_with_too_few_commits_fires_failed(buckets, s3_server):
    commit(buckets, "a", update_manifest("a"))
    event = asyncio.run(first_event(make_trigger(datetime.now(timezone.utc) - timedelta(seconds=1),
                                                 endpoint_url=s3_server.endpoint_url)))
    assert event["state"] == "failed"
    assert "1 of 3" in event["reason"] and "['b', 'c']" in event["reason"]


def test_waits_then_meets_quorum_at_the_deadline(buckets, s3_server):
    trigger = make_trigger(datetime.now(timezone.utc) + timedelta(seconds=2), endpoint_url=s3_server.endpoint_url)

    async def scenario():
        task = asyncio.create_task(first_event(trigger))
        await asyncio.sleep(0.6)
        assert not task.done()  # nobody committed yet: still waiting
        commit(buckets, "b", update_manifest("b"))
        commit(buckets, "c", update_manifest("c"))
        return await task

    event = asyncio.run(scenario())
    assert event["state"] == "met" and event["committed"] == ["b", "c"]
    assert "deadline passed with 2 of 3" in event["reason"]


def test_grace_period_closes_after_the_quorum_long_before_the_deadline(buckets, s3_server):
    trigger = make_trigger(datetime.now(timezone.utc) + timedelta(hours=1), endpoint_url=s3_server.endpoint_url,
                           grace_seconds=3.0)

    async def scenario():
        task = asyncio.create_task(first_event(trigger))
        commit(buckets, "a", update_manifest("a"))
        commit(buckets, "b", update_manifest("b"))
        await asyncio.sleep(0.5)
        assert not task.done()  # quorum in, but the stragglers' grace period is still running
        return await task

    event = asyncio.run(scenario())
    assert event["state"] == "met" and event["committed"] == ["a", "b"]
    assert "grace period ended with 2 of 3" in event["reason"]


def test_declines_never_count_and_end_the_wait_once_the_quorum_is_out_of_reach(buckets, s3_server):
    commit(buckets, "a", update_manifest("a"))
    commit(buckets, "b", decline("b", "column 'amount' missing"), kind="decline")
    commit(buckets, "c", decline("c", "0 rows in the data window"), kind="decline")
    started = datetime.now(timezone.utc)
    event = asyncio.run(first_event(make_trigger(started + timedelta(hours=1), endpoint_url=s3_server.endpoint_url)))
    assert event["state"] == "failed" and event["committed"] == ["a"]
    assert event["declined"] == {"b": "column 'amount' missing", "c": "0 rows in the data window"}
    assert "quorum of 2 cannot be reached: 2 of 3 clients declined" in event["reason"]
    assert "b declined: column 'amount' missing" in event["reason"]
    assert datetime.now(timezone.utc) - started < timedelta(seconds=10)  # not at the deadline


def test_a_garbage_or_foreign_commit_does_not_count_towards_the_quorum(buckets, s3_server):
    """An unreadable manifest, another round's manifest and an unsigned one where signatures
    are required never count: they cannot start the grace period or close the round."""
    commit(buckets, "a", update_manifest("a", sign=True))
    commit(buckets, "b", b"\x00garbage that is not a manifest")
    commit(buckets, "c", update_manifest("c", sign=False))
    trigger = make_trigger(datetime.now(timezone.utc) + timedelta(seconds=2), endpoint_url=s3_server.endpoint_url,
                           grace_seconds=0.0, require_signatures=True)
    import os

    env = {f"AIRFLOW_CONN_FL_SIGNING_{c.upper()}": f'{{"conn_type": "generic", "password": "{KEYS[c]}"}}'
           for c in CLIENTS}
    os.environ.update(env)
    try:
        event = asyncio.run(first_event(trigger))
    finally:
        for name in env:
            os.environ.pop(name)
    assert event["state"] == "failed" and event["committed"] == ["a"]  # only the verified one
    assert "quorum not met: 1 of 3" in event["reason"]


def test_a_broken_update_beside_a_valid_decline_is_a_rejection_as_the_coordinator_sees_it(buckets, s3_server):
    """The trigger decides as the coordinator's intake does: an update manifest, even a bad
    one, is the silo's answer; a decline counts only when there is no update manifest."""
    commit(buckets, "a", update_manifest("a"))
    commit(buckets, "b", update_manifest("b"))
    commit(buckets, "c", b"{not json")
    commit(buckets, "c", decline("c"), kind="decline")
    event = asyncio.run(first_event(make_trigger(datetime.now(timezone.utc) + timedelta(seconds=1.5),
                                                 endpoint_url=s3_server.endpoint_url)))
    assert event["state"] == "met" and event["committed"] == ["a", "b"] and event["declined"] == {}


def test_a_silo_whose_s3_connection_is_missing_counts_as_not_committed(buckets, s3_server, capfd):
    for c in CLIENTS:
        commit(buckets, c, update_manifest(c))
    trigger = make_trigger(datetime.now(timezone.utc) + timedelta(seconds=1.5), endpoint_url=s3_server.endpoint_url)
    trigger.clients["c"] = {**trigger.clients["c"], "aws_conn_id": "aws_of_nobody"}
    event = asyncio.run(first_event(trigger))
    assert event["state"] == "met" and event["committed"] == ["a", "b"]
    logged = "".join(capfd.readouterr())
    assert "c counts as not committed: bucket unreachable: Airflow connection 'aws_of_nobody'" in logged
