"""Federated evaluation through the coordinator's steps: the silos score the candidate and the
champion on their own evaluation share, the gates read those figures, and every answer a silo
writes is screened (the hostile-evaluation corpus). Moto S3, SQLite MLflow, in-process agents.
The lying, sandbagging and silent evaluators run as real DAG runs in
tests/integration/test_dag_rounds.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import pytest
from mlflow import MlflowClient

from fl_tasks import protocol
from fl_tasks.aggregation.mean import cap_shares
from fl_tasks.config import FederationSpec
from fl_tasks.coordinator import Coordinator, RunContext, quorum
from fl_tasks.coordinator.evaluation import (federated_figures, federated_gates, median, screen_evaluation,
                                             silo_regressions, weighted_mean)
from fl_tasks.protocol import EvaluationManifest, EvaluationRequest
from fl_tasks.silo.agent import SiloAgent
from fl_tasks.protocol.signing import sign_manifest
from fl_tasks.silo.holdout import split_rows
from fl_tasks.tasks.api import Metric, load_model_state
from fl_tasks.protocol.codec import decode_state

from tests.conftest import decide_round, federation_doc, merged, signed_federation

CLIENTS = tuple(f"silo-{i}" for i in range(4))
HOSTILE = "silo-3"
KEYS = {c: f"{c}-evaluation-key-{c[-1] * 8}" for c in CLIENTS}
SETTINGS = {"security": {"require_signatures": True}, "training": {"local_epochs": 1},
            "simulation": {"rows": 8000, "seed": 6}, "quorum": {"min_clients": 2, "round_timeout_minutes": 30},
            "gates": {"thresholds": {"roc_auc": 0.5}, "max_regression": 0.5},
            "evaluation": {"federated": {"min_silos": 3, "timeout_minutes": 30, "holdout_fraction": 0.25},
                           "coordinator_data": ""}}
METRICS = (Metric("roc_auc", True, 0.0, 1.0), Metric("pr_auc", True, 0.0, 1.0))


# --- the figures, against their formulas ------------------------------------------------------

def test_weighted_mean_and_median_follow_their_formulas():
    assert weighted_mean([0.5, 0.9], [3, 1]) == pytest.approx((3 * 0.5 + 0.9) / 4)
    assert median([0.3, 0.9, 0.1]) == 0.3
    assert median([0.4, 0.1, 0.9, 0.2]) == pytest.approx((0.2 + 0.4) / 2)
    with pytest.raises(ValueError):
        weighted_mean([], [])
    with pytest.raises(ValueError):
        median([])


def silo(examples: int, candidate: float, champion: float | None = None) -> dict[str, Any]:
    scores = {"candidate": {"roc_auc": candidate, "pr_auc": candidate / 2}}
    if champion is not None:
        scores["champion"] = {"roc_auc": champion, "pr_auc": champion / 2}
    return {"num_examples": examples, "rows_held": examples * 4, "scores": scores}


def test_figures_weigh_silos_by_rows_with_no_silo_over_the_cap():
    results = {"a": silo(100, 0.8), "b": silo(100, 0.6), "c": silo(10_000, 1.0)}
    figures = federated_figures(results, max_share=0.5)
    weights = cap_shares([100.0, 100.0, 10_000.0], 0.5)
    assert figures["mean"]["candidate"]["roc_auc"] == pytest.approx(weighted_mean([0.8, 0.6, 1.0], weights))
    assert figures["weights"]["c"] == pytest.approx(0.5)  # the big (or lying) silo holds half, not 98%
    assert figures["median"]["candidate"]["roc_auc"] == 0.8
    uncapped = federated_figures(results, max_share=None)
    assert uncapped["mean"]["candidate"]["roc_auc"] > 0.99


def test_one_inflated_silo_moves_the_mean_but_not_the_median():
    honest = {c: silo(500, 0.7, 0.75) for c in ("a", "b", "c")}
    lying = {**honest, "liar": silo(500_000, 1.0, 0.75)}
    assert federated_figures(lying, None)["median"]["candidate"]["roc_auc"] == pytest.approx(0.7)
    closed = {"not_counted": {}}
    thresholds = {"roc_auc": 0.9}
    by_mean = federated_gates(lying, federated_figures(lying, None), "mean", 3, closed, thresholds, 1.0, None, TASK)
    by_median = federated_gates(lying, federated_figures(lying, None), "median", 3, closed, thresholds, 1.0, None,
                                TASK)
    assert all(g["passed"] for g in by_mean)  # the liar carries the mean over the threshold
    failed = [g for g in by_median if not g["passed"]]
    assert [g["name"] for g in failed] == ["min_roc_auc"] and "median over 4 silos" in failed[0]["detail"]


class _Task:
    metrics = METRICS
    primary_metric = "pr_auc"

    def metric(self, name):
        return next(m for m in self.metrics if m.name == name)

    @property
    def primary(self):
        return self.metric(self.primary_metric)


TASK = _Task()


def test_per_silo_regression_names_the_silo_and_its_drop():
    results = {"a": silo(500, 0.80, 0.80), "b": silo(500, 0.60, 0.80), "c": silo(500, 0.81, 0.80)}
    assert silo_regressions(results, TASK.primary, 0.05) == {"b": pytest.approx(0.10)}
    gates = federated_gates(results, federated_figures(results, 0.5), "mean", 2, {"not_counted": {}}, {}, 1.0,
                            0.05, TASK)
    gate = next(g for g in gates if g["name"] == "max_silo_regression")
    assert not gate["passed"] and gate["silos"] == ["b"] and "b +0.1000 > 0.0500" in gate["detail"]


def test_too_few_silos_fails_its_gate_and_names_who_did_not_count():
    gates = federated_gates({"a": silo(10, 0.9)}, federated_figures({"a": silo(10, 0.9)}, 0.5), "median", 2,
                            {"not_counted": {"b": "no answer by the deadline", "c": "declined: no rows"}}, {}, 1.0,
                            None, TASK)
    assert gates[0]["name"] == "min_evaluating_silos" and not gates[0]["passed"]
    assert "b: no answer by the deadline" in gates[0]["detail"] and "c: declined: no rows" in gates[0]["detail"]


def manifest(**changes: Any) -> EvaluationManifest:
    base = EvaluationManifest(client_id="a", federation="f", round_id="000001", request_sha256="1" * 64,
                              num_examples=100, rows_held=500,
                              scores={"candidate": {"roc_auc": 0.9, "pr_auc": 0.4}})
    return replace(base, **changes)


@pytest.mark.parametrize("changes, trained, max_examples, reason", [
    ({}, 400, 500, None),
    ({"scores": {"candidate": {"roc_auc": 1.5, "pr_auc": 0.4}}}, None, None, "outside the metric's range"),
    ({"scores": {"candidate": {"roc_auc": 0.9}}}, None, None, "reports metrics ['roc_auc']"),
    ({"scores": {"candidate": {"roc_auc": 0.9, "pr_auc": 0.4, "f1": 0.5}}}, None, None, "reports metrics"),
    ({"scores": {"candidate": {"roc_auc": 0.9, "pr_auc": 0.4}, "champion": {"roc_auc": 0.9, "pr_auc": 0.4}}},
     None, None, "the request asked for ['candidate']"),
    ({}, 401, None, "exceed the 500 rows it says it holds"),
    ({}, None, 499, "over the client's declared max_examples 499"),
])
def test_screen_evaluation(changes, trained, max_examples, reason):
    found = screen_evaluation(manifest(**changes), ["candidate"], METRICS, trained, max_examples)
    assert found == reason if reason is None else reason in found


# --- rounds with real silos ---------------------------------------------------------------------

@dataclass
class Federation:
    spec: FederationSpec
    coordinator: Coordinator
    silos: dict[str, SiloAgent]
    data: Any

    def bucket(self, client: str) -> str:
        return self.spec.client(client).bucket_name


def build(tmp_path, **overrides: Any) -> Federation:
    return Federation(*signed_federation(tmp_path, federation_doc(num_clients=len(CLIENTS),
                                                                  **merged(SETTINGS, overrides)), KEYS))


@pytest.fixture(scope="module")
def federation(s3_server, mlflow_db, tmp_path_factory) -> Federation:
    return build(tmp_path_factory.mktemp("federated-evaluation"))


def train(fed: Federation, run_id: str) -> str:
    """A round up to its evaluation request: every silo trains, the candidate is built."""
    c = fed.coordinator
    round_id = c.prepare(RunContext(run_id=run_id))
    c.dispatch(round_id)
    for agent in fed.silos.values():
        agent.answer(round_id)
    c.close_round(round_id, c.check_quorum(round_id))
    c.aggregate(round_id)
    assert c.request_evaluation(round_id) == sorted(fed.silos)
    return round_id


def decide(fed: Federation, round_id: str, evaluators: tuple[str, ...] = CLIENTS) -> dict[str, Any]:
    c = fed.coordinator
    for client in evaluators:
        fed.silos[client].evaluate(round_id)
    decision = c.check_evaluations(round_id)
    assert decision.state == quorum.MET
    c.close_evaluation(round_id, decision)
    decide_round(c, round_id)
    return c.records.get_json(round_id, "validation.json")


@pytest.fixture(scope="module")
def two_rounds(federation) -> dict[str, Any]:
    """Round 1 from the seed (promoted), round 2 from that champion."""
    first = train(federation, "fed-eval-1")
    first_result = decide(federation, first)
    second = train(federation, "fed-eval-2")
    second_result = decide(federation, second)
    return {"ids": (first, second), "results": (first_result, second_result)}


def test_the_silos_scores_decide_and_the_coordinator_holds_no_rows(federation, two_rounds):
    fed = federation
    first, second = two_rounds["results"]
    assert first["sources"] == ["federated"] and first["coordinator_evaluation"] is None
    assert sorted(first["federated_evaluation"]["per_silo"]) == list(CLIENTS)
    assert all(set(r["scores"]) == {"candidate"} for r in first["federated_evaluation"]["per_silo"].values())  # seed base
    assert fed.coordinator.records.get_json(two_rounds["ids"][0], "decision.json")["decision"] == "promoted"
    # Round 2: candidate and champion on each silo's own share; the deciding figure is the mean.
    per_silo = second["federated_evaluation"]["per_silo"]
    assert all(set(r["scores"]) == {"candidate", "champion"} for r in per_silo.values())
    figures = federated_figures(per_silo, fed.spec.max_weight_share)
    assert second["candidate"] == pytest.approx(figures["mean"]["candidate"])
    clients = sorted(per_silo)
    weights = cap_shares([float(per_silo[c]["num_examples"]) for c in clients], fed.spec.max_weight_share)
    assert second["candidate"]["pr_auc"] == pytest.approx(
        weighted_mean([per_silo[c]["scores"]["candidate"]["pr_auc"] for c in clients], weights))
    assert {g["source"] for g in second["gates"]} == {"federated"}
    report = fed.coordinator.records.get_json(two_rounds["ids"][1], "report.json")
    assert report["evaluation_sources"] == ["federated"] and report["decided_by"] == ["federated"]


def test_the_evaluation_steps_are_safe_to_run_again(federation, two_rounds):
    """A retried or cleared task finds its own earlier writes: the same request in every silo's
    bucket, the same close, the same verdict, and each audit event once."""
    fed, round_id = federation, two_rounds["ids"][1]
    c = fed.coordinator
    key = protocol.evaluation_request_key("", fed.spec.federation, round_id)
    before = {client: fed.coordinator.store.get_bytes(fed.bucket(client), key) for client in CLIENTS}
    closed = c.records.get_json(round_id, "evaluation/quorum.json")
    assert c.request_evaluation(round_id) == list(CLIENTS)
    assert {client: fed.coordinator.store.get_bytes(fed.bucket(client), key) for client in CLIENTS} == before
    assert c.close_evaluation(round_id, quorum.QuorumDecision(quorum.FAILED, (), "a later, different close")) \
        == closed
    assert c.validate(round_id) == two_rounds["results"][1]
    events = [e["event"] for e in c.audit.events(round_id)]
    assert events.count("evaluation_closed") == 1 and events.count("gates_evaluated") == 1
    assert events.count("evaluation_requested") == len(CLIENTS)


def test_each_silo_scores_on_the_share_it_never_trained_on(federation, two_rounds):
    fed = federation
    round_id = two_rounds["ids"][1]
    task = fed.spec.load_task()
    champion = load_model_state(task.build_model(), decode_state(
        fed.coordinator.records.get(round_id, "base/model.safetensors")))
    fraction = fed.spec.evaluation.federated.holdout_fraction
    for client, agent in fed.silos.items():
        rows = pd.read_parquet(fed.data.silos[client])
        training, held = split_rows(rows, fraction, agent.salt)
        assert 0 < len(held) < len(rows) and len(training) + len(held) == len(rows)
        update = protocol.UpdateManifest.from_json(fed.coordinator.store.get_bytes(
            fed.bucket(client), protocol.update_manifest_key("", fed.spec.federation, round_id)))
        assert update.num_examples == len(training)  # the evaluation share stays out of training
        scored = two_rounds["results"][1]["federated_evaluation"]["per_silo"][client]
        assert scored["num_examples"] == len(held) and scored["rows_held"] == len(rows)
        assert scored["scores"]["champion"] == pytest.approx(task.evaluate(champion, held))


def test_mlflow_records_each_silos_numbers_and_the_evaluators(federation, two_rounds):
    fed = federation
    client = MlflowClient()
    version = fed.coordinator.registration(two_rounds["ids"][1])["version"]
    found = client.get_model_version(fed.spec.model_name, version)
    assert found.tags["fl.evaluated_by"] == ",".join(CLIENTS)
    assert found.tags["fl.evaluation_sources"] == "federated"
    assert "silo-0 pr_auc" in found.tags["fl.evaluation"] and "(champion " in found.tags["fl.evaluation"]
    metrics = client.get_run(found.run_id).data.metrics
    per_silo = two_rounds["results"][1]["federated_evaluation"]["per_silo"]
    for name in CLIENTS:
        assert metrics[f"silo_{name}_candidate_pr_auc"] == pytest.approx(per_silo[name]["scores"]["candidate"]["pr_auc"])
        assert metrics[f"silo_{name}_champion_roc_auc"] == pytest.approx(per_silo[name]["scores"]["champion"]["roc_auc"])
    assert metrics["silos_evaluated"] == len(CLIENTS)


def test_an_evaluation_only_run_scores_the_champion_and_a_named_version(federation, two_rounds):
    fed = federation
    c = fed.coordinator
    evaluation_id = c.prepare_evaluation(RunContext(run_id="check-1", params={"version": "1"}))
    assert evaluation_id.startswith("eval-")
    assert c.prepare_evaluation(RunContext(run_id="check-1", params={"version": "1"})) == evaluation_id  # re-run
    assert c.request_evaluation(evaluation_id) == list(CLIENTS)
    request = EvaluationRequest.from_json(fed.coordinator.store.get_bytes(
        fed.bucket("silo-0"), protocol.evaluation_request_key("", fed.spec.federation, evaluation_id)))
    champion = c.registration(two_rounds["ids"][1])["version"] if c.records.get_json(
        two_rounds["ids"][1], "decision.json")["decision"] == "promoted" else "1"
    assert set(request.models) == ({"champion"} if champion == "1" else {"champion", "version-1"})
    for agent in fed.silos.values():
        assert agent.evaluate(evaluation_id)
    c.close_evaluation(evaluation_id, c.check_evaluations(evaluation_id))
    result = c.report_evaluation(evaluation_id)
    assert sorted(result["per_silo"]) == list(CLIENTS) and result["enough_silos"]
    run = MlflowClient().get_run(result["mlflow_run_id"])
    assert run.data.tags["fl.evaluation_id"] == evaluation_id
    assert run.data.metrics["median_champion_pr_auc"] == pytest.approx(result["figures"]["median"]["champion"]["pr_auc"])
    tag = MlflowClient().get_model_version(fed.spec.model_name, champion).tags["fl.last_evaluation"]
    assert tag.startswith(f"{evaluation_id}: mean over 4 silos")
    # No new version, no move of the alias: an evaluation registers nothing.
    assert len(MlflowClient().search_model_versions(f"name = '{fed.spec.model_name}'")) == 2
    # The monitoring DAG reads the champion's figures from here when they are the newest.
    last = c.history.last_evaluation()
    assert (last["evaluation_id"], last["version"]) == (evaluation_id, champion)
    assert last["figures"] == result["figures"]["mean"]["champion"]


# --- the hostile-evaluation corpus: what one silo can write as its answer ---------------------------

def honest(fed: Federation, evaluation_id: str) -> EvaluationManifest:
    """What HOSTILE's agent would commit (read back, then removed so a case can replace it)."""
    store, key = fed.coordinator.store, protocol.evaluation_result_key("", fed.spec.federation, evaluation_id)
    assert fed.silos[HOSTILE].evaluate(evaluation_id)
    found = EvaluationManifest.from_json(store.get_bytes(fed.bucket(HOSTILE), key))
    store.delete(fed.bucket(HOSTILE), key)
    return found


