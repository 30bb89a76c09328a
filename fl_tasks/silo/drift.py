"""Drift at the silo: compare the window a silo trains on with a reference window, with
evidently (0.7's `Report`/`Dataset`/`DataDefinition` API and its `DataDriftPreset`), and keep
the reference windows in the silo's own state directory.

Only the scores leave the silo (`fl_tasks.protocol.drift.DriftReport`, in the update
manifest); the rows, the reference snapshots and evidently's HTML report stay here:

    <state_dir>/<federation>/drift/<round_id>.html           evidently's report of the round
    <state_dir>/<federation>/drift/references/first.parquet   the first window trained on (+ .json)
    <state_dir>/<federation>/drift/references/previous-<round_id>.parquet  the last windows (+ .json)

Nothing here imports evidently or pandas at module import: evidently alone takes seconds,
and the agent imports this module for every round, drift or not.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_tasks.protocol.drift import MAX_TEXT, ColumnDrift, DriftReport, DriftSchemaError, DriftSettings

if TYPE_CHECKING:
    from collections.abc import Collection

    import pandas as pd

    from fl_tasks.contract import DataContract

STATE_DIR_VARIABLE = "FL_CLIENT_STATE_DIR"
# evidently's test statuses (evidently.core.tests.TestStatus values) and the verdict each one
# is. A ValueDrift test only ever FAILs (drifted) or SUCCEEDs; the DriftedColumnsCount test is
# critical, so it FAILs too, but a non-critical one would say WARNING for the same verdict.
# ERROR and SKIPPED give no verdict: the silo sends no scores rather than guess one.
VERDICTS = {"SUCCESS": False, "FAIL": True, "WARNING": True}
KEPT_PREVIOUS = 2  # the last window, and the one before it for a round that is run again


class DriftError(Exception):
    """Drift cannot be measured on this silo's data this round; the message says why. The
    round goes on without scores."""


def default_state_dir(client_id: str) -> Path:
    """FL_CLIENT_STATE_DIR when set, else ~/.fl-client/<client_id>."""
    return Path(os.environ.get(STATE_DIR_VARIABLE) or Path.home() / ".fl-client" / client_id)


def drift_folder(state_dir: Path, federation: str) -> Path:
    return Path(state_dir) / federation / "drift"


def report_path(state_dir: Path, federation: str, round_id: str) -> Path:
    """Where evidently's HTML report of a round stays at the silo."""
    return drift_folder(state_dir, federation) / f"{round_id}.html"


