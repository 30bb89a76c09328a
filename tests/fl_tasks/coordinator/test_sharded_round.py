"""Sharded rounds through the coordinator's steps (moto S3, no Airflow): the candidate equals the
unsharded aggregation of the same snapshots, and each mapped task reads only its byte ranges."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from fl_tasks import aggregation
from fl_tasks.aggregation.mean import cap_shares
from fl_tasks.aggregation.sharded import ShardPlan
from fl_tasks.config import ConfigError, parse_federation
from fl_tasks.coordinator import RunContext, quorum
from fl_tasks.protocol import UpdateManifest
from fl_tasks.protocol.codec import decode_state

from tests.fl_tasks.test_config import SOURCE, config_error, doc


def counting(coordinator):
    """Count the bytes every ranged and whole read of the coordinator's store returns, per key."""
    ranged, whole = defaultdict(int), defaultdict(int)
    get_range, get_bytes = coordinator.store.get_range, coordinator.store.get_bytes

    def counted_range(bucket, key, start, stop):
        data = get_range(bucket, key, start, stop)
        ranged[key] += len(data or b"")
        return data

    def counted_bytes(bucket, key, *args, **kwargs):
        data = get_bytes(bucket, key, *args, **kwargs)
        whole[key] += len(data or b"")
        return data

    coordinator.store.get_range, coordinator.store.get_bytes = counted_range, counted_bytes
    return ranged, whole


def closed_round(coordinator, clients, run_id):
    round_id = coordinator.prepare(RunContext(run_id=run_id))
    coordinator.dispatch(round_id)
    for runtime in clients.values():
        assert runtime.answer(round_id)
    decision = coordinator.check_quorum(round_id)
    assert decision.state == quorum.MET
    coordinator.close_round(round_id, decision)
    return round_id


@pytest.mark.parametrize("aggregation_doc", [
    {"strategy": "weighted_median", "shards": 3},
    {"strategy": "multi_krum", "params": {"f": 0, "m": 2}, "clip_norm": 0.5, "shards": 2},
], ids=["weighted_median", "multi_krum_clipped"])
def test_sharded_candidate_equals_the_unsharded_aggregation(make_federation, aggregation_doc):
    spec, coordinator, clients = make_federation(aggregation=aggregation_doc)
    round_id = closed_round(coordinator, clients, "sharded")
    screened = coordinator.aggregate(round_id)
    assert screened["shards"] == aggregation_doc["shards"] and len(screened["accepted"]) == 3
    assert coordinator.records.get_json(round_id, "candidate/manifest.json") is None  # not aggregated yet

    ranged, whole = counting(coordinator)
    record = coordinator.records.get_json(round_id, "shards/accepted.json")
    plan = ShardPlan.from_dict(record["plan"])
    update_keys = {u["client_id"]: coordinator.round_key(round_id, f"updates/{u['client_id']}/update.safetensors")
                   for u in record["updates"]}
    sizes = {key: len(coordinator.store.get_bytes(coordinator.bucket, key)) for key in update_keys.values()}
    headers = {key: int.from_bytes(coordinator.store.get_bytes(coordinator.bucket, key)[:8], "little")
               for key in update_keys.values()}
    whole.clear()
    for step in (coordinator.shard_statistics, coordinator.aggregate_shard):
        for shard in range(len(plan.shards)):
            ranged.clear()
            step(round_id, shard)
            assert not any(key in whole for key in update_keys.values())  # never a whole update
            if step == coordinator.shard_statistics and not aggregation_doc.get("clip_norm") \
                    and aggregation_doc["strategy"] == "weighted_median":
                assert not ranged  # no statistics needed: nothing read
                continue
            spec_shard = plan.shard(shard)
            own = 4 * spec_shard.size + sum(8 * plan.tensors[w].size for w in spec_shard.whole)  # float32, int64
            for key in update_keys.values():
                assert ranged[key] == 8 + headers[key] + own  # the header, then exactly the shard's elements
                assert ranged[key] < sizes[key]
    assert coordinator.aggregate_shard(round_id, 0)["shard"] == 0  # a re-run finds its result
    summary = coordinator.assemble_candidate(round_id)
    assert summary["shards"] == aggregation_doc["shards"]
    assert summary == coordinator.assemble_candidate(round_id)  # safe to re-run

    base = decode_state(coordinator.store.get_bytes(coordinator.bucket,
                                                    coordinator.round_key(round_id, "base/model.safetensors")))
    updates = []
    for u in record["updates"]:
        manifest = UpdateManifest.from_json(u["manifest"].encode())
        updates.append((decode_state(coordinator.store.get_bytes(coordinator.bucket, update_keys[u["client_id"]])),
                        manifest.num_examples))
    weights = cap_shares([n for _, n in updates], spec.max_weight_share)
    strategy = aggregation.build(spec.aggregation, clip_norm=spec.clip_norm, **spec.aggregation_params)
    expected = strategy.aggregate(base, [(u, w) for (u, _), w in zip(updates, weights)])
    candidate = decode_state(coordinator.store.get_bytes(
        coordinator.bucket, coordinator.round_key(round_id, "candidate/model.safetensors")))
    assert set(candidate) == set(expected)
    for name, value in expected.items():
        assert candidate[name].dtype == value.dtype
        if spec.clip_norm is None:
            assert np.array_equal(candidate[name], value), name  # coordinate-wise: exact
        else:
            np.testing.assert_allclose(candidate[name], value, rtol=1e-6, atol=1e-6)
    assert summary["rule"].split(";")[0] == strategy.outcome.rule.split(";")[0]
    if strategy.outcome.selected is not None:
        assert summary["selected"] == [record["updates"][i]["client_id"] for i in strategy.outcome.selected]
    # The rest of the round reads the same outputs as an unsharded round.
    assert coordinator.validate(round_id)["candidate"] is not None


def test_sharded_round_refuses_more_shards_than_parameters(make_federation):
    spec, coordinator, clients = make_federation(aggregation={"strategy": "fedavg", "shards": 100000})
    round_id = closed_round(coordinator, clients, "too-many")
    from fl_tasks.coordinator import RoundFailed

    with pytest.raises(RoundFailed, match="100000 shards for a model of"):
        coordinator.aggregate(round_id)


def test_shards_config():
    assert parse_federation(doc(), SOURCE).shards == 1
    assert parse_federation(doc(aggregation={"strategy": "median", "shards": 4}), SOURCE).shards == 4
    for bad in (0, 2.5, True, "3"):
        err = config_error(doc(aggregation={"strategy": "median", "shards": bad}), "aggregation.shards")
        assert "whole number >= 1" in err.problem
    err = config_error(doc(aggregation={"strategy": "median", "shards": 2}, training={"codec": "int8"}),
                       "aggregation.shards")
    assert "training.codec is 'int8'" in err.problem and "fp32" in err.fix
    err = config_error(doc(aggregation={"strategy": "fedavg", "shards": 2}, privacy={"noise_multiplier": 1.0}),
                       "aggregation.shards")
    assert "private rounds" in err.problem
    with pytest.raises(ConfigError, match=r"field 'aggregation.shards': .*Fix: "):
        parse_federation(doc(aggregation={"strategy": "fedavg", "shards": 2}, training={"codec": "topk:0.1"}), SOURCE)
