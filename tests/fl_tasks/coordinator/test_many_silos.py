"""Many silos: dispatch and the evaluation request write their buckets concurrently (a
failing silo still named, the events in client order, a re-run of dispatch idempotent); the
close reads their answers concurrently; the candidate comes from updates fetched and decoded
by a bounded read-ahead pool, folded in the round's fixed order, so it is the sequential
code's candidate to the byte. The silos are fake: their updates are written straight
through the protocol functions."""

from __future__ import annotations

import random
import threading
import time
import weakref

import numpy as np
import pytest
import yaml

from fl_tasks import protocol
from fl_tasks.coordinator import Coordinator, RunContext, pools
from fl_tasks.coordinator.candidate import CandidateBuilder
from fl_tasks.protocol import UpdateManifest, sha256_hex
from fl_tasks.protocol.codec import decode_state, encode_state
from fl_tasks.protocol.storage import ObjectStore

from tests.conftest import federation_doc


def many_silo_federation(folder, num_clients: int, shared_bucket: str | None = None, **overrides):
    """(spec, coordinator) of a federation of `num_clients` fake silos on the session's S3
    server; with `shared_bucket`, every silo holds a prefix of that one bucket."""
    from devstack.embedded import create_buckets
    from fl_tasks.config import load_federation

    doc = federation_doc(num_clients, **overrides)
    if shared_bucket:
        doc["clients"] = [{"id": c["id"], "bucket": f"s3://{shared_bucket}/{c['id']}"} for c in doc["clients"]]
    path = folder / f"{doc['federation']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    spec = load_federation(path)
    coordinator = Coordinator(spec)
    create_buckets(spec, coordinator.store)
    return spec, coordinator


def publish_update(store: ObjectStore, spec, client, round_id: str, plan, state: dict[str, np.ndarray],
                   num_examples: int) -> None:
    """What a silo's agent commits: the payload, then its manifest (unsigned)."""
    payload = encode_state(state)
    store.put_bytes(client.bucket_name, protocol.update_payload_key(client.prefix, spec.federation, round_id), payload)
    manifest = UpdateManifest(client_id=client.id, federation=spec.federation, round_id=round_id,
                              base_model_version=plan.base_version, base_sha256=plan.base_sha256,
                              num_examples=num_examples, codec="fp32", payload_sha256=sha256_hex(payload),
                              payload_bytes=len(payload))
    store.put_bytes(client.bucket_name, protocol.update_manifest_key(client.prefix, spec.federation, round_id),
                    manifest.to_json(), "application/json")


