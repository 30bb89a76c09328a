"""The DAG's retry policy: transient faults are retried with backoff, what waiting cannot
fix fails at once (AirflowFailException)."""

from __future__ import annotations

import runpy
from datetime import timedelta
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.exceptions import AirflowFailException

from fl_tasks.protocol.storage import StorageUnavailable

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dag():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FL_FEDERATIONS_DIR", str(REPO / "federations"))
        for name in ("FL_TASK_RETRIES", "FL_TASK_RETRY_DELAY_SECONDS", "FL_TASK_MAX_RETRY_DELAY_SECONDS"):
            mp.delenv(name, raising=False)
        bag = DagBag(dag_folder=str(REPO / "dags"))
        assert bag.import_errors == {}
        return bag.dags["fl_round__banks"]


@pytest.fixture(scope="module")
def dag_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FL_FEDERATIONS_DIR", str(REPO / "federations"))
        return runpy.run_path(str(REPO / "dags" / "fl_round.py"))


def test_every_step_retries_four_times_with_capped_exponential_backoff(dag):
    for task in dag.tasks:
        assert task.retries == 4, task.task_id
        assert task.retry_delay == timedelta(seconds=30), task.task_id
        assert task.retry_exponential_backoff == 2.0, task.task_id
        assert task.max_retry_delay == timedelta(minutes=5), task.task_id


def test_the_retry_policy_can_be_tuned_per_deployment(dag_module, monkeypatch):
    monkeypatch.setenv("FL_TASK_RETRIES", "2")
    monkeypatch.setenv("FL_TASK_RETRY_DELAY_SECONDS", "1.5")
    monkeypatch.setenv("FL_TASK_MAX_RETRY_DELAY_SECONDS", "10")
    assert dag_module["retry_policy"]() == {"retries": 2, "retry_delay": timedelta(seconds=1.5),
                                            "retry_exponential_backoff": 2.0,
                                            "max_retry_delay": timedelta(seconds=10)}


def test_a_round_that_cannot_go_on_fails_at_once_but_an_outage_is_retried(dag_module, s3_server, write_federation,
                                                                         monkeypatch):
    from fl_tasks.config import load_federation
    from devstack.embedded import create_buckets
    from fl_tasks.protocol.storage import ObjectStore

    step = dag_module["_step"]
    path = write_federation()
    create_buckets(load_federation(path), ObjectStore(s3_server.endpoint_url))
    with pytest.raises(AirflowFailException, match="has no plan; run the prepare step first"):
        step(str(path), "dispatch", "000001")  # RoundFailed: no retry can help
    monkeypatch.setenv("FL_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("FL_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageUnavailable, match="Could not connect"):  # any other error: Airflow retries
        step(str(path), "dispatch", "000001")
