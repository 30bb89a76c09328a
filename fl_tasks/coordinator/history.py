"""The federation's history: one record per finished round, kept in the coordinator's
bucket at `<F>/history/rounds.json`, for the charts by round, the circuit breaker, the
monitoring DAG and the Federation page. The summary step writes it; rounds run one at a
time, and a round's record replaces any earlier record of the same round (a re-run). The
last evaluation-only run's figures of the champion are kept beside it
(`<F>/history/last_evaluation.json`), for the monitoring DAG."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from fl_tasks.coordinator.drift import DriftTable
from fl_tasks.coordinator.metrics import RoundMetrics
from fl_tasks.protocol.storage import ObjectStore

MAX_ROUNDS = 500  # older records drop off the index (each round keeps its own report.json)


@dataclass(frozen=True)
class RoundRecord:
    round_id: str
    run_id: str
    dag_id: str
    run_type: str  # manual | scheduled | backfill | asset_triggered
    triggered_by: str  # who or what started it: a user, the scheduler, "monitoring: <reason>"
    decision: str  # promoted | rejected | no_model | refused (circuit breaker open)
    version: str | None
    base_version: str
    reason: str
    finished_at: str  # ISO-8601 UTC
    metrics: RoundMetrics
    mlflow: dict[str, str] = field(default_factory=dict)  # Coordinator.mlflow_refs: model_name, version, mlflow_run_id, ...
    report_html: str = ""  # s3:// URI of the round's HTML report

    @property
    def failed(self) -> bool:
        """Counts towards the circuit breaker: the round ended without a promotion."""
        return self.decision in ("rejected", "no_model")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "metrics": self.metrics.as_dict()}

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "RoundRecord":
        values = {k: v for k, v in body.items() if k in cls.__dataclass_fields__}
        return cls(**{**values, "metrics": RoundMetrics.from_dict(body["metrics"])})


class FederationHistory:
    """Read and extend one federation's round records and reach its latest drift table."""

    def __init__(self, store: ObjectStore, bucket: str, federation: str):
        self.store, self.bucket, self.federation = store, bucket, federation

    @property
    def key(self) -> str:
        return f"{self.federation}/history/rounds.json"

    def rounds(self) -> list[RoundRecord]:
        """Every recorded round, oldest first."""
        data = self.store.get_bytes(self.bucket, self.key)
        return [RoundRecord.from_dict(r) for r in json.loads(data)["rounds"]] if data else []

    def record(self, entry: RoundRecord, rounds: list[RoundRecord] | None = None) -> list[RoundRecord]:
        """Add `entry` to the index (`rounds`: the index as just read, to spare reading it again)."""
        rounds = [r for r in (self.rounds() if rounds is None else rounds) if r.round_id != entry.round_id] + [entry]
        rounds = rounds[-MAX_ROUNDS:]
        body = {"federation": self.federation, "rounds": [r.as_dict() for r in rounds]}
        self.store.put_bytes(self.bucket, self.key, json.dumps(body, indent=1, sort_keys=True).encode(),
                             "application/json")
        return rounds

    @property
    def evaluation_key(self) -> str:
        return f"{self.federation}/history/last_evaluation.json"

    def record_evaluation(self, evaluation_id: str, finished_at: str, version: str,
                          figures: dict[str, float]) -> None:
        """The champion's figures from an evaluation-only run that reached its quorum."""
        body = {"evaluation_id": evaluation_id, "finished_at": finished_at, "version": version, "figures": figures}
        self.store.put_bytes(self.bucket, self.evaluation_key, json.dumps(body).encode(), "application/json")

    def last_evaluation(self) -> dict[str, Any] | None:
        data = self.store.get_bytes(self.bucket, self.evaluation_key)
        return None if data is None else json.loads(data)

    def drift_table(self, round_id: str) -> DriftTable | None:
        data = self.store.get_bytes(self.bucket, f"{self.federation}/rounds/{round_id}/drift.json")
        return None if data is None else DriftTable.from_dict(json.loads(data))

    def latest_drift(self, records: list[RoundRecord] | None = None, lookback: int = 50) -> DriftTable | None:
        """The drift table of the latest round that has one, among the last `lookback`
        rounds (`records`: the rounds already read, oldest first)."""
        for entry in reversed((self.rounds() if records is None else records)[-lookback:]):
            table = self.drift_table(entry.round_id)
            if table is not None:
                return table
        return None
