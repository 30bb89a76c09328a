"""AnswerWatcher with many silos: those that share a bucket are read by listing the common
prefix of their manifests (a few requests per poll, plus a GET per new or changed manifest),
the others by concurrent HEADs; both paths decide every silo the same way. Real requests to
the moto server on loopback, counted as they are sent."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from fl_airflow import answers
from fl_airflow.triggers import QuorumTrigger

from fl_tasks import protocol
from fl_tasks.protocol.storage import ObjectStore

from tests.plugins.test_quorum_trigger import FEDERATION, ROUND

SHARED = "listing-shared"
SILOS = [f"silo-{i:03d}" for i in range(300)]
OWN = ["own-a", "own-b", "own-c"]  # each in a bucket of its own: HEADs


def info(client: str, bucket: str, prefix: str, endpoint_url: str) -> dict:
    return {"bucket": bucket, "answer_key": protocol.update_manifest_key(prefix, FEDERATION, ROUND),
            "decline_key": protocol.decline_key(prefix, FEDERATION, ROUND), "aws_conn_id": None,
            "endpoint_url": endpoint_url, "signing_conn_id": f"fl_signing_{client}"}


def make_trigger(endpoint_url: str, silos=SILOS, own=OWN) -> QuorumTrigger:
    clients = {c: info(c, SHARED, c, endpoint_url) for c in silos}
    clients.update({c: info(c, f"listing-{c}", "", endpoint_url) for c in own})
    return QuorumTrigger(round_id=ROUND, federation=FEDERATION, clients=clients,
                         deadline=(datetime.now(timezone.utc) + timedelta(hours=1)).isoformat(), required=2)


def _manifest(client: str) -> bytes:
    from fl_tasks.protocol import UpdateManifest

    return UpdateManifest(client_id=client, federation=FEDERATION, round_id=ROUND, base_model_version="seed",
                          base_sha256="0" * 64, num_examples=10, codec="fp32", payload_sha256="1" * 64,
                          payload_bytes=100).to_json()


def _decline(client: str, reason: str) -> bytes:
    from fl_tasks.protocol import DeclineManifest

    return DeclineManifest(client_id=client, federation=FEDERATION, round_id=ROUND, reason=reason).to_json()


@pytest.fixture(scope="module")
def store(s3_server):
    """The shared bucket: 300 silos' global models and manifests and their payloads (900
    objects besides the answers), the first 150 committed, 20 declined, 5 garbage, 3 with
    both a broken update and a valid decline; and three silos in buckets of their own."""
    store = ObjectStore(s3_server.endpoint_url)
    for bucket in [SHARED] + [f"listing-{c}" for c in OWN]:
        store.ensure_bucket(bucket)
    writes = []
    for i, c in enumerate(SILOS):
        for key in (protocol.global_model_key(c, FEDERATION, ROUND), protocol.global_manifest_key(c, FEDERATION, ROUND),
                    protocol.update_payload_key(c, FEDERATION, ROUND)):
            writes.append((SHARED, key, b"x"))
        if i < 150:
            writes.append((SHARED, protocol.update_manifest_key(c, FEDERATION, ROUND), _manifest(c)))
        elif i < 170:
            writes.append((SHARED, protocol.decline_key(c, FEDERATION, ROUND), _decline(c, f"reason {i}")))
        elif i < 175:
            writes.append((SHARED, protocol.update_manifest_key(c, FEDERATION, ROUND), b"\x00garbage"))
        elif i < 178:
            writes.append((SHARED, protocol.update_manifest_key(c, FEDERATION, ROUND), b"{not json"))
            writes.append((SHARED, protocol.decline_key(c, FEDERATION, ROUND), _decline(c, "no")))
    # Planted: silo-299's valid manifest under keys that are not its own (another prefix, a
    # prefix that extends its own, another round); silo-298's own key holds silo-297's manifest.
    for key in (protocol.update_manifest_key("silo-299x", FEDERATION, ROUND),
                protocol.update_manifest_key("silo-29", FEDERATION, ROUND),
                protocol.update_manifest_key("silo-299", FEDERATION, "000008"),
                protocol.update_manifest_key("silo-299/extra", FEDERATION, ROUND)):
        writes.append((SHARED, key, _manifest("silo-299")))
    writes.append((SHARED, protocol.update_manifest_key("silo-298", FEDERATION, ROUND), _manifest("silo-297")))
    writes.append(("listing-own-a", protocol.update_manifest_key("", FEDERATION, ROUND), _manifest("own-a")))
    writes.append(("listing-own-b", protocol.decline_key("", FEDERATION, ROUND), _decline("own-b", "no rows")))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda w: store.put_bytes(*w), writes))
    return store


def count_requests(watcher: answers.AnswerWatcher) -> Counter:
    """S3 requests as they are sent (retries included), by operation: HeadObject, GetObject, ListObjectsV2."""
    requests = Counter()

    def sent(event_name: str, **kwargs) -> None:
        requests[event_name.rsplit(".", 1)[-1]] += 1

    for s3 in watcher.stores.values():
        s3._client.meta.events.register("before-send.s3", sent)
    return requests


async def polls(trigger, count: int, listing: bool = True, between=None):
    """`count` polls of one watcher: [(poll, requests of that poll)]."""
    out = []
    async with answers.AnswerWatcher(trigger) as watcher:
        if not listing:
            watcher.listings.clear()
        requests = count_requests(watcher)
        for i in range(count):
            if i and between:
                await asyncio.to_thread(between, i)
            requests.clear()
            poll = await watcher.poll()
            out.append((poll, Counter(requests)))
    return out


def test_shared_bucket_is_listed_with_a_bounded_number_of_requests(store, s3_server):
    def commit_one_more(i):
        if i == 2:
            store.put_bytes(SHARED, protocol.update_manifest_key("silo-299", FEDERATION, ROUND), _manifest("silo-299"))

    (first, r1), (second, r2), (third, r3) = asyncio.run(polls(make_trigger(s3_server.endpoint_url), 3,
                                                               between=commit_one_more))
    # 900 + 183 answers + 5 planted objects under the common prefix "silo-": two pages. The
    # 183 manifests present are fetched once; the three own buckets take a HEAD or two each.
    assert r1["ListObjectsV2"] == 2
    assert r1["GetObject"] == 150 + 20 + 5 + 3 + 1 + 1 + 1  # shared answers, silo-298's, own-a's, own-b's decline
    assert r1["HeadObject"] == 1 + 2 + 2  # own-a answered; own-b declined (no answer first); own-c nothing
    assert r2 == Counter({"ListObjectsV2": 2, "HeadObject": 5})  # nothing new: no GET at all
    assert r3 == Counter({"ListObjectsV2": 2, "HeadObject": 5, "GetObject": 1})  # silo-299 committed

    assert sorted(first.committed) == sorted(SILOS[:150] + ["own-a"])
    assert first.declined == {**{c: f"reason {i}" for i, c in enumerate(SILOS) if 150 <= i < 170}, "own-b": "no rows"}
    assert sorted(first.problems) == sorted(SILOS[170:178] + ["silo-298"])
    assert first.problems["silo-298"].startswith("update manifest rejected: manifest client_id='silo-297'")
    assert first.problems["silo-175"].startswith("update manifest rejected")  # a broken update beats its decline
    assert "silo-299" not in first.committed and "silo-299" not in first.problems  # planted keys never count
    assert (second.committed, second.declined, second.problems) == (first.committed, first.declined, first.problems)
    assert "silo-299" in third.committed and not first.outage


def test_listing_and_heads_decide_every_silo_the_same_way(store, s3_server):
    trigger = make_trigger(s3_server.endpoint_url)
    [(listed, by_list)] = asyncio.run(polls(trigger, 1))
    [(headed, by_head)] = asyncio.run(polls(trigger, 1, listing=False))
    assert "ListObjectsV2" not in by_head and by_head["HeadObject"] > 300
    assert listed.committed == headed.committed  # commit times too: the listing's are cut to seconds as HEAD's
    assert (listed.declined, listed.problems) == (headed.declined, headed.problems)


def test_a_listing_over_its_budget_falls_back_to_heads(store, s3_server, monkeypatch):
    """More objects under the common prefix than the budget allows (here one request): the
    group is read by HEADs from then on, with the same decisions."""
    monkeypatch.setattr(answers, "LIST_SAVING", 1000)
    (first, r1), (second, r2) = asyncio.run(polls(make_trigger(s3_server.endpoint_url), 2))
    assert r1["ListObjectsV2"] == 1 and r1["HeadObject"] > 300
    assert "ListObjectsV2" not in r2
    [(headed, _)] = asyncio.run(polls(make_trigger(s3_server.endpoint_url), 1, listing=False))
    assert (first.committed, first.declined, first.problems) == (headed.committed, headed.declined, headed.problems)


def test_a_refused_listing_falls_back_to_heads(store, s3_server):
    """A bucket that does not exist refuses the listing (as a bucket policy without
    ListBucket would): its silos are read by HEADs from then on, which decide as before."""
    silos = ["gone-1", "gone-2"]
    trigger = make_trigger(s3_server.endpoint_url, silos=[], own=[])
    trigger.clients = {c: info(c, "listing-no-such-bucket", c, s3_server.endpoint_url) for c in silos}
    (first, r1), (second, r2) = asyncio.run(polls(trigger, 2))
    assert r1["ListObjectsV2"] == 1 and r1["HeadObject"] == 4
    assert r2 == Counter({"HeadObject": 4})
    [(headed, _)] = asyncio.run(polls(trigger, 1, listing=False))
    assert (first.committed, first.declined, first.problems) == (headed.committed, headed.declined, headed.problems)
