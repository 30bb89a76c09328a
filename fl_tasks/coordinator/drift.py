"""The round's drift table: silo x column, from the drift scores each silo sent with its
update (fl_tasks.protocol.drift), and the drift gate: off, warn (recorded and alerted) or
block (the candidate is not promoted)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fl_tasks.protocol.drift import DriftReport


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


def build_drift_table(round_id: str, columns: tuple[str, ...], drift_blocks: dict[str, Any]) -> DriftTable:
    """The table from each committed update's drift block (silo -> the block as sent, or None
    when its manifest is gone). An empty block is a silo with no reference yet; a block that
    breaks the schema is kept out, with why."""
    silos, missing = {}, {}
    for client_id, block in sorted(drift_blocks.items()):
        if not block:
            missing[client_id] = "no drift scores (first window: it became the reference)" if block == {} \
                else "no update manifest kept"
            continue
        try:
            silos[client_id] = DriftReport.from_dict(block)
        except ValueError as exc:
            missing[client_id] = f"drift scores unusable: {exc}"
    return DriftTable(round_id, columns, silos, missing)


def drift_gate(table: DriftTable, action: str) -> dict[str, Any] | None:
    """The gate record for the validation result: `block` fails it when a silo's data drifted,
    `warn` passes it with a warning, `off` gives none."""
    if action == "off":
        return None
    drifted = table.drifted_silos
    if not table.silos:
        detail = "no silo sent drift scores this round"
    elif drifted:
        detail = f"{len(drifted)} of {len(table.silos)} silos drifted: " + ", ".join(
            f"{s} ({table.silos[s].drifted_share:.0%} of columns)" for s in drifted)
    else:
        detail = f"no drift at {len(table.silos)} silos"
    return {"name": "drift", "source": "drift", "passed": action != "block" or not drifted,
            "warning": bool(drifted) and action == "warn", "value": table.drifted_share, "threshold": None,
            "detail": detail + ("" if not drifted else " (action block: not promoted)" if action == "block"
                                else " (action warn: recorded and alerted)")}
