"""Real DAG runs (`airflow dags test`) of federations with personal models at the silos: three
`fl-client` processes per federation, a moto S3 server on loopback and an SQLite MLflow store.

- `itest-finetune` (personalization: finetune, share_weights): each silo fine-tunes the
  candidate on its training share at the evaluation, scores it and a local-only model beside
  the global one, serves the better of global and personal, and shares its personal weights;
  the coordinator keeps them, and registers each as a version of <model>-personal-<silo>.
- `itest-fedbn` (personalization: fedbn, batch_norm on): the silos' batch-norm tensors never
  leave them; the candidate keeps the base's, and only scores and hashes reach MLflow.

The round report holds the per-silo table (global, personal and local-only scores, the served
model, the lineage), and the round's MLflow run the per-silo metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from devstack.embedded import airflow, create_buckets, service_env
from fl_tasks import protocol
from fl_tasks.config import load_federation
from fl_tasks.coordinator import Coordinator
from fl_tasks.protocol import sha256_hex
from fl_tasks.protocol.codec import decode_state
from fl_tasks.protocol.storage import ObjectStore
from fl_tasks.simulation.simulate import SiloProcesses, prepare_silos
from tests.conftest import federation_doc

pytestmark = pytest.mark.integration
METRICS = {"roc_auc", "pr_auc"}
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Personal models are scored in the federated evaluation; three silos buy no model worth gating
# on here, so the gates let any model through: the runs show the personal models' mechanics.
COMMON = {"evaluation": {"federated": {"min_silos": 2, "timeout_minutes": 10}, "coordinator_data": ""},
          "gates": {"thresholds": {"roc_auc": 0.0}, "max_regression": 1.0}, "simulation": {"rows": 6000, "seed": 5}}
FEDERATIONS = {
    "itest-finetune": federation_doc(federation="itest-finetune",
                                     personalization={"strategy": "finetune", "epochs": 2, "share_weights": True},
                                     **COMMON),
    "itest-fedbn": federation_doc(federation="itest-fedbn", personalization={"strategy": "fedbn"},
                                  task={"params": {"hidden": [16, 8], "batch_norm": True}}, **COMMON),
}


@pytest.fixture(scope="module")
def services(s3_server, tmp_path_factory):
    """One Airflow home on SQLite and one MLflow store for both federations."""
    state = tmp_path_factory.mktemp("personal")
    federations = state / "federations"
    federations.mkdir()
    for name, doc in FEDERATIONS.items():
        (federations / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    env = service_env(state, s3_server.endpoint_url, federations)
    env.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})
    saved = dict(os.environ)
    os.environ.update(env)
    store = ObjectStore(s3_server.endpoint_url)
    specs = {name: load_federation(federations / f"{name}.yaml") for name in FEDERATIONS}
    for spec in specs.values():
        create_buckets(spec, store)
    migrated = airflow(["db", "migrate"], env)
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    try:
        yield {"env": env, "specs": specs, "store": store, "state": state}
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def silos_of(services, name: str):
    """The federation's three silos as `fl-client` processes, for one test (two CPUs serve one
    federation's silos at a time)."""
    spec, state = services["specs"][name], services["state"] / name
    data = prepare_silos(spec, state)
    silos = SiloProcesses(spec, data.silos, state / "silo-logs", poll_seconds=0.5).start()
    try:
        yield state / "silo-logs"
    finally:
        silos.stop()


def run_round(services, name: str) -> tuple[dict, Coordinator, str]:
    spec, store = services["specs"][name], services["store"]
    result = airflow(["dags", "test", spec.dag_id], services["env"], timeout=900)
    output = result.stdout + result.stderr
    (services["state"] / f"{name}-round.log").write_text(output)
    coordinator = Coordinator(spec, store)
    prefix = f"{spec.federation}/rounds/"
    reports = sorted(k for k in store.list_keys(spec.coordinator_bucket, prefix)
                     if k.endswith("/report.json") and k.count("/") == prefix.count("/") + 1)
    assert reports, output[-4000:]
    return json.loads(store.get_bytes(spec.coordinator_bucket, reports[-1])), coordinator, output


def silo_logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(folder.glob("*.log")))


def check_table(report: dict, strategy: str, candidate_sha256: str) -> dict:
    """The per-silo table: every silo that evaluated has three models' scores, a served model
    that is the better of global and personal, and its lineage."""
    table = report["personalization"]
    assert table["strategy"] == strategy and table["primary_metric"] == "pr_auc"
    assert table["global_model"] == "candidate"
    per_silo = report["federated_evaluation"]["per_silo"]
    assert table["rejected"] == {} and sorted(table["silos"]) == sorted(per_silo) and len(per_silo) == 3
    for client_id, entry in table["silos"].items():
        scores = entry["scores"]
        assert all(set(scores[kind]) == METRICS for kind in ("global", "personal", "local_only"))
        assert scores["global"] == per_silo[client_id]["scores"]["candidate"]
        primary = entry["primary"]
        assert primary == {kind: scores[kind]["pr_auc"] for kind in scores}
        # The silo serves the personal model only when it beats the global one on its own share.
        assert entry["serving"] == ("personal" if primary["personal"] > primary["global"] else "global")
        lineage = entry["lineage"]
        assert lineage["strategy"] == strategy and lineage["global_model"] == "candidate"
        assert lineage["global_sha256"] == candidate_sha256 and lineage["global_version"] == report["version"]
        assert SHA256.fullmatch(lineage["personal_sha256"])
    assert sorted(table["serving"]["personal"] + table["serving"]["global"]) == sorted(per_silo)
    return table


