"""ObjectStore through a fault-injecting proxy in front of the real (moto) S3 server:
5xx answers, resets, slow answers, bodies cut mid-way, the server down."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from fl_tasks.protocol.storage import ObjectStore, StorageUnavailable

BUCKET = "storage-faults"
PAYLOAD = os.urandom(300_000)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def stores(s3_server, s3_proxy):
    """(direct, proxied): the direct store sees S3 as it is; the proxied one goes through the faults."""
    direct = ObjectStore(s3_server.endpoint_url)
    direct.ensure_bucket(BUCKET)
    direct.put_bytes(BUCKET, "payload.bin", PAYLOAD)
    return direct, ObjectStore(s3_proxy.url, max_attempts=3, read_timeout=1.0)


def test_503_answers_are_retried_and_the_objects_are_exact(stores, s3_proxy):
    direct, store = stores
    s3_proxy.fail(503, times=2)
    store.put_bytes(BUCKET, "written.bin", PAYLOAD)
    s3_proxy.fail(500, times=2)
    assert hashlib.sha256(store.get_bytes(BUCKET, "payload.bin")).hexdigest() == DIGEST
    assert direct.get_bytes(BUCKET, "written.bin") == PAYLOAD
    assert [a for _, _, a in s3_proxy.seen] == ["fail", "fail", "pass", "fail", "fail", "pass"]


def test_a_connection_reset_during_put_is_retried(stores, s3_proxy):
    direct, store = stores
    s3_proxy.reset(times=2, match=r"^PUT /storage-faults/reset\.bin")
    store.put_bytes(BUCKET, "reset.bin", PAYLOAD)
    assert len(s3_proxy.actions("reset")) == 2
    assert direct.get_bytes(BUCKET, "reset.bin") == PAYLOAD


def test_a_body_cut_mid_way_is_read_again_never_returned_in_part(stores, s3_proxy):
    _, store = stores
    s3_proxy.cut(times=2, match=r"^GET /storage-faults/payload\.bin", keep=0.5)
    data = store.get_bytes(BUCKET, "payload.bin")
    assert len(s3_proxy.actions("cut")) == 2
    assert len(data) == len(PAYLOAD) and hashlib.sha256(data).hexdigest() == DIGEST


def test_a_body_cut_every_time_is_an_error_not_a_short_payload(stores, s3_proxy):
    _, store = stores
    s3_proxy.cut(times=None, match=r"^GET ", keep=0.9)
    with pytest.raises(StorageUnavailable, match=r"S3 GET s3://storage-faults/payload\.bin failed after 3 attempts"):
        store.get_bytes(BUCKET, "payload.bin")
    assert len(s3_proxy.actions("cut")) == 3


def test_a_slow_answer_times_out_and_is_retried(stores, s3_proxy):
    _, store = stores
    s3_proxy.delay(2.5, times=1, match=r"^GET ")
    started = time.monotonic()
    assert store.get_bytes(BUCKET, "payload.bin") == PAYLOAD
    assert time.monotonic() - started < 2.4  # the read timeout (1 s) cut the wait short
    assert [a for m, _, a in s3_proxy.seen if m == "GET"] == ["delay", "pass"]


def test_server_down_is_a_clear_error_and_back_up_works_again(stores, s3_proxy):
    direct, _ = stores
    store = ObjectStore(s3_proxy.url, max_attempts=2)
    s3_proxy.down()
    with pytest.raises(StorageUnavailable, match=r"S3 PUT s3://storage-faults/down\.bin failed after 2 attempts .*"
                                                 r"Could not connect"):
        store.put_bytes(BUCKET, "down.bin", b"x")
    with pytest.raises(StorageUnavailable, match="S3 HEAD"):
        store.exists(BUCKET, "payload.bin")
    with pytest.raises(StorageUnavailable, match="S3 LIST"):
        list(store.list_keys(BUCKET, ""))
    assert direct.get_bytes(BUCKET, "down.bin") is None
    s3_proxy.up()
    store.put_bytes(BUCKET, "down.bin", b"x")
    assert direct.get_bytes(BUCKET, "down.bin") == b"x"


def test_missing_objects_and_errors_that_are_not_outages_stay_as_they_were(stores, s3_proxy):
    from botocore.exceptions import ClientError

    _, store = stores
    s3_proxy.fail(503, times=1)
    assert store.get_bytes(BUCKET, "never-written.bin") is None  # retried, then a plain miss
    s3_proxy.fail(403, times=1)
    with pytest.raises(ClientError, match="AccessDenied"):  # not retried, not called an outage
        store.get_bytes(BUCKET, "payload.bin")
    assert [a for _, _, a in s3_proxy.seen] == ["fail", "pass", "fail"]


def test_a_call_makes_exactly_max_attempts_tries_first_one_included(stores, s3_proxy):
    _, store = stores
    s3_proxy.fail(503, times=None)
    with pytest.raises(StorageUnavailable, match="failed after 3 attempts"):
        store.get_bytes(BUCKET, "payload.bin")
    assert len(s3_proxy.seen) == 3
    assert ObjectStore(s3_proxy.url)._client.meta.config.retries == {"total_max_attempts": 5, "mode": "standard"}
