"""How the coordinator reaches S3: its own bucket, and each silo's bucket, which often lives
in another organisation's account or on its own endpoint.

Credentials come from a resolver `aws_conn_id -> S3Access` (in Airflow, the connection of
that id: `fl_airflow.connections`; outside it, the process's own AWS chain). A client's
`aws_conn_id` and `endpoint_url` in the federation file override the federation's
`storage.aws_conn_id` and `storage.endpoint_url`. Endpoints: the client's own, else the
connection's, else FL_S3_ENDPOINT_URL, else the federation's `storage.endpoint_url`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from fl_tasks.config import FederationSpec
from fl_tasks.protocol.storage import ObjectStore, S3Access

AccessResolver = Callable[[str | None], S3Access]


def default_access(aws_conn_id: str | None) -> S3Access:
    """Outside Airflow there are no connections: the process's own AWS credential chain."""
    return S3Access()


class BucketAccess:
    """One ObjectStore per (connection, endpoint), made on first use (under a lock: the
    coordinator's thread pools ask for them concurrently, and boto3 makes clients from its
    default session, which is not thread-safe)."""

    def __init__(self, spec: FederationSpec, resolve: AccessResolver | None = None,
                 store: ObjectStore | None = None):
        """`store`: one store for every bucket (tests, a single-account setup)."""
        self.spec, self.resolve, self.shared = spec, resolve or default_access, store
        self._stores: dict[tuple[str | None, str | None], ObjectStore] = {}
        self._lock = threading.Lock()

    def _store(self, aws_conn_id: str | None, endpoint_url: str | None) -> ObjectStore:
        if self.shared is not None:
            return self.shared
        key = (aws_conn_id, endpoint_url)
        with self._lock:
            if key not in self._stores:
                access = self.resolve(aws_conn_id)
                self._stores[key] = ObjectStore(endpoint_url or access.endpoint_url or self.spec.endpoint_url,
                                                access=access)
            return self._stores[key]

    @property
    def coordinator(self) -> ObjectStore:
        return self._store(self.spec.storage_aws_conn_id, None)

    def client(self, client_id: str) -> ObjectStore:
        client = self.spec.client(client_id)
        return self._store(client.aws_conn_id or self.spec.storage_aws_conn_id, client.endpoint_url)
