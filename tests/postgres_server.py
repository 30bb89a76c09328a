"""A throwaway PostgreSQL cluster on loopback for tests: silos read their rows from
databases, so the SQL data sources are tested against a real server, not a mock.

It reuses the local stack's `Postgres` (devstack/localstack.py: initdb, pg_ctl, the
`postgres` user when we are root) on a free port, in a temporary folder deleted on exit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from devstack.embedded import free_port
from devstack.localstack import Postgres


class PostgresServer:
    """`with PostgresServer() as server:` a started cluster; `server.url("db")` for SQLAlchemy."""

    def __init__(self, port: int | None = None):
        # As root the server runs as `postgres`, which must reach its folder: a private
        # $TMPDIR would not do, /tmp does (and the folder is opened to others below).
        self.root = Path(tempfile.mkdtemp(prefix="fl-test-postgres-", dir="/tmp" if os.geteuid() == 0 else None))
        os.chmod(self.root, 0o755)
        data_dir = self.root / "data"
        # pg_ctl writes its log as the `postgres` user: keep it in the cluster's own folder.
        self.postgres = Postgres(data_dir, port or free_port(), data_dir / "server.log")

    @property
    def port(self) -> int:
        return self.postgres.port

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of `database` (trust authentication: no password)."""
        return self.postgres.url(database)

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        import sqlalchemy as sa

        # CREATE DATABASE cannot run inside a transaction.
        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()
        return self.url(name)

    def start(self) -> "PostgresServer":
        try:
            self.postgres.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its folder."""
        try:
            self.postgres.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
