"""When a round may close: the pure decision shared by the Airflow trigger and plain Python."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

MET, WAITING, FAILED = "met", "waiting", "failed"


@dataclass(frozen=True)
class Awaited:
    """What a wait for the silos' answers watches: who, until when, how many, and what the
    answers must name (`binding`); everything the deferrable trigger needs, serialisable."""

    answers: str  # update | evaluation
    clients: tuple[str, ...]
    deadline: str
    required: int
    grace_seconds: float | None
    require_signatures: bool
    binding: dict


@dataclass(frozen=True)
class QuorumDecision:
    state: str  # met | waiting | failed
    committed: tuple[str, ...]
    reason: str


def required_clients(num_expected: int, min_clients: int, min_fraction: float | None = None) -> int:
    """The quorum: `min_clients`, raised to `ceil(min_fraction * clients)` when a fraction is set."""
    needed = int(min_clients)
    if min_fraction is not None:
        needed = max(needed, math.ceil(float(min_fraction) * num_expected - 1e-9))
    return needed


def decide(committed: Mapping[str, datetime] | Collection[str], expected: Collection[str], required: int,
           deadline: datetime, now: datetime, grace: timedelta | None = None,
           declined: Mapping[str, str] | None = None) -> QuorumDecision:
    """Met when every expected client answered (committed or declined) with the quorum in;
    with a grace period, also once `grace` has passed since the quorum was reached (the
    `required`-th commit time); at the deadline, met with at least `required` commits and
    failed with fewer; waiting otherwise. Failed at once when the declines leave too few
    clients to reach the quorum: nothing can change that by waiting.

    `committed` maps client ids to their commit times (the update manifest's LastModified);
    a plain collection is enough when no grace period is set. `declined` maps the clients
    that declined to their reasons; a decline never counts towards the quorum. Both come
    from the object store, so the decision needs no memory of earlier polls and survives
    restarts.
    """
    times = committed if isinstance(committed, Mapping) else dict.fromkeys(committed)
    declined = {c: r for c, r in (declined or {}).items() if c in expected and c not in times}
    done = tuple(sorted(set(times) & set(expected)))
    missing = sorted(set(expected) - set(done) - set(declined))
    if len(done) + len(missing) < required:
        said = "; ".join(f"{c} declined: {r}" for c, r in sorted(declined.items()))
        return QuorumDecision(FAILED, done, f"quorum of {required} cannot be reached: {len(declined)} of "
                                            f"{len(expected)} clients declined ({said}); {len(done)} committed, "
                                            f"{len(missing)} still pending")
    if not missing:
        tail = f", {len(declined)} declined" if declined else ""
        return QuorumDecision(MET, done, f"all {len(done)} clients committed{tail}" if not declined else
                              f"every client answered: {len(done)} committed{tail}")
    if len(done) >= required and grace is not None:
        if any(times[c] is None for c in done):
            raise ValueError("a grace period needs the commit time of every committed client")
        reached = sorted(times[c] for c in done)[required - 1]
        closes = min(deadline, reached + grace)
        if now >= closes:
            return QuorumDecision(MET, done, f"quorum of {required} reached at {reached.isoformat()}; grace period "
                                             f"ended with {len(done)} of {len(expected)} committed; missing {missing}")
        return QuorumDecision(WAITING, done, f"quorum of {required} reached; waiting for stragglers {missing} "
                                             f"until {closes.isoformat()}")
    if now < deadline:
        return QuorumDecision(WAITING, done, f"{len(done)} of {len(expected)} committed, waiting for {missing}")
    if len(done) >= required:
        return QuorumDecision(MET, done, f"deadline passed with {len(done)} of {len(expected)} committed "
                                         f"(quorum {required}); missing {missing}")
    return QuorumDecision(FAILED, done, f"quorum not met: {len(done)} of {len(expected)} clients committed by the "
                                        f"deadline {deadline.isoformat()}, quorum {required}; missing {missing}")
