"""The second example task (examples/claims_triage) in real DAG runs (`airflow dags test`):
another model shape, categorical inputs, three classes and a primary metric where lower is
better (log-loss). One insurer reads its claims from PostgreSQL, the others from Parquet;
one more insurer's rows lack a column of the data contract, so it declines every round. The
coordinator reaches S3 only through the Airflow connection the federation file names
(`storage.aws_conn_id`): its environment has no S3 endpoint and no AWS keys. It aggregates in
3 shards (`aggregation.shards`): the round DAG maps shard_statistics and aggregate_shard over
them (dynamic task mapping), each reading only its byte ranges of every update."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from devstack.embedded import airflow, create_buckets, service_env
from fl_tasks import aggregation
from fl_tasks.aggregation.mean import cap_shares
from fl_tasks.config import load_federation
from fl_tasks.coordinator import Coordinator
from fl_tasks.protocol.codec import decode_state
from fl_tasks.protocol.storage import ObjectStore
from fl_tasks.simulation.simulate import SiloProcesses, prepare_silos, publish_validation
from tests.conftest import REPO, _names

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def claims(s3_server, postgres_server, tmp_path_factory):
    state = tmp_path_factory.mktemp("claims")
    federations = state / "federations"
    federations.mkdir()
    n = next(_names)
    doc = yaml.safe_load((REPO / "federations" / "claims.yaml").read_text())
    doc.update({"federation": "itest-claims", "coordinator": {"bucket": f"claims-coord-{n}"},
                "clients": [{"id": f"insurer-{i}", "bucket": f"s3://claims-{n}-{i}"} for i in range(4)],
                "quorum": {"min_clients": 2, "round_timeout_minutes": 3, "poll_interval_seconds": 0.5},
                "simulation": {"source": "synthetic", "rows": 6000, "seed": 11},
                "training": {"local_epochs": 3, "learning_rate": 0.01, "batch_size": 64},
                "mlflow": {"model_name": f"claims-{n}"}, "storage": {"aws_conn_id": "aws_claims"},
                "aggregation": {"strategy": "weighted_median", "shards": 3},
                "evaluation": {**doc["evaluation"],
                               "coordinator_data": f"s3://claims-coord-{n}/itest-claims/holdout/validation.parquet"}})
    (federations / "itest-claims.yaml").write_text(yaml.safe_dump(doc))
    spec = load_federation(federations / "itest-claims.yaml")
    env = service_env(state, s3_server.endpoint_url, federations)
    # The silos (this process's children) use their own S3 settings; Airflow gets none but the connection.
    saved = dict(os.environ)
    os.environ.update({**env, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})
    for name in ("FL_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name, None)
    env["AIRFLOW_CONN_AWS_CLAIMS"] = json.dumps({"conn_type": "aws", "login": "claims-coordinator",
                                                 "password": "claims-secret", "extra": {
                                                     "endpoint_url": s3_server.endpoint_url,
                                                     "region_name": "us-east-1"}})
    store = ObjectStore(s3_server.endpoint_url)
    create_buckets(spec, store)
    assert airflow(["db", "migrate"], {**env, "FL_S3_ENDPOINT_URL": ""}).returncode == 0
    data = prepare_silos(spec, state)
    publish_validation(spec, data, store)
    # insurer-0 keeps its claims in PostgreSQL (a table the agent queries per data window).
    postgres_server.create_database("insurer0")
    url = postgres_server.url("insurer0")
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    pd.read_parquet(data.silos["insurer-0"]).to_sql("claims", engine, index=False)
    engine.dispose()
    # insurer-3's export lost a column of the contract.
    broken = state / "insurer-3-broken.parquet"
    pd.read_parquet(data.silos["insurer-3"]).drop(columns="claim_amount").to_parquet(broken, index=False)
    silos = SiloProcesses(spec, data.silos, state / "silo-logs", poll_seconds=0.5, data_args={
        "insurer-0": ["--data", url, "--sql-table", "claims"], "insurer-3": ["--data", str(broken)]}).start()
    try:
        yield {"env": env, "spec": spec, "store": store, "state": state, "silos": silos}
    finally:
        silos.stop()
        os.environ.clear()
        os.environ.update(saved)


def run_round(env, spec, conf=None):
    args = ["dags", "test", spec.dag_id] + (["--conf", json.dumps(conf)] if conf else [])
    # Blank, not absent: airflow() starts from this process's environment, which the silos need.
    return airflow(args, {**env, "FL_S3_ENDPOINT_URL": "", "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""},
                   timeout=600)


def report(store, spec, round_id):
    return json.loads(store.get_bytes(spec.coordinator_bucket, f"{spec.federation}/rounds/{round_id}/report.json"))


def test_claims_rounds_train_on_postgres_and_parquet_and_record_the_decline(claims):
    env, spec, store = claims["env"], claims["spec"], claims["store"]
    result = run_round(env, spec)
    first = report(store, spec, "000001")
    assert first["decision"] == "promoted", (first, result.stdout[-3000:])
    assert sorted(first["clients_accepted"]) == ["insurer-0", "insurer-1", "insurer-2"]  # PostgreSQL and Parquet
    assert first["clients_declined"] == {"insurer-3": "column 'claim_amount' missing"}
    assert first["primary_metric"] == "log_loss" and first["candidate"]["log_loss"] <= 0.95
    assert set(first["candidate"]) == {"log_loss", "accuracy", "macro_f1"}
    # Both sources: the insurers that trained scored the candidate on their own evaluation
    # share, and the coordinator on its own rows; every gate passed on each.
    assert first["evaluation_sources"] == ["federated", "coordinator"]
    assert set(first["federated_evaluation"]["per_silo"]) <= {"insurer-0", "insurer-1", "insurer-2"}
    assert len(first["federated_evaluation"]["per_silo"]) >= 2 and first["coordinator_evaluation"]["rows"] > 0
    # The gate on a metric where lower is better is a ceiling, on either source.
    gates = {g["source"]: g for g in first["gates"] if g["name"] == "max_log_loss"}
    assert set(gates) == {"federated", "coordinator"}
    assert all(g["passed"] and "<=" in g["detail"] for g in gates.values())
    assert "declined insurer-3: column 'claim_amount' missing" in result.stdout + result.stderr
    # The PostgreSQL silo trained on its table, and said how many rows it used.
    log = (claims["state"] / "silo-logs" / "insurer-0.log").read_text()
    assert "claims" in log and "round 000001: update committed" in log

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias(spec.model_name, "champion")
    run = client.get_run(version.run_id)
    assert run.data.params["declined_clients"] == "insurer-3"
    assert run.data.params["task"] == "claims_triage.task:ClaimsTriageTask" and run.data.params["task_version"] == "1"
    assert version.tags["fl.task"] == "claims_triage.task:ClaimsTriageTask"


def test_the_sharded_candidate_equals_the_unsharded_aggregation_of_the_same_updates(claims):
    """After the round above: three mapped tasks of each kind wrote their slices, and the
    assembled candidate is the unsharded weighted median of the round's snapshots, bit for bit."""
    spec, store = claims["spec"], claims["store"]
    records = Coordinator(spec, store).records
    summary = records.get_json("000001", "candidate/manifest.json")
    assert summary is not None and summary["shards"] == 3 and summary["aggregator"] == "weighted_median"
    assert all(records.get_json("000001", f"shards/results/{k}/done.json") for k in range(3))
    base = decode_state(records.get("000001", "base/model.safetensors"))
    updates = [(decode_state(records.get("000001", f"updates/{a['client_id']}/update.safetensors",
                                         sha256=a["payload_sha256"])), a["num_examples"]) for a in summary["accepted"]]
    weights = cap_shares([n for _, n in updates], spec.max_weight_share)
    expected = aggregation.build("weighted_median").aggregate(base, [(u, w) for (u, _), w in zip(updates, weights)])
    candidate = decode_state(records.get("000001", "candidate/model.safetensors", sha256=summary["candidate_sha256"]))
    assert set(candidate) == set(expected)
    for name, value in expected.items():
        assert candidate[name].dtype == value.dtype and np.array_equal(candidate[name], value), name
