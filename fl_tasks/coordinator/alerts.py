"""What is worth telling a person about a round: low participation, slow updates, drift, a
falling metric, a rollback, an open circuit breaker. Each alert names the federation, the
round and the numbers; fl_airflow.notifiers sends them (log always; SMTP and a webhook when
the federation file configures them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ALERT_KINDS = ("low_participation", "high_latency", "drift", "accuracy_drop", "rollback", "circuit_open")


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
