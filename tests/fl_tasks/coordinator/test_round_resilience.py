"""Rounds under time pressure, stale and late updates, tasks killed halfway, and the audit log.

Everything runs against the moto S3 server and a SQLite MLflow store; "killing" a step means
raising out of it right before its n-th object write, the way a SIGKILL leaves a task.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from mlflow import MlflowClient

from fl_tasks import protocol
from fl_tasks.coordinator.audit import STEPS as AUDIT_STEPS
from fl_tasks.coordinator import quorum
from fl_tasks.aggregation.mean import cap_shares, weighted_mean
from fl_tasks.coordinator.audit import parse
from fl_tasks.protocol.codec import decode_state
from fl_tasks.coordinator import Coordinator, RunContext
from fl_tasks.protocol import UpdateManifest, sha256_hex
from fl_tasks.protocol.storage import ObjectStore


def read_json(coordinator, round_id, name):
    raw = coordinator.store.get_bytes(coordinator.bucket, coordinator.round_key(round_id, name))
    return None if raw is None else json.loads(raw)


def answer_all(clients, round_id):
    for runtime in clients.values():
        assert runtime.answer(round_id)


def whole_round(coordinator, clients, run_id, **params):
    round_id = coordinator.prepare(RunContext(run_id=run_id, params=params))
    coordinator.dispatch(round_id)
    answer_all(clients, round_id)
    coordinator.close_round(round_id, coordinator.check_quorum(round_id))
    coordinator.aggregate(round_id)
    coordinator.validate(round_id)
    coordinator.register(round_id)
    getattr(coordinator, coordinator.decide(round_id))(round_id)
    return coordinator.summarize(round_id)


# --- quorum size and grace period ---------------------------------------------------------
def test_min_fraction_raises_the_quorum_and_the_grace_period_closes_early(make_federation):
    spec, coordinator, clients = make_federation(
        num_clients=4, quorum={"min_clients": 1, "min_fraction": 0.5, "round_timeout_minutes": 30,
                               "grace_period_minutes": 0.05, "poll_interval_seconds": 0.5})
    round_id = coordinator.prepare(RunContext(run_id="grace"))
    coordinator.dispatch(round_id)
    first, second, third, _ = clients.values()
    first.answer(round_id)
    decision = coordinator.check_quorum(round_id)
    assert decision.state == quorum.WAITING and "1 of 4" in decision.reason  # min_fraction 0.5: two needed
    second.answer(round_id)
    decision = coordinator.check_quorum(round_id)
    assert decision.state == quorum.WAITING and "stragglers" in decision.reason
    third.answer(round_id)  # a straggler inside the grace period still makes it
    later = datetime.now(timezone.utc) + timedelta(seconds=5)
    decision = coordinator.check_quorum(round_id, now_=later)
    assert decision.state == quorum.MET and decision.committed == ("silo-0", "silo-1", "silo-2")
    record = coordinator.close_round(round_id, decision)
    assert set(record["commit_times"]) == {"silo-0", "silo-1", "silo-2"}


def test_an_update_after_the_round_closed_is_ignored_and_recorded(make_federation):
    spec, coordinator, clients = make_federation()
    round_id = coordinator.prepare(RunContext(run_id="late"))
    coordinator.dispatch(round_id)
    runtimes = list(clients.values())
    for runtime in runtimes[:2]:
        runtime.answer(round_id)
    closing = datetime.now(timezone.utc) + timedelta(hours=1)  # past the deadline: closes with 2 of 3
    coordinator.close_round(round_id, coordinator.check_quorum(round_id, now_=closing))
    runtimes[2].answer(round_id)  # arrives after the close
    summary = coordinator.aggregate(round_id)
    assert sorted(a["client_id"] for a in summary["accepted"]) == ["silo-0", "silo-1"]
    coordinator.validate(round_id)
    coordinator.register(round_id)
    getattr(coordinator, coordinator.decide(round_id))(round_id)
    report = coordinator.summarize(round_id)
    assert [entry["client_id"] for entry in report["late"]] == ["silo-2"]
    late = [e for e in coordinator.audit.events(round_id) if e["event"] == "update_late"]
    assert [e["client_id"] for e in late] == ["silo-2"]


# --- stale updates ----------------------------------------------------------------------------
def replay_previous_update(coordinator, client, previous_round, round_id):
    """The client commits, into this round, the update it trained on the previous base."""
    spec, store = coordinator.spec, coordinator.store
    payload = store.get_bytes(client.bucket_name, protocol.update_payload_key("", spec.federation, previous_round))
    old = UpdateManifest.from_json(store.get_bytes(client.bucket_name,
                                                   protocol.update_manifest_key("", spec.federation, previous_round)))
    stale = UpdateManifest(**{**old.__dict__, "round_id": round_id})
    store.put_bytes(client.bucket_name, protocol.update_payload_key("", spec.federation, round_id), payload)
    store.put_bytes(client.bucket_name, protocol.update_manifest_key("", spec.federation, round_id), stale.to_json())
    return old


@pytest.mark.parametrize("policy", ["reject", "polynomial"])
def test_stale_update_is_rejected_or_down_weighted_by_policy(make_federation, policy):
    spec, coordinator, clients = make_federation(staleness={"policy": policy, "exponent": 1.0})
    first = whole_round(coordinator, clients, "stale-1")
    assert first["decision"] == "promoted"
    round_id = coordinator.prepare(RunContext(run_id="stale-2"))
    coordinator.dispatch(round_id)
    runtimes = list(clients.values())
    for runtime in runtimes[:2]:
        runtime.answer(round_id)
    old = replay_previous_update(coordinator, spec.clients[2], first["round_id"], round_id)
    coordinator.close_round(round_id, coordinator.check_quorum(round_id))
    summary = coordinator.aggregate(round_id)
    if policy == "reject":
        assert [r["client_id"] for r in summary["rejected"]] == ["silo-2"]
        assert "stale update: trained on version seed, 1 behind" in summary["rejected"][0]["reason"]
        assert len(summary["accepted"]) == 2
        return
    assert summary["rejected"] == []
    weights = {a["client_id"]: a for a in summary["accepted"]}
    assert weights["silo-2"]["staleness"] == 1 and weights["silo-0"]["staleness"] == 0
    raw = {a["client_id"]: a["num_examples"] * (0.5 if a["staleness"] else 1.0) for a in summary["accepted"]}
    total = sum(raw.values())
    # The influence is the down-weighted share after the weight-share cap (aggregation.max_weight_share).
    capped = dict(zip(raw, cap_shares(list(raw.values()), spec.max_weight_share)))
    for client_id, entry in weights.items():
        assert entry["example_share"] == pytest.approx(raw[client_id] / total)
        assert entry["influence"] == pytest.approx(capped[client_id] / total)
    assert weights["silo-2"]["num_examples"] == old.num_examples


def test_a_stale_update_claiming_weights_that_were_never_registered_is_rejected(make_federation):
    spec, coordinator, clients = make_federation(staleness={"policy": "polynomial"})
    first = whole_round(coordinator, clients, "forge-1")
    round_id = coordinator.prepare(RunContext(run_id="forge-2"))
    coordinator.dispatch(round_id)
    for runtime in list(clients.values())[:2]:
        runtime.answer(round_id)
    client = spec.clients[2]
    old = replay_previous_update(coordinator, client, first["round_id"], round_id)
    forged = UpdateManifest(**{**old.__dict__, "round_id": round_id, "base_sha256": "0" * 64})
    coordinator.store.put_bytes(client.bucket_name, protocol.update_manifest_key("", spec.federation, round_id),
                                forged.to_json())
    coordinator.close_round(round_id, coordinator.check_quorum(round_id))
    summary = coordinator.aggregate(round_id)
    assert [r["client_id"] for r in summary["rejected"]] == ["silo-2"]
    assert "does not match the registered weights of version seed" in summary["rejected"][0]["reason"]


# --- kill a step halfway, re-run it -------------------------------------------------------------
class Killed(BaseException):
    """Not an Exception: nothing in the coordinator may catch it, as with SIGKILL."""


class DyingStore(ObjectStore):
    """Dies right before its `writes_left + 1`-th object write."""

    def __init__(self, endpoint_url: str, writes_left: int):
        super().__init__(endpoint_url)
        self.writes_left = writes_left

    def _write(self) -> None:
        if self.writes_left == 0:
            raise Killed()
        self.writes_left -= 1

    def put_bytes(self, *args, **kwargs):
        self._write()
        return super().put_bytes(*args, **kwargs)

    def put_if_absent(self, *args, **kwargs):
        self._write()
        return super().put_if_absent(*args, **kwargs)


STEPS = ("prepare", "dispatch", "close", "aggregate", "validate", "register", "promote", "summarize")


def run_step(coordinator, step, clients, ctx, state):
    if step == "prepare":
        state["round_id"] = coordinator.prepare(ctx)
    elif step == "dispatch":
        coordinator.dispatch(state["round_id"])
        if not state.get("answered"):
            answer_all(clients, state["round_id"])
            state["answered"] = True
    elif step == "close":
        coordinator.close_round(state["round_id"], coordinator.check_quorum(state["round_id"]))
    else:
        getattr(coordinator, step)(state["round_id"])


def test_every_step_killed_at_every_write_then_rerun_gives_one_clean_round(make_federation, s3_server, monkeypatch):
    """Each step is killed before its 1st, 2nd, ... write, re-run each time, until it completes."""
    spec, coordinator, clients = make_federation()
    alias_moves = []
    original = MlflowClient.set_registered_model_alias
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias",
                        lambda self, *a, **k: (alias_moves.append(a), original(self, *a, **k))[1])
    ctx, state, kills = RunContext(run_id="killed-run", triggered_by="alice"), {}, {}
    for step in STEPS:
        for writes in range(100):
            dying = Coordinator(spec, DyingStore(s3_server.endpoint_url, writes))
            try:
                run_step(dying, step, clients, ctx, state)
                break
            except Killed:
                kills[step] = kills.get(step, 0) + 1
    assert all(kills[step] >= 2 for step in STEPS), kills  # every step died at least twice midway

    round_id = state["round_id"]
    assert round_id == "000001"  # no second round was opened by a re-run
    report = read_json(coordinator, round_id, "report.json")
    assert report["decision"] == "promoted" and report["clients_accepted"] == sorted(clients)
    versions = MlflowClient().search_model_versions(f"name = '{spec.model_name}'")
    assert [str(v.version) for v in versions] == [report["version"]]  # one version for the round
    assert [a[2] for a in alias_moves] == [report["version"]]  # the alias moved once, never flapped

    # No update counted twice: the candidate is FedAvg over each committed update once.
    updates = []
    for client in spec.clients:
        payload = coordinator.store.get_bytes(client.bucket_name, protocol.update_payload_key("", spec.federation,
                                                                                           round_id))
        manifest = UpdateManifest.from_json(coordinator.store.get_bytes(
            client.bucket_name, protocol.update_manifest_key("", spec.federation, round_id)))
        updates.append((decode_state(payload), manifest.num_examples))
    # Weighted by example count under the weight-share cap (aggregation.max_weight_share).
    weights = cap_shares([float(n) for _, n in updates], spec.max_weight_share)
    updates = [(state, w) for (state, _), w in zip(updates, weights)]
    candidate = decode_state(coordinator.store.get_bytes(coordinator.bucket,
                                                         coordinator.round_key(round_id, "candidate/model.safetensors")))
    for name, value in weighted_mean(updates).items():
        np.testing.assert_allclose(candidate[name], value, rtol=1e-6)

    # The same object keys as an undisturbed round, and each audit event exactly once. The
    # coordinator's bucket also keeps each committed manifest (at the close) and payload (at
    # intake) of the round, and the silos' recent example counts (for screening).
    keys = sorted(k.removeprefix(f"{spec.federation}/") for k in coordinator.store.list_keys(coordinator.bucket, ""))
    assert keys == sorted([
        *(f"rounds/{round_id}/{name}" for name in (
            "plan.json", "base/model.safetensors", "dispatch.json", "quorum.json", "candidate/model.safetensors",
            "candidate/manifest.json", "validation.json", "registration.json", "decision.json", "report.json",
            "report.html")),
        "history/rounds.json",
        *(f"rounds/{round_id}/updates/{client.id}/{name}" for client in spec.clients
          for name in ("manifest.json", "update.safetensors")),
        *(f"audit/{round_id}/{AUDIT_STEPS.index(step) + 1:02d}-{step}.jsonl" for step in
          ("prepare", "dispatch", "quorum", "aggregate", "validate", "register", "decision", "summary")),
        f"runs/{coordinator.records.claim_key('killed-run').rsplit('/', 1)[1]}",
        "history/examples.json", "holdout/validation.parquet",
    ])
    history = json.loads(coordinator.store.get_bytes(coordinator.bucket, f"{spec.federation}/history/examples.json"))
    assert history == {a["client_id"]: [a["num_examples"]] for a in read_json(
        coordinator, round_id, "candidate/manifest.json")["accepted"]}  # each count recorded once
    events = coordinator.audit.events(round_id)
    counts = {}
    for event in events:
        counts[event["event"]] = counts.get(event["event"], 0) + 1
    assert counts == {"round_planned": 1, "model_dispatched": 3, "round_closed": 1, "update_seen": 3,
                      "update_accepted": 3, "candidate_built": 1, "gates_evaluated": 1, "model_registered": 1,
                      "model_promoted": 1, "round_summarized": 1}


# --- the audit log ------------------------------------------------------------------------------
def test_audit_log_tells_who_did_what_and_replays_to_the_same_candidate(make_federation):
    spec, coordinator, clients = make_federation()
    round_id = coordinator.prepare(RunContext(run_id="audited", run_type="manual", triggered_by="alice"))
    coordinator.dispatch(round_id)
    answer_all(clients, round_id)
    tampered = spec.clients[1]
    coordinator.store.put_bytes(tampered.bucket_name, protocol.update_payload_key("", spec.federation, round_id),
                                b"not what the manifest promised")
    coordinator.close_round(round_id, coordinator.check_quorum(round_id))
    summary = coordinator.aggregate(round_id)
    coordinator.validate(round_id)
    coordinator.register(round_id)
    getattr(coordinator, coordinator.decide(round_id))(round_id)
    coordinator.summarize(round_id)

    jsonl = coordinator.audit.jsonl(round_id)
    events = parse(jsonl)
    assert all(e["round_id"] == round_id and e["federation"] == spec.federation for e in events)
    planned = next(e for e in events if e["event"] == "round_planned")
    assert planned["triggered_by"] == "alice" and planned["run_type"] == "manual"
    rejected = [e for e in events if e["event"] == "update_rejected"]
    # The payload's size is now checked before its hash: the 30 bytes written are named.
    assert [(e["client_id"], "payload is 30 bytes, the manifest says" in e["reason"]) for e in rejected] == \
        [(tampered.id, True)]
    seen = {e["client_id"]: e for e in events if e["event"] == "update_seen"}
    assert set(seen) == set(clients) and all(len(e["payload_sha256"]) == 64 for e in seen.values())
    assert [e["event"] for e in events][-2:] == ["model_promoted", "round_summarized"]

    # A replay from the log alone (a fresh coordinator, no plan.json or summary read), and
    # the snapshots the round kept; it writes nothing.
    before = sorted(coordinator.store.list_keys(coordinator.bucket, ""))
    replay = Coordinator(spec).replay(parse(jsonl))
    assert sorted(coordinator.store.list_keys(coordinator.bucket, "")) == before
    assert replay["accepted"] == sorted(a["client_id"] for a in summary["accepted"])
    assert set(replay["rejected"]) == {tampered.id}
    assert replay["candidate_sha256"] == summary["candidate_sha256"]
    built = next(e for e in events if e["event"] == "candidate_built")
    assert built["candidate_sha256"] == summary["candidate_sha256"]

    # The same log is the round's MLflow artifact.
    run_id = MlflowClient().get_model_version(spec.model_name, summary_version(coordinator, round_id)).run_id
    logged = MlflowClient().download_artifacts(run_id, "audit/audit.jsonl")
    with open(logged, "rb") as handle:
        assert handle.read() == jsonl

    # A client that rewrites its manifest after the round used to break the replay (which read
    # the client buckets). The round now keeps its own copy of each committed manifest and
    # payload, so the client's rewrite changes nothing...
    honest = spec.clients[0]
    key = protocol.update_manifest_key("", spec.federation, round_id)
    manifest = UpdateManifest.from_json(coordinator.store.get_bytes(honest.bucket_name, key))
    rewritten = UpdateManifest(**{**manifest.__dict__, "created_at": "2030-01-01T00:00:00+00:00"}).to_json()
    coordinator.store.put_bytes(honest.bucket_name, key, rewritten)
    assert Coordinator(spec).replay(parse(jsonl)) == replay
    # ...and a kept copy changed in the coordinator's bucket breaks the replay, loudly.
    coordinator.store.put_bytes(coordinator.bucket, coordinator.round_key(round_id, f"updates/{honest.id}/manifest.json"),
                                rewritten)
    with pytest.raises(ValueError, match="the kept manifests no longer hash to what the round saw: \\['silo-0'\\]"):
        Coordinator(spec).replay(parse(jsonl))


def summary_version(coordinator, round_id):
    return read_json(coordinator, round_id, "registration.json")["version"]


def test_audit_objects_are_write_once(make_federation):
    spec, coordinator, _ = make_federation()
    assert coordinator.audit.append("r-1", "prepare", [{"event": "first"}])
    assert not coordinator.audit.append("r-1", "prepare", [{"event": "second"}])
    assert [e["event"] for e in coordinator.audit.events("r-1")] == ["first"]


def test_a_failed_quorum_is_logged_and_attached_to_a_failed_mlflow_run(make_federation):
    spec, coordinator, clients = make_federation(quorum={"min_clients": 3})
    round_id = coordinator.prepare(RunContext(run_id="short"))
    coordinator.dispatch(round_id)
    next(iter(clients.values())).answer(round_id)
    closing = datetime.now(timezone.utc) + timedelta(hours=1)
    coordinator.close_round(round_id, coordinator.check_quorum(round_id, now_=closing))
    report = coordinator.summarize(round_id)
    assert report["decision"] == "no_model"
    events = coordinator.audit.events(round_id)
    failed = [e for e in events if e["event"] == "round_failed"]
    assert len(failed) == 1 and "quorum not met: 1 of 3" in failed[0]["reason"]
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(spec.experiment_name).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert sha256_hex(coordinator.audit.jsonl(round_id)) == sha256_hex(
        open(MlflowClient().download_artifacts(runs[0].info.run_id, "audit/audit.jsonl"), "rb").read())
