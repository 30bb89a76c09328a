"""MLflow registry helpers against a real SQLite MLflow store."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from fl_tasks.coordinator import registry
from fl_tasks.config import parse_federation
from tests.conftest import federation_doc


@pytest.fixture
def spec(mlflow_uri):
    return parse_federation(federation_doc(), "inline")


def build_model(spec, seed=1):
    """The federation's task model (the built-in fraud task), seeded."""
    return spec.load_task().seeded_model(seed)


def register(spec, round_id, base="seed"):
    return registry.register_candidate(
        spec, build_model(spec), round_id=round_id, airflow_run_id=f"run-{round_id}",
        base_version=base, weights_uri=f"s3://coord/{round_id}.safetensors", weights_sha256="a" * 64,
        params={"aggregator": "fedavg"}, metrics={"candidate_roc_auc": 0.9}, report={"round": round_id}).version


def test_register_is_idempotent_per_round_and_tags_lineage(spec):
    version = register(spec, "000001")
    assert register(spec, "000001") == version
    client = MlflowClient()
    assert len(client.search_model_versions(f"name = '{spec.model_name}'")) == 1
    tags = client.get_model_version(spec.model_name, version).tags
    assert tags["fl.round_id"] == "000001" and tags["fl.base_version"] == "seed"
    assert tags["fl.airflow_run_id"] == "run-000001" and tags["fl.decision"] == "pending"
    assert tags["fl.task"] == "fl_tasks.tasks.fraud:FraudTask" and tags["fl.weights_sha256"] == "a" * 64
    run = client.get_run(client.get_model_version(spec.model_name, version).run_id)
    assert run.data.metrics["candidate_roc_auc"] == 0.9 and run.info.run_name == "round-000001"


def test_promote_moves_the_alias_and_reject_keeps_it(spec):
    assert registry.get_champion(spec) is None
    first = register(spec, "000001")
    registry.promote(spec, first)
    champion = registry.get_champion(spec)
    assert champion.version == first and champion.round_id == "000001"
    assert champion.weights_uri == "s3://coord/000001.safetensors"
    second = register(spec, "000002", base=first)
    registry.reject(spec, second, ["candidate roc_auc 0.5 < 0.9"])
    assert registry.get_champion(spec).version == first
    tags = MlflowClient().get_model_version(spec.model_name, second).tags
    assert tags["fl.decision"] == "rejected" and tags["fl.rejected_reason"] == "candidate roc_auc 0.5 < 0.9"
    registry.promote(spec, first)  # promoting the champion again changes nothing
    assert registry.get_champion(spec).version == first


