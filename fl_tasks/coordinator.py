"""One plain function per step of a round. Each Airflow task calls exactly one of them.

Steps share state through the coordinator's bucket, never through memory, so any step can
be retried or run in another process; `run_round` chains them for use without Airflow.

Coordinator bucket, for round R of federation F:

    <F>/runs/<sha of run id>.json            which round a DAG run claimed (retries reuse it)
    <F>/rounds/<R>/plan.json                 settings, base model, deadline, clients
    <F>/rounds/<R>/base/model.safetensors    the model dispatched this round
    <F>/rounds/<R>/quorum.json               who committed when the round closed
    <F>/rounds/<R>/candidate/model.safetensors, candidate/manifest.json
    <F>/rounds/<R>/validation.json, registration.json, decision.json, failure.json
    <F>/rounds/<R>/report.json               the round summary
    <F>/audit/<R>/NN-<step>.jsonl            the round's audit log, write-once (fl_tasks.audit)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from fl_tasks import protocol, quorum, round_log, screening, signing, staleness
from fl_tasks.audit import AuditLog
from fl_tasks.codec import CodecError, decode_state, encode_state
from fl_tasks.config import FederationSpec
from fl_tasks.protocol import GlobalManifest, ManifestError, UpdateManifest, sha256_hex
from fl_tasks.storage import ObjectStore, ObjectTooLarge

log = logging.getLogger(__name__)

OVERRIDABLE = ("aggregator", "aggregator_params", "min_clients", "min_fraction", "round_timeout_minutes",
               "grace_period_minutes", "local_epochs", "learning_rate", "min_roc_auc", "min_pr_auc", "max_regression")


class RoundFailed(RuntimeError):
    """The round cannot produce a model; the reason is recorded in failure.json."""


@dataclass(frozen=True)
class RunContext:
    """What the orchestrator knows about the run that carries this round."""

    run_id: str
    run_type: str = "manual"  # manual | scheduled | backfill | asset_triggered
    data_interval_start: str | None = None
    data_interval_end: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    triggered_by: str = ""


@dataclass(frozen=True)
class RoundPlan:
    federation: str
    round_id: str
    run_id: str
    run_type: str
    triggered_by: str
    base_version: str  # MLflow version of the champion, or "seed"
    base_sha256: str
    base_bytes: int
    deadline: str
    clients: list[str]
    settings: dict[str, Any]  # effective values of OVERRIDABLE
    aggregation: dict[str, Any]  # strategy, params, clip_norm
    screening: dict[str, Any]
    base_round_id: str | None  # the round that produced the base (its server-optimiser state continues)
    training: dict[str, Any]
    data_window: dict[str, str | None]
    created_at: str
    staleness: dict[str, Any]  # the federation's staleness policy

    @classmethod
    def from_json(cls, data: bytes) -> "RoundPlan":
        return cls(**json.loads(data))


@dataclass(frozen=True)
class ScreenedUpdate:
    """An update that passed screening, with its aggregation weight (example count, times
    the staleness share for a stale one)."""

    manifest: UpdateManifest
    staleness: int
    weight: float


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


class Coordinator:
    """Holds the federation spec and the object store; methods are the round's steps."""

    def __init__(self, spec: FederationSpec, store: ObjectStore | None = None,
                 keys: signing.KeyProvider | None = None):
        """`keys`: client id -> that client's signing key (bytes) or None; by default the
        FL_SIGNING_KEY_<CLIENT_ID> variables (the DAG passes Airflow connections)."""
        self.spec = spec
        self.store = store or ObjectStore(spec.endpoint_url)
        self.bucket = spec.coordinator_bucket
        self.audit = AuditLog(self.store, self.bucket, spec.federation)
        self.keys = keys if keys is not None else signing.EnvKeys()

    # --- keys and small helpers ---------------------------------------------------------
    def round_key(self, round_id: str, name: str) -> str:
        return f"{protocol.round_prefix('', self.spec.federation, round_id)}/{name}"

    def _put_json(self, key: str, obj: Any) -> None:
        self.store.put_bytes(self.bucket, key, _dump(obj), "application/json")

    def _get_json(self, key: str) -> Any | None:
        data = self.store.get_bytes(self.bucket, key)
        return None if data is None else json.loads(data)

    def load_plan(self, round_id: str) -> RoundPlan:
        data = self.store.get_bytes(self.bucket, self.round_key(round_id, "plan.json"))
        if data is None:
            raise RoundFailed(f"round {round_id} has no plan; run the prepare step first")
        return RoundPlan.from_json(data)

    def _fail(self, round_id: str, step: str, reason: str) -> RoundFailed:
        self._put_json(self.round_key(round_id, "failure.json"), {"step": step, "reason": reason, "at": _now().isoformat()})
        self.audit.append(round_id, step, [{"event": "round_failed", "reason": reason}], failed=True)
        return RoundFailed(reason)

    def effective_settings(self, params: dict[str, Any]) -> dict[str, Any]:
        s = self.spec
        settings = {
            "aggregator": s.aggregation, "min_clients": s.quorum.min_clients, "min_fraction": s.quorum.min_fraction,
            "round_timeout_minutes": s.quorum.round_timeout_minutes,
            "grace_period_minutes": s.quorum.grace_period_minutes, "local_epochs": s.training.local_epochs,
            "learning_rate": s.training.learning_rate, "min_roc_auc": s.gates.min_roc_auc,
            "min_pr_auc": s.gates.min_pr_auc, "max_regression": s.gates.max_regression,
        }
        for name in OVERRIDABLE:
            if params.get(name) is not None:
                settings[name] = params[name]
        if settings.get("aggregator_params") is None:
            # The file's strategy parameters belong to the file's strategy only.
            settings["aggregator_params"] = dict(s.aggregation_params) if settings["aggregator"] == s.aggregation else {}
        from fl_tasks.aggregation import build

        strategy = build(settings["aggregator"], **settings["aggregator_params"])  # bad names or values fail here
        if strategy.min_updates > len(s.clients):
            raise ValueError(f"{settings['aggregator']} with {settings['aggregator_params']} needs at least "
                             f"{strategy.min_updates} client updates; the federation has {len(s.clients)} clients")
        if not 1 <= int(settings["min_clients"]) <= len(s.clients):
            raise ValueError(f"param 'min_clients'={settings['min_clients']} must be between 1 and {len(s.clients)}")
        if settings["min_fraction"] is not None and not 0 < float(settings["min_fraction"]) <= 1:
            raise ValueError(f"param 'min_fraction'={settings['min_fraction']} must be in (0, 1]")
        if settings["grace_period_minutes"] is not None and float(settings["grace_period_minutes"]) < 0:
            raise ValueError(f"param 'grace_period_minutes'={settings['grace_period_minutes']} must not be negative")
        return settings

    # --- step 1: prepare -----------------------------------------------------------------
    def _next_round_number(self) -> int:
        prefix = protocol.rounds_listing_prefix("", self.spec.federation)
        numbers = [0]
        for key in self.store.list_keys(self.bucket, prefix):
            name = key[len(prefix):].split("/", 1)[0]
            if name.isdigit():
                numbers.append(int(name))
        return max(numbers) + 1

    def _claim_key(self, run_id: str) -> str:
        return f"{self.spec.federation}/runs/{hashlib.sha256(run_id.encode()).hexdigest()[:32]}.json"

    def prepare(self, ctx: RunContext) -> str:
        """Fix the round id, the base model and the deadline; returns the round id.

        Re-running it for the same DAG run returns the same round and rewrites nothing.
        """
        claim = self._get_json(self._claim_key(ctx.run_id))
        if claim is not None:
            planned = self.store.get_bytes(self.bucket, self.round_key(claim["round_id"], "plan.json"))
            if planned is not None:
                owner = RoundPlan.from_json(planned).run_id
                if owner != ctx.run_id:
                    raise RoundFailed(f"round {claim['round_id']} claimed by this run was taken by run {owner!r}")
                self._audit_plan(RoundPlan.from_json(planned))
                return claim["round_id"]
        settings = self.effective_settings(ctx.params)
        if claim is not None:  # an earlier try claimed the round and died before writing the plan
            round_id = claim["round_id"]
        else:
            if ctx.params.get("round_id"):
                round_id = protocol.validate_round_id(str(ctx.params["round_id"]))
            elif ctx.run_type in ("scheduled", "backfill") and ctx.data_interval_start:
                round_id = protocol.round_id_for_interval(datetime.fromisoformat(ctx.data_interval_start))
            else:
                round_id = protocol.round_id_for_number(self._next_round_number())
            existing = self.store.get_bytes(self.bucket, self.round_key(round_id, "plan.json"))
            if existing is not None:
                other = RoundPlan.from_json(existing).run_id
                raise RoundFailed(f"round {round_id} already belongs to run {other!r}; pick another round_id")
            # Claimed first: a retry after a crash below finds the same round, never a new number.
            self._put_json(self._claim_key(ctx.run_id), {"round_id": round_id, "run_id": ctx.run_id})

        from fl_tasks import registry

        champion = registry.get_champion(self.spec)
        if champion is None:
            base_version, base_round_id, payload = "seed", None, self._seed_payload()
        else:
            base_version, base_round_id, payload = champion.version, champion.round_id, self.read_champion(champion)
        base_key = self.round_key(round_id, "base/model.safetensors")
        self.store.put_bytes(self.bucket, base_key, payload)
        deadline = _now() + timedelta(minutes=float(settings["round_timeout_minutes"]))
        t = self.spec.training
        plan = RoundPlan(
            federation=self.spec.federation, round_id=round_id, run_id=ctx.run_id, run_type=ctx.run_type,
            triggered_by=ctx.triggered_by, base_version=base_version, base_sha256=sha256_hex(payload),
            base_bytes=len(payload), deadline=deadline.isoformat(), clients=[c.id for c in self.spec.clients],
            settings=settings,
            aggregation={"strategy": settings["aggregator"], "params": settings["aggregator_params"],
                         "clip_norm": self.spec.clip_norm},
            screening=asdict(self.spec.screening), base_round_id=base_round_id,
            training={"local_epochs": int(settings["local_epochs"]), "learning_rate": float(settings["learning_rate"]),
                      "batch_size": t.batch_size, "proximal_mu": t.proximal_mu, "codec": t.codec},
            data_window={"start": ctx.data_interval_start, "end": ctx.data_interval_end}
            if ctx.run_type in ("scheduled", "backfill") and t.window == "interval" else {"start": None, "end": None},
            created_at=_now().isoformat(), staleness=asdict(self.spec.staleness),
        )
        self._put_json(self.round_key(round_id, "plan.json"), asdict(plan))
        self._audit_plan(plan)
        return round_id

    def _audit_plan(self, plan: RoundPlan) -> None:
        # The whole plan, who started the run included: a replay needs nothing else from us.
        self.audit.append(plan.round_id, "prepare", [{"event": "round_planned", "run_id": plan.run_id,
                                                      "run_type": plan.run_type, "triggered_by": plan.triggered_by,
                                                      "plan": asdict(plan)}])

    def _seed_payload(self) -> bytes:
        from fl_tasks.models import build_model, state_to_numpy

        return encode_state(state_to_numpy(build_model(self.spec.model, seed=self.spec.model.seed)))

    def read_champion(self, champion) -> bytes:
        bucket, _, key = champion.weights_uri.removeprefix("s3://").partition("/")
        payload = self.store.get_bytes(bucket, key)
        if payload is None or sha256_hex(payload) != champion.weights_sha256:
            raise RoundFailed(f"champion version {champion.version} weights at {champion.weights_uri} are missing "
                              "or do not match their sha256 tag")
        return payload

    # --- step 2: dispatch ----------------------------------------------------------------
    def dispatch(self, round_id: str) -> list[str]:
        """Publish the base model to every client bucket, payload first, manifest last."""
        plan = self.load_plan(round_id)
        payload = self.store.get_bytes(self.bucket, self.round_key(round_id, "base/model.safetensors"))
        if payload is None or sha256_hex(payload) != plan.base_sha256:
            raise self._fail(round_id, "dispatch", "the round's base model is missing or corrupted")
        manifest = GlobalManifest(
            federation=plan.federation, round_id=round_id, model_name=self.spec.model_name,
            model_version=plan.base_version, model=asdict(self.spec.model), payload_sha256=plan.base_sha256, payload_bytes=plan.base_bytes,
            training=plan.training, data_window=plan.data_window, deadline=plan.deadline, created_at=plan.created_at,
        ).to_json()
        events = []
        for client in self.spec.clients:
            manifest_key = protocol.global_manifest_key(client.prefix, plan.federation, round_id)
            events.append({"event": "model_dispatched", "client_id": client.id, "bucket": client.bucket_name,
                           "manifest_key": manifest_key, "manifest_sha256": sha256_hex(manifest),
                           "payload_sha256": plan.base_sha256, "model_version": plan.base_version})
            if self.store.get_bytes(client.bucket_name, manifest_key) == manifest:
                continue  # already committed by an earlier try
            self.store.put_bytes(client.bucket_name,
                                 protocol.global_model_key(client.prefix, plan.federation, round_id), payload)
            self.store.put_bytes(client.bucket_name, manifest_key, manifest, "application/json")
        self.audit.append(round_id, "dispatch", events)
        return plan.clients

    # --- step 3: wait for quorum ---------------------------------------------------------
    def commits(self, round_id: str) -> dict[str, datetime]:
        """Clients whose update manifest (the commit marker) exists for this round, and when
        it was written."""
        found = {}
        for c in self.spec.clients:
            written = self.store.last_modified(c.bucket_name,
                                               protocol.update_manifest_key(c.prefix, self.spec.federation, round_id))
            if written is not None:
                found[c.id] = written
        return found

    def check_quorum(self, round_id: str, now: datetime | None = None) -> quorum.QuorumDecision:
        plan = self.load_plan(round_id)
        return quorum.decide(self.commits(round_id), plan.clients, required_clients(plan),
                             datetime.fromisoformat(plan.deadline), now or _now(), grace_period(plan))

    def close_round(self, round_id: str, decision: quorum.QuorumDecision) -> dict[str, Any]:
        """Record who is in the round; the first close wins so a re-run cannot change it."""
        key = self.round_key(round_id, "quorum.json")
        record = self._get_json(key)
        if record is None:
            commits = self.commits(round_id)
            record = {"state": decision.state, "committed": list(decision.committed), "reason": decision.reason,
                      "closed_at": _now().isoformat(),
                      "commit_times": {c: commits[c].isoformat() for c in decision.committed if c in commits}}
            if decision.state == quorum.FAILED:
                self._fail(round_id, "quorum", decision.reason)
            self._put_json(key, record)
        self.audit.append(round_id, "quorum", [{"event": "round_closed", **record}])
        return record

    # --- step 4: aggregate ---------------------------------------------------------------
    def _read_manifest(self, plan: RoundPlan, client_id: str) -> UpdateManifest:
        """One client's committed update manifest, checked against the round."""
        client = self.spec.client(client_id)
        raw = self.store.get_bytes(client.bucket_name, protocol.update_manifest_key(client.prefix, plan.federation,
                                                                                  plan.round_id),
                                   max_bytes=protocol.MAX_MANIFEST_BYTES)
        if raw is None:
            raise ValueError("update manifest disappeared")
        manifest = UpdateManifest.from_json(raw)
        self._check_signature(client_id, manifest)
        expected = {"client_id": client_id, "federation": plan.federation, "round_id": plan.round_id}
        for name, value in expected.items():
            if getattr(manifest, name) != value:
                raise ValueError(f"manifest {name}={getattr(manifest, name)!r} does not match the round ({value!r})")
        return manifest

    def _staleness(self, plan: RoundPlan, manifest: UpdateManifest) -> int:
        """0 for an update on the dispatched base; for an older base, how many versions behind,
        when the federation's staleness policy accepts it; raises ValueError otherwise."""
        if manifest.base_model_version == plan.base_version and manifest.base_sha256 == plan.base_sha256:
            return 0
        if manifest.base_model_version == plan.base_version:
            raise ValueError(f"base_sha256 does not match the dispatched version {plan.base_version}")
        behind = staleness.versions_behind(plan.base_version, manifest.base_model_version)
        if behind is None:
            raise ValueError(f"base version {manifest.base_model_version!r} is not an earlier version of this "
                             f"federation's model (the round dispatched {plan.base_version})")
        policy = plan.staleness
        where = f"stale update: trained on version {manifest.base_model_version}, {behind} behind the dispatched " \
                f"{plan.base_version}"
        if policy["policy"] == "reject":
            raise ValueError(f"{where}; staleness.policy is 'reject'")
        if behind > policy["max_staleness"]:
            raise ValueError(f"{where}, over staleness.max_staleness={policy['max_staleness']}")
        if manifest.base_sha256 != self._version_sha256(manifest.base_model_version):
            raise ValueError(f"base_sha256 does not match the registered weights of version "
                             f"{manifest.base_model_version}")
        return behind

    def _version_sha256(self, version: str) -> str | None:
        if version == "seed":
            return sha256_hex(self._seed_payload())
        from fl_tasks import registry

        return registry.version_weights_sha256(self.spec, version)

    def _check_signature(self, client_id: str, manifest: UpdateManifest) -> None:
        """Signed manifests are verified with the key of the bucket's owner; unsigned ones
        pass only when the federation does not require signatures."""
        if not manifest.signature:
            if self.spec.security.require_signatures:
                raise signing.SignatureError("unsigned update: federation requires signatures")
            return
        key = self.keys(client_id)
        if not key:
            where = getattr(self.keys, "source", None)
            create = where(client_id) if where else \
                f"Airflow connection '{self.spec.security.conn_id(self.spec.federation, client_id)}'"
            raise signing.SignatureError(f"signed update but no signing key for client '{client_id}': create {create} "
                                         "holding the client's key")
        signing.verify_manifest(manifest, signing.as_key(key, f"the signing key of client '{client_id}'"))

    def _read_state(self, plan: RoundPlan, manifest: UpdateManifest, base: dict[str, np.ndarray]) -> dict:
        """The update's tensors; the payload must still match the manifest's sha256 at every read."""
        client = self.spec.client(manifest.client_id)
        payload = self.store.get_bytes(client.bucket_name,
                                       protocol.update_payload_key(client.prefix, plan.federation, plan.round_id),
                                       max_bytes=2 * plan.base_bytes + 4096)
        if payload is None:
            raise ValueError("manifest committed but the payload is missing")
        if sha256_hex(payload) != manifest.payload_sha256:
            raise ValueError("payload sha256 does not match the manifest")
        if len(payload) != manifest.payload_bytes:
            raise ValueError(f"payload is {len(payload)} bytes, the manifest says {manifest.payload_bytes}")
        state = decode_state(payload, manifest.codec)
        screening.check_structure(state, base)
        return state

    def _screen(self, plan: RoundPlan, committed: list[str], base: dict[str, np.ndarray],
                rejected: list[dict[str, Any]], seen: dict[str, dict[str, Any]]) -> dict[str, "ScreenedUpdate"]:
        """Every check before aggregation; returns the accepted updates, records the rest in
        `rejected`, and what each readable manifest said in `seen`."""
        accepted: dict[str, ScreenedUpdate] = {}
        norms: dict[str, float] = {}
        rules = plan.screening
        exponent = plan.staleness["exponent"]
        for client_id in committed:
            try:
                manifest = self._read_manifest(plan, client_id)
                seen[client_id] = {"payload_sha256": manifest.payload_sha256, "num_examples": manifest.num_examples,
                                   "base_model_version": manifest.base_model_version,
                                   "manifest_sha256": sha256_hex(manifest.to_json())}
                behind = self._staleness(plan, manifest)
                norms[client_id] = screening.update_norm(self._read_state(plan, manifest, base), base)
                seen[client_id]["update_norm"] = norms[client_id]
                weight = manifest.num_examples * (staleness.staleness_weight(behind, exponent) if behind else 1.0)
                accepted[client_id] = ScreenedUpdate(manifest, behind, weight)
            except (ValueError, ManifestError, CodecError, ObjectTooLarge) as exc:
                rejected.append({"client_id": client_id, "reason": str(exc)})
        for client_id, reason in screening.norm_outliers(norms, rules.get("max_update_norm"),
                                                         rules.get("max_norm_ratio")).items():
            rejected.append({"client_id": client_id, "reason": reason})
            del accepted[client_id]
        if rules.get("min_cosine") is not None and len(accepted) > 2:
            # Two more reads per update keep memory at O(one model): the sum, then each cosine.
            total = sum(screening.delta_vector(self._read_state(plan, u.manifest, base), base)
                        for u in accepted.values())
            for client_id, update in list(accepted.items()):
                delta = screening.delta_vector(self._read_state(plan, update.manifest, base), base)
                cosine = screening.leave_one_out_cosine(delta, total, len(accepted))
                if cosine < rules["min_cosine"]:
                    rejected.append({"client_id": client_id, "reason": f"cosine {cosine:.3f} to the mean of the "
                                                                       f"other updates is below {rules['min_cosine']}"})
                    del accepted[client_id]
        return accepted

    def _state_key(self, round_id: str, strategy: str) -> str:
        return self.round_key(round_id, f"candidate/server_state/{strategy}.safetensors")

    def build_candidate(self, plan: RoundPlan, committed: list[str]) -> tuple[dict[str, Any], bytes, dict | None]:
        """Screen the committed updates and stream the accepted ones into the strategy; writes
        nothing. Returns the summary, the candidate payload and the server-optimiser state
        (None for stateless strategies). Raises ValueError when no model can come out."""
        from fl_tasks import aggregation

        payload = self.store.get_bytes(self.bucket, self.round_key(plan.round_id, "base/model.safetensors"))
        if payload is None or sha256_hex(payload) != plan.base_sha256:
            raise ValueError("the round's base model is missing or does not match the plan's sha256")
        base = decode_state(payload)
        rejected: list[dict[str, Any]] = []
        seen: dict[str, dict[str, Any]] = {}
        accepted = self._screen(plan, committed, base, rejected, seen)
        required = required_clients(plan)
        if len(accepted) < required:
            raise ValueError(f"only {len(accepted)} updates passed screening, quorum {required}; rejected: {rejected}")
        settings = plan.aggregation
        strategy = aggregation.build(settings["strategy"], clip_norm=settings["clip_norm"], **settings["params"])
        stateful = getattr(strategy, "stateful", False)
        if stateful and plan.base_round_id:
            saved = self.store.get_bytes(self.bucket, self._state_key(plan.base_round_id, strategy.name))
            if saved is not None:
                strategy.set_state(decode_state(saved))

        def updates() -> Iterator[tuple[dict[str, np.ndarray], float]]:
            for update in accepted.values():
                yield self._read_state(plan, update.manifest, base), update.weight

        try:
            candidate = encode_state(strategy.aggregate(base, updates()))
        except ValueError as exc:
            raise ValueError(f"{strategy.name}: {exc}") from exc
        total = sum(u.weight for u in accepted.values())
        outcome = strategy.outcome
        ids = list(accepted)
        summary = {"round_id": plan.round_id, "aggregator": strategy.name, "params": settings["params"],
                   "clip_norm": settings["clip_norm"], "rejected": rejected, "seen": seen,
                   "total_examples": sum(u.manifest.num_examples for u in accepted.values()),
                   # What the rule did: `influence` is an update's share of the candidate under
                   # this rule (None where the rule gives no update a weight), never its example share.
                   "rule": outcome.rule,
                   "selected": None if outcome.selected is None else [ids[i] for i in outcome.selected],
                   "accepted": [{"client_id": u.manifest.client_id, "num_examples": u.manifest.num_examples,
                                 "staleness": u.staleness, "example_share": u.weight / total,
                                 "influence": None if outcome.influence is None else outcome.influence[i],
                                 "krum_score": None if outcome.scores is None else outcome.scores[i],
                                 "payload_sha256": u.manifest.payload_sha256, "metrics": u.manifest.metrics}
                                for i, u in enumerate(accepted.values())],
                   "candidate_sha256": sha256_hex(candidate)}
        return summary, candidate, strategy.get_state() if stateful else None

    def aggregate(self, round_id: str) -> dict[str, Any]:
        """Build the candidate from the round's closed set of updates and store it."""
        plan = self.load_plan(round_id)
        closed = self._get_json(self.round_key(round_id, "quorum.json"))
        if closed is None:
            raise self._fail(round_id, "aggregate", "the round has not closed yet; run the quorum step first")
        if closed["state"] != quorum.MET:
            raise RoundFailed(closed["reason"])
        summary = self._get_json(self.round_key(round_id, "candidate/manifest.json"))
        if summary is None:
            try:
                summary, payload, server_state = self.build_candidate(plan, closed["committed"])
            except ValueError as exc:
                raise self._fail(round_id, "aggregate", str(exc)) from exc
            self.store.put_bytes(self.bucket, self.round_key(round_id, "candidate/model.safetensors"), payload)
            if server_state is not None:
                # Keyed by this round: the next round continues from it only if this candidate
                # becomes the champion, so a rolled-back round never advances the optimiser.
                self.store.put_bytes(self.bucket, self._state_key(round_id, summary["aggregator"]),
                                     encode_state(server_state))
            # Written last: its presence means the candidate (and state) above are complete.
            self._put_json(self.round_key(round_id, "candidate/manifest.json"), summary)
        self.audit.append(round_id, "aggregate", aggregate_events(summary))
        log_lines(f"round {round_id} aggregated", round_log.aggregate_account(summary, plan.screening))
        return summary

    def replay(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """Rebuild a round's screening and candidate from its audit events alone: the plan and
        the closed set come from the log, the updates from the client buckets, and every
        manifest must still hash to what the log recorded. Writes nothing."""
        planned = [e for e in events if e.get("event") == "round_planned"]
        closed = [e for e in events if e.get("event") == "round_closed"]
        if len(planned) != 1 or len(closed) != 1:
            raise ValueError("the log needs exactly one round_planned and one round_closed event")
        plan = RoundPlan(**planned[0]["plan"])
        summary, _, _ = self.build_candidate(plan, closed[0]["committed"])
        logged = {e["client_id"]: e["manifest_sha256"] for e in events if e.get("event") == "update_seen"}
        now = {client_id: seen["manifest_sha256"] for client_id, seen in summary["seen"].items()}
        if logged != now:
            changed = sorted(c for c in set(logged) | set(now) if logged.get(c) != now.get(c))
            raise ValueError(f"the client buckets no longer hold the manifests the round saw: {changed}")
        return {"accepted": sorted(a["client_id"] for a in summary["accepted"]),
                "rejected": {r["client_id"]: r["reason"] for r in summary["rejected"]},
                "candidate_sha256": summary["candidate_sha256"]}

    # --- step 5: validate ----------------------------------------------------------------
    def _load_model(self, key: str, sha256: str | None = None):
        from fl_tasks.models import build_model, load_numpy_state

        payload = self.store.get_bytes(self.bucket, key)
        if payload is None or (sha256 and sha256_hex(payload) != sha256):
            raise RoundFailed(f"s3://{self.bucket}/{key} is missing or does not match its sha256")
        return load_numpy_state(build_model(self.spec.model), decode_state(payload))

    def validate(self, round_id: str) -> dict[str, Any]:
        """Evaluate candidate and champion on the coordinator's validation split; apply gates."""
        from fl_tasks.evaluation import evaluate
        from fl_tasks.gates import evaluate_gates

        existing = self._get_json(self.round_key(round_id, "validation.json"))
        if existing is not None:
            self._audit_validation(round_id, existing)
            return existing
        plan = self.load_plan(round_id)
        summary = self._get_json(self.round_key(round_id, "candidate/manifest.json"))
        candidate = self._load_model(self.round_key(round_id, "candidate/model.safetensors"), summary["candidate_sha256"])
        validation = validation_split(self.spec)
        candidate_metrics = evaluate(candidate, validation)
        champion_metrics = None
        if plan.base_version != "seed":
            base = self._load_model(self.round_key(round_id, "base/model.safetensors"), plan.base_sha256)
            champion_metrics = evaluate(base, validation)
        gates = evaluate_gates(candidate_metrics, champion_metrics, plan.settings)
        result = {"candidate": candidate_metrics, "champion": champion_metrics, "gates": gates,
                  "passed": all(g["passed"] for g in gates), "validation_rows": len(validation)}
        self._put_json(self.round_key(round_id, "validation.json"), result)
        self._audit_validation(round_id, result)
        return result

    def _audit_validation(self, round_id: str, result: dict[str, Any]) -> None:
        log_lines(f"round {round_id} validated on {result['validation_rows']} rows",
                  round_log.validation_account(result["candidate"], result["champion"], result["gates"]))
        self.audit.append(round_id, "validate", [{"event": "gates_evaluated", "passed": result["passed"],
                                                  "gates": result["gates"], "candidate": result["candidate"],
                                                  "champion": result["champion"]}])

    # --- step 6: register ----------------------------------------------------------------
    def register(self, round_id: str) -> str:
        """Log the round to MLflow and register the candidate version (once per round)."""
        from fl_tasks import registry

        existing = self._get_json(self.round_key(round_id, "registration.json"))
        if existing is not None:
            self._audit_registration(round_id, existing["version"])
            return existing["version"]
        plan = self.load_plan(round_id)
        summary = self._get_json(self.round_key(round_id, "candidate/manifest.json"))
        result = self._get_json(self.round_key(round_id, "validation.json"))
        key = self.round_key(round_id, "candidate/model.safetensors")
        model = self._load_model(key, summary["candidate_sha256"])
        metrics = {f"candidate_{k}": v for k, v in result["candidate"].items()}
        if result["champion"]:
            metrics.update({f"champion_{k}": v for k, v in result["champion"].items()})
        # weight_<client>: the client's share of the candidate under the round's rule; rules that
        # give no update a weight (median, trimmed mean, Bulyan) log none (see the `influence` param).
        metrics.update({f"weight_{a['client_id']}": a["influence"] for a in summary["accepted"]
                        if a["influence"] is not None})
        if summary["selected"] is not None:
            metrics.update({f"selected_{a['client_id']}": float(a["client_id"] in summary["selected"])
                            for a in summary["accepted"]})
        metrics.update({"clients_accepted": len(summary["accepted"]), "clients_rejected": len(summary["rejected"]),
                        "total_examples": summary["total_examples"]})
        params = {**plan.settings, **{f"training_{k}": v for k, v in plan.training.items()},
                  "participating_clients": ",".join(a["client_id"] for a in summary["accepted"]),
                  "influence": summary["rule"],
                  "base_version": plan.base_version, "round_id": round_id}
        registered = registry.register_candidate(
            self.spec, model, round_id=round_id, airflow_run_id=plan.run_id, base_version=plan.base_version,
            weights_uri=f"s3://{self.bucket}/{key}", weights_sha256=summary["candidate_sha256"], params=params,
            metrics=metrics, report={"plan": asdict(plan), "aggregation": summary, "validation": result},
        )
        self._put_json(self.round_key(round_id, "registration.json"), asdict(registered))
        self._audit_registration(round_id, registered.version)
        return registered.version

    def registration(self, round_id: str) -> dict[str, Any]:
        """What register stored: the version, and the MLflow run and experiment that logged it."""
        return self._get_json(self.round_key(round_id, "registration.json")) or {}

    def _audit_registration(self, round_id: str, version: str) -> None:
        summary = self._get_json(self.round_key(round_id, "candidate/manifest.json"))
        self.audit.append(round_id, "register", [{"event": "model_registered", "model_name": self.spec.model_name,
                                                  "version": version,
                                                  "candidate_sha256": summary["candidate_sha256"]}])

    # --- step 7: promote or roll back ----------------------------------------------------
    def decide(self, round_id: str) -> str:
        """'promote' when every gate passed, else 'rollback'."""
        result = self._get_json(self.round_key(round_id, "validation.json"))
        return "promote" if result and result["passed"] else "rollback"

    def promote(self, round_id: str) -> dict[str, Any]:
        from fl_tasks import registry

        version = self.register(round_id)
        registry.promote(self.spec, version)
        decision = {"decision": "promoted", "version": version, "reasons": [], **self.mlflow_refs(round_id)}
        self._put_json(self.round_key(round_id, "decision.json"), decision)
        self.audit.append(round_id, "decision", [{"event": "model_promoted", "version": version, "alias": "champion",
                                                  "previous_champion": self.load_plan(round_id).base_version}])
        return decision

    def rollback(self, round_id: str) -> dict[str, Any]:
        from fl_tasks import registry

        version = self.register(round_id)
        result = self._get_json(self.round_key(round_id, "validation.json"))
        reasons = [g["detail"] for g in result["gates"] if not g["passed"]]
        registry.reject(self.spec, version, reasons)
        decision = {"decision": "rejected", "version": version, "reasons": reasons, **self.mlflow_refs(round_id)}
        self._put_json(self.round_key(round_id, "decision.json"), decision)
        self.audit.append(round_id, "decision", [{"event": "model_rolled_back", "version": version, "reasons": reasons,
                                                  "champion": self.load_plan(round_id).base_version}])
        return decision

    def mlflow_refs(self, round_id: str) -> dict[str, str]:
        """Where the round lives in MLflow, for links from Airflow: model, version, run, experiment."""
        registration = self.registration(round_id)
        from fl_tasks import registry

        return {"model_name": self.spec.model_name, "version": registration.get("version", ""),
                "mlflow_run_id": registration.get("run_id", ""), "experiment_id": registration.get("experiment_id", ""),
                "tracking_uri": registry.tracking_uri(self.spec)}

    # --- step 8: summary -----------------------------------------------------------------
    def summarize(self, round_id: str) -> dict[str, Any]:
        """Collect what the round did into report.json; small enough for XCom."""
        plan = self.load_plan(round_id)
        read = lambda name: self._get_json(self.round_key(round_id, name))  # noqa: E731
        closed, summary, result = read("quorum.json"), read("candidate/manifest.json"), read("validation.json")
        decision, failure = read("decision.json"), read("failure.json")
        late = self.late_updates(round_id, closed)
        report = {
            "federation": plan.federation, "round_id": round_id, "run_id": plan.run_id, "run_type": plan.run_type,
            "base_version": plan.base_version, "data_window": plan.data_window, "settings": plan.settings,
            "clients_expected": len(plan.clients),
            "clients_committed": len(closed["committed"]) if closed else 0,
            "clients_accepted": [a["client_id"] for a in summary["accepted"]] if summary else [],
            "clients_rejected": summary["rejected"] if summary else [],
            "candidate": result["candidate"] if result else None,
            "champion": result["champion"] if result else None,
            "gates": result["gates"] if result else [],
            "decision": decision["decision"] if decision else "no_model",
            "version": decision["version"] if decision else None,
            "reason": (failure or {}).get("reason") or ("; ".join(decision["reasons"]) if decision else ""),
            "late": late,
            "audit_log": f"s3://{self.bucket}/{self.audit.prefix(round_id)}",
        }
        self._put_json(self.round_key(round_id, "report.json"), report)
        self.audit.append(round_id, "summary", [*({"event": "update_late", **entry} for entry in late),
                                                {"event": "round_summarized", "decision": report["decision"],
                                                 "version": report["version"], "reason": report["reason"]}])
        from fl_tasks import registry

        # The bucket holds the log of record; the MLflow copy is for people browsing runs.
        registry.log_audit(self.spec, round_id, self.audit.jsonl(round_id))
        log_lines(f"round {round_id} summary", round_log.summary_table(report))
        return report

    def late_updates(self, round_id: str, closed: dict[str, Any] | None) -> list[dict[str, str]]:
        """Updates committed after the round closed: never aggregated, only recorded."""
        if closed is None:
            return []
        return [{"client_id": client_id, "committed_at": at.isoformat()}
                for client_id, at in sorted(self.commits(round_id).items()) if client_id not in closed["committed"]]


def aggregate_events(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The aggregate step's audit events: every update seen, each verdict, the candidate."""
    events = [{"event": "update_seen", "client_id": c, **seen} for c, seen in summary["seen"].items()]
    events += [{"event": "update_accepted", "client_id": a["client_id"], "payload_sha256": a["payload_sha256"],
                "num_examples": a["num_examples"], "staleness": a["staleness"], "example_share": a["example_share"],
                "influence": a["influence"]}
               for a in summary["accepted"]]
    events += [{"event": "update_rejected", "client_id": r["client_id"], "reason": r["reason"],
                "payload_sha256": summary["seen"].get(r["client_id"], {}).get("payload_sha256")}
               for r in summary["rejected"]]
    events.append({"event": "candidate_built", "candidate_sha256": summary["candidate_sha256"],
                   "aggregator": summary["aggregator"], "params": summary["params"], "clip_norm": summary["clip_norm"],
                   "rule": summary["rule"], "selected": summary["selected"]})
    return events


def log_lines(title: str, text: str) -> None:
    """A multi-line account as one log record per line, so that tables stay aligned in Airflow's log view."""
    log.info("%s:", title)
    for line in text.splitlines():
        log.info("  %s", line)


def required_clients(plan: RoundPlan) -> int:
    """The round's quorum from its settings (min_clients and min_fraction)."""
    return quorum.required_clients(len(plan.clients), int(plan.settings["min_clients"]),
                                   plan.settings.get("min_fraction"))


def grace_period(plan: RoundPlan) -> timedelta | None:
    minutes = plan.settings.get("grace_period_minutes")
    return None if minutes is None else timedelta(minutes=float(minutes))


def validation_split(spec: FederationSpec):
    """The coordinator's gate data: a fixed, seeded share of the dataset no silo trains on."""
    from fl_tasks.datasets import holdout_split, load_dataset

    table = load_dataset(spec.data.dataset, seed=spec.data.seed, synthetic_rows=spec.data.synthetic_rows)
    return holdout_split(table, seed=spec.data.seed)[1]


def run_round(spec: FederationSpec, ctx: RunContext, store: ObjectStore | None = None,
              poll_seconds: float | None = None) -> dict[str, Any]:
    """A whole round without Airflow: the same steps, with a blocking wait for quorum."""
    coordinator = Coordinator(spec, store)
    round_id = coordinator.prepare(ctx)
    coordinator.dispatch(round_id)
    while (decision := coordinator.check_quorum(round_id)).state == quorum.WAITING:
        time.sleep(poll_seconds or spec.quorum.poll_interval_seconds)
    coordinator.close_round(round_id, decision)
    try:
        coordinator.aggregate(round_id)
        coordinator.validate(round_id)
        coordinator.register(round_id)
        getattr(coordinator, coordinator.decide(round_id))(round_id)
    except RoundFailed:
        pass
    return coordinator.summarize(round_id)
