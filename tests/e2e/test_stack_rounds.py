"""End to end on real services: PostgreSQL, an S3 server, an MLflow tracking server, the
Airflow api-server, scheduler, dag-processor and triggerer (LocalExecutor), and silo agents.

Rounds are started the way users start them: the REST API (as the trigger form does), the
schedule, and `airflow backfill create`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from fl_tasks import protocol
from fl_tasks.config import load_federation
from fl_tasks.datasets import Table
from fl_tasks.embedded import REPO, airflow, free_port
from fl_tasks.localstack import DEFAULT_PORTS, LocalStack
from fl_tasks.protocol import GlobalManifest, UpdateManifest
from fl_tasks.storage import ObjectStore

from tests.conftest import federation_doc

pytestmark = pytest.mark.e2e

FEDERATIONS = {
    # Its silos' updates must be signed: the stack's Airflow reads their keys from connections.
    "e2e-rest": {"security": {"require_signatures": True}},
    # Nobody serves it: its quorum sensor can only wait, deferred, until the deadline.
    "e2e-idle": {"quorum": {"min_clients": 2, "round_timeout_minutes": 2}},
    "e2e-sched": {"schedule": "@hourly", "training": {"window": "all"}},
    # Its silos are played by the test, so that the round waits while the scheduler dies.
    "e2e-restart": {"quorum": {"min_clients": 3, "round_timeout_minutes": 15, "poll_interval_seconds": 1}},
    # Replays the dataset's first day in 8-hour windows; no scheduled runs after end_date.
    "e2e-backfill": {"schedule": "0 */8 * * *", "end_date": "2013-09-02", "gates": {"min_roc_auc": 0.5},
                     "data": {"dataset": "synthetic", "synthetic_rows": 12000, "seed": 5}},
}


class Api:
    """A REST client for /api/v2 that logs in like a user does (POST /auth/token)."""

    def __init__(self, base: str, password: str):
        self.base = base
        token = self._call("POST", "/auth/token", {"username": "admin", "password": password}, auth=False)
        self.token = token["access_token"]

    def _call(self, method: str, path: str, body: dict | None = None, auth: bool = True):
        request = urllib.request.Request(f"{self.base}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        if auth:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str):
        return self._call("GET", path)

    def post(self, path: str, body: dict):
        return self._call("POST", path, body)

    def runs(self, dag_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns?order_by=run_after&limit=100")["dag_runs"]

    def wait_for(self, what: str, check, timeout: float, interval: float = 3):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300) -> dict:
        def finished():
            run = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            return run if run["state"] in ("success", "failed") else None

        return self.wait_for(f"run {run_id} of {dag_id}", finished, timeout)


@pytest.fixture(scope="module")
def stack():
    root = REPO / ".state" / f"e2e-{uuid.uuid4().hex[:8]}"
    state, federations = root / "stack", root / "federations"
    federations.mkdir(parents=True)
    for name, overrides in FEDERATIONS.items():
        (federations / f"{name}.yaml").write_text(yaml.safe_dump(federation_doc(federation=name, **overrides)))
    local = LocalStack(state, federations, {name: free_port() for name in DEFAULT_PORTS}, no_silos=("e2e-idle", "e2e-restart"))
    started = time.monotonic()
    try:
        local.up(timeout=240)
        local.startup_seconds = time.monotonic() - started
        api = Api(local.airflow_url, local.password())
        for name in FEDERATIONS:
            api.wait_for(f"DAG of {name} parsed", lambda n=name: _dag_exists(api, n), timeout=120)
        specs = {name: load_federation(federations / f"{name}.yaml") for name in FEDERATIONS}
        yield {"stack": local, "api": api, "specs": specs, "store": ObjectStore(local.s3_url),
               "mlflow": MlflowClient(tracking_uri=local.mlflow_url)}
    finally:
        local.down()
        if not os.environ.get("FL_KEEP_STATE"):  # set it to keep logs and data for debugging
            shutil.rmtree(root, ignore_errors=True)


def _dag_exists(api: Api, federation: str) -> bool:
    try:
        api.get(f"/api/v2/dags/fl_round__{federation.replace('-', '_')}")
        return True
    except urllib.error.HTTPError:
        return False


def dag_id(name: str) -> str:
    return f"fl_round__{name.replace('-', '_')}"


def report_of(env, name: str, round_id: str) -> dict:
    spec = env["specs"][name]
    raw = env["store"].get_bytes(spec.coordinator_bucket, f"{spec.federation}/rounds/{round_id}/report.json")
    assert raw is not None, f"no report for round {round_id} of {name}"
    return json.loads(raw)


def test_stack_starts_within_two_minutes(stack):
    assert stack["stack"].startup_seconds < 120


def test_rest_trigger_runs_a_round_and_refuses_bad_params(stack):
    api, name = stack["api"], "e2e-rest"
    before = len(api.runs(dag_id(name)))
    with pytest.raises(urllib.error.HTTPError) as refused:
        api.post(f"/api/v2/dags/{dag_id(name)}/dagRuns", {"logical_date": None, "conf": {"min_clients": 99}})
    assert refused.value.code in (400, 422)
    assert "min_clients" in refused.value.read().decode()
    assert len(api.runs(dag_id(name))) == before  # refused before any run was created

    # The trigger form sends every param; change two of them.
    dag = api.get(f"/api/v2/dags/{dag_id(name)}/details")
    conf = {key: param["value"] for key, param in dag["params"].items()}
    conf.update({"local_epochs": 1, "min_roc_auc": 0.55})
    run = api.post(f"/api/v2/dags/{dag_id(name)}/dagRuns", {"logical_date": None, "conf": conf})
    finished = api.wait_for_run(dag_id(name), run["dag_run_id"])
    assert finished["state"] == "success"
    report = report_of(stack, name, "000001")
    assert report["decision"] == "promoted" and report["run_id"] == run["dag_run_id"]
    assert report["settings"]["local_epochs"] == 1 and report["settings"]["min_roc_auc"] == 0.55
    version = stack["mlflow"].get_model_version(stack["specs"][name].model_name, report["version"])
    assert version.tags["fl.airflow_run_id"] == run["dag_run_id"]


def wait_for_sensor(api: Api, name: str, run_id: str) -> str:
    """The quorum sensor's first settled state: deferred, success or failed."""
    def sensor_state():
        try:
            ti = api.get(f"/api/v2/dags/{dag_id(name)}/dagRuns/{run_id}/taskInstances/wait_for_quorum")
        except urllib.error.HTTPError:
            return None
        return ti["state"] if ti["state"] in ("deferred", "success", "failed") else None

    return api.wait_for("the quorum sensor to settle", sensor_state, timeout=120, interval=1)


