"""Sharded rounds (`aggregation.shards` > 1): the aggregate step screens as usual, then mapped
tasks aggregate one slice of the model each (maths in `fl_tasks.aggregation.sharded`).

    aggregate           screen the updates one at a time (memory O(model)); write the accepted
                        list, their weights and the shard plan: shards/accepted.json
    shard_statistics k  (rules that need global quantities) shard k's partial Gram matrix:
                        shards/statistics/<k>.json
    aggregate_shard k   shard k's slice of the candidate (and of the new strategy state):
                        shards/results/<k>/model.safetensors, state.safetensors, then
                        shards/results/<k>/done.json (the commit marker: outcome and sha256s)
    assemble_candidate  the candidate, its server state and candidate/manifest.json (last): the
                        unsharded step's outputs, so validate, register and summary are unchanged

Every mapped task reads only its byte ranges of each accepted update's snapshot (and of the
base and the saved strategy state) in the coordinator's bucket, by S3 ranged GETs after
reading each object's safetensors header (`fl_tasks.protocol.ranges`). The snapshots were
checked against their sha256 when the aggregate step screened them; a ranged read cannot hash
the whole object again, so the slices trust the coordinator's own bucket. Every step finds
its own earlier output when re-run.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from fl_tasks.coordinator import report
from fl_tasks.coordinator.candidate import ScreenedUpdate, aggregate_events, candidate_summary
from fl_tasks.coordinator.plan import RoundFailed, RoundPlan, required_clients
from fl_tasks.protocol import UpdateManifest, sha256_hex

ACCEPTED = "shards/accepted.json"


def statistics_name(shard: int) -> str:
    return f"shards/statistics/{shard}.json"


def result_name(shard: int, part: str) -> str:
    return f"shards/results/{shard}/{part}"


def shard_count(plan: RoundPlan) -> int:
    return int(plan.aggregation.get("shards", 1) or 1)


class ShardedRound:
    """The sharded steps of one coordinator (its bucket, records and store)."""

    def __init__(self, coordinator) -> None:
        self.c = coordinator
        self.records = coordinator.records
        self.store = coordinator.store
        self.bucket = coordinator.bucket

    # --- reading slices by byte range ------------------------------------------------------
    def _read(self, round_id: str, name: str, plan, shard: int, state: bool = False) -> dict[str, np.ndarray]:
        """Shard `shard`'s slice of a safetensors object under the round (a model, or with
        `state` a strategy state keyed '<slot>/<tensor>'), by ranged reads only."""
        from fl_tasks.protocol.ranges import ElementRange, read_elements, read_header

        key = self.records.key(round_id, name)

        def fetch(start: int, stop: int) -> bytes:
            data = self.store.get_range(self.bucket, key, start, stop)
            if data is None:
                raise ValueError(f"s3://{self.bucket}/{key} is gone from the coordinator's bucket")
            return data

        header = read_header(fetch)
        spec = plan.shard(shard)
        requests: dict[str, ElementRange] = {}
        if state:
            for entry in header.tensors:
                tensor = entry.partition("/")[2]
                for p in spec.pieces:
                    if p.tensor == tensor:
                        requests[entry] = ElementRange(entry, p.start, p.stop)
        else:
            if set(header.tensors) != set(plan.tensors):
                raise ValueError(f"{name} does not hold the base model's tensors: "
                                 f"{sorted(set(header.tensors) ^ set(plan.tensors))}")
            for tensor_name, info in plan.tensors.items():
                entry = header.tensors[tensor_name]
                if entry.shape != info.shape or entry.dtype != np.dtype(info.dtype):
                    raise ValueError(f"{name}: tensor {tensor_name!r} is {entry.dtype.name} {list(entry.shape)}, the "
                                     f"base's {info.dtype} {list(info.shape)}")
            requests = {p.tensor: ElementRange(p.tensor, p.start, p.stop) for p in spec.pieces}
            requests.update({w: ElementRange(w, 0, plan.tensors[w].size) for w in spec.whole})
        values = read_elements(header, list(requests.values()), fetch)
        out = {k: values[r] for k, r in requests.items()}
        for w in spec.whole if not state else ():
            out[w] = out[w].reshape(plan.tensors[w].shape)
        return out

    def _state_shapes(self, round_id: str, name: str) -> dict[str, tuple[int, ...]] | None:
        from fl_tasks.protocol.ranges import read_header

        key = self.records.key(round_id, name)
        if not self.store.exists(self.bucket, key):
            return None
        header = read_header(lambda a, b: self.store.get_range(self.bucket, key, a, b) or b"")
        return {k: e.shape for k, e in header.tensors.items()}

    # --- the records ------------------------------------------------------------------------
    def _accepted(self, round_id: str) -> dict[str, Any]:
        record = self.records.get_json(round_id, ACCEPTED)
        if record is None:
            raise RoundFailed(f"round {round_id} has no screened updates to aggregate; run the aggregate step first")
        return record

    @staticmethod
    def _setup(record: dict[str, Any]):
        from fl_tasks.aggregation.sharded import Rule, ShardPlan

        return ShardPlan.from_dict(record["plan"]), Rule(record["rule"]["strategy"], record["rule"]["params"],
                                                         record["rule"]["clip_norm"])

    def _state_slice(self, record: dict[str, Any], plan, shard: int):
        from fl_tasks.aggregation.sharded import StateSlice

        saved = record["state"]
        if saved["origin"] != "saved":
            return StateSlice({}, saved["origin"])
        return StateSlice(self._read(saved["round_id"], saved["name"], plan, shard, state=True), "saved")

    def _fail(self, round_id: str, exc: Exception) -> RoundFailed:
        return self.records.fail(round_id, "aggregate", str(exc))

    # --- step 4a: screen (the aggregate step) ------------------------------------------------
    def screen(self, round_id: str, plan: RoundPlan, closed: dict[str, Any]) -> dict[str, Any]:
        """Screen the closed set of updates and write what the mapped tasks aggregate."""
        record = self.records.get_json(round_id, ACCEPTED)
        if record is None:
            try:
                record = self._screen(plan, closed)
            except ValueError as exc:
                raise self._fail(round_id, exc) from exc
            self.records.put_json(round_id, ACCEPTED, record)  # the commit marker of this step
        report.log_lines(f"round {round_id} screened for {len(record['plan']['shards'])} shards",
                         f"accepted: {', '.join(u['client_id'] for u in record['updates'])}; "
                         f"rejected: {record['rejected']}")
        return {"accepted": [{"client_id": u["client_id"]} for u in record["updates"]],
                "rejected": record["rejected"], "shards": len(record["plan"]["shards"])}

    def _screen(self, plan: RoundPlan, closed: dict[str, Any]) -> dict[str, Any]:
        from fl_tasks import aggregation
        from fl_tasks.aggregation.mean import cap_shares
        from fl_tasks.aggregation.sharded import Rule, ShardPlan, state_origin

        builder = self.c._builder(plan, closed["history"])
        base = builder.base()
        committed = {c: closed["answers"][c] for c in closed["committed"]}
        accepted = builder.screen(committed, base)
        required = required_clients(plan)
        if len(accepted) < required:
            raise ValueError(f"only {len(accepted)} updates passed screening, quorum {required}; "
                             f"rejected: {builder.rejected}")
        settings = plan.aggregation
        rule = Rule(settings["strategy"], dict(settings["params"]), settings["clip_norm"])
        strategy = aggregation.build(rule.strategy, **rule.params)
        check = getattr(strategy, "check_count", None)
        try:
            if check is not None:
                check(len(accepted))
            shard_plan = ShardPlan.build(base, shard_count(plan))
            state = {"origin": "none", "round_id": plan.base_round_id,
                     "name": self.records.server_state_name(rule.strategy)}
            if getattr(strategy, "stateful", False) and plan.base_round_id:
                shapes = self._state_shapes(plan.base_round_id, state["name"])
                state["origin"] = state_origin(rule, shard_plan, shapes or {})
        except ValueError as exc:
            raise ValueError(f"{rule.strategy}: {exc}") from exc
        weights = cap_shares([u.weight for u in accepted.values()], settings.get("max_weight_share"))
        return {"plan": shard_plan.to_dict(), "rule": {"strategy": rule.strategy, "params": rule.params,
                                                       "clip_norm": rule.clip_norm},
                "max_weight_share": settings.get("max_weight_share"), "state": state,
                "updates": [{"client_id": c, "manifest": u.manifest.to_json().decode(), "staleness": u.staleness,
                             "raw_weight": u.weight, "weight": w}
                            for (c, u), w in zip(accepted.items(), weights)],
                "rejected": builder.rejected, "seen": builder.seen}

    # --- step 4b: statistics -------------------------------------------------------------------
    def shard_statistics(self, round_id: str, shard: int) -> dict[str, Any]:
        from fl_tasks.aggregation.sharded import shard_statistics

        record = self._accepted(round_id)
        plan, rule = self._setup(record)
        if not rule.needs_statistics:
            return {"shard": shard, "needed": False}
        if self.records.get_json(round_id, statistics_name(shard)) is None:
            try:
                plan.shard(shard)
                base = self._read(round_id, "base/model.safetensors", plan, shard)
                updates = [self._read(round_id, f"updates/{u['client_id']}/update.safetensors", plan, shard)
                           for u in record["updates"]]
                stats = shard_statistics(rule, shard, base, updates, self._state_slice(record, plan, shard))
            except ValueError as exc:
                raise self._fail(round_id, exc) from exc
            self.records.put_json(round_id, statistics_name(shard), stats.to_dict())
        return {"shard": shard, "needed": True}

    # --- step 4c: one shard's slice ----------------------------------------------------------
    def aggregate_shard(self, round_id: str, shard: int) -> dict[str, Any]:
        from fl_tasks.aggregation.sharded import (ShardStatistics, aggregate_shard, combine_statistics)
        from fl_tasks.protocol.codec import encode_state

        done = self.records.get_json(round_id, result_name(shard, "done.json"))
        if done is not None:
            return {"shard": shard, "sha256": done["model_sha256"]}
        record = self._accepted(round_id)
        plan, rule = self._setup(record)
        try:
            plan.shard(shard)
            statistics = None
            if rule.needs_statistics:
                parts = []
                for k in range(len(plan.shards)):
                    kept = self.records.get_json(round_id, statistics_name(k))
                    if kept is None:
                        raise RoundFailed(f"shard {k}'s statistics are missing; run shard_statistics first")
                    parts.append(ShardStatistics.from_dict(kept))
                statistics = combine_statistics(plan, parts)
            base = self._read(round_id, "base/model.safetensors", plan, shard)

            def updates():
                for u in record["updates"]:
                    yield self._read(round_id, f"updates/{u['client_id']}/update.safetensors", plan, shard), u["weight"]

            result = aggregate_shard(rule, shard, base, updates(), statistics, self._state_slice(record, plan, shard))
        except ValueError as exc:
            raise self._fail(round_id, ValueError(f"{rule.strategy}: {exc}")) from exc
        model = encode_state({k: np.ascontiguousarray(v) for k, v in result.tensors.items()})
        self.records.put(round_id, result_name(shard, "model.safetensors"), model)
        marker = {"shard": shard, "model_sha256": sha256_hex(model), "state_sha256": None,
                  "outcome": asdict(result.outcome)}
        if result.state is not None:
            state = encode_state({k: np.ascontiguousarray(v) for k, v in result.state.items()})
            self.records.put(round_id, result_name(shard, "state.safetensors"), state)
            marker["state_sha256"] = sha256_hex(state)
        self.records.put_json(round_id, result_name(shard, "done.json"), marker)  # last: the commit marker
        return {"shard": shard, "sha256": marker["model_sha256"]}

    # --- step 4d: the candidate -----------------------------------------------------------------
    def assemble_candidate(self, round_id: str) -> dict[str, Any]:
        """The candidate from every shard's slice, with the unsharded aggregate step's outputs."""
        plan_ = self.c.load_plan(round_id)
        summary = self.records.get_json(round_id, "candidate/manifest.json")
        if summary is None:
            record = self._accepted(round_id)
            try:
                summary = self._assemble(round_id, plan_, record)
            except ValueError as exc:
                raise self._fail(round_id, exc) from exc
            self.c._record_history(summary, self.c.example_history(plan_.clients))
        self.c.audit.append(round_id, "aggregate", aggregate_events(summary))
        report.log_lines(f"round {round_id} aggregated", report.aggregate_account(summary, plan_.screening))
        return summary

    def _assemble(self, round_id: str, round_plan: RoundPlan, record: dict[str, Any]) -> dict[str, Any]:
        from fl_tasks.aggregation import Outcome
        from fl_tasks.aggregation.sharded import ShardResult, assemble
        from fl_tasks.protocol.codec import decode_state, encode_state

        plan, rule = self._setup(record)
        results = []
        for k in range(len(plan.shards)):
            done = self.records.get_json(round_id, result_name(k, "done.json"))
            if done is None:
                raise RoundFailed(f"shard {k} has no result; run aggregate_shard for it first")
            model = self.records.get(round_id, result_name(k, "model.safetensors"), sha256=done["model_sha256"])
            state = None
            if done["state_sha256"] is not None:
                state = self.records.get(round_id, result_name(k, "state.safetensors"), sha256=done["state_sha256"])
            if model is None or (done["state_sha256"] is not None and state is None):
                raise ValueError(f"shard {k}'s result does not match its commit marker")
            outcome = Outcome(**{key: tuple(v) if isinstance(v, list) else v for key, v in done["outcome"].items()})
            results.append(ShardResult(k, decode_state(model), outcome, None if state is None else decode_state(state)))
        assembled = assemble(plan, results)
        candidate = encode_state(assembled.model)
        self.records.put(round_id, "candidate/model.safetensors", candidate)
        if assembled.state is not None:
            # Keyed by this round, as the unsharded step keeps it (see Coordinator.aggregate).
            self.records.put(round_id, self.records.server_state_name(rule.strategy), encode_state(assembled.state))
        summary = self._summary(round_plan, record, rule, assembled.outcome, candidate, len(plan.shards))
        self.records.put_json(round_id, "candidate/manifest.json", summary)  # written last
        return summary

    @staticmethod
    def _summary(round_plan: RoundPlan, record: dict[str, Any], rule, outcome, candidate: bytes,
                 shards: int) -> dict[str, Any]:
        """candidate/manifest.json as `CandidateBuilder.build` writes it, plus `shards`."""
        accepted = [ScreenedUpdate(UpdateManifest.from_json(u["manifest"].encode()), u["staleness"], u["raw_weight"])
                    for u in record["updates"]]
        summary = candidate_summary(round_plan, rule.strategy, record["rejected"], record["seen"], accepted, outcome,
                                    candidate)
        return {**summary, "shards": shards}