def prune_reports(folder: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest HTML reports in `folder` (each is megabytes: a silo
    with daily rounds would otherwise gather gigabytes a year); returns what was deleted."""
    reports = sorted(Path(folder).glob("*.html"), key=lambda path: (path.stat().st_mtime, path.name))
    stale = reports[:max(0, len(reports) - keep)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# --- the measurement ---------------------------------------------------------------------

def column_kinds(frame: "pd.DataFrame", columns: list[str],
                 contract: "DataContract | None" = None) -> tuple[list[str], list[str]]:
    """(numerical, categorical) columns for evidently's DataDefinition: from the contract's
    column types when it names the column (boolean and categorical are categorical), else
    from the frame's dtype. Left to itself evidently would take a 0/1 boolean column, or
    categories coded as numbers, for numbers and pick a numerical test."""
    import pandas as pd

    declared = {} if contract is None else {c.name: c.type for c in (*contract.features, contract.label)}
    numerical, categorical = [], []
    for name in columns:
        kind = declared.get(name)
        if kind is None:
            dtype = frame[name].dtype
            if pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype):
                kind = "categorical"
            else:
                kind = "numeric"
        (numerical if kind == "numeric" else categorical).append(name)
    return numerical, categorical


def measure_drift(reference: "pd.DataFrame", current: "pd.DataFrame", settings: DriftSettings,
                  reference_label: str, html_path: Path | None = None,
                  contract: "DataContract | None" = None) -> DriftReport:
    """Compare `current` with `reference` over `settings.columns` with evidently's
    DataDriftPreset (the settings' drift_share, method and threshold) and return the scores
    with evidently's own verdicts; write evidently's HTML report to `html_path` when given.
    `contract` declares the column types (without it: the frames' dtypes). DriftError when
    the windows cannot be compared (a column missing, an empty window, evidently failing)."""
    columns = list(settings.columns)
    for which, frame in (("reference", reference), ("current", current)):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DriftError(f"the {which} window has no column(s) {missing} named in the drift settings' columns")
        if frame.empty:
            raise DriftError(f"the {which} window has no rows")

    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    numerical, categorical = column_kinds(current, columns, contract)
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    preset = DataDriftPreset(columns=columns, drift_share=settings.drift_share, method=settings.method,
                             threshold=settings.threshold)
    try:
        # include_tests: the verdicts are the tests evidently derives; without it there are none.
        snapshot = Report([preset], include_tests=True).run(
            Dataset.from_pandas(current[columns].reset_index(drop=True), data_definition=definition),
            Dataset.from_pandas(reference[columns].reset_index(drop=True), data_definition=definition))
        body = snapshot.dict()
    except Exception as exc:  # evidently raises whatever its statistics raise (ValueError, TypeError, ...)
        raise DriftError(f"evidently could not compare the windows: {type(exc).__name__}: {exc}") from exc
    drifted_share, dataset_drifted, scores = read_verdicts(body, columns, set(categorical))
    report = DriftReport(reference=reference_label[:MAX_TEXT], reference_rows=len(reference),
                         current_rows=len(current), drifted_share=drifted_share, dataset_drifted=dataset_drifted,
                         columns=scores)
    try:
        # What the coordinator will accept, checked here: a report it rejects would cost the silo its update there.
        DriftReport.from_dict(report.as_dict())
    except DriftSchemaError as exc:
        raise DriftError(f"evidently's results break the drift schema: {exc}") from None
    if html_path is not None:
        html_path = Path(html_path)
        tmp = html_path.parent / f".writing-{html_path.name}"
        try:
            html_path.parent.mkdir(parents=True, exist_ok=True)
            # save_html writes only when given a str: given a Path it silently writes nothing.
            snapshot.save_html(str(tmp))
            tmp.replace(html_path)
        except OSError as exc:
            raise DriftError(f"cannot write evidently's report to {html_path}: {exc}") from None
    return report


def read_verdicts(body: dict[str, Any], columns: list[str],
                  categorical: Collection[str] = ()) -> tuple[float, bool, dict[str, ColumnDrift]]:
    """(drifted share, dataset drifted, column -> score) from evidently's `snapshot.dict()`.

    How evidently 0.7.23 reports them (Report(..., include_tests=True)):

    - body["metrics"]: one entry per metric, {"id", "metric_name", "config", "value"}. The
      preset yields one DriftedColumnsCount (config type "evidently:metric_v2:DriftedColumnsCount",
      value {"count", "share"}) and one ValueDrift per column (config type
      "evidently:metric_v2:ValueDrift", config column and method, value the drift score: a
      p-value for K-S/chi-square/Z-test, a distance for Wasserstein/PSI/Jensen-Shannon).
    - body["tests"]: the tests evidently derived, each with metric_config.metric_id (the id
      of its metric above) and status (a TestStatus). A ValueDrift's test (id "drift") FAILs
      when evidently found the column drifted, whichever way its score points; the
      DriftedColumnsCount's test (id "lt", share < drift_share) FAILs when the share of
      drifted columns reached drift_share: the dataset drifted.

    The verdicts are those statuses; the scores are never compared with a threshold here."""
    metrics = {m.get("id"): m for m in body.get("metrics", [])}
    share: float | None = None
    dataset_drifted: bool | None = None
    scores: dict[str, ColumnDrift] = {}
    for test in body.get("tests", []):
        metric = metrics.get((test.get("metric_config") or {}).get("metric_id"))
        if metric is None:
            continue
        config, value = metric.get("config") or {}, metric.get("value")
        kind = str(config.get("type", "")).rsplit(":", 1)[-1]
        if kind == "ValueDrift" and config.get("column") in columns:
            column = config["column"]
            score = _finite(value, f"evidently's drift score of column '{column}'")
            scores[column] = ColumnDrift(score, _verdict(test, f"column '{column}'"),
                                         method_name(str(config.get("method")), column in categorical))
        elif kind == "DriftedColumnsCount":
            share = _finite(value.get("share") if isinstance(value, dict) else None,
                            "evidently's share of drifted columns")
            dataset_drifted = _verdict(test, "the share of drifted columns")
    missing = [c for c in columns if c not in scores]
    if missing:
        raise DriftError(f"evidently's report has no drift test for column(s) {missing}")
    if share is None or dataset_drifted is None:
        raise DriftError("evidently's report has no test of the share of drifted columns")
    return share, dataset_drifted, scores


def _verdict(test: dict[str, Any], what: str) -> bool:
    status = test.get("status")
    status = str(getattr(status, "value", status))  # dict() keeps TestStatus enums, json() has their values
    if status not in VERDICTS:
        raise DriftError(f"evidently's drift test of {what} ended with status {status}, not a verdict")
    return VERDICTS[status]


def _finite(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DriftError(f"{what} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise DriftError(f"{what} is {number}, not a finite number")
    return number


def method_name(method: str, categorical: bool = False) -> str:
    """The name evidently shows for a drift method: it reports the resolved display name
    ("K-S p_value") when it chose the method, but echoes the name it was given ("psi") when
    the settings named one; both become the display name ("PSI")."""
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    try:
        test = get_registered_stattest(method, ColumnType.Categorical if categorical else ColumnType.Numerical)
    except (ValueError, TypeError):  # already a display name, or a method evidently does not register
        return method[:MAX_TEXT] or "unknown"
    return (test.display_name or method)[:MAX_TEXT]


# --- the reference windows -----------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """A reference window kept at the silo: the rows of one round's training window, drift
    columns only."""

    kind: str  # first | previous
    round_id: str
    rows: int
    columns: tuple[str, ...]
    path: Path
    kept_ns: int = 0  # when it was kept (time.time_ns)

    @property
    def label(self) -> str:
        return f"{self.kind} window (round {self.round_id}, {self.rows} rows)"[:MAX_TEXT]

    def frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.read_parquet(self.path)


class ReferenceStore:
    """The `first` and `previous` reference windows of one federation at one silo, as Parquet
    snapshots with a small JSON record each. The record is written after its Parquet file and
    a snapshot without one is ignored, so a crash mid-write leaves no half reference."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def first(self) -> Reference | None:
        return self._read(self.folder / "first.json")

    def previous(self, before_round: str) -> Reference | None:
        """The window of the last round this silo trained on other than `before_round` (a round
        that is run again compares with the round before it, not with itself)."""
        for reference in self._previous():
            if reference.round_id != before_round:
                return reference
        return None

    def keep_first(self, round_id: str, rows: "pd.DataFrame") -> bool:
        """Snapshot `rows` as the first window unless there is one already; True when saved."""
        if self.first() is not None:
            return False
        self._write("first", "first", round_id, rows)
        return True

    def keep_previous(self, round_id: str, rows: "pd.DataFrame") -> None:
        """Snapshot `rows` as the last window trained on, dropping all but the last KEPT_PREVIOUS."""
        self._write("previous", f"previous-{round_id}", round_id, rows)
        for old in self._previous()[KEPT_PREVIOUS:]:
            old.path.with_suffix(".json").unlink(missing_ok=True)
            old.path.unlink(missing_ok=True)

    def _previous(self) -> list[Reference]:
        """Newest first, by when they were kept: ids of manual and scheduled rounds do not sort together."""
        found = (self._read(record) for record in self.folder.glob("previous-*.json"))
        return sorted((r for r in found if r is not None), key=lambda r: r.kept_ns, reverse=True)

    def _read(self, record: Path) -> Reference | None:
        path = record.with_suffix(".parquet")
        try:
            body = json.loads(record.read_text())
            if not path.exists():
                return None
            return Reference(body["kind"], body["round_id"], int(body["rows"]), tuple(body["columns"]), path,
                             int(body["kept_ns"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise DriftError(f"the reference record {record} is unreadable ({exc}); delete it and {path.name} "
                             "to take the next window as the reference") from None

    def _write(self, kind: str, name: str, round_id: str, rows: "pd.DataFrame") -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.parquet"
        # Written aside under a name no glob above matches, then renamed: readers see all or nothing.
        tmp = self.folder / f".writing-{path.name}"
        rows.reset_index(drop=True).to_parquet(tmp, index=False)
        tmp.replace(path)
        record = {"kind": kind, "round_id": round_id, "rows": len(rows), "columns": [str(c) for c in rows.columns],
                  "kept_ns": time.time_ns()}
        tmp = self.folder / f".writing-{name}.json"
        tmp.write_text(json.dumps(record))
        tmp.replace(path.with_suffix(".json"))
