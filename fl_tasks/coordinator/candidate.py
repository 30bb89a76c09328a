"""Building the candidate: screen the round's update snapshots, then stream the accepted
ones into the strategy. Reads only what the close and the intake kept; writes nothing.

Updates are fetched and decoded by a bounded pool ahead of their use
(`fl_tasks.coordinator.pools.read_ahead`, the window `pools.window_for(model bytes)` at a
time): screening (fetch from the silo, snapshot, decode, checks, norm) and the strategy's
stream both take them in
the round's fixed order (the close's committed order, then the accepted ones in that order),
never in arrival order. The float32 running mean of FedAvg and the server optimisers
(`fl_tasks.aggregation.mean`) rounds once per client, so another order gives another
candidate at the ulp level: folding in a fixed order makes a re-run of the step, and a
replay, give the same candidate sha256 as the sequential code did, at the cost of waiting
for a slow fetch while later ones wait decoded (at most the window of them). Memory while
streaming: the window's decoded updates ahead, the one being folded, and the aggregate:
about (window + 2) x one model, whatever the number of clients. The robust strategies
hold every update anyway (they stack an n x d matrix).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fl_tasks.coordinator import pools, screening, staleness
from fl_tasks.coordinator.bucket import CoordinatorBucket
from fl_tasks.coordinator.intake import Intake
from fl_tasks.coordinator.plan import RoundPlan, required_clients
from fl_tasks.protocol import ManifestError, UpdateManifest, sha256_hex
from fl_tasks.protocol.codec import Codec, CodecError, Packing, decode_state, decode_update, encode_state

StateDict = dict[str, np.ndarray]
HISTORY_ROUNDS = 5  # a client's recent accepted example counts that its next count is held against


@dataclass(frozen=True)
class ScreenedUpdate:
    """An update that passed screening, with its aggregation weight (example count, times
    the staleness share for a stale one)."""

    manifest: UpdateManifest
    staleness: int
    weight: float


@dataclass(frozen=True)
class Candidate:
    summary: dict[str, Any]  # candidate/manifest.json: who was accepted, rejected, and how
    payload: bytes
    server_state: StateDict | None  # server-optimiser moments (None for stateless strategies)


class CandidateBuilder:
    """Screens a closed round's updates and aggregates the accepted ones."""

    def __init__(self, plan: RoundPlan, bucket: CoordinatorBucket, intake: Intake, task,
                 version_sha256: Callable[[str], str | None], history: dict[str, list[int]],
                 declared_sizes: dict[str, int | None], max_weight_share: float | None, fetch: bool = True):
        """`fetch=False` (a replay): read only the snapshots the round kept, never a silo's bucket."""
        self.plan, self.bucket, self.intake, self.task = plan, bucket, intake, task
        self.fetch = fetch
        self.history, self.declared = history, declared_sizes
        # Asked from the read-ahead threads: each version's sha256 once, one lookup at a time.
        self._versions: dict[str, str | None] = {}
        self._versions_lock = threading.Lock()
        self._version_sha256 = version_sha256
        self.max_weight_share = max_weight_share
        self.rejected: list[dict[str, Any]] = []
        self.seen: dict[str, dict[str, Any]] = {}

    @property
    def window(self) -> int:
        """Updates read ahead: fewer for a large model (pools.window_for)."""
        return pools.window_for(self.plan.base_bytes)

    def version_sha256(self, version: str) -> str | None:
        with self._versions_lock:
            if version not in self._versions:
                self._versions[version] = self._version_sha256(version)
            return self._versions[version]

    def reject(self, client_id: str, reason: str) -> None:
        self.rejected.append({"client_id": client_id, "reason": reason})

    # --- per update -------------------------------------------------------------------------
    def base(self) -> StateDict:
        payload = self.bucket.get(self.plan.round_id, "base/model.safetensors", sha256=self.plan.base_sha256)
        if payload is None:
            raise ValueError("the round's base model is missing or does not match the plan's sha256")
        return decode_state(payload)

    def manifest(self, client_id: str, record: dict[str, Any]) -> UpdateManifest:
        """The manifest the close kept for this client (never the one in its bucket now)."""
        raw = self.bucket.get(self.plan.round_id, f"updates/{client_id}/manifest.json", sha256=record["manifest_sha256"])
        if raw is None:
            raise ValueError("the manifest kept at the close is missing from the coordinator's bucket")
        return UpdateManifest.from_json(raw)

    def staleness_of(self, manifest: UpdateManifest) -> int:
        """0 for an update on the dispatched base; for an older base, how many versions behind,
        when the staleness policy accepts it; raises ValueError otherwise."""
        plan = self.plan
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
        if manifest.base_sha256 != self.version_sha256(manifest.base_model_version):
            raise ValueError(f"base_sha256 does not match the registered weights of version "
                             f"{manifest.base_model_version}")
        return behind

    def state(self, manifest: UpdateManifest, base: StateDict) -> StateDict:
        """The update's tensors from its snapshot, with every per-update check."""
        payload = self.intake.take_snapshot(self.plan, self.bucket, manifest, self.fetch)
        state = self.decode(manifest, payload, base)
        screening.check_structure(state, base)
        rules, epochs = self.plan.screening, int(self.plan.training["local_epochs"])
        screening.check_values(state, base, max_abs=float(rules["max_abs_value"]),
                               max_increment=epochs * manifest.num_examples, ranges=self.task.tensor_ranges)
        return state

    def snapshot_state(self, manifest: UpdateManifest, base: StateDict) -> StateDict:
        """An accepted update's tensors, again from its snapshot (same bytes, by sha256)."""
        payload = self.bucket.get(self.plan.round_id, f"updates/{manifest.client_id}/update.safetensors",
                                  sha256=manifest.payload_sha256)
        if payload is None:
            raise ValueError(f"the snapshot of {manifest.client_id}'s update is gone from the coordinator's bucket")
        return self.decode(manifest, payload, base)

    def local_tensors(self) -> frozenset[str]:
        """The tensors the silos keep and never send (fedbn: the batch-norm tensors); empty otherwise."""
        return frozenset((self.plan.personalization or {}).get("local_tensors") or ())

    def decode(self, manifest: UpdateManifest, payload: bytes, base: StateDict) -> StateDict:
        """The update's full weights (a compressed codec sends the change from `base`, and the
        task's bounded tensors as they are), when it uses the round's codec: decoding another
        one against this base would misread it.

        Under fedbn the silos send every tensor but the local ones (and encode against the base
        without them): the update must leave exactly those out, and they are filled from the
        base, so that screening and aggregation see no change there and the candidate keeps
        the base's values."""
        codec, expected = Codec.parse(manifest.codec), self.plan.training["codec"]
        if codec != Codec.parse(expected):
            raise CodecError(f"codec {manifest.codec!r} is not the round's codec {expected!r}")
        exact = self.task.tensor_ranges
        local = self.local_tensors()
        if not local:
            return decode_update(payload, codec, base, exact=exact)
        leaked = sorted(local & payload_tensor_names(payload))
        if leaked:
            raise ValueError(leak_reason(leaked))
        shared = {name: value for name, value in base.items() if name not in local}
        if codec.sends_change:
            # The floating local tensors would travel inside the change vector, not by name.
            vector = _header(payload).get("q" if codec.name == "int8" else "delta", {}).get("shape")
            extra = vector[0] - Packing(shared, exact).size if isinstance(vector, list) and len(vector) == 1 \
                and isinstance(vector[0], int) else 0
            if extra > 0:
                raise ValueError(f"carries local tensors that fedbn keeps at the silo: its change holds {extra} "
                                 "values more than the base without its local tensors")
        try:
            state = decode_update(payload, codec, shared, exact=exact)
        except CodecError as exc:
            raise CodecError(f"{exc} (fedbn: the update leaves out the {len(local)} local tensors, and a change is "
                             "encoded against the base without them)") from None
        filled = {name: np.array(base[name], copy=True) if name in local else state[name]
                  for name in base if name in local or name in state}
        # Tensors the base does not have stay in: check_structure names them.
        filled.update({name: value for name, value in state.items() if name not in filled})
        return filled

    # --- the round --------------------------------------------------------------------------
    def screen_one(self, client_id: str, record: dict[str, Any], base: StateDict
                   ) -> tuple[dict[str, Any] | None, ScreenedUpdate | None, float | None, str | None]:
        """(what was seen, the update if it passed, its norm, else why not) for one committed
        update; runs in a read-ahead thread, records nothing itself."""
        seen = None
        try:
            manifest = self.manifest(client_id, record)
            seen = {"payload_sha256": manifest.payload_sha256, "num_examples": manifest.num_examples,
                    "base_model_version": manifest.base_model_version,
                    "manifest_sha256": sha256_hex(manifest.to_json())}
            behind = self.staleness_of(manifest)
            norm = screening.update_norm(self.state(manifest, base), base)
            seen["update_norm"] = norm
            exponent = self.plan.staleness["exponent"]
            weight = manifest.num_examples * (staleness.staleness_weight(behind, exponent) if behind else 1.0)
            return seen, ScreenedUpdate(manifest, behind, weight), norm, None
        except (ValueError, ManifestError, CodecError) as exc:
            return seen, None, None, str(exc)

    def screen(self, committed: dict[str, dict[str, Any]], base: StateDict) -> dict[str, ScreenedUpdate]:
        accepted: dict[str, ScreenedUpdate] = {}
        norms: dict[str, float] = {}
        rules = self.plan.screening
        # Fetched and checked READ_AHEAD at a time; recorded in the committed order.
        screened = pools.read_ahead(lambda item: self.screen_one(item[0], item[1], base), committed.items(),
                                    self.window)
        for client_id, (seen, update, norm, problem) in zip(committed, screened):
            if seen is not None:
                self.seen[client_id] = seen
            if problem is not None:
                self.reject(client_id, problem)
                continue
            norms[client_id] = norm
            accepted[client_id] = update
        counts = {c: u.manifest.num_examples for c, u in accepted.items()}
        round_checks = [
            screening.implausible_counts(counts, self.declared, self.history, rules.get("max_example_growth")),
            screening.norm_outliers({c: norms[c] for c in accepted}, rules.get("max_update_norm"),
                                    rules.get("max_norm_ratio")),
            screening.free_riders({c: norms[c] for c in accepted}, rules.get("min_norm_ratio")),
        ]
        for reasons in round_checks:
            for client_id, reason in reasons.items():
                if client_id in accepted:
                    self.reject(client_id, reason)
                    del accepted[client_id]
        if rules.get("min_cosine") is not None and len(accepted) > 2:
            self.cosine_screen(accepted, base, float(rules["min_cosine"]))
        return accepted

    def cosine_screen(self, accepted: dict[str, ScreenedUpdate], base: StateDict, min_cosine: float) -> None:
        # Two more reads of each snapshot keep memory at O(READ_AHEAD models): the sum, then each cosine.
        def change(update: ScreenedUpdate) -> np.ndarray:
            return screening.delta_vector(self.snapshot_state(update.manifest, base), base)

        updates = list(accepted.values())
        total = sum(pools.read_ahead(change, updates, self.window))
        count = len(accepted)
        for (client_id, update), delta in zip(list(accepted.items()), pools.read_ahead(change, updates, self.window)):
            cosine = screening.leave_one_out_cosine(delta, total, count)
            if cosine < min_cosine:
                self.reject(client_id, f"cosine {cosine:.3f} to the mean of the other updates is below {min_cosine}")
                del accepted[client_id]

    def build(self, committed: dict[str, dict[str, Any]], server_state: StateDict | None,
              noise_seed: int | None = None) -> Candidate:
        """Raises ValueError when no model can come out (too few updates left, a strategy error).
        A private round (plan.privacy) draws its noise from `noise_seed`."""
        from fl_tasks import aggregation
        from fl_tasks.aggregation.mean import cap_shares

        base = self.base()
        accepted = self.screen(committed, base)
        required = required_clients(self.plan)
        if len(accepted) < required:
            raise ValueError(f"only {len(accepted)} updates passed screening, quorum {required}; "
                             f"rejected: {self.rejected}")
        settings = self.plan.aggregation
        private = self.plan.privacy
        strategy = aggregation.build(settings["strategy"], clip_norm=None if private else settings["clip_norm"],
                                     **settings["params"])
        if private:
            strategy = self.dp_strategy(strategy, len(accepted), noise_seed)
        stateful = getattr(strategy, "stateful", False)
        if stateful and server_state is not None:
            strategy.set_state(server_state)
        weights = cap_shares([u.weight for u in accepted.values()], settings.get("max_weight_share"))

        def updates() -> Iterator[tuple[StateDict, float]]:
            # Decoded READ_AHEAD at a time, folded in the accepted order (see the module's docstring).
            states = pools.read_ahead(lambda update: self.snapshot_state(update.manifest, base), accepted.values(),
                                      self.window)
            yield from zip(states, weights)

        try:
            aggregated = dict(strategy.aggregate(base, updates()))
        except ValueError as exc:
            raise ValueError(f"{strategy.name}: {exc}") from exc
        # fedbn: the local tensors are the base's, whatever the rule did (noise, a server optimiser).
        aggregated.update({name: np.array(base[name], copy=True) for name in self.local_tensors() if name in base})
        candidate = encode_state(aggregated)
        summary = candidate_summary(self.plan, strategy.name, self.rejected, self.seen, list(accepted.values()),
                                    strategy.outcome, candidate)
        if self.local_tensors():  # fedbn: kept at the silos, the base's values in the candidate
            summary["local_tensors"] = sorted(self.local_tensors())
        return Candidate(summary, candidate, strategy.get_state() if stateful else None)

    def dp_strategy(self, strategy, accepted: int, noise_seed: int | None):
        """DP-FedAvg around the federation's strategy. With the noise at the silos, each sampled
        silo added std z*C/sqrt(sampled); the coordinator adds what the silos that did not count
        left out, so the sum always carries std z*C."""
        from fl_tasks.aggregation.private import DPFedAvg

        p = self.plan.privacy
        if noise_seed is None:
            raise ValueError("a private round needs its noise seed")
        full = float(p["noise_multiplier"]) * float(p["clip_norm"])
        at_silos = p["noise"] == "silos"
        stddev = full * math.sqrt(max(0.0, 1.0 - accepted / len(p["sampled"]))) if at_silos else full
        return DPFedAvg(strategy, float(p["clip_norm"]), float(p["denominator"]), stddev, noise_seed,
                        clip=not at_silos, ranges=self.task.tensor_ranges)


