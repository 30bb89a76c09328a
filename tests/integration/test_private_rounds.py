"""A real DAG run (`airflow dags test`) of a federation that compresses its updates to int8
and trains with differential privacy: three `fl-client` processes send int8 updates, the
coordinator decodes them inside the aggregation, adds the noise, records the round in the
privacy ledger, and logs epsilon to MLflow."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from mlflow import MlflowClient

from devstack.embedded import airflow, create_buckets, service_env
from fl_tasks.config import load_federation
from fl_tasks.coordinator import Coordinator
from fl_tasks.coordinator.privacy import epsilon
from fl_tasks.protocol.storage import ObjectStore
from fl_tasks.simulation.simulate import SiloProcesses, prepare_silos, publish_validation
from tests.conftest import federation_doc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def private(s3_server, tmp_path_factory):
    state = tmp_path_factory.mktemp("private")
    federations = state / "federations"
    federations.mkdir()
    doc = federation_doc(federation="itest-private", training={"codec": "int8"},
                         privacy={"clip_norm": 0.5, "noise_multiplier": 0.6, "sampling": "all", "delta": 1e-5,
                                  "max_epsilon": 50.0},
                         # Three silos buy no useful model with noise that means something: the run
                         # shows the mechanics, so the gates let any model through.
                         gates={"thresholds": {"roc_auc": 0.0}, "max_regression": 1.0})
    (federations / "itest-private.yaml").write_text(yaml.safe_dump(doc))
    spec = load_federation(federations / "itest-private.yaml")
    env = service_env(state, s3_server.endpoint_url, federations)
    env.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})
    saved = dict(os.environ)
    os.environ.update(env)
    store = ObjectStore(s3_server.endpoint_url)
    create_buckets(spec, store)
    assert airflow(["db", "migrate"], env).returncode == 0
    data = prepare_silos(spec, state)
    publish_validation(spec, data, store)
    silos = SiloProcesses(spec, data.silos, state / "silo-logs", poll_seconds=0.5).start()
    try:
        yield {"env": env, "spec": spec, "store": store}
    finally:
        silos.stop()
        os.environ.clear()
        os.environ.update(saved)


def test_an_int8_private_round_logs_epsilon_to_mlflow(private):
    spec, store = private["spec"], private["store"]
    result = airflow(["dags", "test", spec.dag_id], private["env"], timeout=600)
    output = result.stdout + result.stderr
    coordinator = Coordinator(spec, store)
    [key] = [k for k in store.list_keys(spec.coordinator_bucket, f"{spec.federation}/rounds/")
             if k.endswith("/report.json")]
    report = json.loads(store.get_bytes(spec.coordinator_bucket, key))
    assert report["decision"] == "promoted", (report["reason"], output[-4000:])
    round_id = report["round_id"]

    # The silos sent int8, decoded by the coordinator: well under half the fp32 bytes even for
    # this 700-parameter model, whose batch-norm variances travel exactly.
    fp32_bytes = coordinator.load_plan(round_id).base_bytes
    manifests = [json.loads(coordinator.records.get(round_id, f"updates/{c}/manifest.json"))
                 for c in report["clients_accepted"]]
    assert len(manifests) == 3 and {m["codec"] for m in manifests} == {"int8"}
    assert all(m["payload_bytes"] * 2.5 < fp32_bytes for m in manifests), ([m["payload_bytes"] for m in manifests],
                                                                           fp32_bytes)

    # The noise went in, the round is in the ledger, and epsilon is in MLflow and the report.
    summary = coordinator.records.get_json(round_id, "candidate/manifest.json")
    assert summary["rule"].startswith("DP-FedAvg: each update clipped to norm 0.5")
    events = coordinator.ledger.events()
    assert [e.round_id for e in events] == [round_id]
    spent = epsilon(events, 1e-5)
    assert report["privacy"]["epsilon"] == pytest.approx(spent) and spent > 0
    client = MlflowClient(tracking_uri=private["env"]["MLFLOW_TRACKING_URI"])
    version = client.get_model_version(spec.model_name, report["version"])
    run = client.get_run(version.run_id)
    assert run.data.metrics["dp_epsilon"] == pytest.approx(spent)
    assert run.data.params["training_codec"] == "int8" and run.data.params["privacy_noise_multiplier"] == "0.6"
    assert float(version.tags["fl.dp_epsilon"]) == pytest.approx(spent, abs=1e-4)
    assert "differential privacy: epsilon" in output
