"""Federated evaluation: the silos score the candidate and the champion on their own data.

The coordinator holds no rows. After aggregation it publishes the models to every silo whose
update it accepted (payloads first, the request manifest last, as dispatch does); each silo
scores them on its evaluation share, the rows it never trains on, and commits a signed
evaluation manifest with the metrics and row counts only. The DAG waits for those answers
with the same deferrable sensor and trigger as for updates, with its own quorum
(`evaluation.federated.min_silos`) and deadline. An evaluation-only run (`fl_evaluate__<F>`)
asks every silo to score the champion and, optionally, one named version.

Every answer is hostile until screened (`screen_evaluation`): bound to this round, client and
request (so to the candidate's sha256), signed when required, strict schema, exactly the
requested models and the task's metrics, values finite and inside each metric's range, and
row counts that fit what the silo says it holds. The figures the gates read are plain
functions (`weighted_mean`, `median`) over the screened answers.

In the coordinator's bucket, for round (or evaluation) R:

    <F>/rounds/<R>/evaluation/plan.json              what is asked of whom, until when
    <F>/rounds/<R>/evaluation/request.json           the request every silo gets (its sha256 binds the answers)
    <F>/rounds/<R>/evaluation/quorum.json            who answered when the evaluation closed
    <F>/rounds/<R>/evaluation/results/<client>.json  each answer as the close read it
    <F>/rounds/<R>/evaluation/personal/<client>.safetensors  a silo's shared personal weights (share_weights)
    <F>/rounds/<R>/evaluation/report.json            an evaluation-only run's result
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from fl_tasks import protocol
from fl_tasks.aggregation.mean import cap_shares
from fl_tasks.coordinator import pools, quorum
from fl_tasks.coordinator.bucket import now
from fl_tasks.coordinator.intake import STORAGE_ERRORS, Answer, answer_record, storage_reason
from fl_tasks.config import ConfigError
from fl_tasks.coordinator.plan import RoundFailed, personalization_settings
from fl_tasks.protocol import EVALUATIONS, EvaluationManifest, EvaluationRequest, ManifestError, sha256_hex
from fl_tasks.protocol.personalization import PersonalizationSchemaError, PersonalReport, global_label

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
CHECK_PREFIX = "eval-"  # evaluation-only runs: eval-000001, eval-000002, ...


@dataclass(frozen=True)
class EvaluationPlan:
    """One evaluation: the models, the silos asked, the quorum and the deadline."""

    federation: str
    round_id: str
    run_id: str
    purpose: str  # round (after aggregation) | check (an evaluation-only run)
    clients: list[str]
    models: dict[str, dict[str, Any]]  # label -> {version, sha256, bytes, key (in the coordinator's bucket)}
    required: int
    deadline: str
    statistic: str
    max_weight_share: float | None
    require_signatures: bool
    request_sha256: str
    created_at: str
    # What the request asked of the silos' personal models (PersonalizationSettings as a dict); empty: nothing.
    personalization: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: bytes) -> "EvaluationPlan":
        return cls(**json.loads(data))


# --- the figures ---------------------------------------------------------------------------

def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """sum(w_i * x_i) / sum(w_i)."""
    total = float(sum(weights))
    if not values or total <= 0:
        raise ValueError("a weighted mean needs at least one value with a positive weight")
    return float(sum(w * x for w, x in zip(weights, values)) / total)


def median(values: Sequence[float]) -> float:
    """The middle value; the mean of the two middle values for an even count."""
    if not values:
        raise ValueError("the median of nothing")
    ordered = sorted(values)
    middle = len(ordered) // 2
    return float(ordered[middle]) if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2.0


def federated_figures(results: Mapping[str, Mapping[str, Any]], max_share: float | None) -> dict[str, Any]:
    """Per model and metric, the mean weighted by each silo's evaluation rows (no silo's weight
    above `max_share` of the total) and the median, over the silos in `results`
    ({client: {"num_examples", "scores": {label: {metric: value}}}})."""
    clients = sorted(results)
    weights = cap_shares([float(results[c]["num_examples"]) for c in clients], max_share)
    figures: dict[str, Any] = {"mean": {}, "median": {}, "silos": len(clients),
                               "weights": {c: w / sum(weights) for c, w in zip(clients, weights)}}
    if not clients:
        return figures
    for label in results[clients[0]]["scores"]:
        for metric in results[clients[0]]["scores"][label]:
            values = [float(results[c]["scores"][label][metric]) for c in clients]
            figures["mean"].setdefault(label, {})[metric] = weighted_mean(values, weights)
            figures["median"].setdefault(label, {})[metric] = median(values)
    return figures


def screen_evaluation(manifest: EvaluationManifest, labels: Sequence[str], metrics: Sequence,
                      trained_examples: int | None = None, max_examples: int | None = None) -> str | None:
    """Why a (verified, schema-checked) evaluation cannot count; None when it can.

    `metrics`: the task's Metric objects; `trained_examples`: the examples of this silo's
    accepted update this round (its training share); `max_examples`: the silo's declared size.
    """
    reason = screen_scores(manifest.scores, labels, metrics)
    if reason:
        return reason
    if trained_examples is not None and trained_examples + manifest.num_examples > manifest.rows_held:
        return (f"num_examples {manifest.num_examples} plus the {trained_examples} examples it trained on this "
                f"round exceed the {manifest.rows_held} rows it says it holds")
    if max_examples is not None and manifest.rows_held > max_examples:
        return f"rows_held {manifest.rows_held} is over the client's declared max_examples {max_examples}"
    return None


def screen_scores(scores: Mapping[str, Mapping[str, float]], labels: Sequence[str], metrics: Sequence,
                  where: str = "scores", asked: str = "the request asked for") -> str | None:
    """Why `scores` ({label: {metric: value}}) cannot count: other models than `labels`, other
    metrics than the task's, or a value outside its metric's range; None when they can."""
    if sorted(scores) != sorted(labels):
        return f"{where} models {sorted(scores)}, {asked} {sorted(labels)}"
    names = sorted(m.name for m in metrics)
    for label, values in scores.items():
        if sorted(values) != names:
            return f"{where}.{label} reports metrics {sorted(values)}, the task's are {names}"
        for metric in metrics:
            value = values[metric.name]
            if not (metric.low <= value <= metric.high):
                return f"{where}.{label}.{metric.name} {value!r} is outside the metric's range " \
                       f"[{metric.low:g}, {metric.high:g}]"
    return None


def screen_personal(block: Mapping[str, Any], settings: Mapping[str, Any], metrics: Sequence,
                    known_sha256: Mapping[str, str]) -> tuple[PersonalReport | None, str | None]:
    """(the report, None) when a silo's `personal` block can count, else (None, why).

    `settings`: what the request asked (PersonalizationSettings as a dict; empty: nothing);
    `known_sha256`: sha256 -> the model it names (the request's models, the round's base),
    the only models a personal one may come from. The block is checked again here: its
    strategy must be the round's, its scores the task's metrics within their ranges (personal,
    and local_only exactly when asked for), and its shared weights must match the setting."""
    if not settings:
        return (None, "a personal block, but the request asked for no personalization") if block else (None, None)
    strategy = settings["strategy"]
    if not block:
        return None, f"no personal block, though the request asked for personalization ({strategy})"
    try:
        report = PersonalReport.from_dict(dict(block))
    except PersonalizationSchemaError as exc:
        return None, str(exc)
    if report.strategy != strategy:
        return None, f"personal.strategy {report.strategy!r} is not the round's {strategy!r}"
    labels = ["personal"] + (["local_only"] if settings.get("local_only") else [])
    reason = screen_scores(report.scores, labels, metrics, "personal.scores", "personalization.local_only asks for")
    if reason:
        return None, reason
    if report.global_sha256 not in known_sha256:
        return None, (f"personal.global_sha256 {report.global_sha256[:12]}... names no model of this evaluation "
                      f"(its models and the round's base: {', '.join(sorted(set(known_sha256.values())))})")
    if settings.get("share_weights") and report.weights_bytes <= 0:
        return None, ("personal.weights_bytes is 0: no personal weights shared, though "
                      "personalization.share_weights is on")
    if not settings.get("share_weights") and report.weights_bytes > 0:
        return None, (f"personal.weights_bytes is {report.weights_bytes}, but personalization.share_weights is off: "
                      "the personal weights stay at the silo")
    return report, None


def silo_regressions(results: Mapping[str, Mapping[str, Any]], metric, limit: float) -> dict[str, float]:
    """Each silo's drop of `metric` (the candidate against the champion, on its own data;
    a rise for metrics where lower is better) when it is over `limit`."""
    over = {}
    for client, result in sorted(results.items()):
        drop = result["scores"][CHAMPION][metric.name] - result["scores"][CANDIDATE][metric.name]
        drop = drop if metric.higher_is_better else -drop
        if drop > limit + 1e-9:
            over[client] = drop
    return over


def federated_gates(results: Mapping[str, Mapping[str, Any]], figures: Mapping[str, Any], statistic: str,
                    required: int, closed: Mapping[str, Any], thresholds: Mapping[str, float],
                    max_regression: float, max_silo_regression: float | None, task) -> list[dict[str, Any]]:
    """The gates on federated metrics, each record naming the silos and numbers when it fails:
    enough silos evaluated; the thresholds and the regression against the champion on
    `statistic` (mean or median); no silo regressing more than `max_silo_regression`."""
    from fl_tasks.coordinator.gates import evaluate_gates

    count = len(results)
    enough = count >= required
    detail = f"{count} silos evaluated (minimum {required})"
    if closed.get("not_counted"):
        detail += "; not counted: " + "; ".join(f"{c}: {why}" for c, why in sorted(closed["not_counted"].items()))
    gates = [{"name": "min_evaluating_silos", "passed": enough, "value": count, "threshold": required,
              "detail": detail, "source": "federated"}]
    if not results:
        return gates
    over = f"{statistic} over {count} silos"
    for gate in evaluate_gates(figures[statistic][CANDIDATE], figures[statistic].get(CHAMPION), thresholds,
                               max_regression, task):
        gates.append({**gate, "detail": f"{over}: {gate['detail']}", "source": "federated"})
    if max_silo_regression is not None:
        primary = task.primary
        if CHAMPION not in figures[statistic]:
            gates.append({"name": "max_silo_regression", "passed": True, "value": None,
                          "threshold": max_silo_regression, "source": "federated",
                          "detail": "no champion yet: per-silo regression gate not applicable"})
        else:
            regressed = silo_regressions(results, primary, max_silo_regression)
            worst = max(regressed.values()) if regressed else None
            gates.append({"name": "max_silo_regression", "passed": not regressed, "value": worst,
                          "threshold": max_silo_regression, "source": "federated", "silos": sorted(regressed),
                          "detail": (f"{primary.name} {'drop' if primary.higher_is_better else 'rise'} vs champion on "
                                     "each silo's own data: " + ("; ".join(
                                         f"{c} {d:+.4f} > {max_silo_regression:.4f}" for c, d in regressed.items())
                                         if regressed else f"none over {max_silo_regression:.4f}"))})
    return gates


def personal_weights_name(client_id: str) -> str:
    """Where the coordinator keeps a silo's shared personal weights, under its round."""
    return f"evaluation/personal/{client_id}.safetensors"


