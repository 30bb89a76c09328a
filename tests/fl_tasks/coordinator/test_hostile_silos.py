"""Hostile silos: one silo's bucket and signing key in an attacker's hands, in real rounds.

Every test plays one real round (moto S3 on loopback, SQLite MLflow) of a five-silo
federation that requires signed manifests. Four silos are honest `SiloAgent`s; `silo-2`
(listed in the middle, so that `silo-3` and `silo-4` come after it) is hostile: it holds its
own signing key and writes whatever it likes into its own bucket (manifests it builds and
signs itself), runs a simulated attack (`AttackingAgent`), or its bucket fails under the
coordinator (the fault proxy of tests/faultproxy.py in front of the coordinator only; the
silos write to the S3 server directly). For every case:

- no step raises, except where the round legitimately falls below quorum, and then
  failure.json and the report say why;
- the hostile silo is in the round's audit log with a named reason (`update_rejected`,
  `dispatch_failed`, or `update_late` from the summary);
- the candidate is byte for byte the one the honest updates alone give (`candidate_sha256`
  against a FedAvg computed here from the payloads in the honest silos' buckets, with the
  round's plan and weight cap), or, where the attacker's update may legitimately be accepted,
  the candidate of exactly the updates the round says it accepted, with the attacker's
  influence at the documented bound (`aggregation.max_weight_share`, 0.5).

Sections follow the threat classes: 1 storage faults, 2 time-of-check/time-of-use, 3
re-commit after the close, 4 garbage towards the quorum, 5 weight capture, 6 semantic value
checks, 7 strict manifest bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import numpy as np
import pytest

from fl_tasks import aggregation, protocol
from fl_tasks.aggregation.mean import cap_shares
from fl_tasks.config import FederationSpec
from fl_tasks.coordinator import Coordinator, RoundFailed, RunContext, quorum
from fl_tasks.coordinator.bucket import CoordinatorBucket
from fl_tasks.coordinator.plan import RoundPlan
from fl_tasks.protocol import UpdateManifest, sha256_hex
from fl_tasks.protocol.codec import decode_state, encode_state
from fl_tasks.protocol.signing import StaticKeys, sign_manifest
from fl_tasks.protocol.storage import ObjectStore
from fl_tasks.silo.agent import SiloAgent
from fl_tasks.simulation.attacks import SCALED, SIGN_FLIP, AttackingAgent, poison_model

from tests.conftest import federation_doc, merged, signed_federation
from tests.faultproxy import FaultProxy

StateDict = dict[str, np.ndarray]

HOSTILE = "silo-2"
CLIENTS = tuple(f"silo-{i}" for i in range(5))
HONEST = tuple(c for c in CLIENTS if c != HOSTILE)
KEYS = {c: f"{c}-signing-key-{c[-1] * 8}" for c in CLIENTS}
ATTACK_EXAMPLES = 10**11  # a count that would give FedAvg weight ~1 to its holder
# Small and quick: one epoch on 2000 simulated rows; a deadline far enough for the slowest machine.
SETTINGS: dict[str, dict[str, Any]] = {
    "security": {"require_signatures": True}, "training": {"local_epochs": 1}, "simulation": {"rows": 2000},
    "quorum": {"min_clients": 2, "round_timeout_minutes": 30}}
# The verdicts of the audit log that say why a silo's update is not (or no longer) in the round.
VERDICTS = ("update_rejected", "update_declined", "dispatch_failed", "update_late")


# --- the federation -----------------------------------------------------------------------

@dataclass
class Federation:
    spec: FederationSpec
    coordinator: Coordinator  # talks to the S3 server directly, with every silo's key
    silos: dict[str, SiloAgent]  # every silo's agent: the hostile one trains only when a case says so

    @property
    def store(self) -> ObjectStore:
        return self.coordinator.store

    def behind(self, proxy: FaultProxy, **store_options: Any) -> Coordinator:
        """A coordinator that reaches every bucket through the fault proxy."""
        return Coordinator(self.spec, ObjectStore(proxy.url, **store_options), keys=StaticKeys(KEYS))


@pytest.fixture
def new_federation(s3_server, mlflow_db, tmp_path) -> Callable[..., Federation]:
    """A fresh five-silo federation on the session's S3 server (as `make_federation` builds
    one), its silos signing their manifests; `hostile_max_examples` declares the hostile
    silo's size in the federation file."""

    def make(hostile_max_examples: int | None = None, **overrides: Any) -> Federation:
        doc = federation_doc(num_clients=len(CLIENTS), **merged(SETTINGS, overrides))
        if hostile_max_examples is not None:
            next(c for c in doc["clients"] if c["id"] == HOSTILE)["max_examples"] = hostile_max_examples
        spec, coordinator, silos, _ = signed_federation(tmp_path, doc, KEYS)
        return Federation(spec, coordinator, silos)

    return make


# --- one round, and what the hostile silo writes into its own bucket -----------------------------

