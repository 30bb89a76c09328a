"""One plain method per step of a round. Each Airflow task calls exactly one of them.

Steps share state through the coordinator's bucket (`fl_tasks.coordinator.bucket`), never
through memory, so any step can be retried or run in another process; `run_round` chains
them for use without Airflow. What each step needs lives in its own module: the plan
(`plan`), reading what silos wrote (`intake`), building the candidate (`candidate`), the
silos' evaluations (`evaluation`), the coordinator's own rows (`validation`), the gates
(`gates`), MLflow (`registry`) and the report (`report`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from datetime import datetime, timedelta
from typing import Any

from fl_tasks import protocol
from fl_tasks.config import ConfigError, FederationSpec
from fl_tasks.coordinator import pools, quorum, report, shards
from fl_tasks.coordinator.access import AccessResolver, BucketAccess
from fl_tasks.coordinator.breaker import REFUSED, CircuitBreaker
from fl_tasks.coordinator.bucket import CoordinatorBucket, dump, now
from fl_tasks.coordinator.candidate import CandidateBuilder, HISTORY_ROUNDS, aggregate_events
from fl_tasks.coordinator.drift import DriftTable, build_drift_table, drift_gate
from fl_tasks.coordinator.evaluation import FederatedEvaluation
from fl_tasks.coordinator.history import FederationHistory, RoundRecord
from fl_tasks.coordinator.intake import Answer, Intake, STORAGE_ERRORS, answer_record, storage_reason
from fl_tasks.coordinator.plan import (RoundFailed, RoundPlan, RunContext, grace_period, personalization_settings,
                                       required_clients, round_settings, sample_silos)
from fl_tasks.coordinator.privacy import PrivacyLedger, epsilon, round_event
from fl_tasks.protocol import GlobalManifest, ManifestError, UpdateManifest, sha256_hex
from fl_tasks.protocol import signing
from fl_tasks.protocol.codec import decode_state, encode_state
from fl_tasks.protocol.storage import ObjectStore, ObjectTooLarge, StorageUnavailable

log = logging.getLogger(__name__)

__all__ = ["Coordinator", "RoundFailed", "RoundPlan", "RunContext", "grace_period", "required_clients", "run_round"]


class Coordinator:
    """Holds the federation spec and the buckets; methods are the round's steps."""

    def __init__(self, spec: FederationSpec, store: ObjectStore | None = None,
                 keys: signing.KeyProvider | None = None, access: AccessResolver | None = None):
        """`store`: one store for every bucket (tests); `access`: aws_conn_id -> S3Access (the
        DAG passes Airflow connections); `keys`: client id -> that client's signing key or
        None, by default the FL_SIGNING_KEY_<CLIENT_ID> variables (the DAG passes Airflow
        connections)."""
        self.spec = spec
        self.buckets = BucketAccess(spec, access, store)
        self.store = self.buckets.coordinator
        self.bucket = spec.coordinator_bucket
        self.records = CoordinatorBucket(self.store, self.bucket, spec.federation)  # the steps' records
        self.audit = self.records.audit
        self.keys = keys if keys is not None else signing.EnvKeys()
        self.intake = Intake(spec, self.buckets.client, self.keys)
        self.evaluation = FederatedEvaluation(self)
        self.history = FederationHistory(self.store, self.bucket, spec.federation)
        self.breaker = CircuitBreaker(self.store, self.bucket, spec.federation,
                                      spec.circuit_breaker.max_consecutive_failures)
        self.ledger = PrivacyLedger(self.store, self.bucket, spec.federation)
        self._task = None

    @property
    def task(self):
        """The federation's task, imported on first use (ConfigError naming task.entrypoint)."""
        if self._task is None:
            self._task = self.spec.load_task()
        return self._task

    def task_identity(self) -> dict[str, Any]:
        """What a silo checks its installed task against: entrypoint, version, params and their sha256."""
        from fl_tasks.tasks.api import params_sha256

        return {"entrypoint": self.spec.task.entrypoint, "version": self.task.version,
                "params": self.spec.task.params, "params_sha256": params_sha256(self.spec.task.params)}

    def round_key(self, round_id: str, name: str) -> str:
        return self.records.key(round_id, name)

    def load_plan(self, round_id: str) -> RoundPlan:
        return self.records.load_plan(round_id)

    # --- step 1: prepare -----------------------------------------------------------------
    def prepare(self, ctx: RunContext) -> str:
        """Fix the round id, the base model and the deadline; returns the round id.

        Re-running it for the same DAG run returns the same round and rewrites nothing.
        """
        claim = self.records.claim(ctx.run_id)
        if claim is not None:
            planned = self.store.get_bytes(self.bucket, self.round_key(claim["round_id"], "plan.json"))
            if planned is not None:
                plan = RoundPlan.from_json(planned)
                if plan.run_id != ctx.run_id:
                    raise RoundFailed(f"round {claim['round_id']} claimed by this run was taken by run {plan.run_id!r}")
                self._audit_plan(plan)
                return claim["round_id"]
        try:
            task = self.task
            settings = round_settings(self.spec, ctx.params, task)
            personalization = personalization_settings(self.spec, float(settings["learning_rate"]), task)
        except ConfigError as exc:
            raise RoundFailed(str(exc)) from None
        if ctx.params.get("reset_circuit_breaker"):
            reset = self.breaker.reset(now().isoformat(), ctx.triggered_by or "unknown", ctx.run_id)
            log.info("circuit breaker reset by %s (run %s)", reset["by"], ctx.run_id)
        if claim is not None:  # an earlier try claimed the round and died before writing the plan
            round_id = claim["round_id"]
        else:
            round_id = self._new_round_id(ctx)
            # Claimed first: a retry after a crash below finds the same round, never a new number.
            self.store.put_bytes(self.bucket, self.records.claim_key(ctx.run_id),
                                 dump({"round_id": round_id, "run_id": ctx.run_id}), "application/json")
        base_version, base_origin, base_round_id, payload = self._base_model()
        self.records.put(round_id, "base/model.safetensors", payload)
        deadline = now() + timedelta(minutes=float(settings["round_timeout_minutes"]))
        t = self.spec.training
        clients, privacy = sample_silos(self.spec)
        plan = RoundPlan(
            federation=self.spec.federation, round_id=round_id, run_id=ctx.run_id, run_type=ctx.run_type,
            triggered_by=ctx.triggered_by, base_version=base_version, base_origin=base_origin,
            base_sha256=sha256_hex(payload), base_bytes=len(payload), deadline=deadline.isoformat(),
            clients=clients, settings=settings,
            aggregation={"strategy": settings["aggregator"], "params": settings["aggregator_params"],
                         "clip_norm": self.spec.clip_norm, "max_weight_share": self.spec.max_weight_share,
                         **({"shards": self.spec.shards} if self.spec.shards > 1 else {})},
            screening=asdict(self.spec.screening), base_round_id=base_round_id,
            training={"local_epochs": int(settings["local_epochs"]), "learning_rate": float(settings["learning_rate"]),
                      "batch_size": t.batch_size, "proximal_mu": t.proximal_mu, "codec": t.codec,
                      "lr_schedule": t.lr_schedule, "optimizer_state": t.optimizer_state,
                      # The rows each silo keeps out of training for federated evaluation.
                      "holdout_fraction": float(self.spec.evaluation.federated.holdout_fraction)
                      if self.spec.evaluation.federated else 0.0},
            data_window={"start": ctx.data_interval_start, "end": ctx.data_interval_end}
            if ctx.run_type in ("scheduled", "backfill") and t.window == "interval" else {"start": None, "end": None},
            created_at=now().isoformat(), staleness=asdict(self.spec.staleness),
            task=self.task_identity(),
            contract=self.spec.contract.as_dict(), require_signatures=self.spec.security.require_signatures,
            drift=self.spec.drift.settings(self.spec.contract).as_dict() if self.spec.drift else {},
            privacy=privacy, personalization=personalization,
        )
        self.records.put_json(round_id, "plan.json", asdict(plan))
        self._audit_plan(plan)
        return round_id

    def _new_round_id(self, ctx: RunContext) -> str:
        if ctx.params.get("round_id"):
            round_id = protocol.validate_round_id(str(ctx.params["round_id"]))
        elif ctx.run_type in ("scheduled", "backfill") and ctx.data_interval_start:
            round_id = protocol.round_id_for_interval(datetime.fromisoformat(ctx.data_interval_start))
        else:
            round_id = protocol.round_id_for_number(self.records.next_round_number())
        existing = self.store.get_bytes(self.bucket, self.round_key(round_id, "plan.json"))
        if existing is not None:
            other = RoundPlan.from_json(existing).run_id
            raise RoundFailed(f"round {round_id} already belongs to run {other!r}; pick another round_id")
        return round_id

    def _base_model(self) -> tuple[str, str, str | None, bytes]:
        """(version, origin, the round that made it, weights) of the round's base: the
        champion; before the first promotion, the warm-start model or the seeded model."""
        from fl_tasks.coordinator import registry

        champion = registry.get_champion(self.spec)
        if champion is not None:
            return champion.version, "champion", champion.round_id, self.read_champion(champion)
        if self.spec.task.warm_start:
            payload = registry.warm_start_weights(self.spec, self.buckets.coordinator, self.task)
            return "seed", self.spec.task.warm_start, None, payload
        return "seed", f"seed {self.spec.task.seed}", None, self.seed_payload()

    def _audit_plan(self, plan: RoundPlan) -> None:
        # The whole plan, who started the run included: a replay needs nothing else from us.
        events = [{"event": "round_planned", "run_id": plan.run_id, "run_type": plan.run_type,
                   "triggered_by": plan.triggered_by, "plan": asdict(plan)}]
        reset = self.breaker.last_reset()
        if reset and reset["run_id"] == plan.run_id:
            events.append({"event": "circuit_breaker_reset", **reset})
        self.audit.append(plan.round_id, "prepare", events)

    def seed_payload(self) -> bytes:
        from fl_tasks.tasks.api import model_state

        return encode_state(model_state(self.task.seeded_model(self.spec.task.seed)))

    def read_champion(self, champion) -> bytes:
        bucket, _, key = champion.weights_uri.removeprefix("s3://").partition("/")
        payload = self.store.get_bytes(bucket, key)
        if payload is None or sha256_hex(payload) != champion.weights_sha256:
            raise RoundFailed(f"champion version {champion.version} weights at {champion.weights_uri} are missing "
                              "or do not match their sha256 tag")
        return payload

    # --- step 2: dispatch ----------------------------------------------------------------
    def dispatch(self, round_id: str) -> list[str]:
        """Publish the base model to every client bucket, payload first, manifest last. A
        silo whose bucket cannot be written is skipped with the error named (the others
        still get the round); the round goes on if enough silos were reached."""
        plan = self.load_plan(round_id)
        dispatched = self.records.get_json(round_id, "dispatch.json") or {}
        if not dispatched:  # a re-run of a round that reached the silos is not stopped after the fact
            breaker = self.breaker.state(self.history.rounds())
            if breaker.open:
                raise self.records.fail(round_id, "dispatch", breaker.reason(), refused="circuit_breaker")
            if plan.privacy:
                self._check_privacy(plan)
        payload = self.records.get(round_id, "base/model.safetensors", sha256=plan.base_sha256)
        if payload is None:
            raise self.records.fail(round_id, "dispatch", "the round's base model is missing or corrupted")
        manifest = GlobalManifest(
            federation=plan.federation, round_id=round_id, model_name=self.spec.model_name,
            model_version=plan.base_version, task=plan.task, contract=plan.contract,
            payload_sha256=plan.base_sha256, payload_bytes=plan.base_bytes, training=plan.training,
            data_window=plan.data_window, deadline=plan.deadline, created_at=plan.created_at, drift=plan.drift,
            privacy={"clip_norm": plan.privacy["clip_norm"], "noise_stddev": plan.privacy["silo_noise_stddev"]}
            if plan.privacy.get("noise") == "silos" else {},
            personalization=plan.personalization,
        ).to_json()
        manifest_sha256 = sha256_hex(manifest)

        def send(client) -> tuple[dict[str, Any], str | None]:
            """(its audit event, when it was reached or None), payload first, manifest last."""
            manifest_key = protocol.global_manifest_key(client.prefix, plan.federation, round_id)
            event = {"event": "model_dispatched", "client_id": client.id, "bucket": client.bucket_name,
                     "manifest_key": manifest_key, "manifest_sha256": manifest_sha256,
                     "payload_sha256": plan.base_sha256, "model_version": plan.base_version}
            try:
                store = self.buckets.client(client.id)
                if self.held(store, client.bucket_name, manifest_key) != manifest:
                    store.put_bytes(client.bucket_name, protocol.global_model_key(client.prefix, plan.federation,
                                                                                  round_id), payload)
                    store.put_bytes(client.bucket_name, manifest_key, manifest, "application/json")
                return event, now().isoformat()
            except (*STORAGE_ERRORS, ValueError) as exc:  # ValueError: its S3 connection cannot be resolved
                event = {**event, "event": "dispatch_failed", "reason": storage_reason(exc)}
                log.warning("round %s: not dispatched to %s: %s", round_id, client.id, event["reason"])
                return event, None

        # Many silos at once (pools.SILO_WORKERS); the events and dispatch times in client order.
        events, reached = [], []
        for event, sent_at in pools.per_silo(send, [c for c in self.spec.clients if c.id in plan.clients]):
            events.append(event)
            if sent_at is not None:
                reached.append(event["client_id"])
                dispatched.setdefault(event["client_id"], sent_at)
        if not reached and all(e.get("reason", "").startswith("storage error StorageUnavailable") for e in events):
            raise StorageUnavailable(f"round {round_id}: no silo bucket could be written: {events[0]['reason']}")
        # When each silo got the round: its update latency runs from here (the first send counts).
        self.records.put_json(round_id, "dispatch.json", dispatched)
        self.audit.append(round_id, "dispatch", events)
        required = required_clients(plan)
        if len(reached) < required:
            raise self.records.fail(round_id, "dispatch", f"only {len(reached)} of {len(plan.clients)} silos received "
                                   f"the round, quorum {required}: " + "; ".join(
                                       f"{e['client_id']}: {e['reason']}" for e in events if "reason" in e))
        return reached

    def _check_privacy(self, plan: RoundPlan) -> None:
        """Refuse a private round whose sample is below the quorum, or that would spend past
        privacy.max_epsilon: nothing is sent, so no budget is spent."""
        p, required = plan.privacy, required_clients(plan)
        if len(plan.clients) < required or not plan.clients:
            raise self.records.fail(plan.round_id, "dispatch", (
                f"privacy sampling ({p['sampling']}) drew {len(plan.clients)} of {p['population']} silos, fewer than "
                f"the quorum {max(required, 1)}; the round is skipped and spends no privacy budget. Fix: nothing for a "
                "rare draw; if it recurs, raise privacy.sample_rate (or sample_size) or lower quorum.min_clients"),
                refused="privacy_sampling")
        budget = self.ledger.budget(p, self.privacy_event(plan))
        log.info("round %s: privacy budget: epsilon %.3f spent over %d rounds, %.3f after this one (delta %g, "
                 "max_epsilon %s)", plan.round_id, budget.spent, budget.rounds, budget.after_next, budget.delta,
                 budget.max_epsilon)
        if budget.exceeded:
            raise self.records.fail(plan.round_id, "dispatch", budget.refusal(), refused="privacy_budget")

    def privacy_event(self, plan: RoundPlan):
        return round_event(plan.privacy, plan.round_id, plan.base_version, plan.base_round_id, now().isoformat())

    def privacy_figures(self, plan: RoundPlan) -> dict[str, Any] | None:
        """Epsilon at the plan's delta of the federation's whole ledger, and whether this round is in it."""
        p = plan.privacy
        if not p:
            return None
        events = self.ledger.events()
        return {"epsilon": epsilon(events, float(p["delta"]), p["accountant"]), "delta": p["delta"],
                "rounds_released": len(events), "round_released": any(e.round_id == plan.round_id for e in events),
                **{k: p[k] for k in ("max_epsilon", "noise_multiplier", "clip_norm", "noise", "sampling", "sampled",
                                     "population", "accountant")}}

    @staticmethod
    def held(store: ObjectStore, bucket: str, key: str) -> bytes | None:
        """What a silo's bucket holds at a key we write: a bounded read, since anything may
        have been planted there (an oversized object is simply not ours, and is overwritten)."""
        try:
            return store.get_bytes(bucket, key, max_bytes=protocol.MAX_MANIFEST_BYTES)
        except ObjectTooLarge:
            return None

    # --- step 3: wait for quorum ---------------------------------------------------------
    def answers(self, round_id: str, plan: RoundPlan | None = None) -> dict[str, Answer | str]:
        """Each client's verified answer, or why what it wrote is not one (absent: nothing yet)."""
        plan = plan or self.load_plan(round_id)
        # Many silos at once (pools.SILO_WORKERS), the answers in the plan's client order.
        read = pools.per_silo(lambda client_id: self.intake.read_answer(plan, client_id), plan.clients)
        return {client_id: answer for client_id, answer in zip(plan.clients, read) if answer is not None}

    def check_quorum(self, round_id: str, now_: datetime | None = None) -> quorum.QuorumDecision:
        plan = self.load_plan(round_id)
        answers = self.answers(round_id, plan)
        committed = {c: a.committed_at for c, a in answers.items() if isinstance(a, Answer) and a.kind == "update"}
        declined = {c: a.reason for c, a in answers.items() if isinstance(a, Answer) and a.kind == "decline"}
        return quorum.decide(committed, plan.clients, required_clients(plan), datetime.fromisoformat(plan.deadline),
                             now_ or now(), grace_period(plan), declined)

    def awaited(self, round_id: str, answers: str) -> quorum.Awaited:
        """What the wait for `answers` (update | evaluation) watches in this round."""
        if answers == "evaluation":
            plan = self.evaluation.load_plan(round_id)
            return quorum.Awaited(answers, tuple(plan.clients), plan.deadline, plan.required, None,
                                  plan.require_signatures, {"request_sha256": plan.request_sha256})
        plan = self.load_plan(round_id)
        grace = grace_period(plan)
        return quorum.Awaited(answers, tuple(plan.clients), plan.deadline, required_clients(plan),
                              None if grace is None else grace.total_seconds(), plan.require_signatures, {})

    def check(self, round_id: str, answers: str) -> quorum.QuorumDecision:
        return self.check_evaluations(round_id) if answers == "evaluation" else self.check_quorum(round_id)

    def close(self, round_id: str, answers: str, decision: quorum.QuorumDecision) -> dict[str, Any]:
        return self.close_evaluation(round_id, decision) if answers == "evaluation" else \
            self.close_round(round_id, decision)

    def close_round(self, round_id: str, decision: quorum.QuorumDecision) -> dict[str, Any]:
        """Record who is in the round and keep each committed manifest as the round read it.
        The first close wins, so a re-run cannot change it."""
        record = self.records.get_json(round_id, "quorum.json")
        if record is None:
            plan = self.load_plan(round_id)
            answers = self.answers(round_id, plan)
            verified = {c: a for c, a in answers.items() if isinstance(a, Answer)}
            committed = [c for c in decision.committed if c in verified and verified[c].kind == "update"]
            for client_id in committed:
                self.records.put(round_id, f"updates/{client_id}/manifest.json", verified[client_id].manifest)
            record = {"state": decision.state, "committed": committed, "reason": decision.reason,
                      "closed_at": now().isoformat(),
                      "commit_times": {c: verified[c].committed_at.isoformat() for c in committed},
                      "answers": {c: answer_record(a) for c, a in verified.items()},
                      "declined": {c: a.reason for c, a in verified.items() if a.kind == "decline"},
                      "unreadable": {c: a for c, a in answers.items() if isinstance(a, str)},
                      "history": self.example_history(plan.clients)}
            if decision.state == quorum.FAILED:
                self.records.fail(round_id, "quorum", decision.reason)
            self.records.put_json(round_id, "quorum.json", record)
        events = [{"event": "round_closed", **record}]
        events += [{"event": "update_declined", "client_id": c, "reason": r} for c, r in record["declined"].items()]
        events += [{"event": "update_rejected", "client_id": c, "reason": r} for c, r in record["unreadable"].items()]
        self.audit.append(round_id, "quorum", events)
        return record

    # --- step 4: aggregate ---------------------------------------------------------------
    def example_history(self, clients: list[str]) -> dict[str, list[int]]:
        """Each client's accepted example counts in the last rounds it took part in."""
        data = self.store.get_bytes(self.bucket, f"{self.spec.federation}/history/examples.json")
        history = protocol.strict_json_loads(data) if data else {}
        return {c: list(history.get(c, []))[-HISTORY_ROUNDS:] for c in clients}

    def _record_history(self, summary: dict[str, Any], history: dict[str, list[int]]) -> None:
        for entry in summary["accepted"]:
            history.setdefault(entry["client_id"], []).append(entry["num_examples"])
        trimmed = {c: counts[-HISTORY_ROUNDS:] for c, counts in history.items()}
        self.store.put_bytes(self.bucket, f"{self.spec.federation}/history/examples.json",
                             dump(trimmed), "application/json")

    def _builder(self, plan: RoundPlan, history: dict[str, list[int]], fetch: bool = True) -> CandidateBuilder:
        return CandidateBuilder(plan, self.records, self.intake, self.task, self._version_sha256, history,
                                {c.id: c.max_examples for c in self.spec.clients}, self.spec.max_weight_share, fetch)

    def _server_state(self, plan: RoundPlan):
        """The server optimiser's moments from the round that made the base (its lineage)."""
        if not plan.base_round_id:
            return None
        saved = self.records.get(plan.base_round_id, self.records.server_state_name(plan.aggregation["strategy"]))
        return None if saved is None else decode_state(saved)

    def aggregate(self, round_id: str) -> dict[str, Any]:
        """Screen the round's closed set of updates, build the candidate and store it."""
        plan = self.load_plan(round_id)
        closed = self.records.get_json(round_id, "quorum.json")
        if closed is None:
            raise self.records.fail(round_id, "aggregate", "the round has not closed yet; run the quorum step first")
        if closed["state"] != quorum.MET:
            raise RoundFailed(closed["reason"])
        if shards.shard_count(plan) > 1:  # screening only: the mapped shard tasks aggregate
            return shards.ShardedRound(self).screen(round_id, plan, closed)
        summary = self.records.get_json(round_id, "candidate/manifest.json")
        if summary is None:
            committed = {c: closed["answers"][c] for c in closed["committed"]}
            try:
                built = self._builder(plan, closed["history"]).build(committed, self._server_state(plan),
                                                                     self._noise_seed(plan))
            except ValueError as exc:
                raise self.records.fail(round_id, "aggregate", str(exc)) from exc
            summary = built.summary
            self.records.put(round_id, "candidate/model.safetensors", built.payload)
            if built.server_state is not None:
                # Keyed by this round: the next round continues from it only if this candidate
                # becomes the champion, so a rolled-back round never advances the optimiser.
                self.records.put(round_id, self.records.server_state_name(summary["aggregator"]),
                                encode_state(built.server_state))
            if plan.privacy:  # the noisy candidate is stored: from here on its round has spent its budget
                self.ledger.record(self.privacy_event(plan))
            # Written last: its presence means the candidate (and state) above are complete.
            self.records.put_json(round_id, "candidate/manifest.json", summary)
            self._record_history(summary, self.example_history(plan.clients))
        self.audit.append(round_id, "aggregate", aggregate_events(summary))
        report.log_lines(f"round {round_id} aggregated", report.aggregate_account(summary, plan.screening))
        return summary

    # Sharded rounds (aggregation.shards > 1; fl_tasks.coordinator.shards): after `aggregate` screened.
    def shard_statistics(self, round_id: str, shard: int) -> dict[str, Any]:
        """Shard `shard`'s partial Gram matrix, when the round's rule needs one."""
        return shards.ShardedRound(self).shard_statistics(round_id, int(shard))

    def aggregate_shard(self, round_id: str, shard: int) -> dict[str, Any]:
        """Shard `shard`'s slice of the candidate, from its byte ranges of every accepted update."""
        return shards.ShardedRound(self).aggregate_shard(round_id, int(shard))

    def assemble_candidate(self, round_id: str) -> dict[str, Any]:
        """The candidate from the shards' slices: the unsharded aggregate step's outputs."""
        return shards.ShardedRound(self).assemble_candidate(round_id)

    def _noise_seed(self, plan: RoundPlan, create: bool = True) -> int | None:
        """A private round's noise seed, kept with the round (never in the audit log or MLflow):
        a re-run of the aggregate step, or a replay, draws the same noise, so the round releases
        one noisy model however often it runs. Anyone who can read it can already read the
        raw updates kept beside it."""
        if not plan.privacy:
            return None
        kept = self.records.get_json(plan.round_id, "privacy/noise_seed.json")
        if kept is None and create:
            import secrets

            kept = {"seed": secrets.randbits(63)}
            self.records.put_json(plan.round_id, "privacy/noise_seed.json", kept)
        return None if kept is None else int(kept["seed"])

    def replay(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """Rebuild a round's screening and candidate from its audit events and the update
        snapshots it kept: the plan and the closed set come from the log, and every kept
        manifest must still hash to what the log recorded. Writes nothing new."""
        planned = [e for e in events if e.get("event") == "round_planned"]
        closed = [e for e in events if e.get("event") == "round_closed"]
        if len(planned) != 1 or len(closed) != 1:
            raise ValueError("the log needs exactly one round_planned and one round_closed event")
        plan = RoundPlan(**planned[0]["plan"])
        record = closed[0]
        committed = {c: record["answers"][c] for c in record["committed"]}
        # Checked first: a changed copy would otherwise only show as that update's rejection,
        # or as a quorum error when the rejection leaves too few updates to build a candidate.
        changed = sorted(c for c, entry in committed.items() if self.records.get(
            plan.round_id, f"updates/{c}/manifest.json", sha256=entry["manifest_sha256"]) is None)
        if changed:
            raise ValueError(f"the kept manifests no longer hash to what the round saw: {changed}")
        summary = self._builder(plan, record["history"], fetch=False).build(
            committed, self._server_state(plan), self._noise_seed(plan, create=False)).summary
        logged = {e["client_id"]: e["manifest_sha256"] for e in events if e.get("event") == "update_seen"}
        seen = {client_id: entry["manifest_sha256"] for client_id, entry in summary["seen"].items()}
        if logged != seen:
            changed = sorted(c for c in set(logged) | set(seen) if logged.get(c) != seen.get(c))
            raise ValueError(f"the kept manifests no longer hash to what the round saw: {changed}")
        return {"accepted": sorted(a["client_id"] for a in summary["accepted"]),
                "rejected": {r["client_id"]: r["reason"] for r in summary["rejected"]},
                "candidate_sha256": summary["candidate_sha256"]}

    def _version_sha256(self, version: str) -> str | None:
        if version == "seed":
            return sha256_hex(self.seed_payload())
        from fl_tasks.coordinator import registry

        return registry.version_weights_sha256(self.spec, version)

    # --- step 5: evaluate on the silos (federated evaluation) -------------------------------
    def request_evaluation(self, round_id: str) -> list[str]:
        """Publish the candidate (and the champion) to the silos whose update was accepted."""
        return self.evaluation.request(round_id)

    def check_evaluations(self, round_id: str, now_: datetime | None = None) -> quorum.QuorumDecision:
        return self.evaluation.check(round_id, now_)

    def close_evaluation(self, round_id: str, decision: quorum.QuorumDecision) -> dict[str, Any]:
        return self.evaluation.close(round_id, decision)

    def prepare_evaluation(self, ctx: RunContext) -> str:
        """An evaluation-only run: the champion (and `ctx.params['version']`) scored by every silo."""
        return self.evaluation.prepare_check(ctx.run_id, (ctx.params or {}).get("version"))

    def report_evaluation(self, round_id: str) -> dict[str, Any]:
        return self.evaluation.report_check(round_id)

    # --- drift: the silos' scores, as a silo x column table ----------------------------------
    def kept_updates(self, round_id: str, clients: list[str]) -> dict[str, UpdateManifest | None]:
        """The update manifests the round closed with (None: gone or no longer readable)."""
        kept = {}
        for client_id in clients:
            data = self.records.get(round_id, f"updates/{client_id}/manifest.json")
            try:
                kept[client_id] = None if data is None else UpdateManifest.from_json(data)
            except ManifestError:
                kept[client_id] = None
        return kept

    def drift_table(self, round_id: str) -> DriftTable | None:
        """The round's drift table (drift.json), built once from the committed updates' drift
        scores; None when the round asked for no drift or never closed."""
        stored = self.records.get_json(round_id, "drift.json")
        if stored is not None:
            return DriftTable.from_dict(stored)
        plan = self.load_plan(round_id)
        closed = self.records.get_json(round_id, "quorum.json")
        if not plan.drift or closed is None:
            return None
        kept = self.kept_updates(round_id, closed["committed"])
        table = build_drift_table(round_id, tuple(plan.drift["columns"]),
                                  {c: None if m is None else m.drift for c, m in kept.items()})
        self.records.put_json(round_id, "drift.json", table.as_dict())
        report.log_lines(f"round {round_id} drift", report.drift_account(table))
        return table

    # --- step 6: validate ----------------------------------------------------------------
    def load_model(self, round_id: str, name: str, sha256: str):
        """The task's model with the weights kept at `name` (checked against `sha256`)."""
        from fl_tasks.tasks.api import load_model_state

        payload = self.records.get(round_id, name, sha256=sha256)
        if payload is None:
            raise RoundFailed(f"{self.records.uri(round_id, name)} is missing or does not match its sha256")
        return load_model_state(self.task.build_model(), decode_state(payload))

    def validate(self, round_id: str) -> dict[str, Any]:
        """Apply the gates to the figures of every configured source: the silos' evaluations
        (federated) and the coordinator's own rows. Every gate must pass."""
        existing = self.records.get_json(round_id, "validation.json")
        if existing is not None:
            self._audit_validation(round_id, existing)
            return existing
        plan = self.load_plan(round_id)
        settings = plan.settings
        sources = self.spec.evaluation.sources
        result: dict[str, Any] = {"primary_metric": self.task.primary_metric, "sources": list(sources), "gates": [],
                                  "federated_evaluation": None, "coordinator_evaluation": None,
                                  "personalization": None}
        if "federated" in sources:
            from fl_tasks.coordinator.evaluation import CANDIDATE, CHAMPION, federated_gates

            evaluated = self.evaluation.results(round_id)
            self.evaluation.audit_results(round_id, evaluated)
            statistic, figures = evaluated["plan"].statistic, evaluated["figures"]
            result["federated_evaluation"] = {"statistic": statistic, "per_silo": evaluated["accepted"],
                                   "not_counted": evaluated["closed"]["not_counted"], "figures": figures,
                                   "required": evaluated["plan"].required}
            result["gates"] += federated_gates(evaluated["accepted"], figures, statistic, evaluated["plan"].required,
                                               evaluated["closed"], settings["gate_thresholds"],
                                               settings["max_regression"], settings["max_silo_regression"], self.task)
            deciding = figures[statistic]
            result["candidate"], result["champion"] = deciding.get(CANDIDATE), deciding.get(CHAMPION)
            result["personalization"] = self.evaluation.personalization(evaluated)
        if "coordinator" in sources:
            measured = self._coordinator_figures(round_id, plan)
            result["coordinator_evaluation"] = {k: measured[k] for k in ("candidate", "champion", "rows", "data")}
            result["gates"] += [{**g, "source": "coordinator"} for g in measured["gates"]]
            if "federated" not in sources:
                result["candidate"], result["champion"] = measured["candidate"], measured["champion"]
        table = self.drift_table(round_id)
        gate = drift_gate(table, self.spec.drift.action) if table is not None and self.spec.drift else None
        if gate is not None:
            result["gates"].append(gate)
        result["passed"] = all(g["passed"] for g in result["gates"])
        failed = sorted({g["source"] for g in result["gates"] if not g["passed"]})
        result["decided_by"] = failed or list(sources)
        self.records.put_json(round_id, "validation.json", result)
        self._audit_validation(round_id, result)
        return result

    def _coordinator_figures(self, round_id: str, plan: RoundPlan) -> dict[str, Any]:
        """Candidate and champion on the coordinator's own rows (evaluation.coordinator_data)."""
        from fl_tasks.coordinator.gates import evaluate_gates
        from fl_tasks.coordinator.validation import ValidationDataError, read_validation_rows

        uri = self.spec.evaluation.coordinator_data
        try:
            rows = read_validation_rows(uri, self.spec.contract, self.store)
        except ValidationDataError as exc:
            raise self.records.fail(round_id, "validate", str(exc)) from None
        task = self.task
        summary = self.records.get_json(round_id, "candidate/manifest.json")
        candidate = task.evaluate(self.load_model(round_id, "candidate/model.safetensors", summary["candidate_sha256"]),
                                  rows)
        champion = None
        if plan.base_version != "seed":
            champion = task.evaluate(self.load_model(round_id, "base/model.safetensors", plan.base_sha256), rows)
        gates = evaluate_gates(candidate, champion, plan.settings["gate_thresholds"], plan.settings["max_regression"],
                               task)
        return {"candidate": candidate, "champion": champion, "rows": len(rows), "data": uri, "gates": gates}

    def _audit_validation(self, round_id: str, result: dict[str, Any]) -> None:
        report.log_lines(f"round {round_id} validated ({report.sources_text(result)})", report.validation_account(result))
        self.audit.append(round_id, "validate", [{"event": "gates_evaluated", "passed": result["passed"],
                                                  "gates": result["gates"], "decided_by": result["decided_by"],
                                                  "candidate": result["candidate"], "champion": result["champion"]}])

    # --- step 7: register ----------------------------------------------------------------
    def register(self, round_id: str) -> str:
        """Log the round to MLflow and register the candidate version (once per round)."""
        from fl_tasks.coordinator import registry

        existing = self.records.get_json(round_id, "registration.json")
        if existing is not None:
            self._audit_registration(round_id, existing["version"])
            return existing["version"]
        plan = self.load_plan(round_id)
        summary = self.records.get_json(round_id, "candidate/manifest.json")
        result = self.records.get_json(round_id, "validation.json")
        closed = self.records.get_json(round_id, "quorum.json")
        model = self.load_model(round_id, "candidate/model.safetensors", summary["candidate_sha256"])
        metrics = {f"candidate_{k}": v for k, v in (result["candidate"] or {}).items()}
        metrics.update({f"champion_{k}": v for k, v in (result["champion"] or {}).items()})
        metrics.update(report.evaluation_metrics(result))
        # weight_<client>: the client's share of the candidate under the round's rule; rules that
        # give no update a weight (median, trimmed mean, Bulyan) log none (see the `influence` param).
        metrics.update({f"weight_{a['client_id']}": a["influence"] for a in summary["accepted"]
                        if a["influence"] is not None})
        if summary["selected"] is not None:
            metrics.update({f"selected_{a['client_id']}": float(a["client_id"] in summary["selected"])
                            for a in summary["accepted"]})
        metrics.update({"clients_accepted": len(summary["accepted"]), "clients_rejected": len(summary["rejected"]),
                        "clients_declined": len(closed["declined"]), "total_examples": summary["total_examples"]})
        privacy = self.privacy_figures(plan)
        tags = report.evaluation_tags(result)
        if privacy is not None:
            metrics.update({"dp_epsilon": privacy["epsilon"], "dp_rounds_released": privacy["rounds_released"]})
            tags.update({"fl.dp_epsilon": f"{privacy['epsilon']:.4f}", "fl.dp_delta": f"{privacy['delta']:g}"})
        params = {**{k: v for k, v in plan.settings.items()}, **{f"training_{k}": v for k, v in plan.training.items()},
                  "participating_clients": ",".join(a["client_id"] for a in summary["accepted"]),
                  "declined_clients": ",".join(sorted(closed["declined"])),
                  "influence": summary["rule"], "task": plan.task["entrypoint"], "task_version": plan.task["version"],
                  "base_version": plan.base_version, "base_origin": plan.base_origin, "round_id": round_id,
                  **{f"privacy_{k}": v for k, v in plan.privacy.items() if k != "sampled"}}
        personal = result.get("personalization")
        if personal:
            metrics.update(report.personalization_metrics(personal))
            tags.update(report.personalization_tags(personal, lineage=False))
            params.update({f"personalization_{k}": v for k, v in plan.personalization.items() if k != "local_tensors"})
        key = self.round_key(round_id, "candidate/model.safetensors")
        registered = registry.register_candidate(
            self.spec, model, round_id=round_id, airflow_run_id=plan.run_id, base_version=plan.base_version,
            base_origin=plan.base_origin, weights_uri=f"s3://{self.bucket}/{key}",
            weights_sha256=summary["candidate_sha256"], params=params, metrics=metrics,
            tags=tags, report={"plan": asdict(plan), "aggregation": summary, "validation": result, "quorum": closed},
        )
        record = asdict(registered)
        if personal:
            # The lineage names the candidate's version; with share_weights, each silo's personal
            # weights become a version of <model_name>-personal-<client>.
            record["personal_versions"] = self.evaluation.log_personalization(
                round_id, registered.run_id, report.with_versions(personal, registered.version))
        self.records.put_json(round_id, "registration.json", record)
        self._audit_registration(round_id, registered.version)
        return registered.version

    def registration(self, round_id: str) -> dict[str, Any]:
        """What register stored: the version, and the MLflow run and experiment that logged it."""
        return self.records.get_json(round_id, "registration.json") or {}

    def _audit_registration(self, round_id: str, version: str) -> None:
        summary = self.records.get_json(round_id, "candidate/manifest.json")
        self.audit.append(round_id, "register", [{"event": "model_registered", "model_name": self.spec.model_name,
                                                  "version": version,
                                                  "candidate_sha256": summary["candidate_sha256"]}])

    # --- step 8: promote or roll back ----------------------------------------------------
    def decide(self, round_id: str) -> str:
        """'promote' when every gate passed, else 'rollback'."""
        result = self.records.get_json(round_id, "validation.json")
        return "promote" if result and result["passed"] else "rollback"

    def promote(self, round_id: str) -> dict[str, Any]:
        from fl_tasks.coordinator import registry

        def move_alias(version: str) -> list[str]:
            registry.promote(self.spec, version)
            return []

        return self._decision(round_id, move_alias, "promoted")

    def rollback(self, round_id: str) -> dict[str, Any]:
        from fl_tasks.coordinator import registry

        def reject(version: str) -> list[str]:
            result = self.records.get_json(round_id, "validation.json")
            reasons = [g["detail"] for g in result["gates"] if not g["passed"]]
            registry.reject(self.spec, version, reasons)
            return reasons

        return self._decision(round_id, reject, "rejected")

    def _decision(self, round_id: str, act, decided: str) -> dict[str, Any]:
        """Act on the registry once, then record the decision (decision.json, then the audit)."""
        decision = self.records.get_json(round_id, "decision.json")
        # Decided before: a re-run (say a task cleared in the UI, long after) must not move
        # `champion` back to this round's version once later rounds have moved it on.
        if decision is None:
            version = self.register(round_id)
            reasons = act(version)
            decision = {"decision": decided, "version": version, "reasons": reasons, **self.mlflow_refs(round_id)}
            self.records.put_json(round_id, "decision.json", decision)
        base = self.load_plan(round_id).base_version
        event = {"event": "model_promoted", "version": decision["version"], "alias": "champion",
                 "previous_champion": base} if decided == "promoted" else \
            {"event": "model_rolled_back", "version": decision["version"], "reasons": decision["reasons"],
             "champion": base}
        self.audit.append(round_id, "decision", [event])
        return decision

    def mlflow_refs(self, round_id: str) -> dict[str, str]:
        """Where the round lives in MLflow, for links from Airflow: model, version, run, experiment."""
        from fl_tasks.coordinator import registry

        registration = self.registration(round_id)
        return {"model_name": self.spec.model_name, "version": registration.get("version", ""),
                "mlflow_run_id": registration.get("run_id", ""), "experiment_id": registration.get("experiment_id", ""),
                "tracking_uri": registry.tracking_uri(self.spec)}

    # --- step 9: summary -----------------------------------------------------------------
    def summarize(self, round_id: str) -> dict[str, Any]:
        """Collect what the round did: report.json (small enough for XCom), the round's
        figures and alerts, report.html with plots, the federation's history record, and the
        MLflow copies."""
        from fl_tasks.coordinator import registry
        from fl_tasks.coordinator.alerts import circuit_open_alert, privacy_budget_alert, round_alerts
        from fl_tasks.coordinator.charts import render_round_report
        from fl_tasks.coordinator.metrics import round_metrics

        plan = self.load_plan(round_id)
        closed = self.records.get_json(round_id, "quorum.json")
        summary, result, decision, failure = (self.records.get_json(round_id, name) for name in (
            "candidate/manifest.json", "validation.json", "decision.json", "failure.json"))
        drift = self.drift_table(round_id)
        uploaded = {c: m.payload_bytes for c, m in self.kept_updates(round_id, (closed or {}).get("committed") or [])
                    .items() if m is not None}
        metrics = round_metrics(plan, self.records.get_json(round_id, "dispatch.json") or {}, closed, uploaded,
                                summary, self.evaluation.stored_plan(round_id), result,
                                drift.drifted_share if drift else None)
        html_key = self.round_key(round_id, "report.html")
        privacy = self.privacy_figures(plan)
        if privacy is not None and privacy["round_released"]:
            metrics = replace(metrics, dp_epsilon=privacy["epsilon"])
        registration = self.registration(round_id)
        personal = report.with_versions((result or {}).get("personalization"), registration.get("version"),
                                        registration.get("personal_versions"))
        built = report.build_report(plan, closed, summary, result, decision, failure,
                                    late=self.late_updates(round_id, closed),
                                    audit_log=f"s3://{self.bucket}/{self.audit.prefix(round_id)}",
                                    metrics=metrics, drift=drift, report_html=f"s3://{self.bucket}/{html_key}",
                                    privacy=privacy, personalization=personal)
        history = [r for r in self.history.rounds() if r.round_id != round_id]
        record = RoundRecord(
            round_id=round_id, run_id=plan.run_id, dag_id=self.spec.dag_id, run_type=plan.run_type,
            triggered_by=plan.triggered_by, decision=built["decision"], version=built["version"],
            base_version=plan.base_version, reason=built["reason"], finished_at=now().isoformat(), metrics=metrics,
            mlflow=self.mlflow_refs(round_id), report_html=built["report_html"])
        # A refused round did nothing: only what refused it has something to say.
        refused_by = (failure or {}).get("refused") if built["decision"] == REFUSED else None
        alerts = [] if refused_by else round_alerts(
            self.spec, metrics, built["decision"], built["reason"], drift, self.task.primary.higher_is_better)
        if refused_by == "privacy_budget":
            alerts.append(privacy_budget_alert(self.spec.federation, round_id, built["reason"], privacy))
        breaker = self.breaker.state(history + [record])
        if refused_by in ("circuit_breaker", True) or (breaker.open and not refused_by):
            alerts.append(circuit_open_alert(self.spec.federation, round_id,
                                             [(r.round_id, r.reason) for r in breaker.streak], breaker.limit,
                                             refused=bool(refused_by)))
        built["alerts"] = [a.as_dict() for a in alerts]
        html = render_round_report(history, record, drift)
        self.store.put_bytes(self.bucket, html_key, html.encode(), "text/html; charset=utf-8")
        self.records.put_json(round_id, "report.json", built)
        self.history.record(record, history)
        self.audit.append(round_id, "summary", [*({"event": "update_late", **entry} for entry in built["late"]),
                                                *({"event": "alert", **a} for a in built["alerts"]),
                                                {"event": "round_summarized", "decision": built["decision"],
                                                 "version": built["version"], "reason": built["reason"]}])
        # The bucket holds the records of record; the MLflow copies are for people browsing runs.
        files = {"audit/audit.jsonl": self.audit.jsonl(round_id).decode(), "report/report.html": html}
        if drift is not None:
            files["drift/drift.json"] = json.dumps(drift.as_dict(), indent=1)
        registry.log_round_record(self.spec, round_id, files, metrics.flat())
        report.log_lines(f"round {round_id} summary", report.summary_table(built))
        return built

    def late_updates(self, round_id: str, closed: dict[str, Any] | None) -> list[dict[str, str]]:
        """Answers written after the round closed, or changed since: never used, only recorded."""
        if closed is None:
            return []
        plan = self.load_plan(round_id)
        late = []
        for client_id, answer in sorted(self.answers(round_id, plan).items()):
            if not isinstance(answer, Answer) or answer.kind != "update":
                continue
            kept = closed["answers"].get(client_id)
            if client_id not in closed["committed"]:
                late.append({"client_id": client_id, "committed_at": answer.committed_at.isoformat()})
            elif kept and kept["manifest_sha256"] != answer.manifest_sha256:
                late.append({"client_id": client_id, "committed_at": answer.committed_at.isoformat(),
                             "note": "re-committed after the close; the round used the update it closed with"})
        return late


def run_round(spec: FederationSpec, ctx: RunContext, store: ObjectStore | None = None,
              poll_seconds: float | None = None, keys: signing.KeyProvider | None = None) -> dict[str, Any]:
    """A whole round without Airflow: the same steps, with blocking waits for the quorum and
    the silos' evaluations."""
    coordinator = Coordinator(spec, store, keys)
    round_id = coordinator.prepare(ctx)
    coordinator.dispatch(round_id)
    while (decision := coordinator.check_quorum(round_id)).state == quorum.WAITING:
        time.sleep(poll_seconds or spec.quorum.poll_interval_seconds)
    coordinator.close_round(round_id, decision)
    try:
        coordinator.aggregate(round_id)
        count = shards.shard_count(coordinator.load_plan(round_id))
        if count > 1:  # what the DAG's mapped tasks do, one after another
            for step in (coordinator.shard_statistics, coordinator.aggregate_shard):
                for shard in range(count):
                    step(round_id, shard)
            coordinator.assemble_candidate(round_id)
        if spec.evaluation.federated is not None:
            coordinator.request_evaluation(round_id)
            while (decision := coordinator.check_evaluations(round_id)).state == quorum.WAITING:
                time.sleep(poll_seconds or spec.quorum.poll_interval_seconds)
            coordinator.close_evaluation(round_id, decision)
        coordinator.validate(round_id)
        coordinator.register(round_id)
        getattr(coordinator, coordinator.decide(round_id))(round_id)
    except RoundFailed:
        pass
    return coordinator.summarize(round_id)
