"""The MLflow registry with the tracking server failing: a real `mlflow server` (SQLite,
served artifacts) behind the fault proxy. Nothing partial is registered or promoted, a
retry registers exactly one version per round and moves the alias once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fl_tasks.coordinator import registry
from fl_tasks.config import parse_federation
from tests.conftest import federation_doc

MODEL_UPLOAD = r"^PUT .*/mlflow-artifacts/artifacts/.*/models/m-[0-9a-f]+/artifacts/data/"


@pytest.fixture
def spec(mlflow_proxy):
    return parse_federation(federation_doc(), "inline")


@pytest.fixture
def direct(mlflow_server):
    """A client that bypasses the proxy, to see what MLflow really holds."""
    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


def build_model(spec, seed):
    """The federation's task model (the built-in fraud task), seeded."""
    return spec.load_task().seeded_model(seed)


def register(spec, round_id, seed=1, base="seed"):
    return registry.register_candidate(
        spec, build_model(spec, seed), round_id=round_id, airflow_run_id=f"run-{round_id}",
        base_version=base, weights_uri=f"s3://coord/{round_id}.safetensors", weights_sha256=f"{seed:064d}",
        params={"aggregator": "fedavg"}, metrics={"candidate_roc_auc": 0.9}, report={"round": round_id}).version


def versions(direct, spec, round_id=None):
    query = f"name = '{spec.model_name}'" + (f" and tag.`fl.round_id` = '{round_id}'" if round_id else "")
    return sorted(int(v.version) for v in direct.search_model_versions(query))


def champion(direct, spec) -> str | None:
    try:
        return str(direct.get_model_version_by_alias(spec.model_name, "champion").version)
    except MlflowException:
        return None


def test_our_retry_settings_are_mlflows_own_and_the_environment_wins(monkeypatch):
    from mlflow import environment_variables as mlflow_env

    for name in registry.HTTP_DEFAULTS:
        assert hasattr(mlflow_env, name), f"{name} is not an MLflow setting"
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    settings = registry.configure_http_retries()
    assert settings == {**registry.HTTP_DEFAULTS, "MLFLOW_HTTP_REQUEST_TIMEOUT": "7"}
    assert mlflow_env.MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 5
    assert mlflow_env.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    assert mlflow_env.MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 7


def test_mlflow_dying_during_register_registers_nothing_and_the_retry_registers_one_whole_model(
        spec, mlflow_proxy, direct):
    first = register(spec, "000001")
    registry.promote(spec, first)
    mlflow_proxy.down_at(match=MODEL_UPLOAD)  # mid-upload of the model's weights
    with pytest.raises(MlflowException):
        register(spec, "000002", seed=2)
    assert len(mlflow_proxy.actions("down")) == 1
    assert versions(direct, spec) == [int(first)] and champion(direct, spec) == first
    experiment = direct.get_experiment_by_name(spec.experiment_name).experiment_id
    [interrupted] = direct.search_runs([experiment], "tags.`fl.round_id` = '000002'")
    [partial] = direct.search_logged_models([experiment], filter_string=f"source_run_id = '{interrupted.info.run_id}'")
    assert str(partial.status) != "READY"  # the half-uploaded model exists, but never becomes a version

    mlflow_proxy.up()
    second = register(spec, "000002", seed=2)
    assert register(spec, "000002", seed=2) == second  # once more: nothing new
    assert versions(direct, spec, "000002") == [int(second)] and versions(direct, spec) == [int(first), int(second)]
    registered = direct.get_model_version(spec.model_name, second)
    assert registered.run_id == interrupted.info.run_id  # the interrupted run was resumed
    model_id = registered.source.removeprefix("models:/")
    assert registered.source == f"models:/{model_id}" and model_id != partial.model_id
    assert str(direct.get_logged_model(model_id).status) == "READY"
    loaded = __import__("mlflow.pytorch").pytorch.load_model(f"models:/{spec.model_name}/{second}")
    expected = build_model(spec, 2).state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name  # the whole model, not a partial upload
    assert champion(direct, spec) == first  # registering never moves the alias
    registry.promote(spec, second)
    assert champion(direct, spec) == second