def candidate_summary(plan: RoundPlan, aggregator: str, rejected: list[dict[str, Any]], seen: dict[str, Any],
                      accepted: list[ScreenedUpdate], outcome, candidate: bytes) -> dict[str, Any]:
    """candidate/manifest.json: who was accepted and rejected, and what the rule did. Raises
    ValueError on non-finite aggregation weights."""
    settings = plan.aggregation
    raw_total = sum(u.weight for u in accepted)
    ids = [u.manifest.client_id for u in accepted]
    summary = {
        "round_id": plan.round_id, "aggregator": aggregator, "params": settings["params"],
        "clip_norm": settings["clip_norm"], "max_weight_share": settings.get("max_weight_share"),
        "rejected": rejected, "seen": seen,
        "total_examples": sum(u.manifest.num_examples for u in accepted),
        # What the rule did: `influence` is an update's share of the candidate under this
        # rule (None where the rule gives no update a weight), never its example share.
        "rule": outcome.rule,
        "selected": None if outcome.selected is None else [ids[i] for i in outcome.selected],
        "accepted": [{"client_id": u.manifest.client_id, "num_examples": u.manifest.num_examples,
                      "staleness": u.staleness, "example_share": u.weight / raw_total,
                      "influence": None if outcome.influence is None else outcome.influence[i],
                      "krum_score": None if outcome.scores is None else outcome.scores[i],
                      "payload_sha256": u.manifest.payload_sha256, "metrics": u.manifest.metrics}
                     for i, u in enumerate(accepted)],
        "candidate_sha256": sha256_hex(candidate)}
    if any(a["influence"] is not None and not math.isfinite(a["influence"]) for a in summary["accepted"]):
        raise ValueError(f"{aggregator}: non-finite aggregation weights")
    return summary


def _header(payload: bytes) -> dict[str, Any]:
    """A safetensors payload's header ({name: {dtype, shape, data_offsets}}); {} when it does
    not parse (decoding then names the problem)."""
    import json

    if len(payload) < 8:
        return {}
    size = int.from_bytes(payload[:8], "little")
    try:
        header = json.loads(bytes(payload[8:8 + size])) if 0 < size <= len(payload) - 8 else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    if not isinstance(header, dict):
        return {}
    return {name: info for name, info in header.items() if name != "__metadata__" and isinstance(info, dict)}


def payload_tensor_names(payload: bytes) -> set[str]:
    """The model tensors a safetensors payload names: its tensors (fp32), or the `raw/<name>`
    ones of a change codec."""
    return {name.removeprefix("raw/") for name in _header(payload)}


def leak_reason(leaked: list[str]) -> str:
    more = f" (and {len(leaked) - 1} more: {', '.join(leaked[1:6])}{', ...' if len(leaked) > 6 else ''})" \
        if len(leaked) > 1 else ""
    return f"carries local tensor '{leaked[0]}' that fedbn keeps at the silo{more}"


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