def signed(manifest: EvaluationManifest, key: str = KEYS[HOSTILE]) -> bytes:
    return sign_manifest(replace(manifest, signature=""), key).to_json()


def body(manifest: EvaluationManifest, **fields: Any) -> bytes:
    """The manifest as JSON with fields changed or added after signing (no valid signature)."""
    raw = json.loads(manifest.to_json())
    raw.update(fields)
    return json.dumps(raw).encode()


CASES: dict[str, tuple[Callable[[EvaluationManifest], bytes], str]] = {
    "bound to another request": (lambda m: signed(replace(m, request_sha256="0" * 64)), "request_sha256"),
    "another client's name": (lambda m: signed(replace(m, client_id="silo-0")), "client_id"),
    "unsigned": (lambda m: replace(m, signature="").to_json(), "unsigned evaluation"),
    "signed with another key": (lambda m: signed(m, KEYS["silo-0"]), "signature does not match"),
    "altered after signing": (lambda m: body(m, num_examples=m.num_examples + 1), "signature does not match"),
    "unknown field": (lambda m: body(m, comment="trust me"), "unknown fields ['comment']"),
    "NaN metric": (lambda m: m.to_json().replace(b'"pr_auc":', b'"pr_auc":NaN,"x":', 1), "not valid JSON"),
    "a boolean count": (lambda m: body(m, num_examples=True), "has type bool"),
    "more scored rows than held": (lambda m: signed(replace(m, rows_held=m.num_examples - 1)), "rows_held"),
    "metric out of range": (lambda m: signed(replace(m, scores={"champion": {**m.scores["champion"], "roc_auc": 1.2}})),
                            "outside the metric's range"),
    "a metric missing": (lambda m: signed(replace(m, scores={"champion": {"roc_auc": 0.9}})), "reports metrics"),
    "a model not asked for": (lambda m: signed(replace(m, scores={**m.scores, "candidate": m.scores["champion"]})),
                              "the request asked for ['champion']"),
    "byte-order mark": (lambda m: b"\xef\xbb\xbf" + signed(m), "byte-order mark"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_evaluation_is_not_counted_and_the_audit_says_why(federation, two_rounds, case):
    fed = federation
    c = fed.coordinator
    make, reason = CASES[case]
    evaluation_id = c.prepare_evaluation(RunContext(run_id=f"hostile-{case}"))
    c.request_evaluation(evaluation_id)
    written = make(honest(fed, evaluation_id))
    fed.coordinator.store.put_bytes(fed.bucket(HOSTILE), protocol.evaluation_result_key(
        "", fed.spec.federation, evaluation_id), written)
    for client in CLIENTS:
        if client != HOSTILE:
            assert fed.silos[client].evaluate(evaluation_id)
    c.close_evaluation(evaluation_id, c.check_evaluations(evaluation_id))
    result = c.report_evaluation(evaluation_id)
    assert sorted(result["per_silo"]) == [x for x in CLIENTS if x != HOSTILE]
    assert reason in result["not_counted"][HOSTILE]
    events = [json.loads(line) for line in c.audit.jsonl(evaluation_id).decode().splitlines()]
    rejected = [e for e in events if e["event"] == "evaluation_rejected" and e["client_id"] == HOSTILE]
    assert rejected and reason in rejected[0]["reason"]