def test_a_retry_after_an_interrupted_try_reuses_its_run_and_logged_model(spec):
    import mlflow
    import numpy as np

    client = MlflowClient()
    experiment = client.create_experiment(spec.experiment_name)
    # What a try killed after logging the model but before registering it leaves behind.
    with mlflow.start_run(experiment_id=experiment, tags={"fl.round_id": "000009"}) as interrupted:
        mlflow.log_params({"aggregator": "fedavg"})
        info = mlflow.pytorch.log_model(build_model(spec), name="model",
                                        input_example=np.zeros((2, spec.load_task().input_dim), dtype=np.float32),
                                        pip_requirements=["torch==2.13.0"])
    version = register(spec, "000009")
    runs = client.search_runs([experiment], filter_string="tags.`fl.round_id` = '000009'")
    assert [r.info.run_id for r in runs] == [interrupted.info.run_id]
    registered = client.get_model_version(spec.model_name, version)
    assert registered.run_id == interrupted.info.run_id and registered.source == f"models:/{info.model_id}"
    assert len(mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")) == 1


def test_registration_names_the_run_and_experiment_that_logged_the_version(spec):
    def registered():
        return registry.register_candidate(
            spec, build_model(spec), round_id="000004", airflow_run_id="run-4", base_version="seed",
            weights_uri="s3://coord/4.safetensors", weights_sha256="a" * 64, params={}, metrics={}, report={})

    first = registered()
    client = MlflowClient()
    version = client.get_model_version(spec.model_name, first.version)
    assert version.run_id == first.run_id
    assert client.get_run(first.run_id).info.experiment_id == first.experiment_id
    assert client.get_experiment(first.experiment_id).name == spec.experiment_name
    assert registered() == first  # found again, not registered twice


def test_version_weights_sha256_reads_the_tag_and_knows_missing_versions(spec):
    version = register(spec, "000005")
    assert registry.version_weights_sha256(spec, version) == "a" * 64
    assert registry.version_weights_sha256(spec, "99") is None


def test_the_registered_model_loads_and_matches_the_candidates_weights(spec):
    # The version must be the candidate that passed the gates: logged in eval mode, its
    # batch-norm statistics untouched by any input example.
    import mlflow.pytorch
    import numpy as np

    from fl_tasks.tasks.api import model_state

    model = build_model(spec)
    version = registry.register_candidate(
        spec, model, round_id="000006", airflow_run_id="run-6", base_version="seed", base_origin="seed 3",
        weights_uri="s3://coord/6.safetensors", weights_sha256="b" * 64, params={}, metrics={}, report={}).version
    assert MlflowClient().get_model_version(spec.model_name, version).tags["fl.base_origin"] == "seed 3"
    loaded = mlflow.pytorch.load_model(f"models:/{spec.model_name}/{version}", map_location="cpu")
    expected, got = model_state(model), model_state(loaded)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
    assert model.training  # the caller's model is left as it was


def test_round_records_go_to_the_rounds_run_or_a_failed_one_and_a_retry_logs_no_metric_twice(spec):
    version = register(spec, "000007")
    client = MlflowClient()
    logged = client.get_run(client.get_model_version(spec.model_name, version).run_id).data.metrics
    run_id = registry.log_round_record(spec, "000007", {"audit/audit.jsonl": '{"event": "round_planned"}\n'},
                                       {"participation_rate": 0.8, **{k: v + 1 for k, v in logged.items()}})
    assert run_id == client.get_model_version(spec.model_name, version).run_id
    again = registry.log_round_record(spec, "000007", {"audit/audit.jsonl": '{"event": "again"}\n'},
                                      {"participation_rate": 0.5})
    assert again == run_id  # a retry rewrites the same file
    text = client.download_artifacts(run_id, "audit/audit.jsonl")
    assert open(text).read() == '{"event": "again"}\n'
    metrics = client.get_run(run_id).data.metrics
    assert metrics["participation_rate"] == 0.8  # logged once: the retry's value is not added
    assert {k: metrics[k] for k in logged} == logged  # what register logged stays
    assert len(client.get_metric_history(run_id, "participation_rate")) == 1
    # A round that never reached register gets a run of its own, marked FAILED.
    orphan = registry.log_round_record(spec, "000008", {"audit/audit.jsonl": "{}\n"}, {})
    assert orphan != run_id and client.get_run(orphan).info.status == "FAILED"
    assert client.get_run(orphan).data.tags["fl.round_id"] == "000008"


def test_batches_fit_mlflows_limits_in_as_few_requests_as_they_allow():
    """register logs its params, metrics and tags in one log_batch where MLflow's limits allow
    (100 params, 1000 entries per request), and splits only where they do not."""
    one = registry.batches(params={"a": 1, "b": "x"}, metrics={"m": 0.5}, tags={"t": "v"}, stamp=7)
    assert len(one) == 1
    assert [p.key for p in one[0]["params"]] == ["a", "b"] and one[0]["params"][0].value == "1"
    assert [(m.key, m.value, m.timestamp, m.step) for m in one[0]["metrics"]] == [("m", 0.5, 7, 0)]
    assert [(t.key, t.value) for t in one[0]["tags"]] == [("t", "v")]
    many = registry.batches(params={f"p{i:03d}": i for i in range(250)}, metrics={f"m{i:04d}": i for i in range(1500)})
    assert [len(c["params"]) for c in many] == [100, 100, 50, 0]
    assert all(len(c["params"]) + len(c["metrics"]) + len(c["tags"]) <= 1000 for c in many)
    assert sum(len(c["metrics"]) for c in many) == 1500 and len(many) == 4
    assert registry.batches() == []