def check_mlflow_metrics(services, report: dict, table: dict):
    client = MlflowClient(tracking_uri=services["env"]["MLFLOW_TRACKING_URI"])
    version = client.get_model_version(services["specs"][report["federation"]].model_name, report["version"])
    run = client.get_run(version.run_id)
    metrics = run.data.metrics
    for client_id, entry in table["silos"].items():
        for kind in ("global", "personal", "local_only"):
            for metric in METRICS:
                assert metrics[f"{kind}.{client_id}.{metric}"] == pytest.approx(entry["scores"][kind][metric])
        assert metrics[f"serving_personal.{client_id}"] == float(entry["serving"] == "personal")
    assert run.data.tags["fl.personalization"] == table["strategy"]
    assert version.tags["fl.personalization"] == table["strategy"]
    assert "personalization.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    return client, run


def test_a_finetune_round_reports_each_silos_three_models_and_registers_its_personal_weights(services):
    name = "itest-finetune"
    spec, store = services["specs"][name], services["store"]
    with silos_of(services, name) as logs:
        report, coordinator, output = run_round(services, name)
        assert report["decision"] == "promoted", (report["reason"], output[-4000:], silo_logs(logs))
        assert report["personalization"] is not None, silo_logs(logs)
        round_id = report["round_id"]
        plan = coordinator.load_plan(round_id)
        assert plan.personalization["strategy"] == "finetune" and plan.personalization["share_weights"]
        assert plan.personalization["learning_rate"] == spec.training.learning_rate
        summary = coordinator.records.get_json(round_id, "candidate/manifest.json")
        table = check_table(report, "finetune", summary["candidate_sha256"])
        assert table["silos"] and table["rejected"] == {}, silo_logs(logs)

    # Each silo's shared weights: in its bucket, kept by the coordinator, logged and registered.
    client, run = check_mlflow_metrics(services, report, table)
    for client_id, entry in table["silos"].items():
        silo = spec.client(client_id)
        shared = store.get_bytes(silo.bucket_name, protocol.personal_weights_key(silo.prefix, spec.federation,
                                                                                 round_id))
        assert sha256_hex(shared) == entry["lineage"]["personal_sha256"]
        assert entry["weights"]["uri"] == coordinator.records.uri(round_id,
                                                                  f"evaluation/personal/{client_id}.safetensors")
        assert coordinator.records.get(round_id, f"evaluation/personal/{client_id}.safetensors",
                                       sha256=entry["lineage"]["personal_sha256"]) == shared
        registered = client.get_model_version(f"{spec.model_name}-personal-{client_id}",
                                              entry["registered"]["version"])
        assert entry["registered"]["model"] == f"{spec.model_name}-personal-{client_id}"
        assert registered.run_id == run.info.run_id and registered.tags["fl.round_id"] == round_id
        assert registered.tags["fl.global_version"] == report["version"]
        assert registered.tags["fl.global_sha256"] == summary["candidate_sha256"]
        assert registered.tags["fl.weights_sha256"] == entry["lineage"]["personal_sha256"]
        assert registered.tags["fl.strategy"] == "finetune"
    assert "personalization (finetune):" in output


def test_a_fedbn_round_keeps_batch_norm_at_the_silos(services):
    name = "itest-fedbn"
    spec, store = services["specs"][name], services["store"]
    with silos_of(services, name) as logs:
        report, coordinator, output = run_round(services, name)
        assert report["decision"] == "promoted", (report["reason"], output[-4000:], silo_logs(logs))
        round_id = report["round_id"]
        plan = coordinator.load_plan(round_id)
        local = plan.personalization["local_tensors"]
        assert plan.personalization["strategy"] == "fedbn" and local and all(
            n.split(".")[0] in ("1", "4") for n in local)
        summary = coordinator.records.get_json(round_id, "candidate/manifest.json")
        assert len(summary["accepted"]) == 3 and summary["rejected"] == [], silo_logs(logs)
        table = check_table(report, "fedbn", summary["candidate_sha256"])

    # No update carried a batch-norm tensor, and the candidate holds the base's.
    base = decode_state(coordinator.records.get(round_id, "base/model.safetensors"))
    for accepted in summary["accepted"]:
        sent = decode_state(coordinator.records.get(round_id, f"updates/{accepted['client_id']}/update.safetensors"))
        assert not set(sent) & set(local) and set(sent) | set(local) == set(base)
    candidate = decode_state(coordinator.records.get(round_id, "candidate/model.safetensors"))
    assert all(np.array_equal(candidate[n], base[n]) for n in local)
    assert any(not np.array_equal(candidate[n], base[n]) for n in base if n not in local)

    # Without share_weights only scores, hashes and lineage reach MLflow.
    client, run = check_mlflow_metrics(services, report, table)
    assert all(entry["weights"] is None and entry["registered"] is None for entry in table["silos"].values())
    assert not client.search_registered_models(f"name LIKE '{spec.model_name}-personal-%'")
    assert not list(store.list_keys(spec.coordinator_bucket, coordinator.round_key(round_id, "evaluation/personal/")))