# --- the steps -----------------------------------------------------------------------------

class FederatedEvaluation:
    """The evaluation steps of one coordinator (`fl_tasks.coordinator.steps.Coordinator`)."""

    def __init__(self, coordinator):
        self.c = coordinator
        self.spec = coordinator.spec
        self.records = coordinator.records

    def stored_plan(self, round_id: str) -> EvaluationPlan | None:
        data = self.records.store.get_bytes(self.records.bucket, self.records.key(round_id, "evaluation/plan.json"))
        return None if data is None else EvaluationPlan.from_json(data)

    def load_plan(self, round_id: str) -> EvaluationPlan:
        plan = self.stored_plan(round_id)
        if plan is None:
            raise RoundFailed(f"round {round_id} has no evaluation plan; run the request_evaluation step first")
        return plan

    def plan_for_round(self, round_id: str) -> EvaluationPlan:
        """The round's evaluation: its candidate and base, asked of the silos whose update it accepted."""
        plan = self.c.load_plan(round_id)
        summary = self.records.get_json(round_id, "candidate/manifest.json")
        if summary is None:
            raise self.records.fail(round_id, "request_evaluation", "no candidate yet; run the aggregate step first")
        models = {CANDIDATE: {"version": "candidate", "sha256": summary["candidate_sha256"],
                              "key": self.records.key(round_id, "candidate/model.safetensors")}}
        if plan.base_version != "seed":
            models[CHAMPION] = {"version": plan.base_version, "sha256": plan.base_sha256,
                                "key": self.records.key(round_id, "base/model.safetensors")}
        return self._plan(round_id, plan.run_id, "round", [a["client_id"] for a in summary["accepted"]], models,
                          plan.task, plan.contract, plan.data_window, plan.require_signatures, plan.settings,
                          # The share the silos kept out of this round's training.
                          float(plan.training["holdout_fraction"]), plan.personalization)

    def _plan(self, round_id: str, run_id: str, purpose: str, clients: list[str], models: dict[str, dict[str, Any]],
              task: dict[str, Any], contract: dict[str, Any], window: dict[str, Any],
              require_signatures: bool, settings: dict[str, Any], holdout_fraction: float,
              personalization: dict[str, Any]) -> EvaluationPlan:
        """Write the request and the plan (once: a re-run finds them). `settings`: the round's
        (or, for an evaluation-only run, the federation file's) per-round settings;
        `personalization`: what the silos do for their personal models (empty: nothing)."""
        existing = self.stored_plan(round_id)
        if existing is not None:
            return existing
        for model in models.values():
            payload = self.records.store.get_bytes(self.records.bucket, model["key"])
            if payload is None or sha256_hex(payload) != model["sha256"]:
                raise self.records.fail(round_id, "request_evaluation",
                                        f"model {model['version']} at {model['key']} is missing or corrupted")
            model["bytes"] = len(payload)
        deadline = now() + timedelta(minutes=float(settings["evaluation_timeout_minutes"]))
        request = EvaluationRequest(
            federation=self.spec.federation, round_id=round_id, model_name=self.spec.model_name,
            models={label: {k: m[k] for k in ("version", "sha256", "bytes")} for label, m in models.items()},
            task=task, contract=contract, holdout_fraction=holdout_fraction, data_window=window,
            deadline=deadline.isoformat(), created_at=now().isoformat(), personalization=personalization).to_json()
        self.records.put(round_id, "evaluation/request.json", request)
        plan = EvaluationPlan(
            federation=self.spec.federation, round_id=round_id, run_id=run_id, purpose=purpose, clients=clients,
            models=models, required=int(settings["min_evaluating_silos"]), deadline=deadline.isoformat(),
            statistic=settings["evaluation_statistic"], max_weight_share=self.spec.max_weight_share,
            require_signatures=require_signatures, request_sha256=sha256_hex(request), created_at=now().isoformat(),
            personalization=personalization)
        self.records.put_json(round_id, "evaluation/plan.json", asdict(plan))  # written last
        return plan

    def prepare_check(self, run_id: str, version: str | None) -> str:
        """An evaluation-only run: the champion and, when given, one more registered version,
        asked of every silo. Returns its id (eval-NNNNNN); a re-run returns the same."""
        from fl_tasks.coordinator import registry

        self._require_federated()
        models: dict[str, dict[str, Any]] = {}
        champion = registry.get_champion(self.spec)
        if champion is not None:
            models[CHAMPION] = self._registered(champion.version, champion.weights_uri, champion.weights_sha256)
        if version and (champion is None or version != champion.version):
            found = registry.version_weights(self.spec, version)
            if found is None:
                raise RoundFailed(f"param 'version': {self.spec.model_name} has no version {version!r}; "
                                  "give a registered version number, or leave it empty for the champion")
            models[f"version-{version}"] = self._registered(version, *found)
        if not models:
            raise RoundFailed(f"{self.spec.model_name} has no champion yet and no version was named; "
                              "give the param 'version', or run a round first")
        defaults = self.spec.round_defaults()
        try:
            personalization = personalization_settings(self.spec, float(defaults["learning_rate"]), self.c.task)
        except ConfigError as exc:
            raise RoundFailed(str(exc)) from None
        # Its own claim namespace: a round's DAG run may carry the same run id.
        claim_id = f"evaluate:{run_id}"
        claim = self.records.claim(claim_id)
        if claim is not None:
            round_id = claim["round_id"]
        else:
            round_id = f"{CHECK_PREFIX}{self.records.next_round_number(CHECK_PREFIX):06d}"
            # Claimed first: a retry after a crash below finds the same id, never a new number.
            self.records.store.put_bytes(self.records.bucket, self.records.claim_key(claim_id),
                                         json.dumps({"round_id": round_id, "run_id": run_id}).encode(),
                                         "application/json")
        self._plan(round_id, run_id, "check", [c.id for c in self.spec.clients], models, self.c.task_identity(),
                   self.spec.contract.as_dict(), {"start": None, "end": None}, self.spec.security.require_signatures,
                   defaults, self.spec.evaluation.federated.holdout_fraction, personalization)
        self.records.audit.append(round_id, "prepare", [{"event": "evaluation_planned", "run_id": run_id,
                                                         "models": {k: v["version"] for k, v in models.items()}}])
        return round_id

    def _require_federated(self) -> None:
        if self.spec.evaluation.federated is None:
            raise RoundFailed(f"{self.spec.source}: field 'evaluation.federated': federated evaluation is off for "
                              f"{self.spec.federation}. Fix: remove 'federated: false' to have the silos evaluate")

    def _registered(self, version: str, weights_uri: str, sha256: str) -> dict[str, Any]:
        bucket, _, key = weights_uri.removeprefix("s3://").partition("/")
        if bucket != self.records.bucket:
            raise RoundFailed(f"version {version}'s weights live in {weights_uri}, outside the coordinator's bucket")
        return {"version": version, "sha256": sha256, "key": key}

    def request(self, round_id: str) -> list[str]:
        """Publish the models and the request to every silo of the plan, manifest last. A silo
        whose bucket cannot be written is skipped with the error named."""
        self._require_federated()
        plan = self.stored_plan(round_id) or self.plan_for_round(round_id)
        request = self.records.get(round_id, "evaluation/request.json", sha256=plan.request_sha256)
        if request is None:
            raise self.records.fail(round_id, "request_evaluation", "the evaluation request is missing or corrupted")
        payloads = {label: self.records.store.get_bytes(self.records.bucket, m["key"]) for label, m in
                    plan.models.items()}

        def publish(client_id: str) -> dict[str, Any]:
            client = self.spec.client(client_id)
            key = protocol.evaluation_request_key(client.prefix, plan.federation, round_id)
            event = {"event": "evaluation_requested", "client_id": client_id, "request_sha256": plan.request_sha256,
                     "models": {label: m["version"] for label, m in plan.models.items()}}
            try:
                store = self.c.buckets.client(client_id)
                if self.c.held(store, client.bucket_name, key) != request:
                    for label, payload in payloads.items():
                        store.put_bytes(client.bucket_name, protocol.evaluation_model_key(
                            client.prefix, plan.federation, round_id, label), payload)
                    store.put_bytes(client.bucket_name, key, request, "application/json")
            except (*STORAGE_ERRORS, ValueError) as exc:
                event = {**event, "event": "evaluation_request_failed", "reason": storage_reason(exc)}
                log.warning("round %s: evaluation not requested from %s: %s", round_id, client_id, event["reason"])
            return event

        # Many silos at once (pools.SILO_WORKERS); the events in the plan's client order.
        events = pools.per_silo(publish, plan.clients)
        reached = [e["client_id"] for e in events if e["event"] == "evaluation_requested"]
        self.records.audit.append(round_id, "request_evaluation", events)
        log.info("round %s: evaluation of %s requested from %s; deadline %s, %d needed", round_id,
                 ", ".join(f"{label} ({m['version']})" for label, m in plan.models.items()), ", ".join(reached) or "none",
                 plan.deadline, plan.required)
        return reached

    def answers(self, plan: EvaluationPlan) -> dict[str, Answer | str]:
        # Many silos at once (pools.SILO_WORKERS), the answers in the plan's client order.
        read = pools.per_silo(lambda client_id: self.c.intake.read_answer(
            plan, client_id, EVALUATIONS, {"request_sha256": plan.request_sha256}), plan.clients)
        return {client_id: answer for client_id, answer in zip(plan.clients, read) if answer is not None}

    def check(self, round_id: str, now_: datetime | None = None) -> quorum.QuorumDecision:
        plan = self.load_plan(round_id)
        answers = self.answers(plan)
        committed = {c: a.committed_at for c, a in answers.items() if isinstance(a, Answer) and a.kind != "decline"}
        declined = {c: a.reason for c, a in answers.items() if isinstance(a, Answer) and a.kind == "decline"}
        return quorum.decide(committed, plan.clients, plan.required, datetime.fromisoformat(plan.deadline),
                             now_ or now(), None, declined)

    def close(self, round_id: str, decision: quorum.QuorumDecision) -> dict[str, Any]:
        """Record who evaluated and keep each answer as the close read it; the first close wins.
        A missed quorum is recorded, not raised: the gates fail on it and the round rolls back."""
        record = self.records.get_json(round_id, "evaluation/quorum.json")
        if record is None:
            plan = self.load_plan(round_id)
            answers = self.answers(plan)
            verified = {c: a for c, a in answers.items() if isinstance(a, Answer)}
            committed = [c for c in decision.committed if c in verified and verified[c].kind != "decline"]
            for client_id in committed:
                self.records.put(round_id, f"evaluation/results/{client_id}.json", verified[client_id].manifest)
            record = {"state": decision.state, "committed": committed, "reason": decision.reason,
                      "closed_at": now().isoformat(),
                      "answers": {c: answer_record(a) for c, a in verified.items()},
                      "declined": {c: a.reason for c, a in verified.items() if a.kind == "decline"},
                      "unreadable": {c: a for c, a in answers.items() if isinstance(a, str)},
                      "missing": sorted(set(plan.clients) - set(answers))}
            self.records.put_json(round_id, "evaluation/quorum.json", record)
        events = [{"event": "evaluation_closed", **record}]
        events += [{"event": "evaluation_declined", "client_id": c, "reason": r} for c, r in record["declined"].items()]
        events += [{"event": "evaluation_rejected", "client_id": c, "reason": r}
                   for c, r in record["unreadable"].items()]
        self.records.audit.append(round_id, "evaluation_quorum", events)
        log.info("round %s: evaluation closed: %s", round_id, record["reason"])
        return record

    def results(self, round_id: str) -> dict[str, Any]:
        """The screened evaluations: {"accepted": {client: {num_examples, rows_held, scores, and
        `personal` when its personal block counted}}, "rejected": {client: reason}, "closed":
        the close's record, "plan": the plan, "figures", "personal_rejected": {client: why its
        personal block did not count (its global scores still do)}}."""
        plan = self.load_plan(round_id)
        closed = self.records.get_json(round_id, "evaluation/quorum.json")
        if closed is None:
            raise self.records.fail(round_id, "validate", "the evaluation has not closed yet; run "
                                                          "wait_for_evaluations first")
        trained = {}
        if plan.purpose == "round":
            summary = self.records.get_json(round_id, "candidate/manifest.json") or {"accepted": []}
            trained = {a["client_id"]: a["num_examples"] for a in summary["accepted"]}
        metrics = self.c.task.metrics
        known = self.known_models(plan)
        accepted, rejected, personal_rejected = {}, {}, {}
        for client_id in closed["committed"]:
            kept = self.records.get(round_id, f"evaluation/results/{client_id}.json",
                                    sha256=closed["answers"][client_id]["manifest_sha256"])
            try:
                if kept is None:
                    raise ManifestError("the kept evaluation no longer hashes to what the close read")
                manifest = EvaluationManifest.from_json(kept)
            except ManifestError as exc:
                rejected[client_id] = str(exc)
                continue
            reason = screen_evaluation(manifest, list(plan.models), metrics, trained.get(client_id),
                                       self.spec.client(client_id).max_examples)
            if reason:
                rejected[client_id] = reason
                continue
            accepted[client_id] = {"num_examples": manifest.num_examples, "rows_held": manifest.rows_held,
                                   "scores": manifest.scores}
            # A bad personal block costs the silo its personal figures, never its global scores.
            personal, why = screen_personal(manifest.personal, plan.personalization, metrics, known)
            if personal is not None and personal.weights_bytes:
                try:
                    weights = self.personal_weights(plan, client_id, personal)
                except ValueError as exc:
                    personal, why = None, f"personal weights: {exc}"
            else:
                weights = None
            if personal is not None:
                accepted[client_id]["personal"] = {**personal.as_dict(), "global_model": known[personal.global_sha256],
                                                   "weights": weights}
            elif why:
                personal_rejected[client_id] = why
        not_counted = {**{c: f"declined: {r}" for c, r in closed["declined"].items()},
                       **{c: f"rejected: {r}" for c, r in closed["unreadable"].items()},
                       **{c: f"rejected: {r}" for c, r in rejected.items()},
                       **{c: "no answer by the deadline" for c in closed["missing"]}}
        return {"accepted": accepted, "rejected": rejected, "closed": {**closed, "not_counted": not_counted},
                "plan": plan, "figures": federated_figures(accepted, plan.max_weight_share),
                "personal_rejected": personal_rejected}

    def known_models(self, plan: EvaluationPlan) -> dict[str, str]:
        """sha256 -> label of every model a personal one may come from: the request's models,
        and a round's base (ditto pulls its personal model towards the base)."""
        known = {m["sha256"]: label for label, m in plan.models.items()}
        if plan.purpose == "round":
            known.setdefault(self.c.load_plan(plan.round_id).base_sha256, "base")
        return known

    def personal_weights(self, plan: EvaluationPlan, client_id: str, personal: PersonalReport) -> dict[str, Any]:
        """A silo's shared personal weights (share_weights), read once from its bucket with
        the size its report declares, checked against its personal_sha256 and the task's
        model, and kept in the coordinator's bucket (a re-run finds the snapshot). Returns
        {uri, key, bytes, sha256}; ValueError naming the problem."""
        from fl_tasks.coordinator.screening import check_structure
        from fl_tasks.protocol.codec import CodecError, decode_state

        name = personal_weights_name(client_id)
        kept = self.records.get(plan.round_id, name, sha256=personal.personal_sha256)
        if kept is None:
            reference = next(iter(plan.models.values()))
            limit = 2 * int(reference["bytes"]) + 4096
            if personal.weights_bytes > limit:
                raise ValueError(f"weights_bytes {personal.weights_bytes} is over the limit {limit} (twice the "
                                 "global model)")
            client = self.spec.client(client_id)
            key = protocol.personal_weights_key(client.prefix, plan.federation, plan.round_id)
            try:
                payload = self.c.buckets.client(client_id).get_bytes(client.bucket_name, key,
                                                                     max_bytes=personal.weights_bytes)
            except (*STORAGE_ERRORS, ValueError) as exc:
                raise ValueError(f"unreadable at {key}: {storage_reason(exc)}") from None
            if payload is None:
                raise ValueError(f"missing at {key}")
            if len(payload) != personal.weights_bytes or sha256_hex(payload) != personal.personal_sha256:
                raise ValueError(f"{len(payload)} bytes at {key} do not match weights_bytes {personal.weights_bytes} "
                                 "and personal_sha256")
            try:
                check_structure(decode_state(payload), decode_state(
                    self.records.store.get_bytes(self.records.bucket, reference["key"])))
            except (CodecError, ValueError) as exc:
                raise ValueError(f"not a model of the task: {exc}") from None
            self.records.put(plan.round_id, name, payload)
            kept = payload
        return {"uri": self.records.uri(plan.round_id, name), "key": self.records.key(plan.round_id, name),
                "bytes": len(kept), "sha256": personal.personal_sha256}

    def personalization(self, results: Mapping[str, Any]) -> dict[str, Any] | None:
        """The per-silo personalization table of screened results (report.personalization_table),
        against the model the silos personalised (`global_label`: a round's candidate, a check's
        champion); None when the evaluation asked for no personalization."""
        from fl_tasks.coordinator.report import personalization_table

        plan = results["plan"]
        compared = global_label(plan.models) or next(iter(plan.models))
        versions = {label: str(m["version"]) for label, m in plan.models.items()}
        if plan.purpose == "round":
            versions["base"] = self.c.load_plan(plan.round_id).base_version
        return personalization_table(plan.personalization, results["accepted"], results.get("personal_rejected", {}),
                                     self.c.task.primary_metric, compared, versions)

    def log_personalization(self, round_id: str, run_id: str, table: dict[str, Any]) -> dict[str, dict[str, str]]:
        """The table in the MLflow run `run_id` (personalization.json, tags) and, for the silos
        that shared their personal weights, those weights as artifacts and model versions of
        <model_name>-personal-<client>. Returns client -> {model, version}."""
        from fl_tasks.coordinator import registry

        weights = {}
        for client_id, entry in table["silos"].items():
            if entry["weights"]:
                payload = self.records.get(round_id, personal_weights_name(client_id),
                                           sha256=entry["lineage"]["personal_sha256"])
                if payload is None:
                    raise self.records.fail(round_id, "register", f"the kept personal weights of {client_id} at "
                                                                  f"{entry['weights']['uri']} are gone or changed")
                weights[client_id] = payload
        return registry.log_personalization(self.spec, run_id, round_id, table, weights)

    def audit_results(self, round_id: str, results: Mapping[str, Any]) -> None:
        self.records.audit.append(round_id, "evaluation_screening", [
            *({"event": "evaluation_accepted", "client_id": c, "num_examples": r["num_examples"],
               "scores": r["scores"]} for c, r in sorted(results["accepted"].items())),
            *({"event": "evaluation_rejected", "client_id": c, "reason": why}
              for c, why in sorted(results["rejected"].items())),
            *({"event": "personal_accepted", "client_id": c, "strategy": r["personal"]["strategy"],
               "serving": r["personal"]["serving"], "global_sha256": r["personal"]["global_sha256"],
               "personal_sha256": r["personal"]["personal_sha256"], "scores": r["personal"]["scores"],
               "weights": (r["personal"]["weights"] or {}).get("uri")}
              for c, r in sorted(results["accepted"].items()) if r.get("personal")),
            *({"event": "personal_rejected", "client_id": c, "reason": why}
              for c, why in sorted(results.get("personal_rejected", {}).items()))])

    def report_check(self, round_id: str) -> dict[str, Any]:
        """An evaluation-only run's result: per silo and overall, in report.json and MLflow."""
        from fl_tasks.coordinator import registry, report

        existing = self.records.get_json(round_id, "evaluation/report.json")
        if existing is None:
            results = self.results(round_id)
            self.audit_results(round_id, results)
            plan = results["plan"]
            existing = {"federation": plan.federation, "evaluation_id": round_id, "run_id": plan.run_id,
                        "models": {label: m["version"] for label, m in plan.models.items()},
                        "statistic": plan.statistic, "per_silo": results["accepted"],
                        "not_counted": results["closed"]["not_counted"], "figures": results["figures"],
                        "enough_silos": len(results["accepted"]) >= plan.required, "required": plan.required,
                        "audit_log": f"s3://{self.records.bucket}/{self.records.audit.prefix(round_id)}",
                        "personalization": self.personalization(results)}
            existing["mlflow_run_id"] = registry.log_evaluation(self.spec, round_id, existing)
            if existing["personalization"]:
                registered = self.log_personalization(round_id, existing["mlflow_run_id"], existing["personalization"])
                existing["personalization"] = report.with_versions(existing["personalization"], None, registered)
            self.records.put_json(round_id, "evaluation/report.json", existing)
            champion = existing["figures"].get(plan.statistic, {}).get(CHAMPION)
            if existing["enough_silos"] and champion:  # what the monitoring DAG reads of the champion now
                self.c.history.record_evaluation(round_id, now().isoformat(), existing["models"][CHAMPION],
                                                 champion)
        report.log_lines(f"evaluation {round_id}", report.evaluation_account(existing))
        return existing
