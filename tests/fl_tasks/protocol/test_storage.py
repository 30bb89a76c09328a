"""ObjectStore against a real S3-speaking server (moto) on loopback."""

from __future__ import annotations

import pytest

from fl_tasks.protocol.storage import ObjectStore, ObjectTooLarge


@pytest.fixture
def store(s3_server):
    store = ObjectStore(s3_server.endpoint_url)
    store.ensure_bucket("storage-test")
    store.ensure_bucket("storage-test")  # idempotent
    return store


def test_put_get_exists_list_delete(store):
    store.put_bytes("storage-test", "a/b/one.bin", b"\x00\x01")
    store.put_bytes("storage-test", "a/c/two.bin", b"xyz")
    assert store.get_bytes("storage-test", "a/b/one.bin") == b"\x00\x01"
    assert store.exists("storage-test", "a/c/two.bin")
    assert sorted(store.list_keys("storage-test", "a/")) == ["a/b/one.bin", "a/c/two.bin"]
    store.delete("storage-test", "a/c/two.bin")
    assert not store.exists("storage-test", "a/c/two.bin")


def test_missing_object_reads_as_none(store):
    assert store.get_bytes("storage-test", "nope/missing.json") is None
    assert not store.exists("storage-test", "nope/missing.json")


def test_oversized_object_is_refused_before_reading(store):
    store.put_bytes("storage-test", "big.bin", b"x" * 1000)
    with pytest.raises(ObjectTooLarge, match="1000 bytes, over the 999 limit"):
        store.get_bytes("storage-test", "big.bin", max_bytes=999)
    assert store.get_bytes("storage-test", "big.bin", max_bytes=1000) == b"x" * 1000


def test_endpoint_comes_from_the_environment(s3_server, monkeypatch):
    monkeypatch.setenv("FL_S3_ENDPOINT_URL", s3_server.endpoint_url)
    assert ObjectStore().endpoint_url == s3_server.endpoint_url
