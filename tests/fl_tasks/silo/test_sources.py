"""fl_tasks/silo/sources.py: Parquet and CSV files written by pandas, and tables and queries on
a real PostgreSQL server, return exactly the rows of the round's window with UTC event times;
every unreadable source is a DataSourceError that names it and never its password."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import sqlalchemy as sa

from devstack.embedded import free_port
from fl_tasks.contract import Column, DataContract
from fl_tasks.silo.sources import DataSourceError, FileSource, SqlSource, Window, open_source

PASSWORD = "s3cret-Pa55"
START = datetime(2024, 1, 1)  # row i happens at START + 6 h * i (UTC)
CONTRACT = DataContract(
    label=Column("is_fraud", "boolean"),
    features=(Column("amount", "numeric"), Column("channel", "categorical", categories=("web", "pos", "atm"))),
    event_time="event_time",
)
NAIVE = Window(datetime(2024, 1, 1, 6), datetime(2024, 1, 2))  # rows 1, 2, 3
AWARE = Window(datetime(2024, 1, 1, 7, tzinfo=timezone(timedelta(hours=1))),  # the same window, in UTC+1
               datetime(2024, 1, 2, 1, tzinfo=timezone(timedelta(hours=1))))
WINDOWS = [(Window(), list(range(8))), (NAIVE, [1, 2, 3]), (AWARE, [1, 2, 3]),
           (Window(start=datetime(2024, 1, 2, 6)), [5, 6, 7]), (Window(end=datetime(2024, 1, 1, 6)), [0])]


def transactions(tz: str | None = "UTC") -> pd.DataFrame:
    """Eight transactions six hours apart; event times naive (tz=None) or in `tz`."""
    times = pd.date_range(START, periods=8, freq="6h", tz="UTC")
    return pd.DataFrame({
        "id": range(8),
        "amount": [12.5, 80.0, 3.2, 45.0, 9.9, 150.0, 7.5, 22.0],
        "channel": ["web", "pos", "atm", "web", "pos", "atm", "web", "pos"],
        "is_fraud": [False, True, False, False, True, False, False, True],
        "event_time": times.tz_localize(None) if tz is None else times.tz_convert(tz),
    })


def assert_rows(frame: pd.DataFrame, ids: list[int]) -> None:
    """Exactly rows `ids`, with tz-aware UTC event times that satisfy the contract."""
    assert frame["id"].tolist() == ids
    assert str(frame["event_time"].dtype).endswith(", UTC]")
    expected = pd.date_range(START, periods=8, freq="6h", tz="UTC")[ids]
    assert list(frame["event_time"]) == list(expected)
    if len(ids) >= CONTRACT.min_rows:
        assert CONTRACT.check(frame.drop(columns="id")) == []


def source_error(source, window: Window = Window()) -> str:
    with pytest.raises(DataSourceError) as info:
        source.read(window, "event_time")
    message = str(info.value)
    assert PASSWORD not in message
    return message


# --- files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tz", [None, "UTC", "Europe/Paris"])
@pytest.mark.parametrize("window, ids", WINDOWS)
def test_parquet_rows_of_the_window(tmp_path, tz, window, ids):
    path = tmp_path / "tx.parquet"
    transactions(tz).to_parquet(path)
    assert_rows(open_source(str(path)).read(window, "event_time"), ids)


@pytest.mark.parametrize("tz", [None, "UTC", "Europe/Paris"])
@pytest.mark.parametrize("window, ids", WINDOWS)
def test_csv_rows_of_the_window(tmp_path, tz, window, ids):
    path = tmp_path / "tx.csv"
    transactions(tz).to_csv(path, index=False)
    assert_rows(open_source(str(path)).read(window, "event_time"), ids)


def test_files_without_event_time_are_read_whole(tmp_path):
    transactions().to_parquet(tmp_path / "tx.parquet")
    assert len(FileSource(tmp_path / "tx.parquet").read(NAIVE, None)) == 8


def test_csv_problems_are_left_to_the_contract(tmp_path):
    """A missing or unparseable event-time column is the contract's to name, not a read failure."""
    path = tmp_path / "tx.csv"
    transactions().drop(columns="event_time").to_csv(path, index=False)
    frame = open_source(str(path)).read(NAIVE, "event_time")
    assert CONTRACT.check(frame.drop(columns="id")) == ["column 'event_time' missing"]
    transactions().assign(event_time=["01/02/2024"] * 8).to_csv(path, index=False)
    frame = open_source(str(path)).read(NAIVE, "event_time")
    assert CONTRACT.check(frame.drop(columns="id")) == [
        "column 'event_time' (event time) has type object, expected a timestamp"]


