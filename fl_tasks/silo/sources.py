"""Where a silo's rows come from: Parquet or CSV files, or a SQL table or query.

    fl-client ... --data transactions.parquet
    fl-client ... --data transactions.csv
    fl-client ... --data postgresql://fl_reader@db.bank.internal/tx --sql-table transactions
    fl-client ... --data postgresql://... --sql-query "SELECT ... FROM tx
        WHERE (CAST(:window_start AS timestamptz) IS NULL OR ts >= :window_start)
          AND (CAST(:window_end AS timestamptz) IS NULL OR ts < :window_end)"

A round's data window reaches the source: files are read and filtered on the contract's
event-time column; a SQL table is queried with the window as bound parameters; a SQL query
receives `:window_start` and `:window_end` (None for an open end) and must apply them
itself, since only it knows its own columns. Banks keep their transactions in databases:
the rows are selected there and never leave the silo.

Every source returns the event-time column as tz-aware UTC timestamps: naive times (in a
file, a `timestamp` column or a window bound) are UTC; CSV times must be ISO 8601. Errors
are `DataSourceError`s naming the source (never its password) and the fix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import sqlalchemy as sa

FILE_SUFFIXES = (".parquet", ".csv")
WINDOW_PARAMETERS = ("window_end", "window_start")


class DataSourceError(ValueError):
    """A data source that cannot be read; the message names it and the fix."""


def _utc(moment: datetime) -> datetime:
    """Naive moments are UTC, as naive event times are: one rule for files, databases and windows."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


@dataclass(frozen=True)
class Window:
    """Rows with start <= event time < end; None leaves that side open."""

    start: datetime | None = None
    end: datetime | None = None

    @classmethod
    def from_manifest(cls, window: dict) -> "Window":
        """From ISO 8601 strings (JSON manifests) or datetimes and dates (YAML parses those itself)."""

        def moment(side: str) -> datetime | None:
            value = window.get(side)
            if not value:
                return None
            if isinstance(value, datetime):
                return value
            if isinstance(value, date):
                return datetime(value.year, value.month, value.day)
            try:
                return datetime.fromisoformat(str(value))
            except ValueError:
                raise ValueError(f"the data window's {side} {value!r} is not an ISO 8601 time, e.g. "
                                 "'2024-01-01T00:00:00+00:00'") from None

        return cls(moment("start"), moment("end"))

    def __str__(self) -> str:
        return f"[{self.start.isoformat() if self.start else '-inf'}, {self.end.isoformat() if self.end else '+inf'})"


class DataSource(ABC):
    """Reads a silo's rows for one window."""

    @abstractmethod
    def read(self, window: Window, event_time: str | None) -> "pd.DataFrame":
        """The rows inside `window` (all rows when the contract has no event time), the
        event-time column as tz-aware UTC timestamps."""

    @abstractmethod
    def describe(self) -> str:
        """Where the rows come from, for logs (never credentials)."""


def _utc_times(frame: "pd.DataFrame", event_time: str | None) -> "pd.DataFrame":
    """The event-time column as tz-aware UTC timestamps (naive ones taken as UTC), so that
    windows compare alike whatever the source stored. A column that is not made of ISO 8601
    times is left as it is, for the contract check to name (numbers are not guessed to be
    epochs, nor 01/02/2024 to be a day or a month)."""
    import pandas as pd

    if event_time is None or list(frame.columns).count(event_time) != 1:
        return frame  # the contract check names a missing or repeated column
    values = frame[event_time]
    if not (pd.api.types.is_datetime64_any_dtype(values) or pd.api.types.is_object_dtype(values)
            or pd.api.types.is_string_dtype(values)):
        return frame
    try:
        times = pd.to_datetime(values, utc=True, format="ISO8601")
    except (ValueError, TypeError, OverflowError):
        return frame
    frame = frame.copy()
    frame[event_time] = times
    return frame


def _filter(frame: "pd.DataFrame", window: Window, event_time: str | None) -> "pd.DataFrame":
    """The rows of `frame` inside `window` (after `_utc_times`)."""
    import pandas as pd

    if event_time is None or (window.start is None and window.end is None):
        return frame
    if list(frame.columns).count(event_time) != 1 or not isinstance(frame[event_time].dtype, pd.DatetimeTZDtype):
        return frame  # the contract check names the missing column or its type
    times = frame[event_time]
    mask = pd.Series(True, index=frame.index)
    if window.start is not None:
        mask &= times >= pd.Timestamp(_utc(window.start))
    if window.end is not None:
        mask &= times < pd.Timestamp(_utc(window.end))
    return frame[mask].reset_index(drop=True)


