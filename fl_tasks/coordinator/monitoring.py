"""Retraining driven by monitoring: from the latest drift table and the champion's latest
federated figures, decide whether to start a round, and say why. The monitoring DAG
(`fl_monitor__<F>`) calls `check`; when it says so, the DAG emits an event on the
federation's retrain asset, which starts `fl_round__<F>` with the reason attached."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from fl_tasks.config import FederationSpec
from fl_tasks.coordinator.drift import DriftTable
from fl_tasks.coordinator.history import FederationHistory, RoundRecord
from fl_tasks.protocol.storage import ObjectStore


@dataclass(frozen=True)
class RetrainDecision:
    start: bool
    reasons: list[str] = field(default_factory=list)  # why a round is due (empty: it is not)
    held_back: str = ""  # why a due round is not requested (cooldown)
    drift_round: str | None = None  # the round whose drift table was read
    champion: dict[str, float] = field(default_factory=dict)  # the champion's latest federated figures

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reason": self.reason}


def champion_figures(history: list[RoundRecord], last_evaluation: dict[str, Any] | None = None,
                     ) -> tuple[str | None, dict[str, float]]:
    """(where they come from, the champion's figures on the silos' latest data): every round
    re-scores the champion (its `champion` figures), a promoted round's candidate is the new
    champion, and an evaluation-only run scores the champion without a round; the newest wins."""
    found: tuple[str | None, dict[str, float], str] = (None, {}, "")
    for record in reversed(history):
        figures = record.metrics.candidate if record.decision == "promoted" else record.metrics.champion
        if figures:
            found = (f"round {record.round_id}", dict(figures), record.finished_at)
            break
    if last_evaluation and last_evaluation["finished_at"] > found[2]:
        found = (f"evaluation-only run {last_evaluation['evaluation_id']}", dict(last_evaluation["figures"]),
                 last_evaluation["finished_at"])
    return found[0], found[1]


def retrain_decision(spec: FederationSpec, history: list[RoundRecord], drift: DriftTable | None,
                     last_request: dict[str, Any] | None, now: datetime, higher_is_better: dict[str, bool],
                     last_evaluation: dict[str, Any] | None = None) -> RetrainDecision:
    """Start a round when the share of drifted silos reaches `monitoring.max_drifted_share`
    or a champion figure crosses its `monitoring.min_metrics` bound; not within
    `cooldown_minutes` of the last request. The champion's figures are the newest of the last
    round's and the last evaluation-only run's (`last_evaluation`)."""
    m = spec.monitoring
    reasons = []
    if drift is not None and m.max_drifted_share is not None and drift.drifted_share is not None \
            and drift.drifted_share >= m.max_drifted_share:
        reasons.append(f"drift: {len(drift.drifted_silos)} of {len(drift.silos)} silos drifted in round "
                       f"{drift.round_id} ({', '.join(drift.drifted_silos)}; share {drift.drifted_share:.0%} >= "
                       f"{m.max_drifted_share:.0%})")
    scored_in, champion = champion_figures(history, last_evaluation)
    for metric, bound in sorted(m.min_metrics.items()):
        if metric not in champion:
            continue
        higher = higher_is_better.get(metric, True)
        value = champion[metric]
        if (value < bound) if higher else (value > bound):
            reasons.append(f"quality: champion {metric} {value:.4f} {'<' if higher else '>'} {bound:g} "
                           f"(federated evaluation in {scored_in})")
    held_back = ""
    if reasons and last_request is not None:
        since = now - datetime.fromisoformat(last_request["at"])
        if since < timedelta(minutes=m.cooldown_minutes):
            held_back = (f"a round was requested {since.total_seconds() / 60:.0f} minutes ago "
                         f"(monitoring.cooldown_minutes is {m.cooldown_minutes:g})")
    return RetrainDecision(bool(reasons) and not held_back, reasons, held_back,
                           drift.round_id if drift else None, champion)


class Monitor:
    """The monitoring DAG's view of one federation's coordinator bucket."""

    def __init__(self, spec: FederationSpec, store: ObjectStore):
        self.spec, self.store = spec, store
        self.history = FederationHistory(store, spec.coordinator_bucket, spec.federation)

    @property
    def request_key(self) -> str:
        return f"{self.spec.federation}/monitoring/last_request.json"

    def last_request(self) -> dict[str, Any] | None:
        data = self.store.get_bytes(self.spec.coordinator_bucket, self.request_key)
        return None if data is None else json.loads(data)

    def check(self, now: datetime, higher_is_better: dict[str, bool]) -> RetrainDecision:
        rounds = self.history.rounds()
        return retrain_decision(self.spec, rounds, self.history.latest_drift(rounds), self.last_request(), now,
                                higher_is_better, self.history.last_evaluation())

    def record_request(self, decision: RetrainDecision, now: datetime, run_id: str) -> dict[str, Any]:
        """Kept for the cooldown, and as the record of why the round was asked for."""
        record = {"at": now.isoformat(), "run_id": run_id, **decision.as_dict()}
        self.store.put_bytes(self.spec.coordinator_bucket, self.request_key, json.dumps(record).encode(),
                             "application/json")
        return record
