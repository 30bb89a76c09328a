"""A round's operating figures: participation, update latency, bytes moved, weights, why
updates were rejected or declined, the candidate and champion metrics and the drifted share.

`round_metrics` computes them from the records the round's steps stored; the same figures
go to report.json, MLflow (`RoundMetrics.flat`) and, when the deployment enables them,
Airflow's StatsD/OpenTelemetry metrics (fl_airflow.metrics)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import math


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
        return {k: float(v) for k, v in out.items()}
