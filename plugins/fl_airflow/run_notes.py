"""Notes on DAG runs through Airflow's REST API, so that a round reads at a glance in the UI.

A task cannot change its own run's note through the Task SDK, so the round's tasks use the
public API (`PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}`) as any client does, with the
Airflow connection `fl_airflow_api` (`FL_AIRFLOW_API_CONN_ID` names another): host = the
api-server's base URL, login and password = a user allowed to edit DAG runs. A token comes
from `POST /auth/token`. Without the connection (e.g. under `airflow dags test`, which runs
no api-server) the note is skipped with one log line; a note never fails a round.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import quote

log = logging.getLogger(__name__)

DEFAULT_CONN_ID = "fl_airflow_api"
TIMEOUT_SECONDS = 10.0
MAX_NOTE_CHARS = 1000  # Airflow refuses longer notes


def conn_id() -> str:
    return os.environ.get("FL_AIRFLOW_API_CONN_ID", DEFAULT_CONN_ID)


def set_run_note(dag_id: str, run_id: str, note: str) -> bool:
    """Set the run's note; True when Airflow took it. Every failure is logged, never raised."""
    import httpx
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = BaseHook.get_connection(conn_id())
    except AirflowNotFoundException:
        log.info("run note not set: no Airflow connection '%s' (host = the api-server URL, login/password = a "
                 "user that may edit DAG runs); the round's outcome is in the summary log", conn_id())
        return False
    base = (connection.host or "").rstrip("/")
    if connection.port and base.count(":") < 2:
        base = f"{base}:{connection.port}"
    if not base.startswith(("http://", "https://")):
        base = f"http://{base}"
    try:
        with httpx.Client(base_url=base, timeout=TIMEOUT_SECONDS) as client:
            token = client.post("/auth/token", json={"username": connection.login, "password": connection.password})
            token.raise_for_status()
            answer = client.patch(f"/api/v2/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}",
                                  json={"note": _fit(note)}, params={"update_mask": "note"},
                                  headers={"Authorization": f"Bearer {token.json()['access_token']}"})
            answer.raise_for_status()
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        log.warning("run note not set through %s (connection '%s'): %s: %s", base, conn_id(), type(exc).__name__, exc)
        return False
    log.info("run note set: %s", note.replace("\n", " "))
    return True


def _fit(note: str) -> str:
    return note if len(note) <= MAX_NOTE_CHARS else note[:MAX_NOTE_CHARS - 1] + "…"