@dataclass(frozen=True)
class FileSource(DataSource):
    """A Parquet or CSV file (CSV event times in ISO 8601), filtered here on the event time."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.path.suffix.lower() not in FILE_SUFFIXES:
            raise DataSourceError(f"--data {str(self.path)!r}: expected a .parquet or .csv file, or a database URL "
                                  "(e.g. postgresql://user@host/db with --sql-table)")

    def read(self, window: Window, event_time: str | None) -> "pd.DataFrame":
        import pandas as pd

        if not self.path.exists():
            raise DataSourceError(f"data file {self.path} does not exist; pass the silo's Parquet or CSV file "
                                  "to --data")
        kind = "CSV" if self.path.suffix.lower() == ".csv" else "Parquet"
        try:
            frame = pd.read_csv(self.path) if kind == "CSV" else pd.read_parquet(self.path)
        except (OSError, ValueError) as exc:  # pyarrow's and pandas' parse errors are ValueErrors
            first_line = (str(exc).splitlines() or [""])[0]
            raise DataSourceError(f"cannot read {self.path} as {kind}: {type(exc).__name__}: {first_line}; check "
                                  f"that --data is a readable {kind} file") from None
        return _filter(_utc_times(frame, event_time), window, event_time)

    def describe(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class SqlSource(DataSource):
    """A table, or a query that takes `:window_start` and `:window_end`, through SQLAlchemy.

    Naive timestamps in the database are UTC, as in files: on PostgreSQL the session's time
    zone is set to UTC, so that `timestamp` columns compare with the window as `timestamptz`
    ones do whatever the server's own time zone. The rows that come back are filtered on the
    event time once more, so that a query that ignores its window cannot widen it."""

    url: str
    table: str | None = None
    query: str | None = None

    def __post_init__(self) -> None:
        import sqlalchemy as sa

        if (self.table is None) == (self.query is None):
            raise DataSourceError(f"{self.describe()}: a SQL source needs exactly one of --sql-table or --sql-query")
        url = self._parsed_url()
        if url is not None and url.host and "@" in url.host:
            raise DataSourceError(f"{self.describe()}: the URL's password has an '@' (or the host one); "
                                  "percent-encode it in --data, e.g. '@' as %40")
        if self.query is not None:
            found = tuple(sorted(sa.text(self.query).compile().params))
            if found != WINDOW_PARAMETERS:
                raise DataSourceError(
                    f"--sql-query must use :window_start and :window_end and no other parameter (it uses "
                    f"{', '.join(':' + p for p in found) or 'none'}); they are bound to the round's data window "
                    "(None for an open end, which the query must allow), e.g. 'WHERE ts >= :window_start AND ts < "
                    ":window_end'; cast with "
                    "CAST(:window_start AS timestamptz), not :window_start::timestamptz; or pass --sql-table")

    def read(self, window: Window, event_time: str | None) -> "pd.DataFrame":
        import pandas as pd
        import sqlalchemy as sa

        try:
            engine = sa.create_engine(self.url)
        except (sa.exc.ArgumentError, ValueError, ImportError) as exc:  # bad URL, port, dialect or missing driver
            raise self._error(f"--data {self.describe()} is not a usable SQLAlchemy URL ({type(exc).__name__}: {exc}); "
                              "write e.g. postgresql+psycopg2://user:password@host:5432/database and install its "
                              "driver") from None
        try:
            with engine.connect() as connection:
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql("SET TIME ZONE 'UTC'")
                frame = pd.read_sql(self._statement(connection, window, event_time), connection)
        except sa.exc.NoSuchTableError:
            raise self._error(f"table {self.table!r} does not exist in {self.describe()}; check --sql-table "
                              "(write schema.table for a table outside the default schema)") from None
        except sa.exc.SQLAlchemyError as exc:
            fix = "the query runs (--sql-query)" if self.query is not None else "the table is readable (--sql-table)"
            first_line = (str(exc).splitlines() or [""])[0]
            raise self._error(f"reading {self.describe()} failed: {type(exc).__name__}: {first_line}; check that "
                              f"the database is reachable with the URL in --data and that {fix}") from None
        finally:
            engine.dispose()
        return _filter(_utc_times(frame, event_time), window, event_time)

    def _statement(self, connection: "sa.Connection", window: Window, event_time: str | None) -> "sa.Executable":
        import sqlalchemy as sa

        if self.query is not None:
            # Typed, so that every dialect sends a timestamp (None included), aware and in UTC.
            bound = [sa.bindparam(name, _utc(moment) if moment else None, type_=sa.DateTime(timezone=True))
                     for name, moment in (("window_start", window.start), ("window_end", window.end))]
            return sa.text(self.query).bindparams(*bound)
        schema, _, name = self.table.rpartition(".")
        table = sa.Table(name, sa.MetaData(), schema=schema or None, autoload_with=connection)
        statement = sa.select(table)
        if event_time is None or event_time not in table.c:
            return statement  # the contract check names the missing column
        column = table.c[event_time]
        aware = getattr(column.type, "timezone", True)  # a naive column compares with naive UTC bounds

        def bound(moment: datetime) -> datetime:
            return _utc(moment) if aware else _utc(moment).replace(tzinfo=None)

        if window.start is not None:
            statement = statement.where(column >= bound(window.start))
        if window.end is not None:
            statement = statement.where(column < bound(window.end))
        return statement

    def _parsed_url(self) -> "sa.URL | None":
        import sqlalchemy as sa

        try:
            return sa.engine.make_url(self.url)
        except (sa.exc.ArgumentError, ValueError):
            return None

    def _error(self, message: str) -> DataSourceError:
        """A DataSourceError whose message cannot hold the password, whatever a driver said."""
        url = self._parsed_url()
        if url is not None:
            secrets = [url.password, *(v for k, v in url.query.items() if "password" in k.lower())]
            for secret in secrets:
                if isinstance(secret, str) and secret:
                    message = message.replace(secret, "***")
        return DataSourceError(message)

    def describe(self) -> str:
        """The URL without password or query options (which may hold one), and the table."""
        url = self._parsed_url()
        if url is None:
            shown = "<unparseable URL>"
        elif url.host and "@" in url.host:
            shown = f"<{url.drivername} URL with an unencoded '@'>"
        else:
            shown = url.set(query={}).render_as_string(hide_password=True)
        return f"{shown} ({'table ' + self.table if self.table is not None else 'query'})"


def open_source(data: str, sql_table: str | None = None, sql_query: str | None = None) -> DataSource:
    """The source `--data` names: a .parquet or .csv file, or a SQLAlchemy URL with a table or query."""
    if "://" in data:
        return SqlSource(data, sql_table or None, sql_query or None)
    if sql_table or sql_query:
        raise DataSourceError("--sql-table and --sql-query need a database URL in --data")
    return FileSource(Path(data))
