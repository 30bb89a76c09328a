"""Real DAG runs (`airflow dags test`) against a moto S3 server and a real MLflow store,
with three simulated silos running as separate `fl-client` processes."""

from __future__ import annotations

import json
import os

import pytest
from mlflow import MlflowClient

from fl_tasks.protocol import signing
from fl_tasks.config import load_federation
from fl_tasks.coordinator import Coordinator
from devstack.embedded import airflow, create_buckets, service_env
from fl_tasks.simulation.simulate import SiloProcesses, prepare_silos, publish_validation
from fl_tasks.protocol.storage import ObjectStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    """An Airflow home on SQLite, an MLflow store, two federations; silos only for the first."""
    import yaml

    from tests.conftest import federation_doc

    state = tmp_path_factory.mktemp("stack")
    federations = state / "federations"
    federations.mkdir()
    # Its silos sign their updates and the DAG's coordinator checks them with the keys it
    # reads from Airflow connections (AIRFLOW_CONN_FL_SIGNING_<CLIENT>).
    active = federation_doc(federation="itest", security={"require_signatures": True})
    # Nobody serves this one: its rounds can only miss quorum.
    idle = federation_doc(federation="itest-idle", quorum={"min_clients": 2, "round_timeout_minutes": 0.1})
    for doc in (active, idle):
        (federations / f"{doc['federation']}.yaml").write_text(yaml.safe_dump(doc))
    env = service_env(state, s3_server.endpoint_url, federations)
    env.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})
    specs = {name: load_federation(federations / f"{name}.yaml") for name in ("itest", "itest-idle")}
    keys = signing.generate_keys(c.id for c in specs["itest"].clients)
    env.update({k: v for k, v in signing.coordinator_env(specs["itest"], keys).items() if k.startswith("AIRFLOW_CONN_")})
    saved = dict(os.environ)
    os.environ.update(env)
    store = ObjectStore(s3_server.endpoint_url)
    for spec in specs.values():
        create_buckets(spec, store)
    migrated = airflow(["db", "migrate"], env)
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    data = prepare_silos(specs["itest"], state)
    publish_validation(specs["itest"], data, store)
    silos = SiloProcesses(specs["itest"], data.silos, state / "silo-logs", poll_seconds=0.5, signing_keys=keys).start()
    try:
        yield {"env": env, "specs": specs, "store": store, "state": state}
    finally:
        silos.stop()
        os.environ.clear()
        os.environ.update(saved)


def run_round(stack, federation: str, conf: dict | None = None):
    spec = stack["specs"][federation]
    args = ["dags", "test", spec.dag_id]
    if conf:
        args += ["--conf", json.dumps(conf)]
    result = airflow(args, stack["env"], timeout=600)
    return result, spec


def latest_report(stack, federation: str) -> dict:
    spec = stack["specs"][federation]
    coordinator = Coordinator(spec, stack["store"])
    prefix = f"{spec.federation}/rounds/"
    reports = sorted(k for k in stack["store"].list_keys(spec.coordinator_bucket, prefix) if k.endswith("/report.json"))
    assert reports, f"no round report under s3://{spec.coordinator_bucket}/{prefix}"
    return json.loads(stack["store"].get_bytes(coordinator.bucket, reports[-1]))


def test_round_promotes_and_sets_champion(stack):
    result, spec = run_round(stack, "itest")
    report = latest_report(stack, "itest")
    assert report["decision"] == "promoted", (report, result.stdout[-4000:])
    assert report["clients_committed"] == 3 and len(report["clients_accepted"]) == 3  # signatures verified
    client = MlflowClient(tracking_uri=stack["env"]["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(spec.model_name, "champion")
    assert str(champion.version) == report["version"]
    assert champion.tags["fl.round_id"] == report["round_id"]
    assert champion.tags["fl.federation"] == "itest"
    assert champion.tags["fl.base_version"] == "seed"
    assert champion.tags["fl.airflow_run_id"] == report["run_id"]
    run = client.get_run(champion.run_id)
    assert run.data.params["participating_clients"] == "silo-0,silo-1,silo-2"
    assert abs(sum(v for k, v in run.data.metrics.items() if k.startswith("weight_")) - 1.0) < 1e-9


def test_strategy_chosen_in_the_trigger_params_runs_end_to_end(stack):
    result, _ = run_round(stack, "itest", {"aggregator": "multi_krum", "aggregator_params": {"f": 0, "m": 2}})
    output = result.stdout + result.stderr
    (stack["state"] / "multi_krum-round.log").write_text(output)
    report = latest_report(stack, "itest")
    assert report["settings"]["aggregator"] == "multi_krum"
    assert report["settings"]["aggregator_params"] == {"f": 0, "m": 2}
    assert report["decision"] in ("promoted", "rejected") and report["candidate"]["roc_auc"] > 0.5
    client = MlflowClient(tracking_uri=stack["env"]["MLFLOW_TRACKING_URI"])
    run = client.get_run(client.get_model_version(stack["specs"]["itest"].model_name, report["version"]).run_id)
    assert run.data.params["aggregator"] == "multi_krum"
    # The logs say what happened: the rule, each update's norm and verdict, what it selected.
    assert "strategy multi_krum (f=0, m=2)" in output and "screening: max_update_norm" in output
    assert "rule: multi_krum (f=0, m=2): unweighted mean of the 2 updates with the lowest scores" in output
    selected = [k.removeprefix("selected_") for k, v in run.data.metrics.items() if k.startswith("selected_") and v]
    assert len(selected) == 2 and f"selected: {', '.join(sorted(selected))}" in output
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("weight_")} == {
        f"weight_{c}": (0.5 if c in selected else 0.0) for c in ("silo-0", "silo-1", "silo-2")}
    assert f"round {report['round_id']} summary:" in output
    # Nothing MLflow says while registering shows up as an error (it used to write INFO to stderr).
    register_log = output.split("starting task_id=register")[1].split("end task task_id=register")[0]
    assert "[error" not in register_log and "ERROR" not in register_log
    # Tasks whose result the step logs itself do not dump it again as one long line.
    assert "Returned value was: {'passed'" not in output and "Returned value was: {'federation'" not in output
    # airflow dags test runs no api-server: the run note is skipped, and says why.
    assert "run note not set: no Airflow connection 'fl_airflow_api'" in output


def test_round_missing_quorum_ends_without_a_model(stack):
    result, spec = run_round(stack, "itest-idle")
    report = latest_report(stack, "itest-idle")
    assert report["decision"] == "no_model"
    assert "quorum not met: 0 of 3" in report["reason"]
    client = MlflowClient(tracking_uri=stack["env"]["MLFLOW_TRACKING_URI"])
    assert client.search_model_versions(f"name = '{spec.model_name}'") == []
    # The sensor handed the wait to the triggerer instead of holding a worker slot.
    assert "deferring until quorum" in result.stdout + result.stderr
    assert "ended without a new model" in result.stdout + result.stderr
