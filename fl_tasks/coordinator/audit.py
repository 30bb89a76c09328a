"""The round's audit log: append-only JSON lines in the coordinator's bucket.

Each step of a round writes its events once, as one write-once object (an S3 conditional
write), after its own outputs are stored:

    <F>/audit/<R>/<NN>-<step>.jsonl         NN orders the steps
    <F>/audit/<R>/<NN>-<step>-failed.jsonl  a step that stopped the round

A retried or re-run step finds its object taken and writes nothing, so the log holds every
event exactly once. Nothing ever rewrites or deletes an audit object; with S3 Object Lock
(compliance mode) on the `audit/` prefix the storage enforces that too. The concatenation
is also logged to the round's MLflow run as `audit/audit.jsonl`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from fl_tasks.protocol.storage import ObjectStore

STEPS = ("prepare", "dispatch", "quorum", "aggregate", "request_evaluation", "evaluation_quorum",
         "evaluation_screening", "validate", "register", "decision", "summary")


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, default=str).encode() + b"\n"


class AuditLog:
    """Reads and appends one federation's audit events; never overwrites."""

    def __init__(self, store: ObjectStore, bucket: str, federation: str):
        self.store, self.bucket, self.federation = store, bucket, federation

    def prefix(self, round_id: str) -> str:
        return f"{self.federation}/audit/{round_id}/"

    def key(self, round_id: str, step: str, failed: bool = False) -> str:
        return f"{self.prefix(round_id)}{STEPS.index(step) + 1:02d}-{step}{'-failed' if failed else ''}.jsonl"

    def append(self, round_id: str, step: str, events: Iterable[dict[str, Any]], failed: bool = False) -> bool:
        """Write the step's events; False (and nothing written) when the step already logged."""
        at = datetime.now(timezone.utc).isoformat()
        body = b"".join(_line({"at": at, "federation": self.federation, "round_id": round_id, "step": step, **e})
                        for e in events)
        return self.store.put_if_absent(self.bucket, self.key(round_id, step, failed), body, "application/x-ndjson")

    def logged(self, round_id: str, step: str) -> bool:
        return self.store.exists(self.bucket, self.key(round_id, step))

    def jsonl(self, round_id: str) -> bytes:
        """The round's whole log, in step order."""
        keys = sorted(self.store.list_keys(self.bucket, self.prefix(round_id)))
        return b"".join(self.store.get_bytes(self.bucket, key) or b"" for key in keys)

    def events(self, round_id: str) -> list[dict[str, Any]]:
        return parse(self.jsonl(round_id))


def parse(jsonl: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in jsonl.splitlines() if line.strip()]
