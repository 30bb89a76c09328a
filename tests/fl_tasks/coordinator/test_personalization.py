"""Personalization at the coordinator: the plan and the manifests carry the settings, FedBN's
local tensors are filled from the base at intake (never averaged; a leaked one is rejected by
name), each silo's `personal` block is screened apart from its global scores, and the round's
report and MLflow run hold the per-silo table with its lineage (and, with share_weights, the
personal weights as registered versions).

The silos here are hand-written (updates and evaluations committed straight into their
buckets), so that every field the coordinator reads is under the test's control; the real
agents run in tests/integration/test_personal_rounds.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from fl_tasks import protocol
from fl_tasks.config import ConfigError, parse_federation
from fl_tasks.coordinator import RunContext
from fl_tasks.coordinator.candidate import CandidateBuilder
from fl_tasks.coordinator.evaluation import screen_personal
from fl_tasks.coordinator.plan import RoundFailed, personalization_settings
from fl_tasks.coordinator.report import (personalization_account, personalization_metrics, personalization_table,
                                         with_versions)
from fl_tasks.coordinator.screening import update_norm
from fl_tasks.protocol import EvaluationManifest, EvaluationRequest, GlobalManifest, UpdateManifest, sha256_hex
from fl_tasks.protocol.codec import decode_state, encode_state, encode_update
from fl_tasks.tasks.api import Metric, model_state

from tests.conftest import decide_round, federation_doc

METRICS = (Metric("roc_auc", True, 0.0, 1.0), Metric("pr_auc", True, 0.0, 1.0))
FEDERATED = {"federated": {"min_silos": 2, "timeout_minutes": 30}, "coordinator_data": ""}
ANY_MODEL = {"thresholds": {"roc_auc": 0.0}, "max_regression": 1.0}
BN = [f"{layer}.{name}" for layer in (1, 4) for name in ("bias", "num_batches_tracked", "running_mean", "running_var",
                                                          "weight")]


def spec_of(**overrides: Any):
    return parse_federation(federation_doc(evaluation=FEDERATED, **overrides), "personal.yaml")


# --- the plan ----------------------------------------------------------------------------------

def test_the_settings_default_to_the_rounds_learning_rate_and_fedbn_names_the_batch_norm_tensors():
    spec = spec_of(personalization={"strategy": "finetune", "epochs": 2})
    settings = personalization_settings(spec, 0.02, spec.load_task())
    assert settings == {"strategy": "finetune", "layers": "all", "epochs": 2, "learning_rate": 0.02, "batch_size": 64,
                        "ditto_lambda": 1.0, "local_only": True, "share_weights": False, "local_tensors": []}
    spec = spec_of(personalization={"strategy": "fedbn", "learning_rate": 0.005})
    settings = personalization_settings(spec, 0.02, spec.load_task())
    assert settings["learning_rate"] == 0.005 and settings["local_tensors"] == sorted(BN)
    assert personalization_settings(spec_of(), 0.02, None) == {}


def test_fedbn_without_batch_norm_names_the_field_and_the_fix():
    spec = spec_of(personalization={"strategy": "fedbn"}, task={"params": {"hidden": [16, 8], "batch_norm": False}})
    with pytest.raises(ConfigError) as raised:
        personalization_settings(spec, 0.01, spec.load_task())
    assert str(raised.value) == ("personal.yaml: field 'personalization.strategy': fedbn needs batch-norm tensors, the "
                                 "task's model has none. Fix: set task.params.batch_norm: true or choose finetune or "
                                 "ditto")


# --- fedbn at intake: the decoder on its own ---------------------------------------------------

@pytest.fixture(scope="module")
def fraud():
    spec = spec_of(personalization={"strategy": "fedbn"})
    task = spec.load_task()
    return task, model_state(task.seeded_model(3))


def trained(base: dict[str, np.ndarray], seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    """The base with every floating tensor moved a little (variances kept positive)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in base.items():
        if np.issubdtype(value.dtype, np.floating):
            moved = value + rng.normal(0, scale, value.shape).astype(value.dtype)
            out[name] = np.abs(moved) if name.endswith("running_var") else moved
        else:
            out[name] = value + 3
    return out


