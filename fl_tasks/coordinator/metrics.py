"""A round's operating figures: participation, update latency, bytes moved, weights, why
updates were rejected or declined, the candidate and champion metrics and the drifted share.

`round_metrics` computes them from the records the round's steps stored; the same figures
go to report.json, MLflow (`RoundMetrics.flat`) and, when the deployment enables them,
Airflow's StatsD/OpenTelemetry metrics (fl_airflow.metrics)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class RoundMetrics:
    federation: str
    round_id: str
    clients_expected: int
    clients_committed: int  # updates in when the round closed
    clients_accepted: int  # updates that passed screening
    participation_rate: float  # committed / expected
    latency_seconds: dict[str, float] = field(default_factory=dict)  # silo -> dispatch to commit
    bytes_down: int = 0  # models sent to the silos (round and evaluation)
    bytes_up: int = 0  # update payloads the silos committed
    weights: dict[str, float] = field(default_factory=dict)  # silo -> share of the candidate (weighted rules)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    declined_by_reason: dict[str, int] = field(default_factory=dict)
    primary_metric: str | None = None
    candidate: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] = field(default_factory=dict)
    drifted_share: float | None = None  # share of the silos with drift scores whose data drifted
    dp_epsilon: float | None = None  # the federation's privacy spent, this round included (privacy rounds only)

    @property
    def latency_p50(self) -> float | None:
        return percentile(list(self.latency_seconds.values()), 50)

    @property
    def latency_p90(self) -> float | None:
        return percentile(list(self.latency_seconds.values()), 90)

    @property
    def latency_p95(self) -> float | None:
        return percentile(list(self.latency_seconds.values()), 95)

    @property
    def latency_max(self) -> float | None:
        return max(self.latency_seconds.values()) if self.latency_seconds else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "latency_p50": self.latency_p50, "latency_p90": self.latency_p90,
                "latency_p95": self.latency_p95, "latency_max": self.latency_max}

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "RoundMetrics":
        return cls(**{k: v for k, v in body.items() if k in cls.__dataclass_fields__})

    def flat(self) -> dict[str, float]:
        """Name -> number: the MLflow metric names (Airflow's metrics prefix them with
        `fl.<federation>.`). Figures that do not exist this round are left out."""
        out: dict[str, float] = {
            "participation_rate": self.participation_rate, "clients_expected": self.clients_expected,
            "clients_committed": self.clients_committed, "clients_accepted": self.clients_accepted,
            "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
            "updates_rejected": sum(self.rejected_by_reason.values()),
            "updates_declined": sum(self.declined_by_reason.values()),
        }
        for name in ("latency_p50", "latency_p90", "latency_p95", "latency_max"):
            value = getattr(self, name)
            if value is not None:
                out[f"{name}_seconds"] = value
        out.update({f"weight_{silo}": share for silo, share in self.weights.items()})
        out.update({f"rejected_{reason}": n for reason, n in self.rejected_by_reason.items()})
        out.update({f"declined_{reason}": n for reason, n in self.declined_by_reason.items()})
        out.update({f"candidate_{k}": v for k, v in self.candidate.items()})
        out.update({f"champion_{k}": v for k, v in self.champion.items()})
        if self.drifted_share is not None:
            out["drifted_share"] = self.drifted_share
        if self.dp_epsilon is not None:
            out["dp_epsilon"] = self.dp_epsilon
        return {k: float(v) for k, v in out.items()}


# Reasons are sentences for people; metrics need a few stable names. First match wins.
REJECTION_CODES = (
    ("median norm", "norm_ratio"), ("norm", "norm_bound"), ("num_examples", "example_count"),
    ("cosine", "direction"), ("stale", "stale_base"), ("sign", "signature"), ("storage error", "storage"),
    ("bucket unreachable", "storage"), ("payload", "payload"), ("manifest", "manifest"),
    ("value", "value_range"),
)
DECLINE_CODES = (
    ("task", "task_mismatch"), ("data source", "data_source"), ("global model", "model_mismatch"),
    ("column", "data_contract"), ("rows", "data_contract"), ("evaluation share", "evaluation_share"),
)


def reason_code(reason: str, codes: tuple[tuple[str, str], ...]) -> str:
    """A short stable name for a free-text reason (`other` when none fits)."""
    text = reason.lower()
    return next((code for needle, code in codes if needle in text), "other")


def count_codes(reasons: list[str], codes: tuple[tuple[str, str], ...]) -> dict[str, int]:
    counted: dict[str, int] = {}
    for reason in reasons:
        code = reason_code(reason, codes)
        counted[code] = counted.get(code, 0) + 1
    return dict(sorted(counted.items()))


def round_metrics(plan, dispatched: dict[str, str], closed: dict[str, Any] | None, uploaded: dict[str, int],
                  summary: dict[str, Any] | None, evaluation_plan, validation: dict[str, Any] | None,
                  drifted_share: float | None) -> RoundMetrics:
    """The figures of one round from what its steps recorded: the plan, the dispatch times
    (silo -> ISO time), the quorum record, the payload bytes of each committed update, the
    candidate's manifest, the evaluation plan, the validation result and the drift table's
    drifted share. Any of them may be missing when
    the round stopped early; the figures then say what happened up to there."""
    closed = closed or {}
    committed = list(closed.get("committed") or [])
    latency = {}
    for client in committed:
        sent, done = dispatched.get(client), (closed.get("commit_times") or {}).get(client)
        if sent and done:
            latency[client] = max(0.0, (datetime.fromisoformat(done) - datetime.fromisoformat(sent)).total_seconds())
    bytes_down = plan.base_bytes * len(dispatched)
    if evaluation_plan is not None:
        bytes_down += sum(int(m["bytes"]) for m in evaluation_plan.models.values()) * len(evaluation_plan.clients)
    bytes_up = sum(uploaded.values())
    accepted = (summary or {}).get("accepted") or []
    rejected = [r["reason"] for r in (summary or {}).get("rejected") or []] + list(
        (closed.get("unreadable") or {}).values())
    validation = validation or {}
    return RoundMetrics(
        federation=plan.federation, round_id=plan.round_id, clients_expected=len(plan.clients),
        clients_committed=len(committed), clients_accepted=len(accepted),
        participation_rate=len(committed) / len(plan.clients) if plan.clients else 0.0,
        latency_seconds=latency, bytes_down=bytes_down, bytes_up=bytes_up,
        weights={a["client_id"]: float(a["influence"]) for a in accepted if a.get("influence") is not None},
        rejected_by_reason=count_codes(rejected, REJECTION_CODES),
        declined_by_reason=count_codes(list((closed.get("declined") or {}).values()), DECLINE_CODES),
        primary_metric=validation.get("primary_metric"),
        candidate={k: float(v) for k, v in (validation.get("candidate") or {}).items()},
        champion={k: float(v) for k, v in (validation.get("champion") or {}).items()},
        drifted_share=drifted_share,
    )
