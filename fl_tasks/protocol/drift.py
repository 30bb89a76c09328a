"""Drift, as both sides see it: what the coordinator asks each silo to compare
(`DriftSettings`, carried in the global manifest) and the scores a silo sends back
(`DriftReport`, carried in its update manifest). Only scores travel: per column a drift
score, the method that produced it and evidently's own verdict, plus the share of columns
that drifted. The rows and the silo's HTML report stay at the silo.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

REFERENCES = ("first", "previous", "fixed")
MAX_COLUMNS = 512
MAX_TEXT = 200


class DriftSchemaError(ValueError):
    """A drift block that breaks the schema; the message names the field."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise DriftSchemaError(message)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _iso_time(value: Any) -> bool:
    if value is None:
        return True
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class DriftSettings:
    """What each silo compares its training window with, over which columns.

    reference: `first` (the first window the silo trained on), `previous` (the window of the
    last round it trained on) or `fixed` (`reference_window`, read from its data source).
    drift_share: evidently's dataset-drift threshold, the share of drifted columns at which
    the silo's data counts as drifted. method/threshold: evidently's per-column test and its
    threshold; None lets evidently choose by column type and row count.
    """

    reference: str = "first"
    reference_window: dict = field(default_factory=dict)  # {"start": iso, "end": iso} for `fixed`
    columns: tuple[str, ...] = ()
    drift_share: float = 0.5
    method: str | None = None
    threshold: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "columns": list(self.columns)}

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "DriftSettings":
        where = "global manifest field 'drift'"
        _check(isinstance(body, dict) and set(body) == set(cls.__dataclass_fields__),
               f"{where} must hold exactly {sorted(cls.__dataclass_fields__)}")
        _check(body["reference"] in REFERENCES, f"{where}.reference must be one of {list(REFERENCES)}")
        window = body["reference_window"]
        # The silo reads the fixed window with these times: one it cannot parse would only
        # surface there, round after round, as a silo without scores.
        _check(isinstance(window, dict) and set(window) <= {"start", "end"}
               and all((isinstance(v, str) and _iso_time(v)) or v is None for v in window.values()),
               f"{where}.reference_window allows start and end (ISO times, e.g. '2013-09-01T00:00:00+00:00')")
        _check(body["reference"] != "fixed" or bool(window.get("start") or window.get("end")),
               f"{where}.reference_window needs start or end when reference is 'fixed'")
        columns = body["columns"]
        _check(isinstance(columns, list) and 0 < len(columns) <= MAX_COLUMNS
               and all(isinstance(c, str) and 0 < len(c) <= MAX_TEXT for c in columns),
               f"{where}.columns must name 1..{MAX_COLUMNS} columns")
        # A column named twice would be scored twice and counted twice in the drifted share.
        _check(len(set(columns)) == len(columns), f"{where}.columns names a column more than once")
        _check(_number(body["drift_share"]) and 0 < body["drift_share"] <= 1, f"{where}.drift_share must be in (0, 1]")
        _check(body["method"] is None or isinstance(body["method"], str) and 0 < len(body["method"]) <= MAX_TEXT,
               f"{where}.method must be null or a method name")
        _check(body["threshold"] is None or _number(body["threshold"]), f"{where}.threshold must be null or a number")
        return cls(**{**body, "columns": tuple(columns)})


@dataclass(frozen=True)
class ColumnDrift:
    score: float  # the test's statistic or p-value; `method` says which (they point opposite ways)
    drifted: bool  # evidently's own verdict for the column
    method: str


@dataclass(frozen=True)
class DriftReport:
    """One silo's drift scores for one round."""

    reference: str  # what it compared with, in words: "first window (round 000001)", ...
    reference_rows: int
    current_rows: int
    drifted_share: float  # share of the columns evidently marked drifted
    dataset_drifted: bool  # evidently's verdict: drifted_share reached the settings' drift_share
    columns: dict[str, ColumnDrift]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "DriftReport":
        where = "update manifest field 'drift'"
        expected = set(cls.__dataclass_fields__)
        _check(isinstance(body, dict) and set(body) == expected, f"{where} must hold exactly {sorted(expected)}")
        _check(isinstance(body["reference"], str) and 0 < len(body["reference"]) <= MAX_TEXT,
               f"{where}.reference must be text of 1..{MAX_TEXT} characters")
        for name in ("reference_rows", "current_rows"):
            _check(type(body[name]) is int and 0 <= body[name] < 10**12, f"{where}.{name} must be a row count")
        _check(_number(body["drifted_share"]) and 0 <= body["drifted_share"] <= 1,
               f"{where}.drifted_share must be in [0, 1]")
        _check(isinstance(body["dataset_drifted"], bool), f"{where}.dataset_drifted must be true or false")
        columns = body["columns"]
        _check(isinstance(columns, dict) and len(columns) <= MAX_COLUMNS, f"{where}.columns must map at most "
                                                                          f"{MAX_COLUMNS} column names to scores")
        parsed = {}
        for name, cell in columns.items():
            at = f"{where}.columns.{str(name)[:MAX_TEXT]}"
            # JSON keys are always text, but a dict built in Python may hold others (len() of an int fails).
            _check(isinstance(name, str) and 0 < len(name) <= MAX_TEXT, f"{at}: column names must be text of "
                                                                         f"1..{MAX_TEXT} characters")
            _check(isinstance(cell, dict) and set(cell) == {"score", "drifted", "method"},
                   f"{at} must hold exactly score, drifted and method")
            _check(_number(cell["score"]), f"{at}.score must be a finite number")
            _check(isinstance(cell["drifted"], bool), f"{at}.drifted must be true or false")
            _check(isinstance(cell["method"], str) and 0 < len(cell["method"]) <= MAX_TEXT,
                   f"{at}.method must name the method")
            parsed[name] = ColumnDrift(float(cell["score"]), cell["drifted"], cell["method"])
        return cls(body["reference"], body["reference_rows"], body["current_rows"], float(body["drifted_share"]),
                   body["dataset_drifted"], parsed)