def shared(state: dict[str, np.ndarray], keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    return {n: v for n, v in state.items() if n not in BN or n in keep}


def builder(task, codec: str) -> CandidateBuilder:
    plan = SimpleNamespace(training={"codec": codec}, personalization={"strategy": "fedbn", "local_tensors": BN})
    return CandidateBuilder(plan, None, None, task, lambda version: None, {}, {}, None)


@pytest.mark.parametrize("codec", ["fp32", "int8", "topk:0.5"])
def test_fedbn_updates_leave_the_local_tensors_out_and_they_are_filled_from_the_base(fraud, codec):
    task, base = fraud
    state = trained(base, 1)
    payload = encode_update(shared(state), shared(base), codec, exact=task.tensor_ranges).payload
    decoded = builder(task, codec).decode(SimpleNamespace(codec=codec), payload, base)
    assert list(decoded) == list(base)
    for name in BN:  # the base's values: no change there for screening and aggregation
        assert np.array_equal(decoded[name], base[name]) and decoded[name].dtype == base[name].dtype
    moved = [n for n in base if n not in BN]
    assert all(not np.array_equal(decoded[n], base[n]) for n in moved if codec != "topk:0.5")
    # The update's norm counts only what the silo sent: the local tensors add nothing to it.
    norm = update_norm(decoded, base)
    sent = {n: decoded[n] for n in moved}
    assert norm == pytest.approx(update_norm(sent, {n: base[n] for n in moved})) and norm > 0


@pytest.mark.parametrize("codec, keep", [("fp32", ("1.running_mean",)), ("int8", ("1.running_var",)),
                                         ("fp32", tuple(BN))])
def test_an_update_carrying_a_local_tensor_is_rejected_by_name(fraud, codec, keep):
    task, base = fraud
    state = trained(base, 2)
    payload = encode_update(shared(state, keep), shared(base, keep), codec, exact=task.tensor_ranges).payload
    with pytest.raises(ValueError, match=f"carries local tensor '{sorted(keep)[0]}' that fedbn keeps at the silo"):
        builder(task, codec).decode(SimpleNamespace(codec=codec), payload, base)


def test_a_change_that_carries_floating_local_tensors_names_them(fraud):
    task, base = fraud
    # Batch norm's weights, biases and means travel inside the change vector, not by name.
    floating = tuple(n for n in BN if not n.endswith(("num_batches_tracked", "running_var")))
    payload = encode_update(shared(trained(base, 3), floating), shared(base, floating), "fp16",
                            exact=task.tensor_ranges).payload
    size = sum(base[n].size for n in floating)
    with pytest.raises(ValueError, match=f"carries local tensors that fedbn keeps at the silo: its change holds {size} "
                                         "values more than the base without its local tensors"):
        builder(task, "fp16").decode(SimpleNamespace(codec="fp16"), payload, base)
    # One of them.
    payload = encode_update(shared(trained(base, 3), ("4.running_mean",)), shared(base, ("4.running_mean",)), "int8",
                            exact=task.tensor_ranges).payload
    with pytest.raises(ValueError, match="carries local tensors that fedbn keeps at the silo: its change holds 8 values "
                                         "more"):
        builder(task, "int8").decode(SimpleNamespace(codec="int8"), payload, base)
    # The whole base: the counters and variances, which travel by name, are named first.
    payload = encode_update(trained(base, 3), base, "fp16", exact=task.tensor_ranges).payload
    with pytest.raises(ValueError, match="carries local tensor '1.num_batches_tracked' that fedbn keeps at the silo"):
        builder(task, "fp16").decode(SimpleNamespace(codec="fp16"), payload, base)


# --- the personal block ------------------------------------------------------------------------

SETTINGS = {"strategy": "finetune", "layers": "all", "epochs": 1, "learning_rate": 0.01, "batch_size": 64,
            "ditto_lambda": 0.1, "local_only": True, "share_weights": False, "local_tensors": []}
CANDIDATE_SHA, BASE_SHA = "c" * 64, "b" * 64
KNOWN = {CANDIDATE_SHA: "candidate", BASE_SHA: "base"}


def block(**changes: Any) -> dict[str, Any]:
    good = {"strategy": "finetune", "scores": {"personal": {"roc_auc": 0.8, "pr_auc": 0.3},
                                               "local_only": {"roc_auc": 0.7, "pr_auc": 0.2}},
            "serving": "personal", "global_sha256": CANDIDATE_SHA, "personal_sha256": "d" * 64, "weights_bytes": 0,
            "extra": {}}
    return {**good, **changes}


@pytest.mark.parametrize("personal, settings, reason", [
    (block(), SETTINGS, None),
    (block(global_sha256=BASE_SHA), SETTINGS, None),  # ditto pulls towards the round's base
    (block(strategy="ditto"), SETTINGS, "personal.strategy 'ditto' is not the round's 'finetune'"),
    (block(scores={"personal": {"roc_auc": 1.3, "pr_auc": 0.3}, "local_only": {"roc_auc": 0.7, "pr_auc": 0.2}}),
     SETTINGS, "personal.scores.personal.roc_auc 1.3 is outside the metric's range [0, 1]"),
    (block(scores={"personal": {"roc_auc": 0.8}, "local_only": {"roc_auc": 0.7, "pr_auc": 0.2}}), SETTINGS,
     "personal.scores.personal reports metrics ['roc_auc']"),
    (block(scores={"personal": {"roc_auc": 0.8, "pr_auc": 0.3}}), SETTINGS, "personal.scores models ['personal']"),
    (block(global_sha256="e" * 64), SETTINGS, "personal.global_sha256 eeeeeeeeeeee... names no model"),
    (block(serving="both"), SETTINGS, "serving must be one of"),
    (block(extra={"note": 1}), SETTINGS, "extra must be empty"),
    (block(), {**SETTINGS, "share_weights": True}, "no personal weights shared"),
    (block(weights_bytes=10), SETTINGS, "share_weights is off"),
    ({}, SETTINGS, "no personal block, though the request asked for personalization (finetune)"),
    (block(), {}, "the request asked for no personalization"),
])
def test_screen_personal(personal, settings, reason):
    report, why = screen_personal(personal, settings, METRICS, KNOWN)
    if reason is None:
        assert why is None and report.as_dict() == personal
    else:
        assert report is None and reason in why


def test_no_block_and_no_request_is_nothing_to_say():
    assert screen_personal({}, {}, METRICS, KNOWN) == (None, None)


def test_the_table_holds_three_models_per_silo_the_choice_and_the_lineage():
    per_silo = {
        "a": {"scores": {"candidate": {"roc_auc": 0.75, "pr_auc": 0.25}},
              "personal": {**block(), "global_model": "candidate", "weights": None}},
        "b": {"scores": {"candidate": {"roc_auc": 0.85, "pr_auc": 0.35}},
              "personal": {**block(serving="global", global_sha256=BASE_SHA), "global_model": "base",
                           "weights": None}},
        "c": {"scores": {"candidate": {"roc_auc": 0.8, "pr_auc": 0.3}}},
    }
    table = personalization_table(SETTINGS, per_silo, {"c": "no personal block"}, "pr_auc", "candidate",
                                  {"candidate": "candidate", "base": "4"})
    assert sorted(table["silos"]) == ["a", "b"] and table["rejected"] == {"c": "no personal block"}
    a = table["silos"]["a"]
    assert a["scores"] == {"global": {"roc_auc": 0.75, "pr_auc": 0.25}, "personal": {"roc_auc": 0.8, "pr_auc": 0.3},
                           "local_only": {"roc_auc": 0.7, "pr_auc": 0.2}}
    assert a["primary"] == {"global": 0.25, "personal": 0.3, "local_only": 0.2} and a["serving"] == "personal"
    assert a["lineage"] == {"strategy": "finetune", "global_model": "candidate", "global_version": "candidate",
                            "global_sha256": CANDIDATE_SHA, "personal_sha256": "d" * 64}
    assert table["silos"]["b"]["lineage"]["global_version"] == "4"
    assert table["serving"] == {"personal": ["a"], "global": ["b"]}
    assert table["mean"]["global"]["pr_auc"] == pytest.approx(0.3)
    versioned = with_versions(table, "5", {"a": {"model": "m-personal-a", "version": "2"}})
    assert versioned["silos"]["a"]["lineage"]["global_version"] == "5"
    assert versioned["silos"]["b"]["lineage"]["global_version"] == "4"  # from the base, not the candidate
    assert versioned["silos"]["a"]["registered"] == {"model": "m-personal-a", "version": "2"}
    metrics = personalization_metrics(versioned)
    assert metrics["personal.a.pr_auc"] == 0.3 and metrics["local_only.b.roc_auc"] == 0.7
    assert metrics["global.b.pr_auc"] == 0.35 and metrics["serving_personal.a"] == 1.0
    assert metrics["serving_personal.b"] == 0.0 and metrics["personalization.serving_personal"] == 1.0
    text = personalization_account(versioned)
    assert "personalization (finetune): 1 of 2 silos serve their personal model" in text
    assert "m-personal-a v2" in text and "personal not counted c: no personal block" in text
    assert personalization_table({}, per_silo, {}, "pr_auc", "candidate", {}) is None


# --- rounds: hand-written silos on the test S3 server and an SQLite MLflow ------------------

def commit_update(coordinator, round_id: str, client_id: str, state: dict[str, np.ndarray],
                  base: dict[str, np.ndarray], codec: str = "fp32", examples: int = 1000) -> None:
    spec, plan = coordinator.spec, coordinator.load_plan(round_id)
    client = spec.client(client_id)
    payload = encode_update(state, base, codec, exact=coordinator.task.tensor_ranges).payload
    manifest = UpdateManifest(client_id=client_id, federation=spec.federation, round_id=round_id,
                              base_model_version=plan.base_version, base_sha256=plan.base_sha256,
                              num_examples=examples, codec=codec, payload_sha256=sha256_hex(payload),
                              payload_bytes=len(payload))
    store = coordinator.store
    store.put_bytes(client.bucket_name, protocol.update_payload_key(client.prefix, spec.federation, round_id), payload)
    store.put_bytes(client.bucket_name, protocol.update_manifest_key(client.prefix, spec.federation, round_id),
                    manifest.to_json())


def base_of(coordinator, round_id: str) -> dict[str, np.ndarray]:
    return decode_state(coordinator.records.get(round_id, "base/model.safetensors"))


def test_a_fedbn_round_keeps_the_base_batch_norm_and_rejects_a_leak_by_name(make_federation):
    spec, coordinator, _ = make_federation(personalization={"strategy": "fedbn"}, evaluation=FEDERATED,
                                           training={"codec": "int8"}, gates=ANY_MODEL)
    round_id = coordinator.prepare(RunContext(run_id="fedbn-1"))
    plan = coordinator.load_plan(round_id)
    assert plan.personalization["strategy"] == "fedbn" and plan.personalization["local_tensors"] == sorted(BN)
    assert plan.personalization["learning_rate"] == spec.training.learning_rate
    coordinator.dispatch(round_id)
    client = spec.clients[0]
    sent = GlobalManifest.from_json(coordinator.store.get_bytes(client.bucket_name, protocol.global_manifest_key(
        client.prefix, spec.federation, round_id)))
    assert sent.personalization == plan.personalization
    base = base_of(coordinator, round_id)
    states = {c.id: trained(base, i + 10) for i, c in enumerate(spec.clients)}
    for client_id in ("silo-0", "silo-1"):
        commit_update(coordinator, round_id, client_id, shared(states[client_id]), shared(base), "int8")
    commit_update(coordinator, round_id, "silo-2", shared(states["silo-2"], ("1.running_var",)),
                  shared(base, ("1.running_var",)), "int8")
    coordinator.close_round(round_id, coordinator.check_quorum(round_id))
    summary = coordinator.aggregate(round_id)
    assert [a["client_id"] for a in summary["accepted"]] == ["silo-0", "silo-1"]
    assert summary["rejected"] == [{"client_id": "silo-2", "reason": "carries local tensor '1.running_var' that "
                                                                     "fedbn keeps at the silo"}]
    assert summary["local_tensors"] == sorted(BN)
    candidate = decode_state(coordinator.records.get(round_id, "candidate/model.safetensors"))
    for name in BN:  # never averaged: the base's own values
        assert np.array_equal(candidate[name], base[name])
    # The rest is the mean of the two accepted updates (int8: within its rounding).
    expected = (states["silo-0"]["0.weight"] + states["silo-1"]["0.weight"]) / 2
    assert np.allclose(candidate["0.weight"], expected, atol=2e-3)
    norms = [summary["seen"][c]["update_norm"] for c in ("silo-0", "silo-1")]
    for client_id, norm in zip(("silo-0", "silo-1"), norms):
        moved = [n for n in base if n not in BN]
        assert norm == pytest.approx(update_norm({n: states[client_id][n] for n in moved},
                                                 {n: base[n] for n in moved}), rel=1e-2)
    # A replay from the audit log reads the same snapshots and reaches the same verdicts.
    replayed = coordinator.replay(coordinator.audit.events(round_id))
    assert replayed["candidate_sha256"] == summary["candidate_sha256"]
    assert replayed["rejected"]["silo-2"].startswith("carries local tensor '1.running_var'")


def test_fedbn_on_a_model_without_batch_norm_fails_at_prepare(make_federation):
    spec, coordinator, _ = make_federation(personalization={"strategy": "fedbn"}, evaluation=FEDERATED,
                                           task={"params": {"hidden": [16, 8], "batch_norm": False}})
    with pytest.raises(RoundFailed, match=r"field 'personalization.strategy': fedbn needs batch-norm tensors, the "
                                          r"task's model has none. Fix: set task.params.batch_norm: true"):
        coordinator.prepare(RunContext(run_id="fedbn-none"))


def personal_block(strategy: str, global_sha: str, personal: dict[str, float], weights: bytes | None,
                   serving: str = "personal", local_only: dict[str, float] | None = None) -> dict[str, Any]:
    return {"strategy": strategy, "scores": {"personal": personal, "local_only": local_only or
                                             {"roc_auc": 0.6, "pr_auc": 0.1}},
            "serving": serving, "global_sha256": global_sha,
            "personal_sha256": sha256_hex(weights) if weights else "f" * 64,
            "weights_bytes": len(weights) if weights else 0, "extra": {}}


def commit_evaluation(coordinator, round_id: str, client_id: str, scores: dict[str, float],
                      personal: dict[str, Any], weights: bytes | None = None) -> None:
    spec = coordinator.spec
    client = spec.client(client_id)
    plan = coordinator.evaluation.load_plan(round_id)
    if weights is not None:
        coordinator.store.put_bytes(client.bucket_name, protocol.personal_weights_key(
            client.prefix, spec.federation, round_id), weights)
    manifest = EvaluationManifest(client_id=client_id, federation=spec.federation, round_id=round_id,
                                  request_sha256=plan.request_sha256, num_examples=250, rows_held=2000,
                                  scores={"candidate": scores}, personal=personal)
    coordinator.store.put_bytes(client.bucket_name, protocol.evaluation_result_key(
        client.prefix, spec.federation, round_id), manifest.to_json())


def trained_round(spec, coordinator, run_id: str) -> tuple[str, dict[str, np.ndarray]]:
    round_id = coordinator.prepare(RunContext(run_id=run_id))
    coordinator.dispatch(round_id)
    base = base_of(coordinator, round_id)
    for i, c in enumerate(spec.clients):
        commit_update(coordinator, round_id, c.id, trained(base, 20 + i), base)
    coordinator.close_round(round_id, coordinator.check_quorum(round_id))
    coordinator.aggregate(round_id)
    assert coordinator.request_evaluation(round_id) == [c.id for c in spec.clients]
    return round_id, decode_state(coordinator.records.get(round_id, "candidate/model.safetensors"))


def close_and_decide(coordinator, round_id: str) -> dict[str, Any]:
    coordinator.close_evaluation(round_id, coordinator.check_evaluations(round_id))
    return decide_round(coordinator, round_id)


def artifact(run_id: str, path: str, folder: Path) -> Path:
    return Path(MlflowClient().download_artifacts(run_id, path, str(folder)))


def test_shared_personal_weights_reach_mlflow_as_versions_with_their_lineage(make_federation, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fl_tasks.coordinator")
    spec, coordinator, _ = make_federation(personalization={"strategy": "finetune", "share_weights": True},
                                           evaluation=FEDERATED, gates=ANY_MODEL)
    round_id, candidate = trained_round(spec, coordinator, "personal-1")
    plan = coordinator.load_plan(round_id)
    assert plan.personalization["share_weights"] and plan.personalization["local_tensors"] == []
    client = spec.clients[0]
    request = EvaluationRequest.from_json(coordinator.store.get_bytes(
        client.bucket_name, protocol.evaluation_request_key(client.prefix, spec.federation, round_id)))
    assert request.personalization == plan.personalization
    candidate_sha = request.models["candidate"]["sha256"]
    weights = {c: encode_state(trained(candidate, 30 + i, 0.01)) for i, c in enumerate(("silo-0", "silo-1"))}
    commit_evaluation(coordinator, round_id, "silo-0", {"roc_auc": 0.70, "pr_auc": 0.20}, personal_block(
        "finetune", candidate_sha, {"roc_auc": 0.75, "pr_auc": 0.30}, weights["silo-0"]), weights["silo-0"])
    commit_evaluation(coordinator, round_id, "silo-1", {"roc_auc": 0.80, "pr_auc": 0.40}, personal_block(
        "finetune", candidate_sha, {"roc_auc": 0.78, "pr_auc": 0.35}, weights["silo-1"], serving="global"),
        weights["silo-1"])
    # silo-2's personal block names another strategy: its global scores still count.
    commit_evaluation(coordinator, round_id, "silo-2", {"roc_auc": 0.72, "pr_auc": 0.22}, personal_block(
        "ditto", candidate_sha, {"roc_auc": 0.9, "pr_auc": 0.5}, None))
    report = close_and_decide(coordinator, round_id)
    assert report["decision"] == "promoted", report["reason"]
    assert sorted(report["federated_evaluation"]["per_silo"]) == ["silo-0", "silo-1", "silo-2"]
    table = report["personalization"]
    assert table["strategy"] == "finetune" and table["primary_metric"] == "pr_auc"
    assert sorted(table["silos"]) == ["silo-0", "silo-1"]
    assert "personal.strategy 'ditto' is not the round's 'finetune'" in table["rejected"]["silo-2"]
    zero = table["silos"]["silo-0"]
    assert zero["scores"] == {"global": {"roc_auc": 0.70, "pr_auc": 0.20},
                              "personal": {"roc_auc": 0.75, "pr_auc": 0.30},
                              "local_only": {"roc_auc": 0.6, "pr_auc": 0.1}}
    assert zero["primary"] == {"global": 0.20, "personal": 0.30, "local_only": 0.1}
    assert zero["serving"] == "personal" and table["silos"]["silo-1"]["serving"] == "global"
    assert zero["lineage"] == {"strategy": "finetune", "global_model": "candidate", "global_version": report["version"],
                               "global_sha256": candidate_sha, "personal_sha256": sha256_hex(weights["silo-0"])}
    # The coordinator keeps its own snapshot of each silo's shared weights.
    name = "evaluation/personal/silo-0.safetensors"
    assert zero["weights"]["uri"] == coordinator.records.uri(round_id, name)
    assert coordinator.records.get(round_id, name, sha256=sha256_hex(weights["silo-0"])) == weights["silo-0"]
    assert zero["registered"] == {"model": f"{spec.model_name}-personal-silo-0", "version": "1"}

    mlflow = MlflowClient()
    version = mlflow.get_model_version(spec.model_name, report["version"])
    run = mlflow.get_run(version.run_id)
    metrics = run.data.metrics
    assert metrics["personal.silo-0.pr_auc"] == pytest.approx(0.30)
    assert metrics["local_only.silo-1.roc_auc"] == pytest.approx(0.6)
    assert metrics["global.silo-1.pr_auc"] == pytest.approx(0.40)
    assert metrics["serving_personal.silo-0"] == 1.0 and metrics["serving_personal.silo-1"] == 0.0
    assert "personal.silo-2.pr_auc" not in metrics
    assert run.data.tags["fl.personalization"] == "finetune"
    assert run.data.tags["fl.personal_serving"] == "silo-0 personal; silo-1 global"
    assert version.tags["fl.personalization"] == "finetune"
    assert json.loads(artifact(run.info.run_id, "personalization.json", tmp_path).read_text()) == table
    for client_id in ("silo-0", "silo-1"):
        registered = mlflow.get_model_version(f"{spec.model_name}-personal-{client_id}", "1")
        assert registered.run_id == run.info.run_id
        assert registered.tags["fl.global_version"] == report["version"]
        assert registered.tags["fl.global_sha256"] == candidate_sha
        assert registered.tags["fl.strategy"] == "finetune" and registered.tags["fl.round_id"] == round_id
        assert registered.tags["fl.weights_sha256"] == sha256_hex(weights[client_id])
        logged = artifact(run.info.run_id, f"personal/{client_id}/model.safetensors", tmp_path / client_id)
        assert logged.read_bytes() == weights[client_id]
    assert not mlflow.search_model_versions(f"name = '{spec.model_name}-personal-silo-2'")

    # The summary's log lines carry the table.
    text = caplog.text
    assert "personalization (finetune): 1 of 2 silos serve their personal model" in text
    assert f"{spec.model_name}-personal-silo-0 v1" in text and "personal not counted silo-2" in text
    # The audit log says who counted and why one did not.
    events = coordinator.audit.events(round_id)
    assert {e["client_id"] for e in events if e["event"] == "personal_accepted"} == {"silo-0", "silo-1"}
    assert [e["client_id"] for e in events if e["event"] == "personal_rejected"] == ["silo-2"]

    # Re-running the steps registers nothing twice.
    coordinator.records.store.delete(coordinator.bucket, coordinator.round_key(round_id, "registration.json"))
    assert coordinator.register(round_id) == report["version"]
    versions = mlflow.search_model_versions(f"name = '{spec.model_name}-personal-silo-0'")
    assert [str(v.version) for v in versions] == ["1"]
    assert coordinator.registration(round_id)["personal_versions"]["silo-1"] == {
        "model": f"{spec.model_name}-personal-silo-1", "version": "1"}


def test_without_share_weights_only_scores_and_hashes_reach_mlflow(make_federation, tmp_path):
    spec, coordinator, _ = make_federation(personalization={"strategy": "finetune", "local_only": False},
                                           evaluation=FEDERATED, gates=ANY_MODEL)
    round_id, candidate = trained_round(spec, coordinator, "personal-2")
    candidate_sha = coordinator.evaluation.load_plan(round_id).models["candidate"]["sha256"]
    base_sha = coordinator.load_plan(round_id).base_sha256
    for i, c in enumerate(spec.clients):
        # silo-2 came from the round's base (as ditto does): a model of this round, too.
        personal = personal_block("finetune", base_sha if c.id == "silo-2" else candidate_sha,
                                  {"roc_auc": 0.7 + i / 100, "pr_auc": 0.3}, None)
        del personal["scores"]["local_only"]
        commit_evaluation(coordinator, round_id, c.id, {"roc_auc": 0.7, "pr_auc": 0.25}, personal)
    # One silo also puts weights in its bucket, unasked: the coordinator never reads them.
    client = spec.client("silo-0")
    coordinator.store.put_bytes(client.bucket_name, protocol.personal_weights_key(client.prefix, spec.federation,
                                                                                  round_id), b"not asked for")
    report = close_and_decide(coordinator, round_id)
    table = report["personalization"]
    assert sorted(table["silos"]) == ["silo-0", "silo-1", "silo-2"] and table["rejected"] == {}
    assert all(s["scores"]["local_only"] is None and s["weights"] is None and s["registered"] is None
               for s in table["silos"].values())
    assert table["silos"]["silo-2"]["lineage"]["global_model"] == "base"
    assert table["silos"]["silo-2"]["lineage"]["global_version"] == "seed"
    assert table["serving"]["personal"] == ["silo-0", "silo-1", "silo-2"]
    kept = coordinator.round_key(round_id, "evaluation/personal/")
    assert not list(coordinator.store.list_keys(coordinator.bucket, kept))
    mlflow = MlflowClient()
    run = mlflow.get_run(mlflow.get_model_version(spec.model_name, report["version"]).run_id)
    assert run.data.metrics["personal.silo-2.roc_auc"] == pytest.approx(0.72)
    assert not any(k.startswith("local_only.") for k in run.data.metrics)
    assert f"personal sha256 {'f' * 64}" in run.data.tags["fl.personal.silo-0"]
    assert [a.path for a in mlflow.list_artifacts(run.info.run_id) if a.path == "personal"] == []
    assert not mlflow.search_registered_models(f"name LIKE '{spec.model_name}-personal-%'")


def test_bad_shared_weights_cost_the_personal_block_only(make_federation):
    spec, coordinator, _ = make_federation(personalization={"strategy": "finetune", "share_weights": True},
                                           evaluation=FEDERATED, gates=ANY_MODEL)
    round_id, candidate = trained_round(spec, coordinator, "personal-3")
    candidate_sha = coordinator.evaluation.load_plan(round_id).models["candidate"]["sha256"]
    good = encode_state(trained(candidate, 40, 0.01))
    wrong_shape = encode_state({**trained(candidate, 41, 0.01), "0.weight": np.zeros((2, 2), np.float32)})
    for client_id, claimed, stored in (("silo-0", good, good), ("silo-1", good, good[:-1] + b"\x00"),
                                       ("silo-2", wrong_shape, wrong_shape)):
        commit_evaluation(coordinator, round_id, client_id, {"roc_auc": 0.7, "pr_auc": 0.25},
                          personal_block("finetune", candidate_sha, {"roc_auc": 0.7, "pr_auc": 0.3}, claimed), stored)
    report = close_and_decide(coordinator, round_id)
    assert sorted(report["federated_evaluation"]["per_silo"]) == ["silo-0", "silo-1", "silo-2"]
    table = report["personalization"]
    assert sorted(table["silos"]) == ["silo-0"]
    assert "do not match weights_bytes" in table["rejected"]["silo-1"]
    assert "not a model of the task: tensor '0.weight'" in table["rejected"]["silo-2"]


def test_an_evaluation_only_run_asks_for_personal_models_and_reports_them(make_federation, caplog):
    caplog.set_level(logging.INFO, logger="fl_tasks.coordinator")
    spec, coordinator, _ = make_federation(personalization={"strategy": "ditto", "ditto_lambda": 0.5},
                                           evaluation=FEDERATED, gates=ANY_MODEL)
    round_id, _ = trained_round(spec, coordinator, "personal-4")
    for c in spec.clients:
        commit_evaluation(coordinator, round_id, c.id, {"roc_auc": 0.7, "pr_auc": 0.25}, {})  # no personal model yet
    first = close_and_decide(coordinator, round_id)
    assert first["decision"] == "promoted"
    assert first["personalization"]["silos"] == {} and sorted(first["personalization"]["rejected"]) == [
        "silo-0", "silo-1", "silo-2"]

    evaluation_id = coordinator.prepare_evaluation(RunContext(run_id="personal-check"))
    coordinator.request_evaluation(evaluation_id)
    plan = coordinator.evaluation.load_plan(evaluation_id)
    assert plan.personalization["strategy"] == "ditto" and plan.personalization["ditto_lambda"] == 0.5
    client = spec.clients[0]
    request = EvaluationRequest.from_json(coordinator.store.get_bytes(
        client.bucket_name, protocol.evaluation_request_key(client.prefix, spec.federation, evaluation_id)))
    assert request.personalization == plan.personalization and set(request.models) == {"champion"}
    champion_sha = request.models["champion"]["sha256"]
    for i, c in enumerate(spec.clients):
        manifest = EvaluationManifest(
            client_id=c.id, federation=spec.federation, round_id=evaluation_id, request_sha256=plan.request_sha256,
            num_examples=250, rows_held=2000, scores={"champion": {"roc_auc": 0.7, "pr_auc": 0.25}},
            personal=personal_block("ditto", champion_sha, {"roc_auc": 0.8, "pr_auc": 0.2 + i / 10}, None,
                                    serving="global" if i == 0 else "personal"))
        coordinator.store.put_bytes(c.bucket_name, protocol.evaluation_result_key(c.prefix, spec.federation,
                                                                                  evaluation_id), manifest.to_json())
    coordinator.close_evaluation(evaluation_id, coordinator.check_evaluations(evaluation_id))
    result = coordinator.report_evaluation(evaluation_id)
    table = result["personalization"]
    assert table["global_model"] == "champion" and table["serving"]["personal"] == ["silo-1", "silo-2"]
    assert table["silos"]["silo-2"]["lineage"]["global_version"] == first["version"]
    assert table["silos"]["silo-2"]["primary"] == {"global": 0.25, "personal": pytest.approx(0.4),
                                                   "local_only": 0.1}
    run = MlflowClient().get_run(result["mlflow_run_id"])
    assert run.data.metrics["personal.silo-2.pr_auc"] == pytest.approx(0.4)
    assert run.data.metrics["global.silo-0.roc_auc"] == pytest.approx(0.7)
    assert run.data.tags["fl.personalization"] == "ditto"
    assert "personalization (ditto): 2 of 3 silos serve their personal model" in caplog.text
    assert coordinator.report_evaluation(evaluation_id) == result  # a re-run reads what it stored