def test_file_errors_name_the_file_and_the_fix(tmp_path):
    missing = source_error(open_source(str(tmp_path / "nowhere.parquet")))
    assert "nowhere.parquet does not exist" in missing and "--data" in missing
    (tmp_path / "broken.parquet").write_text("not parquet")
    broken = source_error(open_source(str(tmp_path / "broken.parquet")))
    assert broken.startswith(f"cannot read {tmp_path / 'broken.parquet'} as Parquet") and "--data" in broken
    (tmp_path / "empty.csv").write_text("")
    assert "cannot read" in source_error(open_source(str(tmp_path / "empty.csv")))
    with pytest.raises(DataSourceError, match="expected a .parquet or .csv file, or a database URL"):
        open_source("tx.json")
    with pytest.raises(DataSourceError, match="--sql-table and --sql-query need a database URL"):
        open_source("tx.parquet", sql_table="transactions")


# --- SQL on a real PostgreSQL ------------------------------------------------------------------
@pytest.fixture(scope="module")
def database(postgres_server) -> str:
    """A database whose own time zone is not UTC, with the transactions twice: in a
    `timestamptz` column (`transactions`) and a naive `timestamp` one (`naive_transactions`)."""
    url = postgres_server.create_database("silo_bank_a")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("ALTER DATABASE silo_bank_a SET timezone TO 'Asia/Tokyo'")
        engine.dispose()  # the setting holds from the next session on
        with engine.begin() as connection:
            transactions().to_sql("transactions", connection, index=False)
            transactions(None).to_sql("naive_transactions", connection, index=False)
        with engine.connect() as connection:
            types = dict(connection.exec_driver_sql(
                "SELECT table_name, data_type FROM information_schema.columns WHERE column_name = 'event_time'").all())
            assert connection.exec_driver_sql("SHOW timezone").scalar() == "Asia/Tokyo"
        assert types == {"transactions": "timestamp with time zone",
                         "naive_transactions": "timestamp without time zone"}
    finally:
        engine.dispose()
    return url


def with_password(url: str) -> str:
    """The same URL with a password (the server trusts loopback, so any password works)."""
    return url.replace("postgres@", f"postgres:{PASSWORD}@")


@pytest.mark.parametrize("table", ["transactions", "naive_transactions", "public.transactions"])
@pytest.mark.parametrize("window, ids", WINDOWS)
def test_sql_table_rows_of_the_window(database, table, window, ids):
    assert_rows(open_source(database, sql_table=table).read(window, "event_time").sort_values("id"), ids)


WINDOW_QUERY = """
    SELECT * FROM {table}
    WHERE (CAST(:window_start AS timestamptz) IS NULL OR event_time >= :window_start)
      AND (CAST(:window_end AS timestamptz) IS NULL OR event_time < :window_end)
    ORDER BY id
"""


@pytest.mark.parametrize("table", ["transactions", "naive_transactions"])
@pytest.mark.parametrize("window, ids", WINDOWS)
def test_sql_query_rows_of_the_window(database, table, window, ids):
    assert_rows(open_source(database, sql_query=WINDOW_QUERY.format(table=table)).read(window, "event_time"), ids)


@pytest.mark.parametrize("window, count", [(Window(), 8), (NAIVE, 3), (AWARE, 3)])
def test_sql_query_parameters_are_bound_in_the_database(database, window, count):
    """Counted in the database (no event time comes back to filter on), the window holds
    only its rows, and the bound values are the window's bounds in UTC."""
    query = """
        SELECT count(*) AS n, CAST(:window_start AS timestamptz) AS bound_start,
               CAST(:window_end AS timestamptz) AS bound_end
        FROM transactions
        WHERE event_time >= COALESCE(CAST(:window_start AS timestamptz), '-infinity')
          AND event_time < COALESCE(CAST(:window_end AS timestamptz), 'infinity')
    """
    [row] = open_source(database, sql_query=query).read(window, "event_time").to_dict("records")
    assert row["n"] == count
    for side in ("start", "end"):
        moment = getattr(window, side)
        expected = None if moment is None else pd.Timestamp(moment).tz_localize("UTC") if moment.tzinfo is None \
            else pd.Timestamp(moment).tz_convert("UTC")
        assert (pd.isna(row[f"bound_{side}"]) and expected is None) or row[f"bound_{side}"] == expected