@dataclass
class Round:
    fed: Federation
    coordinator: Coordinator  # the one that runs this round (perhaps behind the proxy)
    round_id: str

    @property
    def store(self) -> ObjectStore:  # the silos' own view of S3: never through the proxy
        return self.fed.store

    @property
    def plan(self) -> RoundPlan:
        return self.coordinator.load_plan(self.round_id)

    def bucket(self, client: str = HOSTILE) -> str:
        return self.fed.spec.client(client).bucket_name

    def key(self, which: str, client: str = HOSTILE) -> str:
        make = {"payload": protocol.update_payload_key, "manifest": protocol.update_manifest_key,
                "global": protocol.global_manifest_key}[which]
        return make(self.fed.spec.client(client).prefix, self.fed.spec.federation, self.round_id)

    def path_regex(self, method: str, which: str | None = None) -> str:
        """The proxy's match for `method` on the hostile bucket (on one of its objects)."""
        where = f"/{self.bucket()}/" + (re.escape(self.key(which)) + r"(\?|$)" if which else "")
        return f"^{method} {where}"

    def base(self) -> StateDict:
        return decode_state(self.coordinator.records.get(self.round_id, "base/model.safetensors"))

    # What it can put in its bucket.
    def nudged(self, seed: int = 7) -> StateDict:
        """A plausible update without training: the base moved a little."""
        rng = np.random.default_rng(seed)
        return {name: (value + rng.normal(0, 0.01, value.shape)).astype(value.dtype)
                if np.issubdtype(value.dtype, np.floating) else value for name, value in self.base().items()}

    def train(self) -> StateDict:
        """It trains honestly and commits (as its agent does); returns what it committed."""
        assert self.fed.silos[HOSTILE].answer(self.round_id)
        return decode_state(self.read("payload"))

    def manifest(self, payload: bytes, **changes: Any) -> UpdateManifest:
        """A manifest for `payload` signed with its own key (after `changes`)."""
        plan = self.plan
        manifest = UpdateManifest(
            client_id=HOSTILE, federation=plan.federation, round_id=self.round_id,
            base_model_version=plan.base_version, base_sha256=plan.base_sha256, num_examples=400, codec="fp32",
            payload_sha256=sha256_hex(payload), payload_bytes=len(payload), metrics={"train_loss": 0.5},
            created_at=datetime.now(timezone.utc).isoformat())
        return sign_manifest(replace(manifest, **changes), KEYS[HOSTILE])

    def commit(self, state: StateDict, **changes: Any) -> bytes:
        """Payload, then its signed manifest (the protocol's order); returns the payload."""
        payload = encode_state(state)
        self.put("payload", payload)
        self.put("manifest", self.manifest(payload, **changes).to_json())
        return payload

    def put(self, which: str, data: bytes) -> None:
        self.store.put_bytes(self.bucket(), self.key(which), data)

    def read(self, which: str, client: str = HOSTILE) -> bytes:
        data = self.store.get_bytes(self.bucket(client), self.key(which, client))
        assert data is not None
        return data

    def delete(self, which: str) -> None:
        self.store.delete(self.bucket(), self.key(which))

    def archive(self, which: str, endpoint_url: str) -> None:
        """Move one of its objects to an archive storage class (GET fails, HEAD answers)."""
        s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
        s3.put_object(Bucket=self.bucket(), Key=self.key(which), Body=self.read(which), StorageClass="GLACIER")

    def delete_bucket(self, endpoint_url: str) -> None:
        s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
        for key in list(self.store.list_keys(self.bucket(), "")):
            self.store.delete(self.bucket(), key)
        s3.delete_bucket(Bucket=self.bucket())


def open_round(fed: Federation, coordinator: Coordinator | None = None, run_id: str = "hostile") -> Round:
    """Prepare and dispatch a round; every silo is reached unless a case says otherwise."""
    coordinator = coordinator or fed.coordinator
    round_id = coordinator.prepare(RunContext(run_id=run_id))
    assert coordinator.dispatch(round_id) == list(CLIENTS)
    return Round(fed, coordinator, round_id)


def honest_answer(r: Round, clients: tuple[str, ...] = HONEST) -> None:
    for client in clients:
        assert r.fed.silos[client].answer(r.round_id)


def close(r: Round) -> quorum.QuorumDecision:
    """Close the round: at once when every silo answered, else at its deadline."""
    decision = r.coordinator.check_quorum(r.round_id)
    if decision.state == quorum.WAITING:
        decision = r.coordinator.check_quorum(r.round_id, now_=datetime.now(timezone.utc) + timedelta(hours=1))
    assert decision.state == quorum.MET, decision.reason
    r.coordinator.close_round(r.round_id, decision)
    return decision