def audit_counts(env, name: str, round_id: str) -> dict[str, int]:
    spec = env["specs"][name]
    counts: dict[str, int] = {}
    for key in env["store"].list_keys(spec.coordinator_bucket, f"{spec.federation}/audit/{round_id}/"):
        for line in env["store"].get_bytes(spec.coordinator_bucket, key).splitlines():
            event = json.loads(line)["event"]
            counts[event] = counts.get(event, 0) + 1
    return counts


def test_cleared_tasks_rerun_to_the_same_outcome(stack):
    """Clear aggregate and everything after it, as from the UI: same model, same version,
    no second MLflow version, no audit event twice."""
    api, name = stack["api"], "e2e-rest"
    spec = stack["specs"][name]
    run = [r for r in api.runs(dag_id(name)) if r["state"] == "success"][0]
    before, counts = report_of(stack, name, "000001"), audit_counts(stack, name, "000001")
    versions = len(stack["mlflow"].search_model_versions(f"name = '{spec.model_name}'"))
    cleared = api.post(f"/api/v2/dags/{dag_id(name)}/clearTaskInstances", {
        "dag_run_id": run["dag_run_id"], "task_ids": ["aggregate"], "include_downstream": True,
        "only_failed": False, "dry_run": False, "reset_dag_runs": True})
    assert {ti["task_id"] for ti in cleared["task_instances"]} >= {"aggregate", "register", "promote", "summary"}
    api.wait_for("the cleared run to start again", lambda: api.get(
        f"/api/v2/dags/{dag_id(name)}/dagRuns/{run['dag_run_id']}")["state"] != "success", timeout=60, interval=1)
    assert api.wait_for_run(dag_id(name), run["dag_run_id"])["state"] == "success"
    after = report_of(stack, name, "000001")
    assert (after["version"], after["decision"], after["clients_accepted"]) == (
        before["version"], before["decision"], before["clients_accepted"])
    assert len(stack["mlflow"].search_model_versions(f"name = '{spec.model_name}'")) == versions
    alias = stack["mlflow"].get_model_version_by_alias(spec.model_name, "champion")
    assert str(alias.version) == before["version"]
    assert audit_counts(stack, name, "000001") == counts


def test_scheduler_and_triggerer_killed_mid_round_then_restarted_finish_the_round(stack):
    api, name, local = stack["api"], "e2e-restart", stack["stack"]
    spec = stack["specs"][name]
    run = api.post(f"/api/v2/dags/{dag_id(name)}/dagRuns", {"logical_date": None, "conf": {}})

    assert wait_for_sensor(api, name, run["dag_run_id"]) == "deferred"
    local.kill("airflow-scheduler")
    local.kill("airflow-triggerer")
    # The clients answer while no scheduler or triggerer is alive.
    from fl_tasks.client import ClientRuntime
    from fl_tasks.simulate import prepare_silos

    silos = prepare_silos(spec, local.state_dir / "data" / name)
    for client in spec.clients:
        runtime = ClientRuntime(client.id, spec.federation, client.bucket, Table.load(silos[client.id]),
                                stack["store"])
        assert runtime.answer("000001")
    local.start_airflow("scheduler")
    local.start_airflow("triggerer")
    finished = api.wait_for_run(dag_id(name), run["dag_run_id"], timeout=300)
    assert finished["state"] == "success"
    report = report_of(stack, name, "000001")
    assert report["decision"] == "promoted" and report["clients_accepted"] == [c.id for c in spec.clients]
    assert len(stack["mlflow"].search_model_versions(f"name = '{spec.model_name}'")) == 1


