"""The round's drift table: silo x column, from the drift scores each silo sent with its
update (fl_tasks.protocol.drift), and the drift gate: off, warn (recorded and alerted) or
block (the candidate is not promoted)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fl_tasks.protocol.drift import DriftReport

DRIFT_ACTIONS = ("off", "warn", "block")


@dataclass(frozen=True)
class DriftTable:
    round_id: str
    columns: tuple[str, ...]
    silos: dict[str, DriftReport]  # silo -> its scores (silos that sent none are in `missing`)
    missing: dict[str, str] = field(default_factory=dict)  # silo -> why there are no scores

    @property
    def drifted_silos(self) -> list[str]:
        return sorted(s for s, r in self.silos.items() if r.dataset_drifted)

    @property
    def drifted_share(self) -> float | None:
        """Share of the silos with scores whose data drifted (None: no silo sent scores)."""
        return len(self.drifted_silos) / len(self.silos) if self.silos else None

    def as_dict(self) -> dict[str, Any]:
        return {"round_id": self.round_id, "columns": list(self.columns),
                "silos": {s: r.as_dict() for s, r in sorted(self.silos.items())}, "missing": dict(self.missing),
                "drifted_silos": self.drifted_silos, "drifted_share": self.drifted_share}

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "DriftTable":
        return cls(body["round_id"], tuple(body["columns"]),
                   {s: DriftReport.from_dict(r) for s, r in body["silos"].items()}, dict(body.get("missing") or {}))
