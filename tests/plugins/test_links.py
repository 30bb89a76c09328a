"""fl_airflow.links: the extra links of register, promote and rollback."""

from __future__ import annotations

from fl_airflow.links import AuditLogLink, MlflowModelVersionLink, MlflowRunLink


class FakeTaskInstance:
    """What Airflow hands get_link when the task ends: a task instance whose XCom holds the return value."""

    task_id = "rollback"

    def __init__(self, value):
        self.value = value

    def xcom_pull(self, task_ids):
        assert task_ids == self.task_id
        return self.value


REFS = {"model_name": "banks fraud", "version": "3", "mlflow_run_id": "abc123", "experiment_id": "7",
        "tracking_uri": "http://mlflow.internal:5000/"}


def links(value):
    ti = FakeTaskInstance(value)
    return [link.get_link(None, ti_key=ti) for link in (MlflowModelVersionLink(), MlflowRunLink(), AuditLogLink())]


def test_links_point_at_the_version_the_run_and_the_audit_log(monkeypatch):
    monkeypatch.delenv("FL_MLFLOW_UI_URL", raising=False)
    assert links(REFS) == ["http://mlflow.internal:5000/#/models/banks%20fraud/versions/3",
                           "http://mlflow.internal:5000/#/experiments/7/runs/abc123",
                           "http://mlflow.internal:5000/#/experiments/7/runs/abc123/artifacts/audit/audit.jsonl"]


def test_the_ui_address_browsers_use_wins_over_the_tracking_uri(monkeypatch):
    monkeypatch.setenv("FL_MLFLOW_UI_URL", "https://mlflow.example.org/")
    assert links(REFS)[0] == "https://mlflow.example.org/#/models/banks%20fraud/versions/3"


def test_no_mlflow_ui_or_no_registration_gives_empty_links(monkeypatch):
    monkeypatch.delenv("FL_MLFLOW_UI_URL", raising=False)
    assert links({**REFS, "tracking_uri": "sqlite:////tmp/mlflow.db"}) == ["", "", ""]
    assert links(None) == ["", "", ""]
