"""QuorumTrigger: watches the silos' answers asynchronously inside the triggerer."""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from fl_tasks.coordinator import quorum

HEARTBEAT_SECONDS = 300  # while nothing changes, one "still waiting" line this often


class QuorumTrigger(BaseTrigger):
    """Fires once the round may close (`fl_tasks.coordinator.quorum.decide`): every client
    answered, the grace period after the quorum ended, the deadline passed, or the declines
    left too few clients to reach the quorum. It waits for the silos' updates
    (`answers="update"`) or for their evaluations of a candidate (`answers="evaluation"`,
    each bound to the request by `binding`).

    A commit is a readable, verified manifest, exactly as the coordinator counts it
    (`fl_tasks.coordinator.intake.verify_answer`): strict schema, this round and client,
    signed when required. A manifest is fetched again only when its ETag changes. A silo
    whose objects cannot be read, or whose manifest does not verify, counts as not
    committed, and the trigger logs why; it never fails the round for the others.

    Holds only serialisable fields: per client the bucket, the keys of its answer and decline
    manifests, its S3 connection and endpoint and its signing-key connection; the round's
    identity, deadline, quorum and grace period; what is awaited and what the answers must
    name (`binding`, e.g. the evaluation request's sha256). Credentials and keys come from Airflow
    connections (read in a worker thread), never from the serialised trigger. Commit times
    are the manifests' LastModified, so a restarted triggerer decides the same way.

    Logs a line when the answers or the state change, and otherwise one every five minutes.
    Nothing in it blocks the triggerer's event loop: imports, connection lookups and the S3
    client's set-up run in worker threads (`fl_tasks.protocol.storage.AsyncObjectStore`).

    S3 faults: while every silo's read fails with a transient error (the endpoint down) the
    trigger polls again until the deadline; a poll that still fails for every silo after the
    deadline fires an `error` event, and the sensor's Airflow retry checks again.
    """

    def __init__(self, round_id: str, federation: str, clients: dict[str, dict[str, Any]], deadline: str,
                 required: int, grace_seconds: float | None = None, poll_interval: float = 10.0,
                 require_signatures: bool = False, answers: str = "update", binding: dict[str, str] | None = None):
        super().__init__()
        self.round_id = round_id
        self.federation = federation
        # client id -> {bucket, answer_key, decline_key, aws_conn_id, endpoint_url (the client's own),
        # federation_endpoint_url, signing_conn_id}
        self.clients = clients
        self.deadline = deadline
        self.required = required
        self.grace_seconds = grace_seconds
        self.poll_interval = poll_interval
        self.require_signatures = require_signatures
        self.answers = answers
        self.binding = binding or {}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("fl_airflow.triggers.QuorumTrigger", {
            "round_id": self.round_id, "federation": self.federation, "clients": self.clients,
            "deadline": self.deadline, "required": self.required, "grace_seconds": self.grace_seconds,
            "poll_interval": self.poll_interval, "require_signatures": self.require_signatures,
            "answers": self.answers, "binding": self.binding,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # boto3 and the manifest code load in a worker thread, never on the triggerer's loop.
        watcher = await asyncio.to_thread(importlib.import_module, "fl_airflow.answers")
        deadline = datetime.fromisoformat(self.deadline)
        grace = None if self.grace_seconds is None else timedelta(seconds=self.grace_seconds)
        logged: tuple | None = None
        logged_at = 0.0
        failures = 0
        async with watcher.AnswerWatcher(self) as answers:
            while True:
                poll = await answers.poll()
                past_deadline = datetime.now(timezone.utc) >= deadline
                if poll.outage:
                    failures += 1
                    if past_deadline:
                        reason = (f"cannot read the silos' answers of round {self.round_id} at the deadline "
                                  f"({failures} failed polls): {poll.outage}")
                        self.log.error("round %s: %s", self.round_id, reason)
                        yield TriggerEvent({"state": "error", "committed": [], "declined": {}, "reason": reason})
                        return
                    self.log.warning("round %s: S3 unreachable for every silo (%d polls in a row), polling again in "
                                     "%ss: %s", self.round_id, failures, self.poll_interval, poll.outage)
                    await asyncio.sleep(self.poll_interval)
                    continue
                if failures:
                    self.log.info("round %s: S3 answers again after %d failed polls", self.round_id, failures)
                    failures = 0
                decision = quorum.decide(poll.committed, list(self.clients), self.required, deadline,
                                         datetime.now(timezone.utc), grace, poll.declined)
                state = (decision.state, decision.committed, tuple(sorted(poll.declined)), tuple(sorted(poll.problems)))
                # A line when something changed, and a heartbeat while nothing does.
                if state != logged or time.monotonic() - logged_at >= HEARTBEAT_SECONDS:
                    self.log.info("round %s: %s (deadline %s)", self.round_id, decision.reason, self.deadline)
                    for client, problem in sorted(poll.problems.items()):
                        self.log.warning("round %s: %s counts as not committed: %s", self.round_id, client, problem)
                    logged, logged_at = state, time.monotonic()
                if decision.state != quorum.WAITING:
                    yield TriggerEvent({"state": decision.state, "committed": list(decision.committed),
                                        "declined": dict(poll.declined), "reason": decision.reason})
                    return
                await asyncio.sleep(self.poll_interval)
