"""Operator extra links from a round's tasks to what they produced in MLflow.

Airflow 3 computes each link on the worker when the task ends and keeps it in XCom, so the
UI needs nothing of ours to show it. The links read the task's return value (the model
name, version, MLflow run, experiment and tracking URI) and point at the MLflow UI:
`FL_MLFLOW_UI_URL` when set (e.g. when workers reach MLflow at another address than
browsers do), else the tracking URI when it is http(s). Without an MLflow UI (a SQLite
store) a link is empty and Airflow shows it disabled.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink


def mlflow_ui_url(refs: dict[str, Any]) -> str:
    explicit = os.environ.get("FL_MLFLOW_UI_URL")
    if explicit:
        return explicit.rstrip("/")
    tracking = str(refs.get("tracking_uri") or "")
    return tracking.rstrip("/") if tracking.startswith(("http://", "https://")) else ""


def _refs(ti_key) -> dict[str, Any]:
    value = ti_key.xcom_pull(task_ids=ti_key.task_id) if hasattr(ti_key, "xcom_pull") else None
    return value if isinstance(value, dict) else {}


def model_version_url(refs: dict[str, Any]) -> str:
    """The MLflow UI page of the round's model version ('' without an MLflow UI)."""
    ui = mlflow_ui_url(refs)
    if not (ui and refs.get("model_name") and refs.get("version")):
        return ""
    return f"{ui}/#/models/{quote(refs['model_name'], safe='')}/versions/{refs['version']}"


def run_url(refs: dict[str, Any]) -> str:
    """The MLflow UI page of the round's run ('' without an MLflow UI)."""
    ui = mlflow_ui_url(refs)
    if not (ui and refs.get("experiment_id") and refs.get("mlflow_run_id")):
        return ""
    return f"{ui}/#/experiments/{refs['experiment_id']}/runs/{refs['mlflow_run_id']}"


class MlflowModelVersionLink(BaseOperatorLink):
    name = "MLflow model version"

    def get_link(self, operator, *, ti_key) -> str:
        return model_version_url(_refs(ti_key))


class MlflowRunLink(BaseOperatorLink):
    name = "MLflow run"

    def get_link(self, operator, *, ti_key) -> str:
        return run_url(_refs(ti_key))


class AuditLogLink(BaseOperatorLink):
    """The round's audit log, as the summary step attaches it to the MLflow run."""

    name = "Audit log"

    def get_link(self, operator, *, ti_key) -> str:
        run = MlflowRunLink().get_link(operator, ti_key=ti_key)
        return f"{run}/artifacts/audit/audit.jsonl" if run else ""


ROUND_LINKS = (MlflowModelVersionLink(), MlflowRunLink(), AuditLogLink())