def test_quorum_sensor_is_deferred_while_clients_are_slow(stack):
    api, name = stack["api"], "e2e-idle"
    run = api.post(f"/api/v2/dags/{dag_id(name)}/dagRuns", {"logical_date": None, "conf": {}})

    assert wait_for_sensor(api, name, run["dag_run_id"]) == "deferred"


def test_scheduled_federation_produces_rounds_on_its_own(stack):
    api, name = stack["api"], "e2e-sched"

    def scheduled_success():
        runs = [r for r in api.runs(dag_id(name)) if r["run_type"] == "scheduled" and r["state"] == "success"]
        return runs[0] if runs else None

    run = api.wait_for("a scheduled round", scheduled_success, timeout=420)
    start = datetime.fromisoformat(run["data_interval_start"].replace("Z", "+00:00"))
    report = report_of(stack, name, protocol.round_id_for_interval(start))
    assert report["run_type"] == "scheduled" and report["decision"] in ("promoted", "rejected")


def test_backfill_runs_rounds_in_order_on_their_data_windows(stack):
    env, api, name = stack["stack"].env(), stack["api"], "e2e-backfill"
    spec = stack["specs"][name]
    command = ["backfill", "create", "--dag-id", dag_id(name), "--from-date", "2013-09-01T00:00:00",
               "--to-date", "2013-09-01T16:00:00", "--reprocess-behavior", "none"]
    created = airflow(command, env)
    assert created.returncode == 0, created.stdout[-2000:] + created.stderr[-2000:]

    def three_done():
        runs = [r for r in api.runs(dag_id(name)) if r["run_type"] == "backfill"]
        return runs if len(runs) == 3 and all(r["state"] in ("success", "failed") for r in runs) else None

    runs = sorted(api.wait_for("three backfill rounds", three_done, timeout=900, interval=5),
                  key=lambda r: r["data_interval_start"])
    assert [r["state"] for r in runs] == ["success"] * 3
    # Backfill starts its runs together; the rounds inside them still go one at a time,
    # oldest window first: each prepares only after the previous round's summary ended.
    def task(run, task_id):
        return api.get(f"/api/v2/dags/{dag_id(name)}/dagRuns/{run['dag_run_id']}/taskInstances/{task_id}")

    for earlier, later in zip(runs, runs[1:]):
        assert task(later, "prepare_round")["start_date"] >= task(earlier, "summary")["end_date"]

    store, champion = stack["store"], "seed"
    for run in runs:
        start = datetime.fromisoformat(run["data_interval_start"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(run["data_interval_end"].replace("Z", "+00:00"))
        round_id = protocol.round_id_for_interval(start)
        report = report_of(stack, name, round_id)
        assert report["base_version"] == champion, "each round starts from the previous round's champion"
        if report["decision"] == "promoted":
            champion = report["version"]
        for client in spec.clients:
            manifest = GlobalManifest.from_json(store.get_bytes(
                client.bucket_name, protocol.global_manifest_key("", spec.federation, round_id)))
            assert datetime.fromisoformat(manifest.data_window["start"]) == start
            assert datetime.fromisoformat(manifest.data_window["end"]) == end
            update = UpdateManifest.from_json(store.get_bytes(
                client.bucket_name, protocol.update_manifest_key("", spec.federation, round_id)))
            silo = Table.load(stack["stack"].state_dir / "data" / name / "silos" / f"{client.id}.npz")
            lo, hi = np.datetime64(start.replace(tzinfo=None), "s"), np.datetime64(end.replace(tzinfo=None), "s")
            assert update.num_examples == int(((silo.time >= lo) & (silo.time < hi)).sum()) < len(silo)
    versions = stack["mlflow"].search_model_versions(f"name = '{spec.model_name}'")
    lineage = {v.tags["fl.round_id"]: v.tags["fl.base_version"] for v in versions}
    assert sorted(lineage) == [protocol.round_id_for_interval(datetime.fromisoformat(
        r["data_interval_start"].replace("Z", "+00:00"))) for r in runs]

    # Replaying the same windows with --reprocess-behavior none creates nothing new.
    api.wait_for("the backfill to complete", lambda: all(
        b["completed_at"] for b in api.get(f"/api/v2/backfills?dag_id={dag_id(name)}")["backfills"]), timeout=120)
    again = airflow(command, env)
    assert again.returncode == 0 or "No runs to create" in again.stdout + again.stderr, again.stderr[-2000:]
    time.sleep(10)
    assert len([r for r in api.runs(dag_id(name)) if r["run_type"] == "backfill"]) == 3
    assert len(stack["mlflow"].search_model_versions(f"name = '{spec.model_name}'")) == len(versions)
