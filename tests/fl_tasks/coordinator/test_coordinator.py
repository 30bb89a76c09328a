"""A whole round through the coordinator's steps, without Airflow: moto S3, SQLite MLflow,
in-process client runtimes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient

from fl_tasks import protocol
from fl_tasks.coordinator import quorum
from fl_tasks.aggregation.mean import weighted_mean
from fl_tasks.coordinator import Coordinator, RoundFailed, RunContext, run_round
from fl_tasks.protocol import UpdateManifest
from fl_tasks.protocol.codec import decode_state
from fl_tasks.simulation.attacks import AttackingAgent


@pytest.fixture
def federation(make_federation):
    return make_federation()


def read_json(coordinator, round_id, name):
    return coordinator.records.get_json(round_id, name)


def test_full_round_promotes_and_fedavg_matches_the_formula(federation):
    spec, coordinator, clients = federation
    round_id = coordinator.prepare(RunContext(run_id="run-a"))
    assert round_id == "000001"
    assert coordinator.dispatch(round_id) == list(clients)
    assert coordinator.check_quorum(round_id).state == quorum.WAITING
    for runtime in clients.values():
        assert runtime.answer(round_id)
    decision = coordinator.check_quorum(round_id)
    assert decision.state == quorum.MET and decision.committed == tuple(sorted(clients))
    coordinator.close_round(round_id, decision)
    summary = coordinator.aggregate(round_id)
    assert [a["client_id"] for a in summary["accepted"]] == sorted(clients) and summary["rejected"] == []

    updates = []
    for client in spec.clients:
        payload = coordinator.store.get_bytes(client.bucket_name,
                                              protocol.update_payload_key("", spec.federation, round_id))
        manifest = UpdateManifest.from_json(coordinator.store.get_bytes(
            client.bucket_name, protocol.update_manifest_key("", spec.federation, round_id)))
        updates.append((decode_state(payload), manifest.num_examples))
    expected = weighted_mean(updates)
    candidate = decode_state(coordinator.store.get_bytes(coordinator.bucket,
                                                         coordinator.round_key(round_id, "candidate/model.safetensors")))
    for name, value in expected.items():
        np.testing.assert_allclose(candidate[name], value, rtol=1e-6)
        assert candidate[name].dtype == value.dtype
    counters = [k for k in candidate if k.endswith("num_batches_tracked")]
    # The fraud task's test federation keeps batch norm: its counters must survive the average.
    assert counters and all(int(candidate[k]) > 0 for k in counters)  # integer buffers are not zeroed

    result = coordinator.validate(round_id)
    assert result["passed"] and result["champion"] is None
    version = coordinator.register(round_id)
    assert coordinator.register(round_id) == version  # a re-run registers nothing new
    assert coordinator.decide(round_id) == "promote"
    coordinator.promote(round_id)
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(spec.model_name, "champion").version) == version
    assert len(client.search_model_versions(f"name = '{spec.model_name}'")) == 1
    report = coordinator.summarize(round_id)
    assert report["decision"] == "promoted" and report["version"] == version

    # The next round starts from that champion.
    next_round = coordinator.prepare(RunContext(run_id="run-b"))
    assert next_round == "000002"
    assert coordinator.load_plan(next_round).base_version == version


def test_prepare_and_dispatch_are_idempotent(federation):
    spec, coordinator, _ = federation
    first = coordinator.prepare(RunContext(run_id="same-run"))
    plan = read_json(coordinator, first, "plan.json")
    assert coordinator.prepare(RunContext(run_id="same-run")) == first
    assert read_json(coordinator, first, "plan.json") == plan
    coordinator.dispatch(first)
    client = spec.clients[0]
    key = protocol.global_manifest_key("", spec.federation, first)
    before = coordinator.store.get_bytes(client.bucket_name, key)
    coordinator.dispatch(first)
    assert coordinator.store.get_bytes(client.bucket_name, key) == before


def test_an_explicit_round_id_cannot_be_reused_by_another_run(federation):
    _, coordinator, _ = federation
    coordinator.prepare(RunContext(run_id="one", params={"round_id": "r-1"}))
    with pytest.raises(RoundFailed, match="already belongs to run 'one'"):
        coordinator.prepare(RunContext(run_id="two", params={"round_id": "r-1"}))


def test_scheduled_rounds_are_named_after_the_data_interval(federation):
    _, coordinator, _ = federation
    round_id = coordinator.prepare(RunContext(run_id="sched", run_type="scheduled",
                                              data_interval_start="2013-09-01T06:00:00+00:00",
                                              data_interval_end="2013-09-01T12:00:00+00:00"))
    assert round_id == "20130901T060000"
    assert coordinator.load_plan(round_id).data_window == {"start": "2013-09-01T06:00:00+00:00",
                                                           "end": "2013-09-01T12:00:00+00:00"}


def test_a_tampered_update_is_rejected_and_the_round_goes_on(federation):
    spec, coordinator, clients = federation
    round_id = coordinator.prepare(RunContext(run_id="tamper"))
    coordinator.dispatch(round_id)
    for runtime in clients.values():
        runtime.answer(round_id)
    victim = spec.clients[1]
    key = protocol.update_payload_key("", spec.federation, round_id)
    payload = coordinator.store.get_bytes(victim.bucket_name, key)
    coordinator.store.put_bytes(victim.bucket_name, key, payload[:-1] + bytes([payload[-1] ^ 1]))  # same size
    coordinator.close_round(round_id, coordinator.check_quorum(round_id))
    summary = coordinator.aggregate(round_id)
    assert [r["client_id"] for r in summary["rejected"]] == [victim.id]
    assert "sha256 does not match" in summary["rejected"][0]["reason"]
    assert len(summary["accepted"]) == 2
    assert abs(sum(a["influence"] for a in summary["accepted"]) - 1) < 1e-12


def test_gate_failure_rolls_back_and_keeps_the_champion(federation):
    spec, coordinator, clients = federation
    # The first round promotes; the second demands the impossible and must roll back.
    first = run_round_with_clients(spec, RunContext(run_id="first"), clients)
    assert first["decision"] == "promoted"
    second = run_round_with_clients(spec, RunContext(run_id="second", params={"gate_thresholds": {"pr_auc": 1.0}}), clients)
    assert second["decision"] == "rejected" and "pr_auc" in second["reason"]
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(spec.model_name, "champion").version) == first["version"]
    rejected = client.get_model_version(spec.model_name, second["version"])
    assert rejected.tags["fl.decision"] == "rejected" and "1.0000" in rejected.tags["fl.rejected_reason"]


def run_round_with_clients(spec, ctx, clients):
    coordinator = Coordinator(spec)
    round_id = coordinator.prepare(ctx)
    coordinator.dispatch(round_id)
    for runtime in clients.values():
        runtime.answer(round_id)
    return run_round(spec, ctx, poll_seconds=0.1)


def test_missing_quorum_records_the_reason_and_builds_nothing(federation):
    spec, coordinator, clients = federation
    ctx = RunContext(run_id="lonely", params={"round_timeout_minutes": 0.01})
    round_id = coordinator.prepare(ctx)
    coordinator.dispatch(round_id)
    next(iter(clients.values())).answer(round_id)
    report = run_round(spec, ctx, poll_seconds=0.1)
    assert report["decision"] == "no_model" and report["clients_committed"] == 1
    assert "quorum not met: 1 of 3" in report["reason"]
    with pytest.raises(RoundFailed, match="quorum not met"):
        coordinator.aggregate(round_id)
    assert MlflowClient().search_model_versions(f"name = '{spec.model_name}'") == []


def test_server_optimiser_state_follows_the_champion_and_skips_rolled_back_rounds(federation):
    spec, coordinator, clients = federation
    params = {"aggregator": "fedadam", "aggregator_params": {"eta": 0.1}}
    first = run_round_with_clients(spec, RunContext(run_id="adam-1", params=params), clients)
    assert first["decision"] == "promoted"
    state_key = coordinator.round_key(first["round_id"], "candidate/server_state/fedadam.safetensors")
    first_state = decode_state(coordinator.store.get_bytes(coordinator.bucket, state_key))
    assert any(name.startswith("m/") for name in first_state) and any(np.any(v != 0) for v in first_state.values())

    rejected = run_round_with_clients(spec, RunContext(run_id="adam-2", params={**params, "gate_thresholds": {"pr_auc": 1.0}}),
                                      clients)
    assert rejected["decision"] == "rejected"
    third_id = coordinator.prepare(RunContext(run_id="adam-3", params=params))
    plan = coordinator.load_plan(third_id)
    # The rolled-back round is not a base: round 3 continues the optimiser of round 1.
    assert plan.base_round_id == first["round_id"] and plan.base_version == first["version"]


def test_strategy_and_its_parameters_come_from_the_trigger_params(federation):
    spec, coordinator, clients = federation
    report = run_round_with_clients(spec, RunContext(run_id="krum", params={
        "aggregator": "krum", "aggregator_params": {"f": 0}}), clients)
    summary = read_json(coordinator, report["round_id"], "candidate/manifest.json")
    assert summary["aggregator"] == "krum" and summary["params"] == {"f": 0}
    assert report["decision"] in ("promoted", "rejected")
    with pytest.raises(ValueError, match="krum"):
        coordinator.prepare(RunContext(run_id="bad-krum", params={"aggregator": "krum",
                                                                  "aggregator_params": {"f": 5}}))


def test_norm_screening_rejects_a_scaled_attacker_before_the_strategy(make_federation):
    # No batch norm: a scaled update would otherwise fail the variance check before any norm is compared.
    spec, coordinator, clients = make_federation(screening={"max_norm_ratio": 3.0}, task={
        "entrypoint": "fl_tasks.tasks.fraud:FraudTask", "params": {"hidden": [16, 8], "batch_norm": False}})
    attacker = clients["silo-2"]
    clients["silo-2"] = AttackingAgent(attacker.client_id, attacker.federation, attacker.bucket_uri, attacker.source,
                                       attacker.store, behaviour="scaled", attack_scale=50.0)
    report = run_round_with_clients(spec, RunContext(run_id="screen"), clients)
    assert [r["client_id"] for r in report["clients_rejected"]] == ["silo-2"]
    assert "median norm" in report["clients_rejected"][0]["reason"]
    assert report["clients_accepted"] == ["silo-0", "silo-1"]


def test_prepare_killed_after_claiming_resumes_the_same_round(federation):
    _, coordinator, _ = federation
    coordinator.prepare(RunContext(run_id="earlier"))  # round 000001 exists
    # A try that died right after claiming round 000002, before writing its plan.
    coordinator.store.put_bytes(coordinator.bucket, coordinator.records.claim_key("crashed"),
                                json.dumps({"round_id": "000002", "run_id": "crashed"}).encode())
    assert coordinator.prepare(RunContext(run_id="crashed")) == "000002"
    assert coordinator.load_plan("000002").run_id == "crashed"
    assert coordinator.prepare(RunContext(run_id="crashed")) == "000002"
    assert coordinator.prepare(RunContext(run_id="later")) == "000003"


@pytest.mark.parametrize("aggregator, params", [("median", {}), ("krum", {"f": 0})])
def test_mlflow_weights_are_the_rules_influence_never_an_example_share(make_federation, aggregator, params, caplog):
    spec, coordinator, clients = make_federation(aggregation={"strategy": aggregator, "params": params})
    round_id = coordinator.prepare(RunContext(run_id=f"run-{aggregator}"))
    coordinator.dispatch(round_id)
    for runtime in clients.values():
        runtime.answer(round_id)
    coordinator.close_round(round_id, coordinator.check_quorum(round_id))
    with caplog.at_level("INFO", logger="fl_tasks.coordinator"):
        summary = coordinator.aggregate(round_id)
    coordinator.validate(round_id)
    coordinator.register(round_id)
    registration = coordinator.registration(round_id)
    run = MlflowClient().get_run(registration["run_id"])
    weights = {k: v for k, v in run.data.metrics.items() if k.startswith("weight_")}
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert f"strategy {aggregator}" in log and "screening: max_update_norm off" in log
    for client_id in clients:
        assert client_id in log and "accepted" in log
    if aggregator == "median":
        assert weights == {} and "no update has a weight" in run.data.params["influence"]
        assert all(a["influence"] is None for a in summary["accepted"])
    else:
        chosen = summary["selected"]
        assert len(chosen) == 1
        assert weights == {f"weight_{c}": float(c in chosen) for c in clients}
        assert run.data.metrics[f"selected_{chosen[0]}"] == 1.0
        assert f"selected: {chosen[0]}" in log


def test_a_decision_taken_stays_taken_when_an_old_round_is_run_again(federation):
    """Clearing an old round's promote in the UI must not move `champion` back to it."""
    spec, coordinator, clients = federation
    first = run_round_with_clients(spec, RunContext(run_id="old"), clients)
    second = run_round_with_clients(spec, RunContext(run_id="new"), clients)
    assert first["decision"] == "promoted" and second["decision"] == "promoted"
    again = coordinator.promote(first["round_id"])
    assert again["version"] == first["version"]
    alias = MlflowClient().get_model_version_by_alias(spec.model_name, "champion")
    assert str(alias.version) == second["version"]
