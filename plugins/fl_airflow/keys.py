"""Per-client signing keys from Airflow connections: the coordinator's key provider in DAG runs.

One connection per client, id from the federation's `security.signing_key_conn_id` (default
`fl_signing_{client}`, '-' in the client id written as '_'), whose password is the client's
key. Airflow looks connections up in its secrets backend (Vault, AWS Secrets Manager, ...),
`AIRFLOW_CONN_<ID>` environment variables, then its metadata database, so the key can live
in any of them, e.g.

    AIRFLOW_CONN_FL_SIGNING_BANK_NORTH='{"conn_type": "generic", "password": "<key>"}'
"""

from __future__ import annotations

from fl_tasks.config import FederationSpec


class ConnectionKeys:
    """`client_id -> key bytes | None`, read through `airflow.sdk.BaseHook.get_connection`."""

    def __init__(self, spec: FederationSpec):
        self.spec = spec

    def conn_id(self, client_id: str) -> str:
        return self.spec.security.conn_id(self.spec.federation, client_id)

    def source(self, client_id: str) -> str:
        return f"Airflow connection '{self.conn_id(client_id)}' (password = the key)"

    def __call__(self, client_id: str) -> bytes | None:
        # Imported here: the DAG file parses without touching connections.
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            connection = BaseHook.get_connection(self.conn_id(client_id))
        except AirflowNotFoundException:
            return None  # the coordinator rejects the update and names the connection to create
        # Any other error (a secrets backend down) propagates: the task retries rather than
        # rejecting an honest update.
        return connection.password.encode() if connection.password else None