def test_mlflows_own_retries_ride_out_503s_and_a_lost_answer_leaves_one_version(spec, mlflow_proxy, direct):
    mlflow_proxy.fail(503, times=2, match=r"^POST .*/runs/create")
    # The server creates the version, the answer comes after the client's 3 s timeout, and
    # MLflow's client sends the POST again: a duplicate that register must remove.
    mlflow_proxy.delay(4.0, times=1, match=r"^POST .*/model-versions/create")
    version = register(spec, "000001")
    assert len(mlflow_proxy.actions("fail")) == 2
    creates = [s for s in mlflow_proxy.seen if s[1].endswith("/model-versions/create")]
    assert [a for _, _, a in creates] == ["delay", "pass"]  # two creates reached the server
    assert versions(direct, spec) == [int(version)] == [1]
    assert registry.find_round_version(spec, "000001").version == version
    assert direct.get_model_version(spec.model_name, version).tags["fl.round_id"] == "000001"


def test_mlflow_dying_during_promote_keeps_the_alias_and_the_retry_moves_it_once(spec, mlflow_proxy, direct):
    first = register(spec, "000001")
    registry.promote(spec, first)
    second = register(spec, "000002", seed=2)
    mlflow_proxy.down_at(match=r"^POST .*/registered-models/alias")
    with pytest.raises(MlflowException):
        registry.promote(spec, second)
    assert champion(direct, spec) == first
    mlflow_proxy.down()  # and down from the start
    with pytest.raises(MlflowException):
        registry.promote(spec, second)
    assert champion(direct, spec) == first
    mlflow_proxy.up()
    mlflow_proxy.seen.clear()
    registry.promote(spec, second)
    assert champion(direct, spec) == second
    assert direct.get_model_version(spec.model_name, second).tags["fl.decision"] == "promoted"
    assert [s[0] for s in mlflow_proxy.seen if s[1].startswith("/api/2.0/mlflow/registered-models/alias")] == \
        ["GET", "POST"]  # the alias was set once
    registry.promote(spec, second)  # a re-run changes nothing
    assert champion(direct, spec) == second and versions(direct, spec) == [int(first), int(second)]


def test_an_unreachable_registry_is_an_error_not_no_champion(spec, mlflow_proxy):
    assert registry.get_champion(spec) is None  # no model yet: a real "none"
    mlflow_proxy.down()
    with pytest.raises(MlflowException, match="Max retries exceeded"):
        registry.get_champion(spec)  # a round would otherwise start from the seed model
    mlflow_proxy.up()
    assert registry.get_champion(spec) is None


def test_prepare_with_mlflow_down_fails_then_resumes_the_same_round_from_the_champion(
        spec, mlflow_proxy, s3_server, direct):
    from fl_tasks.protocol.codec import encode_state
    from fl_tasks.coordinator import Coordinator, RunContext
    from devstack.embedded import create_buckets
    from fl_tasks.tasks.api import model_state
    from fl_tasks.protocol import sha256_hex

    coordinator = Coordinator(spec)
    create_buckets(spec, coordinator.store)
    weights = encode_state(model_state(build_model(spec, 4)))
    coordinator.store.put_bytes(coordinator.bucket, "champion.safetensors", weights)
    version = registry.register_candidate(
        spec, build_model(spec, 4), round_id="000001", airflow_run_id="run-1", base_version="seed",
        weights_uri=f"s3://{coordinator.bucket}/champion.safetensors", weights_sha256=sha256_hex(weights),
        params={}, metrics={}, report={}).version
    registry.promote(spec, version)
    mlflow_proxy.down()
    with pytest.raises(MlflowException):
        coordinator.prepare(RunContext(run_id="run-2", params={"round_id": "r-2"}))
    assert coordinator.store.get_bytes(coordinator.bucket, coordinator.round_key("r-2", "plan.json")) is None
    mlflow_proxy.up()
    assert coordinator.prepare(RunContext(run_id="run-2")) == "r-2"  # the claim made before the outage
    plan = coordinator.load_plan("r-2")
    assert plan.base_version == version and plan.base_sha256 == sha256_hex(weights)
    assert np.isfinite(plan.base_bytes)
