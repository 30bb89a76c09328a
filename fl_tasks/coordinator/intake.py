"""Update intake: what each silo answered, read once, checked, and kept as one snapshot.

A silo controls its own bucket, so everything read from it is hostile until checked, and
anything can change between two reads. The round therefore reads each silo's answer once:

- at the close (`read_answer`), its manifest: a commit is a readable, verified manifest
  (strict schema, bound to this federation, round and client, signed when required), not
  the existence of an object; its bytes are kept in the coordinator's bucket;
- at intake (`take_snapshot`), its payload, once, checked against that manifest's sha256 and
  size and then kept in the coordinator's bucket next to the manifest.

Screening, aggregation, replay and the audit log read only those snapshots. What a silo
changes later is ignored and reported as late. Any storage error on one silo's objects
(denied, missing, archived, deleted bucket, an outage of its endpoint) rejects that silo with
the error named; it never fails the step for the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from fl_tasks import protocol
from fl_tasks.config import FederationSpec
from fl_tasks.coordinator.bucket import CoordinatorBucket
from fl_tasks.coordinator.plan import RoundPlan
from fl_tasks.protocol import UPDATES, AnswerKind, DeclineManifest, ManifestError, UpdateManifest, sha256_hex
from fl_tasks.protocol import signing
from fl_tasks.protocol.storage import ObjectTooLarge, StorageUnavailable

log = logging.getLogger(__name__)

# The errors a silo's bucket can answer with; each is that silo's problem, not the round's.
STORAGE_ERRORS = (ClientError, BotoCoreError, StorageUnavailable, ObjectTooLarge, OSError)


def storage_reason(exc: BaseException) -> str:
    """A short, named reason for a storage error on a silo's object."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"storage error {error.get('Code', '?')}: {error.get('Message', '') or exc}"
    return f"storage error {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Answer:
    """A silo's verified answer at the close: an update or evaluation manifest, or a decline."""

    client_id: str
    kind: str  # update | evaluation | decline
    manifest: bytes
    committed_at: datetime
    reason: str = ""  # a decline's reason

    @property
    def manifest_sha256(self) -> str:
        return sha256_hex(self.manifest)


