"""Warm start: the first round's base from a model the team already runs (an MLflow model
version or a weights URI), checked against the task's model, its origin in the lineage."""

from __future__ import annotations

import mlflow
import pytest
import torch

from fl_tasks.coordinator import RoundFailed, RunContext
from fl_tasks.protocol.codec import decode_state, encode_state
from fl_tasks.tasks.api import model_state

TASK = {"entrypoint": "fl_tasks.tasks.fraud:FraudTask", "params": {"hidden": [16, 8]}, "seed": 3}


def production_model(task, seed: int = 11):
    """The model 'the team already runs': the task's model with other weights."""
    return task.seeded_model(seed)


def test_an_mlflow_version_becomes_the_first_base_and_the_lineage_says_so(make_federation):
    spec, coordinator, _ = make_federation(task=TASK)
    model = production_model(coordinator.task)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                        registered_model_name="fraud-in-production",
                                        pip_requirements=["torch==2.13.0"])
    version = info.registered_model_version
    warm = make_federation(task={**TASK, "warm_start": f"models:/fraud-in-production/{version}"})
    spec, coordinator = warm[0], warm[1]
    round_id = coordinator.prepare(RunContext(run_id="warm"))
    plan = coordinator.load_plan(round_id)
    assert plan.base_version == "seed" and plan.base_origin == f"models:/fraud-in-production/{version}"
    base = decode_state(coordinator.records.get(round_id, "base/model.safetensors", sha256=plan.base_sha256))
    for name, tensor in model.state_dict().items():
        assert torch.equal(torch.from_numpy(base[name]), tensor), name
    assert coordinator.records.get_json(round_id, "plan.json")["base_origin"].startswith("models:/")


def test_a_weights_uri_works_and_a_model_of_another_shape_is_refused_with_the_mismatch(make_federation):
    spec, coordinator, _ = make_federation(task=TASK)
    weights = encode_state(model_state(production_model(coordinator.task)))
    coordinator.store.put_bytes(coordinator.bucket, "warm/weights.safetensors", weights)
    uri = f"s3://{coordinator.bucket}/warm/weights.safetensors"
    spec, coordinator, _ = make_federation(task={**TASK, "warm_start": uri},
                                           coordinator={"bucket": coordinator.bucket})
    round_id = coordinator.prepare(RunContext(run_id="warm-uri"))
    assert coordinator.load_plan(round_id).base_origin == uri
    assert coordinator.records.get(round_id, "base/model.safetensors") == weights

    other = make_federation(task={**TASK, "params": {"hidden": [32]}})[1].task.seeded_model(1)
    coordinator.store.put_bytes(coordinator.bucket, "warm/other.safetensors", encode_state(model_state(other)))
    _, wrong, _ = make_federation(task={**TASK, "warm_start": f"s3://{coordinator.bucket}/warm/other.safetensors"},
                                  coordinator={"bucket": coordinator.bucket})
    with pytest.raises((RoundFailed, ValueError), match="does not fit the task's model: tensor"):
        wrong.prepare(RunContext(run_id="warm-wrong"))


def test_a_warm_start_model_that_does_not_exist_is_a_named_error(make_federation):
    _, coordinator, _ = make_federation(task={**TASK, "warm_start": "models:/does-not-exist/1"})
    with pytest.raises((RoundFailed, ValueError), match="task.warm_start: cannot load models:/does-not-exist/1"):
        coordinator.prepare(RunContext(run_id="no-such-model"))
