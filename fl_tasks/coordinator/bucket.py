"""The coordinator's own bucket: where each step keeps what it decided.

For round R of federation F:

    <F>/runs/<sha of run id>.json              which round a DAG run claimed (retries reuse it)
    <F>/rounds/<R>/plan.json                   settings, base model, deadline, clients, task, contract
    <F>/rounds/<R>/base/model.safetensors      the model dispatched this round
    <F>/rounds/<R>/quorum.json                 who committed and who declined when the round closed
    <F>/rounds/<R>/updates/<client>/...        each accepted update as the round read it (one snapshot)
    <F>/rounds/<R>/candidate/model.safetensors, candidate/manifest.json
    <F>/rounds/<R>/shards/...                  sharded rounds' screening, statistics and slices (coordinator.shards)
    <F>/rounds/<R>/evaluation/...              federated evaluation (fl_tasks.coordinator.evaluation)
    <F>/rounds/<R>/validation.json, registration.json, decision.json, failure.json
    <F>/rounds/<R>/dispatch.json               when each silo was sent the round (update latency)
    <F>/rounds/<R>/drift.json                  the silo x column drift table (fl_tasks.coordinator.drift)
    <F>/rounds/<R>/report.json, report.html    the round summary, and its page with plots
    <F>/history/rounds.json                    one record per finished round (fl_tasks.coordinator.history)
    <F>/history/breaker_reset.json             the circuit breaker's last reset (fl_tasks.coordinator.breaker)
    <F>/monitoring/last_request.json           the monitoring DAG's last retrain request
    <F>/audit/<R>/NN-<step>.jsonl              the round's audit log, write-once (fl_tasks.coordinator.audit)

Every step writes its commit marker last and finds its own earlier writes when run again.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from fl_tasks import protocol
from fl_tasks.coordinator.audit import AuditLog
from fl_tasks.coordinator.plan import RoundFailed, RoundPlan
from fl_tasks.protocol.storage import ObjectStore


def now() -> datetime:
    return datetime.now(timezone.utc)


def dump(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


class CoordinatorBucket:
    """Keys and JSON records of one federation in the coordinator's bucket."""

    def __init__(self, store: ObjectStore, bucket: str, federation: str):
        self.store, self.bucket, self.federation = store, bucket, federation
        self.audit = AuditLog(store, bucket, federation)

    def key(self, round_id: str, name: str) -> str:
        return f"{protocol.round_prefix('', self.federation, round_id)}/{name}"

    def uri(self, round_id: str, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(round_id, name)}"

    def put_json(self, round_id: str, name: str, obj: Any) -> None:
        self.store.put_bytes(self.bucket, self.key(round_id, name), dump(obj), "application/json")

    def get_json(self, round_id: str, name: str) -> Any | None:
        data = self.store.get_bytes(self.bucket, self.key(round_id, name))
        return None if data is None else json.loads(data)

    def put(self, round_id: str, name: str, data: bytes) -> None:
        self.store.put_bytes(self.bucket, self.key(round_id, name), data)

    def get(self, round_id: str, name: str, sha256: str | None = None) -> bytes | None:
        """The object's bytes; None when missing or (with `sha256`) not those bytes."""
        data = self.store.get_bytes(self.bucket, self.key(round_id, name))
        if data is None or (sha256 is not None and protocol.sha256_hex(data) != sha256):
            return None
        return data

    def load_plan(self, round_id: str) -> RoundPlan:
        data = self.store.get_bytes(self.bucket, self.key(round_id, "plan.json"))
        if data is None:
            raise RoundFailed(f"round {round_id} has no plan; run the prepare step first")
        return RoundPlan.from_json(data)

    def fail(self, round_id: str, step: str, reason: str, refused: str | None = None) -> RoundFailed:
        """Record why the round cannot go on (failure.json and the audit log); returns the
        exception to raise. `refused`: what stopped the round on purpose before it reached
        the silos (circuit_breaker, privacy_budget, privacy_sampling)."""
        self.put_json(round_id, "failure.json", {"step": step, "reason": reason, "at": now().isoformat(),
                                                 "refused": refused or False})
        self.audit.append(round_id, step, [{"event": "round_refused" if refused else "round_failed", "reason": reason}],
                          failed=True)
        return RoundFailed(reason)

    # --- runs and round numbers ------------------------------------------------------------
    def claim_key(self, run_id: str) -> str:
        return f"{self.federation}/runs/{hashlib.sha256(run_id.encode()).hexdigest()[:32]}.json"

    def claim(self, run_id: str) -> dict[str, Any] | None:
        data = self.store.get_bytes(self.bucket, self.claim_key(run_id))
        return None if data is None else json.loads(data)

    def next_round_number(self, name_prefix: str = "") -> int:
        """The next free number among the round ids `<name_prefix><digits>` (manual rounds:
        no prefix; evaluation-only runs: `eval-`)."""
        prefix = protocol.rounds_listing_prefix("", self.federation) + name_prefix
        numbers = [0]
        for key in self.store.list_keys(self.bucket, prefix):
            name = key[len(prefix):].split("/", 1)[0]
            if name.isdigit():
                numbers.append(int(name))
        return max(numbers) + 1

    def server_state_name(self, strategy: str) -> str:
        return f"candidate/server_state/{strategy}.safetensors"
