"""What is worth telling a person about a round: low participation, slow updates, drift, a
falling metric, a rollback, an open circuit breaker. Each alert names the federation, the
round and the numbers; fl_airflow.notifiers sends them (log always; SMTP and a webhook when
the federation file configures them)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: config and the coordinator's modules stay import-independent
    from fl_tasks.config import FederationSpec
    from fl_tasks.coordinator.drift import DriftTable
    from fl_tasks.coordinator.metrics import RoundMetrics

ALERT_KINDS = ("low_participation", "high_latency", "drift", "accuracy_drop", "rollback", "circuit_open",
               "privacy_budget")


@dataclass(frozen=True)
class Alert:
    kind: str  # one of ALERT_KINDS
    federation: str
    round_id: str
    message: str  # one line: the federation, the round and the numbers
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return f"[fl {self.federation}] round {self.round_id}: {self.kind.replace('_', ' ')}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "subject": self.subject}

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "Alert":
        return cls(**{k: v for k, v in body.items() if k in cls.__dataclass_fields__})


# A float computed from others (a difference of two metrics, an interpolated percentile) can
# land a hair past a threshold it equals on paper; an alert must not fire on that noise.
_EPS = 1e-9


def _past(value: float, limit: float) -> bool:
    """value > limit, beyond floating-point noise."""
    return value - limit > _EPS * max(1.0, abs(limit))


def _num(value: float, places: int = 4) -> str:
    """A number for a one-line message: at most `places` decimals, no trailing zeros."""
    text = f"{value:.{places}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _pct(share: float) -> str:
    return f"{_num(share * 100, 1)}%"


def _alert(kind: str, federation: str, round_id: str, message: str, figures: dict[str, float]) -> Alert:
    return Alert(kind, federation, round_id, message, {k: float(v) for k, v in figures.items()})


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _participation(spec: FederationSpec, m: RoundMetrics) -> Alert | None:
    limit = spec.alerts.min_participation
    if limit is None or not _past(limit, m.participation_rate):
        return None
    return _alert("low_participation", m.federation, m.round_id,
                 f"{m.federation} round {m.round_id}: {m.clients_committed} of {m.clients_expected} silos sent "
                 f"updates (participation {_pct(m.participation_rate)}, alert below {_pct(limit)})",
                 {"participation_rate": m.participation_rate, "min_participation": limit,
                  "clients_committed": m.clients_committed, "clients_expected": m.clients_expected})


def _latency(spec: FederationSpec, m: RoundMetrics) -> Alert | None:
    limit, p95 = spec.alerts.max_latency_p95_seconds, m.latency_p95
    if limit is None or p95 is None or not _past(p95, limit):
        return None
    slowest = max(sorted(m.latency_seconds), key=lambda silo: m.latency_seconds[silo])
    return _alert("high_latency", m.federation, m.round_id,
                 f"{m.federation} round {m.round_id}: update latency p95 {_num(p95, 1)}s over "
                 f"{len(m.latency_seconds)} silos (alert above {_num(limit, 1)}s; slowest {slowest} "
                 f"{_num(m.latency_seconds[slowest], 1)}s)",
                 {"latency_p95_seconds": p95, "max_latency_p95_seconds": limit,
                  "latency_max_seconds": m.latency_seconds[slowest]})


MAX_DRIFT_COLUMNS = 3  # per silo in the message; the drift table has them all


def _drift(spec: FederationSpec, m: RoundMetrics, table: DriftTable | None) -> Alert | None:
    # action off means "recorded only" (config.DriftSpec): the table and report show it.
    if spec.drift is None or spec.drift.action not in ("warn", "block") or table is None:
        return None
    drifted = table.drifted_silos
    if not drifted:
        return None
    # Scores of different methods point different ways (p-values vs distances), so columns
    # rank by how many drifted silos flag them: the federation-wide picture comes first.
    flagged: dict[str, int] = {}
    for silo in drifted:
        for column, cell in table.silos[silo].columns.items():
            if cell.drifted:
                flagged[column] = flagged.get(column, 0) + 1
    parts = []
    for silo in drifted:
        report = table.silos[silo]
        columns = sorted((c for c, cell in report.columns.items() if cell.drifted), key=lambda c: (-flagged[c], c))
        shown = ", ".join(columns[:MAX_DRIFT_COLUMNS]) + (f" +{len(columns) - MAX_DRIFT_COLUMNS}"
                                                          if len(columns) > MAX_DRIFT_COLUMNS else "")
        parts.append(f"{silo} {_pct(report.drifted_share)} of columns" + (f" ({shown})" if shown else ""))
    share = table.drifted_share or 0.0
    outcome = ("the candidate is not promoted" if spec.drift.action == "block"
               else "recorded, promotion not blocked")
    return _alert("drift", m.federation, m.round_id,
                 f"{m.federation} round {m.round_id}: data drifted at {len(drifted)} of {len(table.silos)} silos "
                 f"({_pct(share)}): {'; '.join(parts)}; drift.action {spec.drift.action}: {outcome}",
                 {"drifted_share": share, "drifted_silos": len(drifted), "silos_with_scores": len(table.silos),
                  **{f"drifted_share_{silo}": table.silos[silo].drifted_share for silo in drifted}})


def _metric_drop(spec: FederationSpec, m: RoundMetrics, higher_is_better: bool) -> Alert | None:
    limit, name = spec.alerts.max_metric_drop, m.primary_metric
    if limit is None or not name or name not in m.candidate or name not in m.champion:
        return None  # e.g. the first round: no champion to compare with
    candidate, champion = m.candidate[name], m.champion[name]
    if not (math.isfinite(candidate) and math.isfinite(champion)):
        return None
    drop = champion - candidate if higher_is_better else candidate - champion
    if not _past(drop, limit):
        return None
    side, better = ("below", "higher") if higher_is_better else ("above", "lower")
    return _alert("accuracy_drop", m.federation, m.round_id,
                 f"{m.federation} round {m.round_id}: candidate {name} {_num(candidate)} is {_num(drop)} {side} the "
                 f"champion's {_num(champion)} ({better} is better; alert when more than {_num(limit)} {side})",
                 {f"candidate_{name}": candidate, f"champion_{name}": champion, "metric_drop": drop,
                  "max_metric_drop": limit})


def _rollback(spec: FederationSpec, m: RoundMetrics, decision: str, reason: str) -> Alert | None:
    if decision != "rejected" or not spec.alerts.on_rollback:
        return None
    figures = {}
    if m.primary_metric:
        figures = {f"{side}_{m.primary_metric}": values[m.primary_metric]
                   for side, values in (("candidate", m.candidate), ("champion", m.champion))
                   if m.primary_metric in values}
    return _alert("rollback", m.federation, m.round_id,
                 f"{m.federation} round {m.round_id}: candidate rolled back, the champion stays: "
                 f"{_one_line(reason) or 'no reason recorded'}", figures)


def round_alerts(spec: FederationSpec, metrics: RoundMetrics, decision: str, reason: str,
                 drift: DriftTable | None, higher_is_better: bool) -> list[Alert]:
    """The alerts a finished round raises under `spec.alerts` (a threshold of None turns that
    alert off) and `spec.drift.action`, in ALERT_KINDS order. `decision` is the round's
    (promoted | rejected | no_model), `reason` its one-line why; `higher_is_better` is the
    direction of the task's primary metric (Task.primary.higher_is_better)."""
    found = [_participation(spec, metrics), _latency(spec, metrics), _drift(spec, metrics, drift),
             _metric_drop(spec, metrics, higher_is_better), _rollback(spec, metrics, decision, reason)]
    return [alert for alert in found if alert is not None]