def fake_updates(coordinator, spec, round_id: str, seed: int = 0, workers: int = 8) -> None:
    """Every silo answers with base + noise of its own scale and example count."""
    plan = coordinator.load_plan(round_id)
    base = decode_state(coordinator.records.get(round_id, "base/model.safetensors"))
    rng = np.random.default_rng(seed)

    def answer(item):
        i, client = item
        local = np.random.default_rng([seed, i])
        state = {k: (v + local.normal(0, 0.01, v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
                 for k, v in base.items()}
        publish_update(coordinator.store, spec, client, round_id, plan, state, int(100 + 10 * i))

    rng.shuffle(order := list(enumerate(spec.clients)))  # the silos answer in no particular order
    pools.per_silo(answer, order, workers=workers)


class PutLog:
    """ObjectStore.put_bytes, recorded: (bucket, key) in the order the PUTs began, and the most at once."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        self.running = self.most = 0
        self.lock = threading.Lock()
        original = ObjectStore.put_bytes

        def put_bytes(store, bucket, key, *args, **kwargs):
            with self.lock:
                self.calls.append((bucket, key))
                self.running += 1
                self.most = max(self.most, self.running)
            try:
                time.sleep(0.002)  # a little network time, so that the pool's writes overlap
                return original(store, bucket, key, *args, **kwargs)
            finally:
                with self.lock:
                    self.running -= 1

        monkeypatch.setattr(ObjectStore, "put_bytes", put_bytes)


def test_dispatch_reaches_many_silos_concurrently_in_client_order(tmp_path, s3_server, mlflow_uri, monkeypatch):
    spec, coordinator = many_silo_federation(tmp_path, 50)
    round_id = coordinator.prepare(RunContext(run_id="many-dispatch"))
    gone = spec.clients[17]
    coordinator.store._client.delete_bucket(Bucket=gone.bucket_name)
    puts = PutLog(monkeypatch)
    reached = coordinator.dispatch(round_id)

    assert reached == [c.id for c in spec.clients if c.id != gone.id]  # in client order
    assert 1 < puts.most <= pools.SILO_WORKERS
    for client in spec.clients:  # per silo: payload first, manifest last
        if client is gone:
            continue  # its bucket failed the read before any write
        keys = [k for b, k in puts.calls if b == client.bucket_name]
        assert keys == [protocol.global_model_key("", spec.federation, round_id),
                        protocol.global_manifest_key("", spec.federation, round_id)], client.id
    events = coordinator.audit.events(round_id)
    dispatch = [e for e in events if e.get("event") in ("model_dispatched", "dispatch_failed")]
    assert [e["client_id"] for e in dispatch] == [c.id for c in spec.clients]
    [failed] = [e for e in dispatch if e["event"] == "dispatch_failed"]
    assert failed["client_id"] == gone.id and "NoSuchBucket" in failed["reason"]
    sent = coordinator.records.get_json(round_id, "dispatch.json")
    assert sorted(sent) == sorted(reached)

    # A re-run writes nothing to a silo that already holds the round, and names the missing bucket again.
    puts.calls.clear()
    assert coordinator.dispatch(round_id) == reached
    assert [b for b, _ in puts.calls if b != spec.coordinator_bucket] == []
    assert coordinator.records.get_json(round_id, "dispatch.json") == sent


@pytest.fixture
def closed_round(tmp_path, s3_server, mlflow_uri):
    """A round of 12 fake silos sharing one bucket, every update committed and the round closed."""
    spec, coordinator = many_silo_federation(tmp_path, 12, shared_bucket=f"many-{tmp_path.name[-20:].lower()}"
                                             .replace("_", "-"), quorum={"min_clients": 2})
    round_id = coordinator.prepare(RunContext(run_id="many-fetch"))
    coordinator.dispatch(round_id)
    fake_updates(coordinator, spec, round_id)
    decision = coordinator.check_quorum(round_id)
    assert decision.state == "met" and len(decision.committed) == 12
    record = coordinator.close_round(round_id, decision)
    assert record["committed"] == sorted(c.id for c in spec.clients)  # the decision's order
    assert list(record["answers"]) == [c.id for c in spec.clients]  # read concurrently, in client order
    return spec, coordinator, round_id, record


def build(coordinator, round_id: str, record) -> dict:
    plan = coordinator.load_plan(round_id)
    committed = {c: record["answers"][c] for c in record["committed"]}
    return coordinator._builder(plan, record["history"]).build(committed, None).summary


def test_read_ahead_gives_the_sequential_candidate_and_bounds_the_updates_in_memory(closed_round, monkeypatch):
    spec, coordinator, round_id, record = closed_round
    monkeypatch.setattr(pools, "READ_AHEAD", 1)  # the sequential code: one update at a time
    sequential = build(coordinator, round_id, record)

    # Now 3 ahead, each decode delayed at random so that they finish out of order; count the
    # decoded updates alive at once (by a weak reference on each) and the decodes running.
    monkeypatch.setattr(pools, "READ_AHEAD", 3)
    original = CandidateBuilder.decode
    lock = threading.Lock()
    tally = {"alive": 0, "most_alive": 0, "running": 0, "most_running": 0}

    def released():
        with lock:
            tally["alive"] -= 1

    def decode(self, manifest, payload, base):
        with lock:
            tally["running"] += 1
            tally["most_running"] = max(tally["most_running"], tally["running"])
        try:
            time.sleep(random.uniform(0, 0.03))
            state = original(self, manifest, payload, base)
        finally:
            with lock:
                tally["running"] -= 1
        with lock:
            tally["alive"] += 1
            tally["most_alive"] = max(tally["most_alive"], tally["alive"])
        weakref.finalize(next(iter(state.values())), released)
        return state

    monkeypatch.setattr(CandidateBuilder, "decode", decode)
    ahead = build(coordinator, round_id, record)
    assert ahead["candidate_sha256"] == sequential["candidate_sha256"]
    assert ahead["accepted"] == sequential["accepted"] and ahead["seen"] == sequential["seen"]
    assert list(ahead["seen"]) == record["committed"]  # recorded in the committed order
    assert tally["most_running"] <= 3
    assert tally["most_alive"] <= 3 + 1  # the window and the update being folded
    assert tally["alive"] == 0

    # And the step itself (stores the candidate) gives the same model.
    assert coordinator.aggregate(round_id)["candidate_sha256"] == sequential["candidate_sha256"]


def test_an_update_that_fails_screening_is_rejected_in_its_place(closed_round, monkeypatch):
    spec, coordinator, round_id, record = closed_round
    bad = spec.clients[5]
    original = CandidateBuilder.decode

    def decode(self, manifest, payload, base):
        if manifest.client_id == bad.id:
            raise ValueError("not a safetensors file")
        return original(self, manifest, payload, base)

    monkeypatch.setattr(CandidateBuilder, "decode", decode)
    summary = build(coordinator, round_id, record)
    assert summary["rejected"] == [{"client_id": bad.id, "reason": "not a safetensors file"}]
    assert [a["client_id"] for a in summary["accepted"]] == [c for c in record["committed"] if c != bad.id]


def test_the_evaluation_request_reaches_many_silos_concurrently_in_client_order(tmp_path, s3_server, mlflow_uri,
                                                                                 monkeypatch):
    spec, coordinator = many_silo_federation(tmp_path, 24, quorum={"min_clients": 2},
                                             evaluation={"federated": {"min_silos": 2}})
    round_id = coordinator.prepare(RunContext(run_id="many-evaluate"))
    coordinator.dispatch(round_id)
    fake_updates(coordinator, spec, round_id)
    coordinator.close_round(round_id, coordinator.check_quorum(round_id))
    coordinator.aggregate(round_id)
    gone = spec.clients[9]  # its bucket goes away after its update was aggregated
    s3 = coordinator.store._client
    for key in coordinator.store.list_keys(gone.bucket_name, ""):
        s3.delete_object(Bucket=gone.bucket_name, Key=key)
    s3.delete_bucket(Bucket=gone.bucket_name)
    puts = PutLog(monkeypatch)
    reached = coordinator.request_evaluation(round_id)

    asked = coordinator.evaluation.load_plan(round_id).clients  # the accepted silos, in the round's order
    assert sorted(asked) == sorted(c.id for c in spec.clients)
    assert reached == [c for c in asked if c != gone.id]  # in that order
    assert 1 < puts.most <= pools.SILO_WORKERS
    request_key = protocol.evaluation_request_key("", spec.federation, round_id)
    for client in spec.clients:  # per silo: the model first, the request last
        if client is gone:
            continue
        keys = [k for b, k in puts.calls if b == client.bucket_name]
        assert len(keys) == 2 and keys[-1] == request_key, (client.id, keys)
    events = [e for e in coordinator.audit.events(round_id)
              if e.get("event") in ("evaluation_requested", "evaluation_request_failed")]
    assert [e["client_id"] for e in events] == asked
    [failed] = [e for e in events if e["event"] == "evaluation_request_failed"]
    assert failed["client_id"] == gone.id and "NoSuchBucket" in failed["reason"]