def test_a_query_that_ignores_its_window_cannot_widen_it(database):
    query = "SELECT * FROM transactions WHERE :window_start IS NULL OR :window_end IS NULL OR true ORDER BY id"
    assert_rows(open_source(database, sql_query=query).read(NAIVE, "event_time"), [1, 2, 3])


def test_a_query_must_take_the_window(database):
    for query in ("SELECT * FROM transactions", "SELECT * FROM transactions WHERE event_time >= :window_start",
                  "SELECT * FROM transactions WHERE event_time >= :window_start AND event_time < :window_end "
                  "AND amount > :min_amount"):
        with pytest.raises(DataSourceError, match="--sql-query must use :window_start and :window_end"):
            open_source(database, sql_query=query)
    with pytest.raises(DataSourceError, match="exactly one of --sql-table or --sql-query"):
        open_source(database)
    with pytest.raises(DataSourceError, match="exactly one of --sql-table or --sql-query"):
        SqlSource(database, "transactions", WINDOW_QUERY)


def test_sql_errors_name_the_source_and_the_fix_never_the_password(database):
    url = with_password(database)
    assert_rows(open_source(url, sql_table="transactions").read(NAIVE, "event_time"), [1, 2, 3])
    source = open_source(url, sql_table="transfers")
    assert PASSWORD not in source.describe() and "postgres:***@127.0.0.1" in source.describe()
    assert source_error(source) == (f"table 'transfers' does not exist in {source.describe()}; check --sql-table "
                                    "(write schema.table for a table outside the default schema)")

    query = source_error(open_source(url, sql_query=WINDOW_QUERY.format(table="transfers")))
    assert "ProgrammingError" in query and 'relation "transfers" does not exist' in query and "--sql-query" in query

    unknown_db = source_error(open_source(with_password(database).replace("silo_bank_a", "silo_nowhere"),
                                          sql_table="transactions"))
    assert "OperationalError" in unknown_db and 'database "silo_nowhere" does not exist' in unknown_db

    port = free_port()  # nothing listens there
    unreachable = source_error(open_source(f"postgresql+psycopg2://fl_reader:{PASSWORD}@127.0.0.1:{port}/tx"
                                           f"?password={PASSWORD}", sql_table="transactions"))
    assert unreachable.startswith(f"reading postgresql+psycopg2://fl_reader:***@127.0.0.1:{port}/tx (table "
                                  "transactions) failed: OperationalError")
    assert "check that the database is reachable with the URL in --data" in unreachable

    bad_port = source_error(open_source(f"postgresql://fl_reader:{PASSWORD}@db:port/tx", sql_table="transactions"))
    assert bad_port.startswith("--data <unparseable URL> (table transactions) is not a usable SQLAlchemy URL")
    dialect = source_error(open_source(f"postgres://fl_reader:{PASSWORD}@db/tx", sql_table="transactions"))
    assert "Can't load plugin: sqlalchemy.dialects:postgres" in dialect and "postgresql+psycopg2://" in dialect
    with pytest.raises(DataSourceError, match="percent-encode it in --data") as info:
        open_source(f"postgresql://fl_reader:{PASSWORD}@x@db/tx", sql_table="transactions")
    assert PASSWORD not in str(info.value)


def test_window_from_manifest():
    assert Window.from_manifest({}) == Window()
    assert Window.from_manifest({"start": "2024-01-01T06:00:00+00:00", "end": None}) == \
        Window(datetime(2024, 1, 1, 6, tzinfo=timezone.utc))
    assert Window.from_manifest({"start": datetime(2024, 1, 1).date(), "end": datetime(2024, 1, 2)}) == \
        Window(datetime(2024, 1, 1), datetime(2024, 1, 2))
    with pytest.raises(ValueError, match="the data window's end 'soon' is not an ISO 8601 time"):
        Window.from_manifest({"end": "soon"})
    assert str(NAIVE) == "[2024-01-01T06:00:00, 2024-01-02T00:00:00)"
