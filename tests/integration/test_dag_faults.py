"""A real DAG run (`airflow dags test`) whose S3 dies in the middle of a task: the task
fails, Airflow retries it after the backoff once S3 is back, and the round ends as if
nothing had happened (one candidate, one model version, hashes that match)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time

import pytest
from mlflow import MlflowClient

from fl_tasks.config import load_federation
from devstack.embedded import airflow, create_buckets, service_env
from fl_tasks.simulation.simulate import SiloProcesses, prepare_silos, publish_validation
from fl_tasks.protocol.storage import ObjectStore

from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.integration

CANDIDATE_PUT = r"^PUT /coord-\d+/itest-faults/rounds/\d+/candidate/model\.safetensors"


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    """Airflow (SQLite) talks to S3 through the fault proxy; the silos talk to S3 directly."""
    import yaml

    from tests.conftest import federation_doc

    state = tmp_path_factory.mktemp("faults-stack")
    federations = state / "federations"
    federations.mkdir()
    doc = federation_doc(federation="itest-faults")
    (federations / "itest-faults.yaml").write_text(yaml.safe_dump(doc))
    spec = load_federation(federations / "itest-faults.yaml")
    store = ObjectStore(s3_server.endpoint_url)
    create_buckets(spec, store)
    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        env = service_env(state, proxy.url, federations)
        env.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                    # fail fast inside a try (2 attempts per S3 call), retry soon (2 s, doubling, 5 s cap)
                    "FL_S3_MAX_ATTEMPTS": "2", "FL_TASK_RETRY_DELAY_SECONDS": "2",
                    "FL_TASK_MAX_RETRY_DELAY_SECONDS": "5"})
        migrated = airflow(["db", "migrate"], env)
        assert migrated.returncode == 0, migrated.stderr[-3000:]
        data = prepare_silos(spec, state)
        publish_validation(spec, data, store)
        silos = SiloProcesses(spec, data.silos, state / "silo-logs", poll_seconds=0.5).start()
        try:
            yield {"env": env, "spec": spec, "store": store, "proxy": proxy, "state": state}
        finally:
            silos.stop()


def task_tries(state, dag_id: str) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(f"file:{state / 'airflow' / 'airflow.db'}?mode=ro", uri=True, timeout=10) as db:
        rows = db.execute("SELECT task_id, state, try_number FROM task_instance WHERE dag_id = ?", (dag_id,)).fetchall()
    return {task_id: (task_state, try_number) for task_id, task_state, try_number in rows}


def test_s3_dying_mid_aggregate_is_recovered_by_the_airflow_task_retry(stack):
    spec, proxy, state = stack["spec"], stack["proxy"], stack["state"]
    proxy.down_at(match=CANDIDATE_PUT)  # S3 dies as aggregate writes the candidate

    def bring_s3_back_once_airflow_waits_to_retry():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proxy.actions("down"):
                try:
                    if task_tries(state, spec.dag_id).get("aggregate", ("", 0))[0] == "up_for_retry":
                        proxy.up()
                        return
                except sqlite3.Error:
                    pass  # the DB is busy; look again
            time.sleep(0.2)

    watcher = threading.Thread(target=bring_s3_back_once_airflow_waits_to_retry, daemon=True)
    watcher.start()
    result = airflow(["dags", "test", spec.dag_id], stack["env"], timeout=600)
    watcher.join(timeout=1)
    output = result.stdout + result.stderr

    tries = task_tries(state, spec.dag_id)
    expected = {task_id: ("success", 1) for task_id in tries}
    expected.update({"aggregate": ("success", 2), "rollback": ("skipped", 0)})
    assert tries == expected, (tries, output[-4000:])  # only aggregate needed a second try
    assert "StorageUnavailable: S3 PUT" in output and "candidate/model.safetensors" in output
    assert len(proxy.actions("down")) == 1  # S3 died once, on the candidate's PUT

    store = stack["store"]
    [report_key] = [k for k in store.list_keys(spec.coordinator_bucket, f"{spec.federation}/rounds/")
                    if k.endswith("/report.json")]
    report = json.loads(store.get_bytes(spec.coordinator_bucket, report_key))
    assert report["decision"] == "promoted" and len(report["clients_accepted"]) == 3, report
    round_prefix = report_key.rsplit("/", 1)[0]
    candidate = store.get_bytes(spec.coordinator_bucket, f"{round_prefix}/candidate/model.safetensors")
    manifest = json.loads(store.get_bytes(spec.coordinator_bucket, f"{round_prefix}/candidate/manifest.json"))
    assert hashlib.sha256(candidate).hexdigest() == manifest["candidate_sha256"]
    client = MlflowClient(tracking_uri=stack["env"]["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions(f"name = '{spec.model_name}'")
    assert [str(v.version) for v in versions] == [str(report["version"])]
    assert versions[0].tags["fl.weights_sha256"] == manifest["candidate_sha256"]
    assert str(client.get_model_version_by_alias(spec.model_name, "champion").version) == report["version"]
    assert os.environ.get("FL_S3_ENDPOINT_URL") != proxy.url  # the silos never went through the proxy