def finish(r: Round, full: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Aggregate and summarize (with `full`, validate, register and decide in between; without,
    the report has a candidate but no decision: `no_model`); returns (candidate/manifest.json,
    report.json)."""
    coordinator = r.coordinator
    summary = coordinator.aggregate(r.round_id)
    if full:
        coordinator.validate(r.round_id)
        coordinator.register(r.round_id)
        getattr(coordinator, coordinator.decide(r.round_id))(r.round_id)
    report = coordinator.summarize(r.round_id)
    assert coordinator.records.get_json(r.round_id, "candidate/manifest.json") == summary
    assert coordinator.records.get_json(r.round_id, "failure.json") is None
    assert report["decision"] in (("promoted", "rejected") if full else ("no_model",))
    return summary, report


# --- what the round must show ----------------------------------------------------------------

def verdicts(r: Round, client: str = HOSTILE) -> dict[str, str]:
    """What the audit log says about `client`: verdict event -> its reason (a late update's note)."""
    found = {}
    for event in r.coordinator.audit.events(r.round_id):
        if event.get("client_id") == client and event["event"] in VERDICTS:
            found[event["event"]] = event.get("reason") or event.get("note") or "committed after the close"
    return found


def assert_named(r: Round, event: str, fragment: str) -> str:
    """The hostile silo is in the audit log with `event`, its reason naming `fragment`."""
    found = verdicts(r)
    assert event in found, found
    assert fragment in found[event], found[event]
    return found[event]


def honest_updates(r: Round) -> dict[str, tuple[bytes, int]]:
    """Each honest silo's committed payload and example count, from its own bucket."""
    return {c: (r.read("payload", c), UpdateManifest.from_json(r.read("manifest", c)).num_examples) for c in HONEST}


def fedavg_sha256(r: Round, updates: dict[str, tuple[bytes, int]]) -> str:
    """The candidate a round over exactly `updates` builds: the plan's strategy, each client's
    example count capped at the plan's `max_weight_share` (water-filling), in client order."""
    plan = r.plan
    settings = plan.aggregation
    ids = sorted(updates)
    weights = cap_shares([float(updates[c][1]) for c in ids], settings["max_weight_share"])
    strategy = aggregation.build(settings["strategy"], clip_norm=settings["clip_norm"], **settings["params"])
    candidate = strategy.aggregate(r.base(), iter([(decode_state(updates[c][0]), w) for c, w in zip(ids, weights)]))
    return sha256_hex(encode_state(candidate))


def assert_candidate(r: Round, summary: dict[str, Any], hostile: tuple[bytes, int] | None = None) -> None:
    """The round accepted the honest silos (and `hostile`'s update, when given) and nothing
    else, and its candidate is exactly theirs."""
    updates = honest_updates(r) | ({HOSTILE: hostile} if hostile else {})
    assert [a["client_id"] for a in summary["accepted"]] == sorted(updates), summary["rejected"]
    assert summary["candidate_sha256"] == fedavg_sha256(r, updates)
    stored = r.coordinator.records.get(r.round_id, "candidate/model.safetensors", sha256=summary["candidate_sha256"])
    assert stored is not None


def assert_rejected_at_intake(r: Round, summary: dict[str, Any], report: dict[str, Any], fragment: str) -> None:
    """Committed at the close, rejected in the aggregate step, the reason everywhere."""
    closed = r.coordinator.records.get_json(r.round_id, "quorum.json")
    assert HOSTILE in closed["committed"] and closed["unreadable"] == {}
    assert [x["client_id"] for x in summary["rejected"]] == [HOSTILE]
    assert fragment in summary["rejected"][0]["reason"]
    assert [x["client_id"] for x in report["clients_rejected"]] == [HOSTILE]
    assert_named(r, "update_rejected", fragment)
    assert_candidate(r, summary)


def assert_refused_at_close(r: Round, summary: dict[str, Any], report: dict[str, Any], fragment: str) -> None:
    """Never a commit: left out at the close, with the reason in quorum.json, report and log."""
    closed = r.coordinator.records.get_json(r.round_id, "quorum.json")
    assert HOSTILE not in closed["committed"] and HOSTILE not in closed["answers"]
    assert fragment in closed["unreadable"][HOSTILE], closed["unreadable"]
    assert summary["rejected"] == [] and HOSTILE not in summary["seen"]
    assert {x["client_id"]: x["reason"] for x in report["clients_rejected"]} == {
        HOSTILE: closed["unreadable"][HOSTILE]}
    assert_named(r, "update_rejected", fragment)
    assert_candidate(r, summary)


# === 1. Storage faults on the hostile silo's bucket ================================================

@pytest.mark.parametrize("status, fragment", [(403, "storage error AccessDenied"),
                                              (503, "storage error StorageUnavailable")])
def test_payload_read_denied_after_the_commit(new_federation, s3_proxy, status, fragment):
    """1. Storage faults: GET of its committed payload is denied (403) or keeps failing
    (503 after every retry) at intake; the round goes on without it."""
    fed = new_federation()
    r = open_round(fed, fed.behind(s3_proxy, max_attempts=2))
    honest_answer(r)
    r.train()
    s3_proxy.fail(status, times=None, match=r.path_regex("GET", "payload"))
    close(r)
    summary, report = finish(r, full=status == 403)
    assert_rejected_at_intake(r, summary, report, f"payload unreadable: {fragment}")
    assert s3_proxy.actions("fail", r.path_regex("GET", "payload"))


@pytest.mark.parametrize("which, at", [("payload", "intake"), ("manifest", "close")])
def test_object_moved_to_an_archive_class(new_federation, s3_server, which, at):
    """1. Storage faults: its payload (or manifest) re-put with StorageClass=GLACIER: HEAD
    answers, GET fails with InvalidObjectState. A payload is rejected at intake, a manifest
    is no commit at all."""
    fed = new_federation()
    r = open_round(fed)
    honest_answer(r)
    r.train()
    if which == "manifest":
        r.archive("manifest", s3_server.endpoint_url)
    close(r)
    if which == "payload":
        r.archive("payload", s3_server.endpoint_url)
    assert r.store.last_modified(r.bucket(), r.key(which)) is not None  # HEAD still answers
    summary, report = finish(r)
    if at == "intake":
        assert_rejected_at_intake(r, summary, report, "payload unreadable: storage error InvalidObjectState")
    else:
        assert_refused_at_close(r, summary, report, "update manifest unreadable: storage error InvalidObjectState")


def test_bucket_deleted_after_the_close(new_federation, s3_server):
    """1. Storage faults: the hostile silo deletes its whole bucket once the round closed
    with its commit; intake names the missing bucket, the summary reads past it."""
    fed = new_federation()
    r = open_round(fed)
    honest_answer(r)
    r.train()
    close(r)
    r.delete_bucket(s3_server.endpoint_url)
    summary, report = finish(r)
    assert_rejected_at_intake(r, summary, report, "payload unreadable: storage error NoSuchBucket")
    assert report["late"] == []


def test_head_denied_at_the_close(new_federation, s3_proxy):
    """1. Storage faults: HEAD on its bucket denied when the round polls and closes: its
    commit cannot be seen, so it is not one; the round closes at the deadline without it."""
    fed = new_federation()
    r = open_round(fed, fed.behind(s3_proxy))
    honest_answer(r)
    r.train()
    s3_proxy.fail(403, times=None, match=r.path_regex("HEAD"))
    waiting = r.coordinator.check_quorum(r.round_id)
    assert waiting.state == quorum.WAITING and waiting.committed == HONEST
    decision = close(r)
    assert decision.committed == HONEST
    summary, report = finish(r)
    assert_refused_at_close(r, summary, report, "update manifest unreadable: storage error 403")


def _dispatched(r: Round) -> dict[str, dict[str, Any]]:
    return {e["client_id"]: e for e in r.coordinator.audit.events(r.round_id) if e["step"] == "dispatch"}


def assert_others_received(r: Round, reached: list[str]) -> None:
    """Every honest silo, those listed after the hostile one included, has the round."""
    assert reached == list(HONEST)
    for client in HONEST:
        assert protocol.GlobalManifest.from_json(r.read("global", client)).round_id == r.round_id


@pytest.mark.parametrize("fault", ["bucket-gone", "put-denied"])
def test_dispatch_fault_on_the_hostile_bucket(new_federation, s3_proxy, s3_server, fault):
    """1. Storage faults in dispatch: its bucket is gone, or every PUT to it is denied. It
    gets `dispatch_failed` with the error; the silos listed after it still get the round,
    which completes without it."""
    fed = new_federation()
    coordinator = fed.behind(s3_proxy) if fault == "put-denied" else fed.coordinator
    round_id = coordinator.prepare(RunContext(run_id="dispatch"))
    r = Round(fed, coordinator, round_id)
    if fault == "bucket-gone":
        r.delete_bucket(s3_server.endpoint_url)
    else:
        s3_proxy.fail(403, times=None, match=r.path_regex("PUT"))
    reached = coordinator.dispatch(round_id)
    assert_others_received(r, reached)
    assert _dispatched(r)[HOSTILE]["event"] == "dispatch_failed"
    assert_named(r, "dispatch_failed", "storage error NoSuchBucket" if fault == "bucket-gone"
                 else "storage error AccessDenied")
    honest_answer(r)
    close(r)
    summary, _ = finish(r)
    assert_candidate(r, summary)


def test_large_objects_planted_at_its_manifest_keys(new_federation):
    """1. Storage faults (bounded reads): a 4 MiB object planted at its global-manifest key
    is not read whole in dispatch; it is not ours, so it is overwritten and everyone (the
    silos after it included) gets the round. One planted at its update-manifest key is
    refused at the close, unread."""
    fed = new_federation()
    round_id = fed.coordinator.prepare(RunContext(run_id="planted"))
    r = Round(fed, fed.coordinator, round_id)
    r.put("global", b"{" + b" " * (4 << 20) + b"}")
    assert fed.coordinator.dispatch(round_id) == list(CLIENTS)
    assert _dispatched(r)[HOSTILE]["event"] == "model_dispatched"
    assert protocol.GlobalManifest.from_json(r.read("global")).round_id == round_id
    honest_answer(r)
    r.put("payload", encode_state(r.nudged()))
    r.put("manifest", b"{" + b" " * (4 << 20) + b"}")
    close(r)
    summary, report = finish(r)
    assert_refused_at_close(r, summary, report, "update manifest unreadable: storage error ObjectTooLarge")


# === 2. Time of check, time of use ===================================================================

def _swap(r: Round, committed: bytes) -> None:
    """The same size, other bytes: a sign-flipped copy of what it committed."""
    state = decode_state(committed)
    swapped = encode_state(poison_model(SIGN_FLIP, state, r.base(), 1.0, r.round_id))
    assert len(swapped) == len(committed) and swapped != committed
    r.put("payload", swapped)


TOCTOU = {
    "swapped": (_swap, "payload sha256 does not match the manifest"),
    "deleted": (lambda r, committed: r.delete("payload"), "manifest committed but the payload is missing"),
    "enlarged": (lambda r, committed: r.put("payload", committed + b"\0" * 64),
                 "bytes, the manifest says"),
    "enlarged-past-the-limit": (lambda r, committed: r.put("payload", committed * 5),
                                "payload unreadable: storage error ObjectTooLarge"),
}


@pytest.mark.parametrize("change", list(TOCTOU))
def test_payload_changed_between_the_close_and_the_intake(new_federation, change):
    """2. TOCTOU: its payload swapped, deleted or enlarged after the close read its
    manifest and before intake read the payload: rejected, the others unaffected."""
    act, fragment = TOCTOU[change]
    fed = new_federation()
    r = open_round(fed)
    honest_answer(r)
    r.train()
    close(r)
    act(r, r.read("payload"))
    summary, report = finish(r)
    assert_rejected_at_intake(r, summary, report, fragment)
    assert report["late"] == []  # its manifest did not change


def test_a_rejection_at_intake_below_quorum_fails_the_round_with_the_reason(new_federation):
    """2. TOCTOU, below quorum: with every silo required, the payload deleted after the close
    leaves four updates; the round fails, and failure.json and the report name the silo."""
    fed = new_federation(quorum={"min_clients": 5})
    r = open_round(fed)
    honest_answer(r)
    r.train()
    close(r)
    r.delete("payload")
    with pytest.raises(RoundFailed, match="only 4 updates passed screening, quorum 5"):
        r.coordinator.aggregate(r.round_id)
    failure = r.coordinator.records.get_json(r.round_id, "failure.json")
    assert failure["step"] == "aggregate" and HOSTILE in failure["reason"]
    assert "manifest committed but the payload is missing" in failure["reason"]
    report = r.coordinator.summarize(r.round_id)
    assert report["decision"] == "no_model" and report["reason"] == failure["reason"]
    assert any(e["event"] == "round_failed" for e in r.coordinator.audit.events(r.round_id))


def test_payload_swapped_after_the_intake_has_no_effect(new_federation, monkeypatch):
    """2. TOCTOU: its payload swapped for a sign-flipped one right after intake snapshotted
    it, while the round still reads the update (cosine screen, aggregation), and again before
    the summary and a replay: no effect at all. The candidate is the one of the five updates
    as committed, and nothing is reported."""
    fed = new_federation(screening={"min_cosine": -1.0})  # more reads of each snapshot
    r = open_round(fed)
    honest_answer(r)
    r.train()
    committed = r.read("payload")
    num_examples = UpdateManifest.from_json(r.read("manifest")).num_examples
    close(r)
    intake = r.coordinator.intake
    original = intake.take_snapshot
    swaps = []

    def snapshot_then_swap(plan: RoundPlan, bucket: CoordinatorBucket, manifest: UpdateManifest, *args: Any) -> bytes:
        kept = original(plan, bucket, manifest, *args)
        if manifest.client_id == HOSTILE:
            _swap(r, committed)
            swaps.append(manifest.client_id)
        return kept

    monkeypatch.setattr(intake, "take_snapshot", snapshot_then_swap)
    summary = r.coordinator.aggregate(r.round_id)
    assert swaps == [HOSTILE]
    assert_candidate(r, summary, hostile=(committed, num_examples))
    accepted = {a["client_id"]: a for a in summary["accepted"]}
    assert accepted[HOSTILE]["payload_sha256"] == sha256_hex(committed)
    _swap(r, committed)
    report = r.coordinator.summarize(r.round_id)
    assert report["late"] == [] and report["clients_rejected"] == []
    assert verdicts(r) == {}
    assert r.coordinator.replay(r.coordinator.audit.events(r.round_id))["candidate_sha256"] == \
        summary["candidate_sha256"]


# === 3. Re-commit after the close ====================================================================

RECOMMITTED = "re-committed after the close; the round used the update it closed with"


@pytest.mark.parametrize("when", ["before-intake", "after-intake"])
def test_a_new_signed_update_after_the_close_is_not_aggregated(new_federation, when):
    """3. Re-commit after the close: a new, validly signed update (a sign-flipped payload
    claiming 1000x the examples) committed after the close is never the one aggregated.
    Before intake it breaks the payload the close committed to (rejected); after intake it
    changes nothing. Either way the summary lists it in `late` with the note, and a replay
    from the audit log gives the same candidate."""
    fed = new_federation()
    r = open_round(fed)
    honest_answer(r)
    r.train()
    first = r.read("payload")
    first_count = UpdateManifest.from_json(r.read("manifest")).num_examples

    def recommit() -> None:
        r.commit(poison_model(SIGN_FLIP, decode_state(first), r.base(), 1.0, r.round_id),
                 num_examples=first_count * 1000)

    close(r)
    if when == "before-intake":
        recommit()
    summary = r.coordinator.aggregate(r.round_id)
    if when == "after-intake":
        recommit()
    report = r.coordinator.summarize(r.round_id)
    assert [(x["client_id"], x["note"]) for x in report["late"]] == [(HOSTILE, RECOMMITTED)]
    assert_named(r, "update_late", RECOMMITTED)
    if when == "before-intake":
        assert_rejected_at_intake(r, summary, report, "payload sha256 does not match the manifest")
    else:
        assert_candidate(r, summary, hostile=(first, first_count))
        assert summary["seen"][HOSTILE]["num_examples"] == first_count
    replayed = r.coordinator.replay(r.coordinator.audit.events(r.round_id))
    assert replayed["candidate_sha256"] == summary["candidate_sha256"]
    assert replayed["accepted"] == [a["client_id"] for a in summary["accepted"]]


def test_a_replay_reads_only_what_the_round_took_in(new_federation):
    """3. Re-commit after the close, then the replay: the payload it swapped before intake got
    it rejected; after the round it puts the original back (which matches the manifest the
    round closed with). A replay from the audit log must not take it in now: it reads only
    the snapshots the round kept, so it gives the round's candidate and writes nothing."""
    fed = new_federation()
    r = open_round(fed)
    honest_answer(r)
    r.train()
    committed = r.read("payload")
    close(r)
    _swap(r, committed)
    summary, report = finish(r)
    assert_rejected_at_intake(r, summary, report, "payload sha256 does not match the manifest")
    r.put("payload", committed)  # what the manifest of the close promised, too late
    keys = sorted(r.coordinator.store.list_keys(r.coordinator.bucket, ""))
    replayed = r.coordinator.replay(r.coordinator.audit.events(r.round_id))
    assert sorted(r.coordinator.store.list_keys(r.coordinator.bucket, "")) == keys
    assert replayed["accepted"] == list(HONEST) and list(replayed["rejected"]) == [HOSTILE]
    assert replayed["candidate_sha256"] == summary["candidate_sha256"]


# === 4. Garbage does not count towards the quorum =====================================================

GARBAGE = b'{"kind": "update", "protocol": 1, "client_id": "silo-2", "num_examples": 1'


def test_a_garbage_commit_is_not_counted(new_federation):
    """4. Quorum: with the four honest silos committed and garbage at the hostile silo's
    manifest key, the round is still waiting for it (had the garbage counted, everyone would
    have answered and the round would close); at the deadline it closes without it."""
    fed = new_federation()
    r = open_round(fed)
    honest_answer(r)
    r.put("payload", encode_state(r.nudged()))
    r.put("manifest", GARBAGE)
    decision = r.coordinator.check_quorum(r.round_id)
    assert decision.state == quorum.WAITING and decision.committed == HONEST
    assert HOSTILE in decision.reason
    close(r)
    summary, report = finish(r)
    assert_refused_at_close(r, summary, report, "update manifest rejected: update manifest is not valid JSON")


def test_a_garbage_commit_does_not_start_the_grace_period(new_federation):
    """4. Quorum with a grace period: one honest commit plus garbage is one commit, not the
    quorum of two, so the grace period does not start (the round is still waiting long after
    it would have ended); once a second honest silo commits, it starts and ends."""
    fed = new_federation(quorum={"min_clients": 2, "grace_period_minutes": 1})
    r = open_round(fed)
    honest_answer(r, HONEST[:1])
    r.put("payload", encode_state(r.nudged()))
    r.put("manifest", GARBAGE)
    later = datetime.now(timezone.utc) + timedelta(minutes=10)
    decision = r.coordinator.check_quorum(r.round_id, now_=later)
    assert decision.state == quorum.WAITING and decision.committed == HONEST[:1], decision.reason
    assert "quorum of 2 reached" not in decision.reason
    honest_answer(r, HONEST[1:])
    decision = r.coordinator.check_quorum(r.round_id, now_=later)
    assert decision.state == quorum.MET and decision.committed == HONEST and "grace period ended" in decision.reason
    r.coordinator.close_round(r.round_id, decision)
    summary, report = finish(r)
    assert_refused_at_close(r, summary, report, "update manifest rejected: update manifest is not valid JSON")


# === 5. Weight capture =================================================================================

def test_sign_flipped_update_claiming_1e11_examples_is_capped_at_half(new_federation):
    """5. Weight capture: a sign-flipped update (its own trained delta, negated; a norm like
    the others') declaring 10**11 examples. Nothing says the count is false in a first round,
    so it is accepted, with its influence capped at `aggregation.max_weight_share` (0.5) and
    the honest silos sharing the other half in proportion to their counts."""
    fed = new_federation()
    r = open_round(fed)
    honest_answer(r)
    flipped = poison_model(SIGN_FLIP, r.train(), r.base(), 1.0, r.round_id)
    payload = r.commit(flipped, num_examples=ATTACK_EXAMPLES)
    close(r)
    summary, report = finish(r, full=True)
    assert verdicts(r) == {}
    assert_candidate(r, summary, hostile=(payload, ATTACK_EXAMPLES))
    influence = {a["client_id"]: a["influence"] for a in summary["accepted"]}
    assert summary["max_weight_share"] == 0.5
    assert influence[HOSTILE] == pytest.approx(0.5, abs=1e-12)
    assert sum(influence[c] for c in HONEST) == pytest.approx(0.5, abs=1e-12)
    counts = {c: n for c, (_, n) in honest_updates(r).items()}
    for client in HONEST:
        assert influence[client] == pytest.approx(0.5 * counts[client] / sum(counts.values()), abs=1e-12)
    assert report["decision"] in ("promoted", "rejected")


def test_zero_update_claiming_1e11_examples_is_a_free_rider(new_federation):
    """5. Weight capture: the base model sent back unchanged with 10**11 examples is a free
    rider (a zero update), rejected whatever its count."""
    fed = new_federation()
    r = open_round(fed)
    honest_answer(r)
    r.commit(r.base(), num_examples=ATTACK_EXAMPLES)
    close(r)
    summary, report = finish(r)
    assert_rejected_at_intake(r, summary, report, "free rider")


def test_an_inflated_count_is_rejected_in_a_later_round_by_its_history(new_federation):
    """5. Weight capture: after a round in which it reported its true count, the hostile silo
    declares 10**11 examples for the same kind of update; the history check (10x its recent
    median, `screening.max_example_growth`) rejects it."""
    fed = new_federation()
    first = open_round(fed, run_id="honest-first")
    honest_answer(first)
    first.train()
    true_count = UpdateManifest.from_json(first.read("manifest")).num_examples
    close(first)
    summary, _ = finish(first)
    assert HOSTILE in [a["client_id"] for a in summary["accepted"]]

    r = open_round(fed, run_id="inflated-second")
    honest_answer(r)
    r.commit(r.train(), num_examples=ATTACK_EXAMPLES)
    close(r)
    summary, report = finish(r)
    assert_rejected_at_intake(r, summary, report, f"num_examples {ATTACK_EXAMPLES} is over 10 x this client's "
                                                  f"recent median {true_count}")


def test_an_inflated_count_over_the_declared_size_is_rejected_at_once(new_federation):
    """5. Weight capture: with `max_examples` declared for the hostile silo in the federation
    file, its 10**11 is rejected in its first round."""
    fed = new_federation(hostile_max_examples=5000)
    r = open_round(fed)
    honest_answer(r)
    r.commit(r.train(), num_examples=ATTACK_EXAMPLES)
    close(r)
    summary, report = finish(r)
    assert_rejected_at_intake(r, summary, report, f"num_examples {ATTACK_EXAMPLES} is over the 5000 declared for "
                                                  "this client in the federation file")


def test_an_int64_max_batch_norm_counter_is_rejected(new_federation):
    """5. Weight capture through integer buffers: batch norm's `num_batches_tracked` set to
    int64 max (with 10**11 examples declared, so that the allowed growth is as large as it
    gets) is rejected: a round moves it by at most local_epochs x num_examples."""
    fed = new_federation()
    r = open_round(fed)
    honest_answer(r)
    state = r.train()
    counters = [n for n in state if n.endswith("num_batches_tracked")]
    assert counters
    for name in counters:
        state[name] = np.full_like(state[name], np.iinfo(np.int64).max)
    r.commit(state, num_examples=ATTACK_EXAMPLES)
    close(r)
    summary, report = finish(r)
    assert_rejected_at_intake(r, summary, report, f"from the base; a round allows 0..{ATTACK_EXAMPLES}")
    assert str(np.iinfo(np.int64).max) in summary["rejected"][0]["reason"]


# === 6. Semantic value checks ============================================================================

def test_a_negative_running_variance_is_rejected(new_federation):
    """6. Semantic checks: a batch-norm running variance below zero is outside the task's
    `tensor_ranges` (`*running_var` >= 0)."""
    fed = new_federation()
    r = open_round(fed)
    honest_answer(r)
    state = r.train()
    name = next(n for n in sorted(state) if n.endswith("running_var"))
    state[name] = state[name].copy()
    state[name].flat[0] = -0.5
    r.commit(state)
    close(r)
    summary, report = finish(r)
    assert_rejected_at_intake(r, summary, report, f"tensor '{name}' has values in -0.5..")
    assert "outside the task's range 0..inf" in summary["rejected"][0]["reason"]


def test_finite_values_near_float_max_are_rejected_with_norm_screening_off(new_federation):
    """6. Semantic checks: a finite 3e38 in one weight (it passes the finiteness test and
    would still wreck the average) is rejected by `screening.max_abs_value` (1e6) even with
    the norm checks off."""
    fed = new_federation(screening={"max_norm_ratio": None, "min_norm_ratio": None})
    r = open_round(fed)
    honest_answer(r)
    state = r.train()
    name = next(n for n in sorted(state) if n.endswith("weight") and np.issubdtype(state[n].dtype, np.floating))
    state[name] = state[name].copy()
    state[name].flat[0] = 3e38
    r.commit(state)
    close(r)
    summary, report = finish(r)
    assert r.plan.screening["max_norm_ratio"] is None and r.plan.screening["min_norm_ratio"] is None
    assert_rejected_at_intake(r, summary, report, f"tensor '{name}' has a value of magnitude 3e+38, over the "
                                                  "bound 1e+06")


def test_a_scaled_update_is_caught_by_the_default_norm_ratio_not_by_min_cosine(new_federation):
    """6. Semantic checks: an update scaled x10**4 (`AttackingAgent`, behaviour `scaled`), in
    a federation that configures only `screening.min_cosine` beyond the defaults. The scaled
    update points the way its honest training did, so the cosine test alone would let it
    through; the default `max_norm_ratio` (5x the round's median norm) rejects it first.
    (No batch norm: the scaled running variances would go negative and be rejected earlier.)"""
    fed = new_federation(screening={"min_cosine": 0.0}, task={
        "entrypoint": "fl_tasks.tasks.fraud:FraudTask", "params": {"hidden": [16, 8], "batch_norm": False}})
    honest = fed.silos[HOSTILE]
    fed.silos[HOSTILE] = AttackingAgent(honest.client_id, honest.federation, honest.bucket_uri, honest.source,
                                        honest.store, signing_key=KEYS[HOSTILE], behaviour=SCALED,
                                        attack_scale=1e4)
    r = open_round(fed)
    honest_answer(r)
    r.train()
    close(r)
    summary, report = finish(r)
    assert r.plan.screening["min_cosine"] == 0.0 and r.plan.screening["max_norm_ratio"] == 5.0
    assert_rejected_at_intake(r, summary, report, "exceeds 5 x the round's median norm")
    # It is the norm check that caught it: its direction is that of honest training.
    base = r.base()
    delta = {n: decode_state(r.read("payload"))[n].astype(np.float64) - base[n] for n in base
             if np.issubdtype(base[n].dtype, np.floating)}
    mean = {n: sum(decode_state(p)[n].astype(np.float64) - base[n] for p, _ in honest_updates(r).values())
            for n in delta}
    flat, other = (np.concatenate([v.ravel() for v in d.values()]) for d in (delta, mean))
    assert flat @ other / (np.linalg.norm(flat) * np.linalg.norm(other)) > 0.0


# === 7. Strict manifest bytes ============================================================================

def _protocol(value: Any) -> Callable[[bytes], bytes]:
    def change(manifest: bytes) -> bytes:
        body = json.loads(manifest)
        body["protocol"] = value
        return json.dumps(body).encode()
    return change


STRICT_BYTES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "utf-16": (lambda m: m.decode().encode("utf-16"), "update manifest is not valid JSON: 'utf-8' codec can't decode"),
    "utf-8-bom": (lambda m: b"\xef\xbb\xbf" + m, "starts with a byte-order mark"),
    "protocol-true": (_protocol(True), "manifest field 'protocol' must be 1"),
    "protocol-1.0": (_protocol(1.0), "manifest field 'protocol' must be 1"),
}


@pytest.mark.parametrize("variant", list(STRICT_BYTES))
def test_a_manifest_in_other_bytes_is_not_a_commit(new_federation, variant):
    """7. Strict bytes: a validly signed manifest re-encoded as UTF-16, prefixed with a UTF-8
    byte-order mark, or with `"protocol": true` / `1.0` (equal to 1 in Python, not in the
    protocol) is not a commit: refused at the close with a named reason."""
    encode, fragment = STRICT_BYTES[variant]
    fed = new_federation()
    r = open_round(fed)
    honest_answer(r)
    payload = encode_state(r.nudged())
    r.put("payload", payload)
    r.put("manifest", encode(r.manifest(payload).to_json()))
    decision = r.coordinator.check_quorum(r.round_id)
    assert decision.state == quorum.WAITING and HOSTILE not in decision.committed
    close(r)
    summary, report = finish(r)
    assert_refused_at_close(r, summary, report, fragment)
