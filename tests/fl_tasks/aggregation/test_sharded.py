"""Sharded aggregation agrees with the unsharded strategies, for every strategy and shard count."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fl_tasks.aggregation import STRATEGY_NAMES, build
from fl_tasks.aggregation.sharded import (DISTANCE_RULES, Rule, ShardPlan, ShardStatistics, aggregate_shard,
                                          assemble, combine_statistics, shard_statistics, slice_strategy_state)

SHAPES = {"conv.weight": (4, 3), "head.bias": (5,), "block.kernel": (2, 3, 2), "bn.num_batches_tracked": ()}
N = 7  # bulyan with f=1 needs 7
PARAMS = {"krum": {"f": 1}, "multi_krum": {"f": 1}, "weighted_multi_krum": {"f": 1, "m": 4}, "bulyan": {"f": 1},
          "trimmed_mean": {"beta": 0.2}, "weighted_trimmed_mean": {"beta": 0.2}, "centered_clipping": {"iterations": 3}}
SLOTS = {"fedavgm": ("v",), "fedadam": ("m", "v"), "fedyogi": ("m", "v"), "fedadagrad": ("m", "v"),
         "centered_clipping": ("v",)}


def model(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    out = {name: (rng.normal(size=shape) * scale).astype(np.float32) for name, shape in SHAPES.items()
           if name != "bn.num_batches_tracked"}
    out["bn.num_batches_tracked"] = np.array(int(rng.integers(0, 100)), dtype=np.int64)
    return {name: out[name] for name in SHAPES}  # the base's key order, not sorted


def round_inputs(seed: int):
    rng = np.random.default_rng(seed)
    base = model(rng)
    updates = []
    for i in range(N):
        update = {k: (v + rng.normal(scale=0.1 * (1 + i), size=v.shape)).astype(np.float32)
                  if v.dtype == np.float32 else np.array(int(v) + int(rng.integers(0, 20)), dtype=np.int64)
                  for k, v in base.items()}
        updates.append((update, float(rng.integers(10, 200))))
    return base, updates


def previous_state(name: str, base, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1000)
    floating = [k for k, v in base.items() if v.dtype == np.float32]
    return {f"{slot}/{k}": np.abs(rng.normal(scale=0.05, size=base[k].shape)).astype(np.float32)
            if slot == "v" and name != "fedavgm" and name != "centered_clipping"
            else rng.normal(scale=0.05, size=base[k].shape).astype(np.float32)
            for slot in SLOTS.get(name, ()) for k in floating}


def sharded(rule: Rule, base, updates, shards: int, state):
    plan = ShardPlan.build(base, shards)
    plan = ShardPlan.from_dict(json.loads(json.dumps(plan.to_dict())))  # as it travels through XCom
    slices = [[plan.slice(k, u) for u, _ in updates] for k in range(shards)]
    states = [slice_strategy_state(rule, plan, k, state) for k in range(shards)]
    stats = None
    if rule.needs_statistics:
        parts = [shard_statistics(rule, k, plan.slice(k, base), slices[k], states[k]) for k in range(shards)]
        parts = [ShardStatistics.from_dict(json.loads(json.dumps(p.to_dict()))) for p in parts]
        stats = combine_statistics(plan, parts)
    results = [aggregate_shard(rule, k, plan.slice(k, base), list(zip(slices[k], [w for _, w in updates])),
                               stats, states[k]) for k in range(shards)]
    return assemble(plan, results)


def unsharded(rule: Rule, base, updates, state):
    strategy = build(rule.strategy, clip_norm=rule.clip_norm, **rule.params)
    if state:
        strategy.set_state(state)
    result = strategy.aggregate(base, [(dict(u), w) for u, w in updates])
    return result, strategy.outcome, strategy.get_state() if strategy.stateful else None


def _close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "clip_norm"])
@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_sharded_equals_unsharded(name, clip):
    base, updates = round_inputs(STRATEGY_NAMES.index(name))
    state = previous_state(name, base, STRATEGY_NAMES.index(name))
    clip_norm = None
    if clip:
        from fl_tasks.aggregation.clip import update_norm

        clip_norm = float(np.median([update_norm(u, base) for u, _ in updates]))  # about half are clipped
    rule = Rule(name, PARAMS.get(name, {}), clip_norm)
    expected, outcome, expected_state = unsharded(rule, base, updates, state)
    exact = not clip and name not in DISTANCE_RULES and name != "centered_clipping"
    for shards in (1, 2, 3, 7):
        got = sharded(rule, base, updates, shards, state)
        assert list(got.model) == list(expected)
        for key in expected:
            if exact or not np.issubdtype(expected[key].dtype, np.floating):
                assert got.model[key].dtype == expected[key].dtype and np.array_equal(got.model[key], expected[key]), \
                    (shards, key)
            else:
                _close(got.model[key], expected[key])
        assert (got.state is None) == (expected_state is None)
        if expected_state is not None:
            assert set(got.state) == set(expected_state)
            for key in expected_state:
                if exact:
                    assert np.array_equal(got.state[key], expected_state[key]), (shards, key)
                else:
                    _close(got.state[key], expected_state[key])
        assert got.outcome.selected == outcome.selected
        if exact:
            assert got.outcome == outcome
        else:
            assert (got.outcome.influence is None) == (outcome.influence is None)
            if outcome.influence is not None:
                np.testing.assert_allclose(got.outcome.influence, outcome.influence, rtol=1e-6, atol=1e-9)
            if outcome.scores is not None:
                np.testing.assert_allclose(got.outcome.scores, outcome.scores, rtol=1e-5)
            if name != "centered_clipping":
                assert got.outcome.rule == outcome.rule
            else:  # the radius and the history share are printed to a few digits
                assert got.outcome.rule.split(": radius")[0] == outcome.rule.split(": radius")[0]


def test_centered_clipping_center_that_does_not_fit_starts_from_zero():
    base, updates = round_inputs(3)
    state = {"v/conv.weight": np.ones((2, 2), dtype=np.float32)}
    rule = Rule("centered_clipping")
    expected, outcome, _ = unsharded(rule, base, updates, state)
    got = sharded(rule, base, updates, 3, state)
    assert "did not match the model" in got.outcome.rule and "did not match the model" in outcome.rule
    for key in expected:
        _close(got.model[key], expected[key]) if expected[key].dtype == np.float32 else None


def test_centered_clipping_center_not_finite_starts_from_zero():
    base, updates = round_inputs(4)
    state = previous_state("centered_clipping", base, 4)
    state["v/head.bias"][2] = np.nan
    rule = Rule("centered_clipping")
    expected, outcome, _ = unsharded(rule, base, updates, state)
    got = sharded(rule, base, updates, 3, state)
    assert "was not finite" in got.outcome.rule and "was not finite" in outcome.rule
    for key in expected:
        if expected[key].dtype == np.float32:
            _close(got.model[key], expected[key])


def test_plan_cuts_near_equal_contiguous_ranges():
    base, _ = round_inputs(0)
    plan = ShardPlan.build(base, 3)
    assert [s.size for s in plan.shards] == [9, 10, 10]  # 29 floating elements
    assert plan.shards[0].whole == ("bn.num_batches_tracked",) and not plan.shards[1].whole
    flat = [(p.tensor, i) for s in plan.shards for p in s.pieces for i in range(p.start, p.stop)]
    assert flat == [(name, i) for name in sorted(k for k in SHAPES if k != "bn.num_batches_tracked")
                    for i in range(int(np.prod(SHAPES[name])))]
    assert ShardPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    sliced = plan.slice(1, base)
    assert all(v.ndim == 1 for v in sliced.values()) and "bn.num_batches_tracked" not in sliced


def test_plan_errors():
    base, _ = round_inputs(0)
    with pytest.raises(ValueError, match="30 shards for a model of 29 floating elements"):
        ShardPlan.build(base, 30)
    with pytest.raises(ValueError, match="shards must be a whole number >= 1"):
        ShardPlan.build(base, 0)
    good = ShardPlan.build(base, 3).to_dict()
    gap = json.loads(json.dumps(good))
    gap["shards"][1]["pieces"][0][1] += 1  # skips an element
    with pytest.raises(ValueError, match="bad shard plan: shard 1: piece"):
        ShardPlan.from_dict(gap)
    moved = json.loads(json.dumps(good))
    moved["shards"][1]["whole"] = moved["shards"][0].pop("whole")
    with pytest.raises(ValueError, match="bad shard plan: the integer / bool tensors"):
        ShardPlan.from_dict(moved)
    with pytest.raises(ValueError, match="bad shard plan: not a plan's JSON"):
        ShardPlan.from_dict({"shards": []})
    with pytest.raises(ValueError, match="shard 3 is not in 0..2"):
        ShardPlan.build(base, 3).slice(3, base)


def test_stage_one_is_required_and_results_must_be_complete():
    base, updates = round_inputs(1)
    plan = ShardPlan.build(base, 2)
    rule = Rule("krum", {"f": 1})
    with pytest.raises(ValueError, match="needs the statistics of every shard"):
        aggregate_shard(rule, 0, plan.slice(0, base), [(plan.slice(0, u), w) for u, w in updates])
    fedavg = Rule("fedavg")
    part = aggregate_shard(fedavg, 0, plan.slice(0, base), [(plan.slice(0, u), w) for u, w in updates])
    with pytest.raises(ValueError, match=r"results of shards \[0\], the plan has 2 shards"):
        assemble(plan, [part])


def test_server_optimiser_state_that_does_not_fit_is_refused():
    base, _ = round_inputs(2)
    plan = ShardPlan.build(base, 2)
    with pytest.raises(ValueError, match="fedadam state does not match the base model"):
        slice_strategy_state(Rule("fedadam"), plan, 0, {"m/conv.weight": np.zeros((4, 3), np.float32)})


@pytest.mark.parametrize("name", sorted(DISTANCE_RULES))
def test_copies_of_an_update_tie_and_the_earlier_copy_wins_sharded_or_not(name):
    """Copies of one update must get equal scores on every CPU; BLAS rounds each shard's Gram
    by row position, so only the copies found on every shard's slice make the tie exact."""
    base, updates = round_inputs(11)
    updates = [updates[0], updates[1], updates[0], updates[2], updates[3], updates[1], updates[0]]
    rule = Rule(name, PARAMS.get(name, {}), None)
    _, outcome, _ = unsharded(rule, base, updates, {})
    for shards in (1, 3):
        got = sharded(rule, base, updates, shards, {})
        assert got.outcome.selected == outcome.selected
        plan = ShardPlan.build(base, shards)
        parts = [ShardStatistics.from_dict(json.loads(json.dumps(shard_statistics(
            rule, k, plan.slice(k, base), [plan.slice(k, u) for u, _ in updates]).to_dict()))) for k in range(shards)]
        assert combine_statistics(plan, parts).copies.tolist() == [0, 1, 0, 3, 4, 1, 0]
    assert 6 not in outcome.selected or {0, 2} <= set(outcome.selected)  # a later copy never before an earlier
    assert 5 not in outcome.selected or 1 in outcome.selected
