"""QuorumTrigger: polls the clients' update manifests asynchronously inside the triggerer."""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from fl_tasks import quorum

HEARTBEAT_SECONDS = 300  # while nothing changes, one "still waiting" line this often


class QuorumTrigger(BaseTrigger):
    """Fires once the round may close (`fl_tasks.quorum.decide`): all clients committed, the
    grace period after the quorum ended, or the deadline passed.

    Holds only serialisable fields: for each expected client the (bucket, manifest key) to
    look for, the deadline, the quorum size, the grace period and the S3 endpoint. Commit
    times are the manifests' LastModified, so a restarted triggerer decides the same way.
    Credentials come from the triggerer's environment (the standard AWS chain), never from
    the serialised trigger.

    Logs a line when the set of committed clients or the state changes, and otherwise one
    line every five minutes. Nothing in it blocks the triggerer's event loop: the S3 client
    is set up in a worker thread (`fl_tasks.storage.AsyncObjectStore`).

    S3 faults: a poll that fails with a transient error (no connection, a timeout, HTTP 5xx,
    throttling) is logged and the trigger polls again, until the deadline. A poll that still
    fails after the deadline, or fails with an error that is not transient (access denied,
    no such bucket), fires an `error` event: the sensor then fails with the reason, and its
    Airflow retry checks the quorum again on the worker. A deferred task never crashes on a
    blip.
    """

    def __init__(self, round_id: str, manifests: dict[str, list[str]], deadline: str, required: int,
                 grace_seconds: float | None = None, poll_interval: float = 10.0, endpoint_url: str | None = None):
        super().__init__()
        self.round_id = round_id
        self.manifests = manifests  # client id -> [bucket, key]
        self.deadline = deadline
        self.required = required
        self.grace_seconds = grace_seconds
        self.poll_interval = poll_interval
        self.endpoint_url = endpoint_url

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("fl_airflow.triggers.QuorumTrigger", {
            "round_id": self.round_id, "manifests": self.manifests, "deadline": self.deadline,
            "required": self.required, "grace_seconds": self.grace_seconds, "poll_interval": self.poll_interval,
            "endpoint_url": self.endpoint_url,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # fl_tasks.storage imports boto3: a worker thread does it, never the triggerer's loop.
        storage = await asyncio.to_thread(importlib.import_module, "fl_tasks.storage")
        deadline = datetime.fromisoformat(self.deadline)
        grace = None if self.grace_seconds is None else timedelta(seconds=self.grace_seconds)
        failures = 0
        logged: tuple[str, tuple[str, ...]] | None = None
        logged_at = 0.0
        async with storage.AsyncObjectStore(self.endpoint_url) as store:
            while True:
                try:
                    found = await store.last_modified_many({c: (b, k) for c, (b, k) in self.manifests.items()})
                except Exception as exc:  # noqa: BLE001 - sorted below; cancellation is not an Exception
                    failures += 1
                    past_deadline = datetime.now(timezone.utc) >= deadline
                    if past_deadline or not storage.is_transient_async(exc):
                        reason = (f"cannot read the update manifests of round {self.round_id}"
                                  f"{' at the deadline' if past_deadline else ''} ({failures} failed polls): "
                                  f"{type(exc).__name__}: {exc}")
                        self.log.error("round %s: %s", self.round_id, reason)
                        yield TriggerEvent({"state": "error", "committed": [], "reason": reason})
                        return
                    self.log.warning("round %s: S3 error while polling (%d in a row), polling again in %ss: %s: %s",
                                     self.round_id, failures, self.poll_interval, type(exc).__name__, exc)
                    await asyncio.sleep(self.poll_interval)
                    continue
                if failures:
                    self.log.info("round %s: S3 answers again after %d failed polls", self.round_id, failures)
                    failures = 0
                committed = {client: at for client, at in found.items() if at is not None}
                decision = quorum.decide(committed, list(self.manifests), self.required, deadline,
                                         datetime.now(timezone.utc), grace)
                # A line when something changed, and a heartbeat while nothing does.
                if (decision.state, decision.committed) != logged or time.monotonic() - logged_at >= HEARTBEAT_SECONDS:
                    self.log.info("round %s: %s (deadline %s)", self.round_id, decision.reason, self.deadline)
                    logged, logged_at = (decision.state, decision.committed), time.monotonic()
                if decision.state != quorum.WAITING:
                    yield TriggerEvent({"state": decision.state, "committed": list(decision.committed),
                                        "reason": decision.reason})
                    return
                await asyncio.sleep(self.poll_interval)
