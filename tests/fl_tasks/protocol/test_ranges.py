"""Reading element ranges of a safetensors object by byte ranges, and S3 ranged GETs."""

from __future__ import annotations

import numpy as np
import pytest

from fl_tasks.aggregation.sharded import ShardPlan
from fl_tasks.protocol.codec import CodecError, encode_state
from fl_tasks.protocol.ranges import ElementRange, byte_spans, read_elements, read_header


def state():
    rng = np.random.default_rng(0)
    return {"b.weight": rng.normal(size=(3, 4)).astype(np.float32), "a.bias": rng.normal(size=5).astype(np.float32),
            "c.count": np.array(7, dtype=np.int64), "d.table": rng.normal(size=(2, 2)).astype(np.float64)}


def reader(payload: bytes):
    calls = []

    def fetch(start: int, stop: int) -> bytes:
        calls.append((start, stop))
        return payload[start:stop]

    return fetch, calls


def test_each_shard_reads_exactly_its_elements():
    tensors = state()
    payload = encode_state(tensors)
    plan = ShardPlan.build(tensors, 3)
    for k in range(3):
        fetch, calls = reader(payload)
        header = read_header(fetch)
        shard = plan.shard(k)
        requests = [ElementRange(p.tensor, p.start, p.stop) for p in shard.pieces]
        requests += [ElementRange(w, 0, plan.tensors[w].size) for w in shard.whole]
        values = read_elements(header, requests, fetch)
        expected = plan.slice(k, tensors)
        for r in requests:
            assert np.array_equal(values[r], np.asarray(expected[r.key]).reshape(-1)), r
            assert values[r].dtype == tensors[r.key].dtype
        fetched = sum(b - a for a, b in calls)
        wanted = sum((r.stop - r.start) * tensors[r.key].itemsize for r in requests)
        assert fetched == 8 + header.data_start - 8 + wanted < len(payload)


def test_adjacent_ranges_merge_into_one_read():
    tensors = {"x": np.arange(10, dtype=np.float32), "y": np.arange(4, dtype=np.float32)}
    payload = encode_state(tensors)
    header = read_header(reader(payload)[0])
    spans = byte_spans(header, [ElementRange("x", 2, 5), ElementRange("x", 5, 10), ElementRange("y", 1, 2)])
    x, y = header.tensors["x"], header.tensors["y"]
    if y.start == x.stop:  # x then y in the data: 'x' 2..10 runs into 'y' 0.. only from y's start
        assert len(spans) == 2
    assert spans[0].start == x.start + 8 and spans[0].stop == x.stop and len(spans[0].parts) == 2
    with pytest.raises(ValueError, match="outside tensor 'x'"):
        byte_spans(header, [ElementRange("x", 5, 11)])
    with pytest.raises(ValueError, match="overlap"):
        byte_spans(header, [ElementRange("x", 0, 5), ElementRange("x", 4, 6)])
    with pytest.raises(CodecError, match="no tensor 'z'"):
        byte_spans(header, [ElementRange("z", 0, 1)])


def test_a_bad_header_is_a_codec_error():
    with pytest.raises(CodecError, match="not JSON"):
        read_header(reader((4).to_bytes(8, "little") + b"{{{{")[0])
    with pytest.raises(CodecError, match="over the"):
        read_header(reader((1 << 40).to_bytes(8, "little"))[0])


def test_get_range_on_s3(s3_server):
    from fl_tasks.protocol.storage import ObjectStore

    store = ObjectStore(s3_server.endpoint_url)
    store.ensure_bucket("ranges-test")
    store.put_bytes("ranges-test", "obj", bytes(range(100)))
    assert store.get_range("ranges-test", "obj", 10, 20) == bytes(range(10, 20))
    assert store.get_range("ranges-test", "obj", 5, 5) == b""
    assert store.get_range("ranges-test", "missing", 0, 4) is None
    with pytest.raises(ValueError):
        store.get_range("ranges-test", "obj", 90, 120)
    with pytest.raises(ValueError):
        store.get_range("ranges-test", "obj", 200, 210)
