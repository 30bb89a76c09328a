"""The circuit breaker: after K consecutive rounds that failed or rolled back, the next round
refuses to dispatch until an operator resets it (trigger a round with the param
`reset_circuit_breaker: true`). A failing silo, a broken data feed or a bad setting then costs
K rounds, not every round until someone notices.

The streak is read from the federation's history (fl_tasks.coordinator.history): rounds
after the last reset, newest first, counted until the first promotion. Refused rounds
neither count nor break the streak."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fl_tasks.coordinator.history import RoundRecord
from fl_tasks.protocol.storage import ObjectStore

REFUSED = "refused"  # the decision of a round the open breaker stopped


@dataclass(frozen=True)
class BreakerState:
    limit: int | None  # K; None: the breaker is off
    streak: list[RoundRecord]  # the failed rounds since the last promotion or reset, oldest first
    reset: dict[str, Any] | None  # the last reset: at, by, run_id

    @property
    def open(self) -> bool:
        return self.limit is not None and len(self.streak) >= self.limit

    def reason(self) -> str:
        rounds = "; ".join(f"{r.round_id} {'rolled back' if r.decision == 'rejected' else 'failed'}: "
                           f"{r.reason or 'no reason recorded'}" for r in self.streak[-self.limit:])
        return (f"circuit breaker open: the last {len(self.streak)} rounds failed or rolled back "
                f"(circuit_breaker.max_consecutive_failures is {self.limit}): {rounds}. Fix the cause, then "
                "trigger a round with the param reset_circuit_breaker set to true")


def streak(history: list[RoundRecord], reset_at: str | None) -> list[RoundRecord]:
    """The failed rounds since the last promotion (and since `reset_at`), oldest first."""
    found = []
    for record in reversed(history):
        if reset_at is not None and record.finished_at <= reset_at:
            break
        if record.decision == REFUSED:
            continue
        if not record.failed:
            break
        found.append(record)
    return list(reversed(found))


class CircuitBreaker:
    """The breaker of one federation; its reset is kept at `<F>/history/breaker_reset.json`."""

    def __init__(self, store: ObjectStore, bucket: str, federation: str, limit: int | None):
        self.store, self.bucket, self.federation, self.limit = store, bucket, federation, limit

    @property
    def reset_key(self) -> str:
        return f"{self.federation}/history/breaker_reset.json"

    def last_reset(self) -> dict[str, Any] | None:
        data = self.store.get_bytes(self.bucket, self.reset_key)
        return None if data is None else json.loads(data)

    def state(self, history: list[RoundRecord]) -> BreakerState:
        reset = self.last_reset()
        return BreakerState(self.limit, streak(history, reset["at"] if reset else None), reset)

    def reset(self, at: str, by: str, run_id: str) -> dict[str, Any]:
        record = {"at": at, "by": by, "run_id": run_id}
        self.store.put_bytes(self.bucket, self.reset_key, json.dumps(record).encode(), "application/json")
        return record
