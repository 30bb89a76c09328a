"""When a round may close: the pure decision shared by the Airflow trigger and plain Python."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

MET, WAITING, FAILED = "met", "waiting", "failed"


@dataclass(frozen=True)
class QuorumDecision:
    state: str  # met | waiting | failed
    committed: tuple[str, ...]
    reason: str


def decide(committed: Collection[str], expected: Collection[str], min_clients: int,
           deadline: datetime, now: datetime) -> QuorumDecision:
    """Met when every expected client committed, or at the deadline when at least
    `min_clients` did; failed at the deadline otherwise; waiting before it."""
    done = tuple(sorted(set(committed) & set(expected)))
    missing = sorted(set(expected) - set(done))
    if not missing:
        return QuorumDecision(MET, done, f"all {len(done)} clients committed")
    if now < deadline:
        return QuorumDecision(WAITING, done, f"{len(done)} of {len(expected)} committed, waiting for {missing}")
    if len(done) >= min_clients:
        return QuorumDecision(MET, done, f"deadline passed with {len(done)} of {len(expected)} committed "
                                         f"(min_clients={min_clients}); missing {missing}")
    return QuorumDecision(FAILED, done, f"quorum not met: {len(done)} of {len(expected)} clients committed by the "
                                        f"deadline {deadline.isoformat()}, min_clients={min_clients}; missing {missing}")