def circuit_open_alert(federation: str, round_id: str, failures: list[tuple[str, str]], k: int,
                       refused: bool = True) -> Alert:
    """The alert of a round the open circuit breaker refused (`refused`), or of the round whose
    failure opened it: `failures` are the failed or rolled-back rounds of the streak as
    (round_id, reason), oldest first; `k` is circuit_breaker.max_consecutive_failures."""
    named = failures[-k:] if k > 0 else failures
    rounds = "; ".join(f"{rid}: {_one_line(why) or 'no reason recorded'}" for rid, why in named)
    return _alert("circuit_open", federation, round_id,
                 f"{federation} round {round_id}: {'not dispatched' if refused else 'the next round will not be dispatched'}"
                 f", circuit breaker open after {len(failures)} "
                 f"consecutive failed or rolled-back rounds (circuit_breaker.max_consecutive_failures {k}): "
                 f"{rounds}. Fix: remove the cause, then trigger a round with the param reset_circuit_breaker "
                 "set to true",
                 {"consecutive_failures": len(failures), "max_consecutive_failures": k})


def privacy_budget_alert(federation: str, round_id: str, reason: str, privacy: dict[str, Any] | None) -> Alert:
    """The alert of a round refused because it would spend past privacy.max_epsilon."""
    figures = {} if privacy is None else {"epsilon": float(privacy["epsilon"]), "delta": float(privacy["delta"])}
    if privacy is not None and privacy.get("max_epsilon") is not None:
        figures["max_epsilon"] = float(privacy["max_epsilon"])
    return _alert("privacy_budget", federation, round_id, f"{federation} round {round_id}: not dispatched, "
                  f"{_one_line(reason)}", figures)
