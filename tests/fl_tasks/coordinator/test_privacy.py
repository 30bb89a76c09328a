"""fl_tasks/coordinator/privacy.py and DP-FedAvg rounds: epsilon is dp-accounting's own for
the same events, the ledger counts each released round once (rolled-back ones included), the
budget stops dispatch, and the noisy mean follows its formula."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fl_tasks import protocol
from fl_tasks.aggregation import build
from fl_tasks.aggregation.clip import clip_update
from fl_tasks.aggregation.private import DPFedAvg, noisy_mean
from fl_tasks.coordinator import RunContext
from fl_tasks.coordinator.privacy import (PrivacyError, PrivacyEvent, PrivacyLedger, draw_silos, epsilon, main,
                                          noise_multiplier_for)
from fl_tasks.protocol.codec import decode_state
from fl_tasks.silo.privacy import noised_update
from tests.conftest import decide_round

logging.getLogger("absl").setLevel(logging.ERROR)


def poisson(round_id: str, z: float = 1.1, q: float = 0.5, n: int = 10) -> PrivacyEvent:
    return PrivacyEvent(round_id, z, "poisson", n, sample_rate=q)


# --- the accountant -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_epsilon_is_the_librarys_own_for_the_same_events(kind):
    events = [poisson(f"{i:06d}") for i in range(6)] + [poisson("000100", z=2.0, q=0.3)]
    account = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    for _ in range(6):
        account.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.1)))
    account.compose(dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(2.0)))
    expected = account.get_epsilon(1e-5)
    assert epsilon(events, 1e-5, kind) == pytest.approx(expected, rel=1e-9 if kind == "rdp" else 1e-3)
    assert 0 < expected < math.inf


def test_every_silo_each_round_is_the_plain_gaussian_and_fixed_size_counts_twice_the_sensitivity():
    every = [PrivacyEvent("000001", 1.5, "all", 4), PrivacyEvent("000002", 1.5, "all", 4)]
    account = rdp.RdpAccountant()
    account.compose(dp_accounting.GaussianDpEvent(1.5), 2)
    assert epsilon(every, 1e-6) == pytest.approx(account.get_epsilon(1e-6), rel=1e-9)

    fixed = [PrivacyEvent(f"{i:06d}", 2.0, "fixed", 10, sample_size=4) for i in range(3)]
    replace_one = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    replace_one.compose(dp_accounting.SampledWithoutReplacementDpEvent(10, 4, dp_accounting.GaussianDpEvent(1.0)), 3)
    assert epsilon(fixed, 1e-5) == pytest.approx(replace_one.get_epsilon(1e-5), rel=1e-9)
    assert epsilon([], 1e-5) == 0.0


def test_a_ledger_mixing_replace_one_and_add_remove_events_is_refused():
    with pytest.raises(PrivacyError, match="mixes fixed-size sampling"):
        epsilon([poisson("000001"), PrivacyEvent("000002", 1.0, "fixed", 10, sample_size=4)], 1e-5)


def test_the_noise_multiplier_for_a_target_epsilon_lands_on_it():
    z = noise_multiplier_for(4.0, 1e-5, rounds=20, population=10, sample_rate=0.5)
    events = [poisson(f"{i:06d}", z=z) for i in range(20)]
    assert epsilon(events, 1e-5) <= 4.0 + 1e-6
    assert epsilon([poisson(f"{i:06d}", z=z * 0.97) for i in range(20)], 1e-5) > 4.0
    with pytest.raises(PrivacyError, match="rounds must be at least 1"):
        noise_multiplier_for(4.0, 1e-5, rounds=0, population=10)


def test_the_cli_prints_the_noise_multiplier_and_names_a_bad_argument(capsys):
    assert main(["noise", "--epsilon", "8", "--rounds", "10", "--silos", "5", "--sample-rate", "0.6"]) == 0
    answer = json.loads(capsys.readouterr().out)
    z = answer["noise_multiplier"]
    assert epsilon([poisson(f"{i:06d}", z=z, q=0.6, n=5) for i in range(10)], 1e-5) <= 8.0
    assert main(["noise", "--epsilon", "8", "--rounds", "0", "--silos", "5"]) == 2
    assert "rounds must be at least 1" in capsys.readouterr().err


# --- the ledger -----------------------------------------------------------------------------
def test_the_ledger_keeps_one_event_per_round_and_rebuilds_the_accountant(s3_server):
    from fl_tasks.protocol.storage import ObjectStore

    store = ObjectStore(s3_server.url)
    store.ensure_bucket("ledger-test")
    ledger = PrivacyLedger(store, "ledger-test", "fed-a")
    assert ledger.events() == []
    ledger.record(poisson("000001"))
    ledger.record(poisson("000001"))  # a re-run of the same round's aggregate
    ledger.record(poisson("000002"))
    again = PrivacyLedger(store, "ledger-test", "fed-a").events()
    assert [e.round_id for e in again] == ["000001", "000002"]
    privacy = {"delta": 1e-5, "accountant": "rdp", "max_epsilon": None}
    budget = ledger.budget(privacy, poisson("000003"))
    assert budget.spent == pytest.approx(epsilon(again, 1e-5))
    assert budget.after_next == pytest.approx(epsilon(again + [poisson("000003")], 1e-5))
    assert budget.rounds == 2 and not budget.exceeded
    tight = ledger.budget({**privacy, "max_epsilon": budget.spent + 1e-9}, poisson("000003"))
    assert tight.exceeded and "over privacy.max_epsilon" in tight.refusal() and "Fix:" in tight.refusal()


def test_sampling_draws_the_configured_silos():
    from fl_tasks.config import PrivacySpec

    clients = [f"s{i}" for i in range(20)]
    assert draw_silos(PrivacySpec(sampling="all"), clients) == clients
    fixed = draw_silos(PrivacySpec(sampling="fixed", sample_size=7), clients)
    assert len(fixed) == 7 == len(set(fixed)) and set(fixed) <= set(clients)
    counts = [len(draw_silos(PrivacySpec(sample_rate=0.3), clients)) for _ in range(400)]
    assert 0.25 < np.mean(counts) / 20 < 0.35 and len(set(counts)) > 3


# --- the noisy mean -------------------------------------------------------------------------
def small_case():
    base = {"w": np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32), "b": np.array([0.5], dtype=np.float32),
            "steps": np.array(4, dtype=np.int64)}
    updates = [{"w": base["w"] + 3.0, "b": base["b"] + 4.0, "steps": np.array(6, dtype=np.int64)},  # norm 10: clipped
               {"w": base["w"] + 0.1, "b": base["b"] - 0.2, "steps": np.array(8, dtype=np.int64)}]
    return base, updates


def test_dp_fedavg_matches_its_formula_on_a_small_case():
    base, updates = small_case()
    clip, denominator, std, seed = 1.0, 2.5, 0.3, 1234
    result = DPFedAvg(build("fedavg"), clip, denominator, std, seed).aggregate(base, [(u, 999) for u in updates])
    clipped = [clip_update(u, base, clip) for u in updates]
    rng = np.random.default_rng(seed)
    for name in ("b", "w"):  # sorted-name order of the draws
        total = sum(np.asarray(c[name], np.float64) - base[name] for c in clipped)
        expected = base[name] + (total + rng.normal(0, std, base[name].shape)) / denominator
        np.testing.assert_allclose(result[name], expected, rtol=0, atol=1e-6)
        assert result[name].dtype == np.float32
    assert result["steps"] == 7 and result["steps"].dtype == np.int64
    # Example counts play no part, and the same seed gives the same model.
    again = DPFedAvg(build("fedavg"), clip, denominator, std, seed).aggregate(base, [(updates[0], 1), (updates[1], 5)])
    np.testing.assert_array_equal(again["w"], result["w"])
    np.testing.assert_array_equal(noisy_mean(base, {"w": np.zeros((2, 2)), "b": np.zeros(1)}, 1.0, 0.0, 1)["w"],
                                  base["w"])


def test_dp_fedavg_feeds_the_noisy_mean_to_a_server_optimiser():
    base, updates = small_case()
    plain = DPFedAvg(build("fedavg"), 1.0, 2.0, 0.0, 7).aggregate(base, [(u, 1) for u in updates])
    momentum = build("fedavgm", eta=0.5)
    stepped = DPFedAvg(momentum, 1.0, 2.0, 0.0, 7).aggregate(base, [(u, 1) for u in updates])
    # One server step of lr 0.5 from the base towards the private mean: half way.
    np.testing.assert_allclose(stepped["w"], base["w"] + 0.5 * (plain["w"] - base["w"]), atol=1e-6)


def test_the_silo_clips_then_adds_its_noise():
    base, updates = small_case()
    quiet = noised_update(updates[0], base, 1.0, 0.0)
    delta = np.concatenate([(quiet[n] - base[n]).ravel() for n in ("b", "w")])
    assert np.linalg.norm(delta) == pytest.approx(1.0, rel=1e-6)
    big = {"w": np.zeros((400, 500), np.float32), "bn.running_var": np.ones(1000, np.float32)}
    noisy = noised_update(big, big, 1.0, 0.25, {"*running_var": (0.0, math.inf)}, np.random.default_rng(3))
    assert np.std(noisy["w"]) == pytest.approx(0.25, rel=0.02) and noisy["w"].dtype == np.float32
    assert np.min(noisy["bn.running_var"]) >= 0 and np.std(noisy["bn.running_var"]) > 0.2


# --- rounds ---------------------------------------------------------------------------------
# Three silos cannot buy a useful model with any noise that means something: these rounds test
# the accounting, so the gates pass whatever the noise did to the model.
PRIVATE = {"privacy": {"clip_norm": 0.5, "noise_multiplier": 0.5, "sampling": "all", "delta": 1e-5},
           "gates": {"thresholds": {"roc_auc": 0.0}, "max_regression": 1.0}}


def play(coordinator, clients, run_id: str, params: dict | None = None) -> dict:
    round_id = coordinator.prepare(RunContext(run_id=run_id, params=params or {}))
    try:
        coordinator.dispatch(round_id)
    except Exception:
        return coordinator.summarize(round_id)
    for client_id in coordinator.load_plan(round_id).clients:
        assert clients[client_id].answer(round_id)
    coordinator.close_round(round_id, coordinator.check_quorum(round_id))
    coordinator.aggregate(round_id)
    return decide_round(coordinator, round_id)


def test_private_rounds_spend_their_budget_once_then_dispatch_stops(make_federation):
    import mlflow

    spec, coordinator, clients = make_federation(**PRIVATE)
    first = play(coordinator, clients, "dp-1")
    events = coordinator.ledger.events()
    assert first["decision"] == "promoted" and [e.round_id for e in events] == [first["round_id"]]
    spent = epsilon(events, 1e-5)
    assert first["privacy"]["epsilon"] == pytest.approx(spent) and first["metrics"]["dp_epsilon"] == pytest.approx(spent)
    version = mlflow.MlflowClient().get_model_version(spec.model_name, first["version"])
    assert float(version.tags["fl.dp_epsilon"]) == pytest.approx(spent, abs=1e-4)
    run = mlflow.MlflowClient().get_run(version.run_id)
    assert run.data.metrics["dp_epsilon"] == pytest.approx(spent)
    assert run.data.params["privacy_noise_multiplier"] == "0.5"
    assert "DP-FedAvg" in coordinator.records.get_json(first["round_id"], "candidate/manifest.json")["rule"]

    # A re-run of the aggregate step: the same noise, the same candidate, no second event.
    before = coordinator.records.get_json(first["round_id"], "candidate/manifest.json")["candidate_sha256"]
    coordinator.records.store.delete(coordinator.bucket, coordinator.round_key(first["round_id"],
                                                                               "candidate/manifest.json"))
    assert coordinator.aggregate(first["round_id"])["candidate_sha256"] == before
    assert len(coordinator.ledger.events()) == 1

    # A rolled-back round released its candidate (MLflow, the gates): it spends too.
    second = play(coordinator, clients, "dp-2", {"gate_thresholds": {"roc_auc": 0.9999}})
    assert second["decision"] == "rejected"
    events = coordinator.ledger.events()
    assert [e.round_id for e in events] == [first["round_id"], second["round_id"]]
    assert second["privacy"]["epsilon"] == pytest.approx(epsilon(events, 1e-5))
    assert epsilon(events, 1e-5) > spent

    # The budget: the next round would pass max_epsilon, so it is refused before any silo hears of it.
    now_spent, after = epsilon(events, 1e-5), epsilon(events + [PrivacyEvent("x", 0.5, "all", len(clients))], 1e-5)
    coordinator.spec = replace(spec, privacy=replace(spec.privacy, max_epsilon=(now_spent + after) / 2))
    refused = play(coordinator, clients, "dp-3")
    assert refused["decision"] == "refused" and "privacy budget" in refused["reason"]
    assert "over privacy.max_epsilon" in refused["reason"] and "Fix:" in refused["reason"]
    assert [a["kind"] for a in refused["alerts"]] == ["privacy_budget"]
    assert len(coordinator.ledger.events()) == 2 and refused["privacy"]["round_released"] is False
    assert not any(coordinator.store.exists(c.bucket_name, protocol.global_manifest_key(
        c.prefix, spec.federation, refused["round_id"])) for c in spec.clients)


def test_a_round_that_fails_before_its_aggregate_spends_nothing(make_federation):
    spec, coordinator, clients = make_federation(**PRIVATE)
    round_id = coordinator.prepare(RunContext(run_id="dp-quiet"))
    coordinator.dispatch(round_id)
    clients["silo-0"].answer(round_id)  # one update, quorum 2: the round fails at the deadline
    from datetime import datetime, timedelta, timezone

    late = datetime.fromisoformat(coordinator.load_plan(round_id).deadline) + timedelta(seconds=1)
    coordinator.close_round(round_id, coordinator.check_quorum(round_id, late.astimezone(timezone.utc)))
    with pytest.raises(Exception):
        coordinator.aggregate(round_id)
    report = coordinator.summarize(round_id)
    assert report["decision"] == "no_model" and coordinator.ledger.events() == []
    assert report["privacy"]["epsilon"] == 0.0 and report["privacy"]["round_released"] is False


def test_noise_at_the_silos_and_sampling_in_the_plan(make_federation):
    spec, coordinator, clients = make_federation(num_clients=4, privacy={
        "clip_norm": 2.0, "noise_multiplier": 0.8, "noise": "silos", "sampling": "fixed", "sample_size": 3},
        gates=PRIVATE["gates"])
    round_id = coordinator.prepare(RunContext(run_id="dp-silos"))
    plan = coordinator.load_plan(round_id)
    assert len(plan.clients) == 3 and plan.privacy["sampled"] == plan.clients and plan.privacy["denominator"] == 3
    assert plan.privacy["silo_noise_stddev"] == pytest.approx(0.8 * 2.0 / math.sqrt(3))
    reached = coordinator.dispatch(round_id)
    assert reached == plan.clients
    left_out = next(c for c in spec.clients if c.id not in plan.clients)
    assert not coordinator.store.exists(left_out.bucket_name, protocol.global_manifest_key(
        left_out.prefix, spec.federation, round_id))
    for client_id in plan.clients:
        assert clients[client_id].answer(round_id)
    base = decode_state(coordinator.records.get(round_id, "base/model.safetensors"))
    payload = coordinator.store.get_bytes(spec.client(plan.clients[0]).bucket_name, protocol.update_payload_key(
        spec.client(plan.clients[0]).prefix, spec.federation, round_id))
    sent = decode_state(payload)
    weights = [n for n in sorted(base) if n.endswith(("weight", "bias"))]
    delta = np.concatenate([(sent[n] - base[n]).ravel() for n in weights])
    # Mostly noise: the clipped change is 2.0 over hundreds of weights, the noise about 0.9 on each.
    assert np.std(delta) == pytest.approx(plan.privacy["silo_noise_stddev"], rel=0.15)
    assert all(np.min(sent[n]) >= 0 for n in base if n.endswith("running_var"))  # clamped into the task's range
    coordinator.close_round(round_id, coordinator.check_quorum(round_id))
    summary = coordinator.aggregate(round_id)
    assert "the silos clipped to norm 2" in summary["rule"] and "std 0 added" in summary["rule"]
    assert [e.sampling for e in coordinator.ledger.events()] == ["fixed"]


def test_a_sample_below_the_quorum_is_refused_without_spending(make_federation, monkeypatch):
    import fl_tasks.coordinator.privacy as privacy

    spec, coordinator, clients = make_federation(privacy={**PRIVATE["privacy"], "sampling": "poisson",
                                                          "sample_rate": 0.9}, gates=PRIVATE["gates"])
    monkeypatch.setattr(privacy, "draw_silos", lambda p, ids: ids[:1])  # an unlucky draw: one silo of three
    report = play(coordinator, clients, "dp-small")
    assert report["decision"] == "refused" and "drew 1 of 3 silos, fewer than the quorum 2" in report["reason"]
    assert report["alerts"] == [] and coordinator.ledger.events() == []
    # Refused on purpose: the circuit breaker does not count it as a failure.
    assert coordinator.breaker.state(coordinator.history.rounds()).streak == []


# --- the federation file --------------------------------------------------------------------
@pytest.mark.parametrize("privacy, aggregation, field, needle", [
    ({"noise_multiplier": 0}, "fedavg", "privacy.noise_multiplier", "must be positive"),
    ({"noise": "everywhere"}, "fedavg", "privacy.noise", "unknown noise placement 'everywhere'"),
    ({"sampling": "fixed"}, "fedavg", "privacy.sample_size", "is needed with sampling 'fixed'"),
    ({"sampling": "fixed", "sample_size": 9}, "fedavg", "privacy.sample_size", "must be in 1..3"),
    ({"sampling": "all", "sample_rate": 0.5}, "fedavg", "privacy.sample_rate", "applies to poisson sampling only"),
    ({"sampling": "fixed", "sample_size": 2, "accountant": "pld"}, "fedavg", "privacy.accountant",
     "PLD accountant has no fixed-size sampling"),
    ({"sample_rate": 0.3}, "fedavg", "privacy.sample_rate", "fewer than quorum.min_clients 2"),
    ({"delta": 1.5}, "fedavg", "privacy.delta", "must be in (0, 1)"),
    ({}, "median", "aggregation.strategy", "median does not average the updates"),
])
def test_the_privacy_section_names_the_field_and_the_fix(privacy, aggregation, field, needle):
    from fl_tasks.config import ConfigError, parse_federation
    from tests.conftest import federation_doc

    doc = federation_doc(privacy=privacy, aggregation=aggregation)
    with pytest.raises(ConfigError) as error:
        parse_federation(doc, "fed.yaml")
    assert error.value.field_path == field and needle in error.value.problem and "Fix:" in str(error.value)


def test_a_run_cannot_switch_a_private_federation_to_a_robust_rule(make_federation):
    from fl_tasks.coordinator.plan import RoundFailed

    spec, coordinator, _ = make_federation(**PRIVATE)
    with pytest.raises((RoundFailed, ValueError), match="differential privacy, which needs one of fedavg"):
        coordinator.prepare(RunContext(run_id="dp-median", params={"aggregator": "median"}))