class Intake:
    """Reads and verifies what silos wrote, for one federation."""

    def __init__(self, spec: FederationSpec, client_store, keys: signing.KeyProvider):
        """`client_store(client_id) -> ObjectStore` for the silo's bucket; `keys(client_id)`
        -> the silo's signing key or None."""
        self.spec, self.client_store, self.keys = spec, client_store, keys

    # --- the close: manifests --------------------------------------------------------------
    def read_answer(self, plan, client_id: str, asked: AnswerKind = UPDATES,
                    binding: dict[str, str] | None = None) -> Answer | str | None:
        """The silo's verified answer to what the round asked (`asked`: its update, or its
        evaluation bound by `binding`); a rejection reason (str) when what it wrote is not one;
        None when it wrote nothing yet. An answer wins over a decline. `plan` is a RoundPlan or
        an EvaluationPlan (federation, round_id, require_signatures)."""
        client = self.spec.client(client_id)
        try:
            store = self.client_store(client_id)
        except ValueError as exc:  # its S3 connection cannot be resolved: this silo's problem
            return f"bucket unreachable: {exc}"
        for kind, key in ((asked.name, asked.answer_key(client.prefix, plan.federation, plan.round_id)),
                          ("decline", asked.decline_key(client.prefix, plan.federation, plan.round_id))):
            try:
                written = store.last_modified(client.bucket_name, key)
                if written is None:
                    continue
                raw = store.get_bytes(client.bucket_name, key, max_bytes=protocol.MAX_MANIFEST_BYTES)
            except STORAGE_ERRORS as exc:
                return f"{kind} manifest unreadable: {storage_reason(exc)}"
            if raw is None:
                continue  # deleted between the two calls: nothing committed
            try:
                manifest = self.verify(plan, client_id, raw, DeclineManifest if kind == "decline" else asked.manifest,
                                       binding if kind != "decline" else None)
            except (ManifestError, signing.SignatureError, ValueError) as exc:
                return f"{kind} manifest rejected: {exc}"
            return Answer(client_id, kind, raw, written, getattr(manifest, "reason", ""))
        return None

    def verify(self, plan, client_id: str, raw: bytes, kind: type, binding: dict[str, str] | None = None):
        key = self.keys(client_id)
        where = getattr(self.keys, "source", None)
        source = where(client_id) if where else \
            f"Airflow connection '{self.spec.security.conn_id(self.spec.federation, client_id)}'"
        return verify_answer(raw, kind, client_id, plan.federation, plan.round_id, plan.require_signatures, key,
                             source, binding)

    # --- intake: payloads -------------------------------------------------------------------
    def take_snapshot(self, plan: RoundPlan, bucket: CoordinatorBucket, manifest: UpdateManifest,
                      fetch: bool = True) -> bytes:
        """The update's payload, read once from the silo's bucket and kept in the coordinator's
        (a retry finds the snapshot); ValueError naming the problem when it is not the bytes
        the manifest committed to. With `fetch=False` (a replay) only the kept snapshot counts."""
        name = f"updates/{manifest.client_id}/update.safetensors"
        kept = bucket.get(plan.round_id, name, sha256=manifest.payload_sha256)
        if kept is not None:
            return kept
        if not fetch:
            raise ValueError("the round kept no snapshot of this update (it was rejected at intake)")
        client = self.spec.client(manifest.client_id)
        limit = 2 * plan.base_bytes + 4096
        if manifest.payload_bytes > limit:
            raise ValueError(f"payload_bytes {manifest.payload_bytes} is over the limit {limit} (twice the base model)")
        try:
            store = self.client_store(client.id)
        except ValueError as exc:
            raise ValueError(f"bucket unreachable: {exc}") from None
        try:
            payload = store.get_bytes(
                client.bucket_name, protocol.update_payload_key(client.prefix, plan.federation, plan.round_id),
                max_bytes=limit)
        except STORAGE_ERRORS as exc:
            raise ValueError(f"payload unreadable: {storage_reason(exc)}") from None
        if payload is None:
            raise ValueError("manifest committed but the payload is missing")
        if len(payload) != manifest.payload_bytes:
            raise ValueError(f"payload is {len(payload)} bytes, the manifest says {manifest.payload_bytes}")
        if sha256_hex(payload) != manifest.payload_sha256:
            raise ValueError("payload sha256 does not match the manifest")
        bucket.put(plan.round_id, name, payload)
        return payload


def verify_answer(raw: bytes, kind: type, client_id: str, federation: str, round_id: str, require_signatures: bool,
                  key: bytes | str | None, key_source: str, binding: dict[str, str] | None = None):
    """Parse a silo's manifest strictly and check that it belongs to this round and client (and
    to what `binding` names, e.g. the evaluation request's sha256) and carries the client's
    signature (when the round requires one; a signed manifest is always verified). Shared by
    the coordinator and the quorum trigger, so that both count the same commits. Raises
    ManifestError, SignatureError or ValueError naming the problem."""
    manifest = kind.from_json(raw)
    expected = {"client_id": client_id, "federation": federation, "round_id": round_id, **(binding or {})}
    for name, value in expected.items():
        if getattr(manifest, name) != value:
            raise ValueError(f"manifest {name}={getattr(manifest, name)!r} does not match the round ({value!r})")
    if not manifest.signature:
        if require_signatures:
            raise signing.SignatureError(f"unsigned {manifest.kind}: the federation requires signatures")
        return manifest
    if not key:
        raise signing.SignatureError(f"signed {manifest.kind} but no signing key for client '{client_id}': "
                                     f"create {key_source} holding the client's key")
    signing.verify_manifest(manifest, signing.as_key(key, f"the signing key of client '{client_id}'"))
    return manifest


def answer_record(answer: Answer) -> dict[str, Any]:
    return {"kind": answer.kind, "manifest_sha256": answer.manifest_sha256,
            "committed_at": answer.committed_at.isoformat(), **({"reason": answer.reason} if answer.reason else {})}
