"""fl_tasks/aggregation: FedAvg = sum_i n_i x_i / sum_i n_i, streamed one client at a time."""

from __future__ import annotations

import gc
import tracemalloc
import warnings
import weakref

import numpy as np
import pytest

from fl_tasks import aggregation
from fl_tasks.aggregation import STRATEGY_NAMES, build
from fl_tasks.aggregation.fedavg import FedAvg
from fl_tasks.aggregation.mean import CHUNK, StreamingWeightedMean, cap_shares, weighted_mean


def fedavg(updates, base=None):
    updates = list(updates)
    if base is None:
        base = {k: np.zeros_like(v) for k, v in updates[0][0].items()}
    return FedAvg().aggregate(base, updates)


# --- hand-computed ---------------------------------------------------------------------------


def test_two_clients_weights_one_and_three():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([[0.0, 4.0]], dtype=np.float32)}
    b = {"w": np.array([5.0, 10.0], dtype=np.float32), "b": np.array([[8.0, -4.0]], dtype=np.float32)}
    out = fedavg([(a, 1), (b, 3)])
    # w: (1*1 + 3*5)/4 = 4, (1*2 + 3*10)/4 = 8;  b: (0 + 24)/4 = 6, (4 - 12)/4 = -2
    np.testing.assert_array_equal(out["w"], np.array([4.0, 8.0], dtype=np.float32))
    np.testing.assert_array_equal(out["b"], np.array([[6.0, -2.0]], dtype=np.float32))
    assert out["w"].dtype == np.float32 and out["b"].shape == (1, 2)


def test_integer_buffers_are_rounded_weighted_means_in_their_dtype():
    a = {"n": np.array(10, dtype=np.int64), "m": np.array([10, 0, 7], dtype=np.int32)}
    b = {"n": np.array(15, dtype=np.int64), "m": np.array([13, 1, 7], dtype=np.int32)}
    out = fedavg([(a, 1), (b, 3)])
    # n: (10 + 45)/4 = 13.75 -> 14 (truncation would give 13, a float cast of an int buffer 0)
    assert out["n"].dtype == np.int64 and out["n"].shape == ()
    assert int(out["n"]) == 14
    # m: (10 + 39)/4 = 12.25 -> 12; (0 + 3)/4 = 0.75 -> 1; 7 -> 7
    assert out["m"].dtype == np.int32
    np.testing.assert_array_equal(out["m"], np.array([12, 1, 7], dtype=np.int32))


def test_bool_buffers_keep_their_dtype():
    a = {"mask": np.array([True, True, False])}
    b = {"mask": np.array([False, True, False])}
    out = fedavg([(a, 3), (b, 1)])  # 0.75, 1, 0
    assert out["mask"].dtype == np.bool_
    np.testing.assert_array_equal(out["mask"], [True, True, False])


def test_single_client_returns_its_own_state():
    rng = np.random.default_rng(1)
    state = {"w": rng.standard_normal((7, 5)).astype(np.float32), "n": np.array(123, dtype=np.int64),
             "d": rng.standard_normal(3)}
    out = fedavg([(state, 42)])
    for name, value in state.items():
        assert out[name].dtype == value.dtype and out[name].shape == value.shape
        np.testing.assert_allclose(out[name], value, rtol=1e-7, atol=0)
    assert int(out["n"]) == 123


def test_equal_states_average_to_themselves():
    state = {"w": np.full((3, 3), 0.1, dtype=np.float32)}
    out = fedavg([(state, 7), (state, 11), (state, 13)])
    np.testing.assert_allclose(out["w"], state["w"], rtol=1e-7)


# --- against the formula -------------------------------------------------------------------------


@pytest.mark.parametrize("num_clients", [2, 3, 4, 7])
def test_random_inputs_match_the_formula(num_clients):
    rng = np.random.default_rng(num_clients)
    shapes = {"a": (5, 4), "b": (4,), "c": (2, 3, 2), "scalar": ()}
    states = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(num_clients)]
    weights = rng.integers(1, 10_000, size=num_clients)
    out = fedavg(zip(states, weights.tolist()))
    for name in shapes:
        stacked = np.stack([s[name].astype(np.float64) for s in states])
        expected = np.tensordot(weights.astype(np.float64), stacked, axes=1) / weights.sum()
        assert out[name].dtype == np.float32 and out[name].shape == shapes[name]
        np.testing.assert_allclose(out[name], expected.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_tensor_larger_than_one_chunk_matches_the_formula():
    rng = np.random.default_rng(5)
    size = 2 * CHUNK + 123  # several chunk steps plus a partial one
    states = [{"w": rng.standard_normal(size).astype(np.float32)} for _ in range(3)]
    weights = [2.0, 5.0, 0.5]
    out = weighted_mean(zip(states, weights))
    expected = sum(w * s["w"].astype(np.float64) for s, w in zip(states, weights)) / sum(weights)
    np.testing.assert_allclose(out["w"], expected.astype(np.float32), rtol=1e-6, atol=1e-7)


EPS32 = float(np.finfo(np.float32).eps)


def scaled_error(out, states, weights):
    """max |out - formula| / (sum_i w_i |x_i| / sum_i w_i), in float32 epsilons: the error of a
    weighted sum measured against the size of its terms, so that cancellation does not count."""
    stacked = np.stack(states).astype(np.float64)
    w = np.asarray(weights, dtype=np.float64)
    expected = w @ stacked / w.sum()
    scale = w @ np.abs(stacked) / w.sum()
    return float(np.max(np.abs(out.astype(np.float64) - expected) / scale)) / EPS32


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_clients_match_the_float64_formula_to_float32_precision(seed):
    # float32 tensors keep a float32 running mean: one rounding per client, each scaled down by
    # the later steps. 200 clients stay within a few float32 ulps of the float64 formula.
    rng = np.random.default_rng(seed)
    num_clients, size = 200, 20_000
    weights = rng.integers(1, 100_000, size=num_clients).tolist()
    # Independent models: the terms cancel, the mean is small.
    states = [rng.standard_normal(size, dtype=np.float32) for _ in range(num_clients)]
    out = fedavg(({"w": s}, w) for s, w in zip(states, weights))["w"]
    assert out.dtype == np.float32
    assert scaled_error(out, states, weights) <= 4
    # Clients near one model (the usual round): the mean is as large as the terms.
    common = rng.standard_normal(size).astype(np.float32)
    states = [common + np.float32(1e-2) * rng.standard_normal(size, dtype=np.float32) for _ in range(num_clients)]
    out = fedavg(({"w": s}, w) for s, w in zip(states, weights))["w"]
    assert scaled_error(out, states, weights) <= 16  # ~2.5 ulps rms, the max over 20k entries ~10


def test_float32_single_client_and_identical_clients_come_back_exactly():
    rng = np.random.default_rng(3)
    state = {"w": rng.standard_normal(1000, dtype=np.float32)}
    single = fedavg([(state, 7)])["w"]
    np.testing.assert_array_equal(single, state["w"])
    assert not np.shares_memory(single, state["w"])  # a new array, not the client's
    np.testing.assert_array_equal(fedavg([(state, 7), (dict(state), 1), (dict(state), 12345)])["w"], state["w"])


def test_float32_path_allocates_one_model_whatever_the_number_of_clients():
    size = 1 << 20
    rng = np.random.default_rng(4)
    updates = [({"w": rng.standard_normal(size, dtype=np.float32)}, 10 + i) for i in range(12)]
    base = {"w": np.zeros(size, dtype=np.float32)}
    gc.collect()
    tracemalloc.start()
    try:
        out = FedAvg().aggregate(base, iter(updates))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["w"].dtype == np.float32
    assert peak < 1.1 * 4 * size, peak / (4 * size)  # the running mean is the result: no cast, no copy


def test_the_running_mean_keeps_no_update_once_added():
    """The first update is copied into the mean, not held until the second: a producer's
    update can be freed as soon as it is added (memory: the mean and the update being added)."""
    rng = np.random.default_rng(5)
    mean = StreamingWeightedMean()
    for weight in (3.0, 1.0, 2.0):
        update = {"w": rng.standard_normal(1000, dtype=np.float32)}
        alive = weakref.ref(update["w"])
        mean.add(update, weight)
        del update
        gc.collect()
        assert alive() is None, weight


def test_read_only_strided_and_mixed_dtype_updates():
    rng = np.random.default_rng(6)
    a = rng.standard_normal(64, dtype=np.float32)
    a.flags.writeable = False  # as decoded from a payload
    b = rng.standard_normal(128, dtype=np.float32)[::-2]  # negative stride
    c = rng.standard_normal(64)  # float64 update of a float32 tensor
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = weighted_mean([({"w": a}, 1), ({"w": b}, 2), ({"w": c}, 3)])
    expected = (a.astype(np.float64) + 2 * b + 3 * c) / 6
    np.testing.assert_allclose(out["w"], expected, rtol=0, atol=4 * EPS32 * np.abs(expected).max())
    assert out["w"].dtype == np.float32 and not a.flags.writeable


def test_float_weights_in_weighted_mean():
    out = weighted_mean([({"x": np.array([0.0])}, 0.25), ({"x": np.array([1.0])}, 0.75)])
    assert out["x"].dtype == np.float64
    assert out["x"][0] == pytest.approx(0.75)


def test_inputs_are_not_modified():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    b = {"w": np.array([3.0, 4.0], dtype=np.float32)}
    fedavg([(a, 1), (b, 1)])
    np.testing.assert_array_equal(a["w"], [1.0, 2.0])
    np.testing.assert_array_equal(b["w"], [3.0, 4.0])


def test_accumulator_counts_and_total_weight():
    acc = StreamingWeightedMean()
    acc.add({"x": np.ones(2)}, 2)
    acc.add({"x": np.ones(2)}, 3.5)
    assert acc.count == 2
    assert acc.total_weight == 5.5


# --- errors ----------------------------------------------------------------------------------------


def test_update_keys_must_match_the_base():
    base = {"w": np.zeros(2, dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}
    with pytest.raises(ValueError, match=r"keys differ from the base model: \['b'\]"):
        FedAvg().aggregate(base, [({"w": np.ones(2, dtype=np.float32)}, 1)])
    extra = {"w": np.ones(2, dtype=np.float32), "b": np.ones(1, dtype=np.float32), "x": np.ones(1)}
    with pytest.raises(ValueError, match=r"\['x'\]"):
        FedAvg().aggregate(base, [(extra, 1)])


def test_streaming_mean_rejects_key_mismatch_between_updates():
    acc = StreamingWeightedMean()
    acc.add({"w": np.ones(2)}, 1)
    with pytest.raises(ValueError, match="keys differ from the first update"):
        acc.add({"v": np.ones(2)}, 1)


def test_shape_mismatch_rejected():
    base = {"w": np.zeros((2, 3), dtype=np.float32)}
    good = {"w": np.ones((2, 3), dtype=np.float32)}
    bad = {"w": np.ones((3, 2), dtype=np.float32)}
    with pytest.raises(ValueError, match=r"tensor 'w' has shape \(3, 2\), expected \(2, 3\)"):
        FedAvg().aggregate(base, [(good, 1), (bad, 1)])


def test_rejected_update_leaves_the_accumulator_untouched():
    acc = StreamingWeightedMean()
    acc.add({"w": np.array([1.0, 1.0]), "v": np.array([2.0])}, 1)
    with pytest.raises(ValueError):
        # 'w' would fit, 'v' does not: nothing of this update may be added.
        acc.add({"w": np.array([100.0, 100.0]), "v": np.array([1.0, 2.0])}, 1)
    acc.add({"w": np.array([3.0, 5.0]), "v": np.array([4.0])}, 1)
    out = acc.result()
    np.testing.assert_array_equal(out["w"], [2.0, 3.0])
    np.testing.assert_array_equal(out["v"], [3.0])
    assert acc.count == 2


@pytest.mark.parametrize("weight", [0, -1, -0.5, float("nan")])
def test_non_positive_weight_rejected(weight):
    with pytest.raises(ValueError, match="weight must be positive"):
        fedavg([({"w": np.ones(2, dtype=np.float32)}, weight)])


def test_no_updates_raises():
    with pytest.raises(ValueError, match="no updates"):
        FedAvg().aggregate({"w": np.zeros(1)}, [])
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean(iter(()))


# --- build -------------------------------------------------------------------------------------------


def test_build_fedavg():
    strategy = build("fedavg")
    assert isinstance(strategy, FedAvg)
    assert strategy.name == "fedavg"
    assert "fedavg" in STRATEGY_NAMES
    out = strategy.aggregate({"x": np.zeros(1)}, [({"x": np.array([2.0])}, 1), ({"x": np.array([4.0])}, 1)])
    assert out["x"][0] == 3.0


def test_build_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError) as info:
        build("nope")
    assert "'nope'" in str(info.value)
    for name in STRATEGY_NAMES:
        assert name in str(info.value)


def test_build_unknown_parameter_rejected():
    with pytest.raises(ValueError) as info:
        build("fedavg", bogus=1)
    assert "'fedavg'" in str(info.value) and "['bogus']" in str(info.value)
    assert not isinstance(info.value, TypeError)


def test_module_exports():
    assert set(aggregation.__all__) == {"STRATEGY_NAMES", "STRATEGY_PARAMS", "Outcome", "Strategy", "build",
                                        "clip_update"}


# --- outcome: what each rule did with each update, never an example share it did not use ---------------
def _updates_around(base, offsets, counts):
    return [({"w": base["w"] + offset}, count) for offset, count in zip(offsets, counts)]


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_weighted_rules_report_their_weight_shares(name):
    base = {"w": np.zeros(3, dtype=np.float32)}
    strategy = build(name)
    strategy.aggregate(base, _updates_around(base, [1.0, 2.0, 3.0], [100, 300, 600]))
    assert strategy.outcome.influence == pytest.approx((0.1, 0.3, 0.6))
    assert "weighted" in strategy.outcome.rule and strategy.outcome.selected is None


def test_krum_rules_report_what_they_picked_and_its_equal_share():
    base = {"w": np.zeros(3, dtype=np.float32)}
    offsets = [0.0, 0.1, 0.2, 0.15, 50.0]  # the last one is far from the rest
    counts = [10, 10, 10, 10, 10_000]
    krum = build("krum", f=1)
    krum.aggregate(base, _updates_around(base, offsets, counts))
    assert len(krum.outcome.selected) == 1 and 4 not in krum.outcome.selected
    assert sorted(krum.outcome.influence) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert krum.outcome.scores[4] == max(krum.outcome.scores)
    multi = build("multi_krum", f=1)
    multi.aggregate(base, _updates_around(base, offsets, counts))
    assert multi.outcome.selected == (0, 1, 2, 3)
    assert multi.outcome.influence == (0.25, 0.25, 0.25, 0.25, 0.0)  # the large silo's count plays no part


@pytest.mark.parametrize("name, params", [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("bulyan", {"f": 1})])
def test_coordinate_rules_say_no_update_has_a_weight(name, params):
    base = {"w": np.zeros(3, dtype=np.float32)}
    strategy = build(name, **params)
    strategy.aggregate(base, _updates_around(base, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 9.0], [1, 1, 1, 1, 1, 1, 99]))
    assert strategy.outcome.influence is None and "no update has a weight" in strategy.outcome.rule
    if name == "bulyan":
        assert len(strategy.outcome.selected) == 5 and 6 not in strategy.outcome.selected


def test_clipping_keeps_the_outcome_and_says_so():
    base = {"w": np.zeros(3, dtype=np.float32)}
    strategy = build("fedavg", clip_norm=0.5)
    strategy.aggregate(base, _updates_around(base, [1.0, 2.0], [1, 3]))
    assert strategy.outcome.influence == pytest.approx((0.25, 0.75))
    assert strategy.outcome.rule.endswith("every update clipped to norm 0.5 first")


# --- streaming: peak memory does not grow with the number of clients ------------------------------------

MODEL_SHAPES = {"layer.weight": (1024, 1000), "layer.bias": (1024,), "bn.num_batches_tracked": ()}  # ~1M floats


def lazy_updates(num_clients: int):
    """Each client's state is made only when the aggregator asks for it."""
    for i in range(num_clients):
        rng = np.random.default_rng(i)
        state = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in MODEL_SHAPES.items()
                 if shape}
        state["bn.num_batches_tracked"] = np.array(100 + i, dtype=np.int64)
        yield state, 100 + i


def peak_bytes(num_clients: int, base) -> tuple[int, dict]:
    gc.collect()
    tracemalloc.start()
    try:
        out = FedAvg().aggregate(base, lazy_updates(num_clients))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, out


def test_aggregate_streams_over_a_generator():
    base = {name: np.zeros(shape, dtype=np.int64 if not shape else np.float32) for name, shape in MODEL_SHAPES.items()}
    model_bytes = 4 * sum(int(np.prod(s)) for s in MODEL_SHAPES.values() if s)
    peak_2, out_2 = peak_bytes(2, base)
    peak_20, out_20 = peak_bytes(20, base)
    # Holding all 20 updates at once would need 20 model copies; streaming needs about 3
    # (the float32 running mean, the update being read, the next one being made).
    assert peak_20 < 1.5 * peak_2, (peak_2, peak_20)
    assert peak_20 < 8 * model_bytes, (peak_20, model_bytes)
    # And the answer is still the weighted mean: counters 100..119 weighted by 100..119.
    w = np.arange(100, 120, dtype=np.float64)
    assert int(out_20["bn.num_batches_tracked"]) == int(np.rint((w * w).sum() / w.sum()))
    assert int(out_2["bn.num_batches_tracked"]) == int(np.rint((100 * 100 + 101 * 101) / 201))
    # Spot-check one float entry against the formula.
    first = [np.random.default_rng(i).standard_normal(1024 * 1000, dtype=np.float32)[:5] for i in range(2)]
    expected = (100 * first[0].astype(np.float64) + 101 * first[1]) / 201
    np.testing.assert_allclose(out_2["layer.weight"].reshape(-1)[:5], expected, rtol=1e-6, atol=1e-7)


def test_output_takes_the_base_dtypes():
    base = {"w": np.zeros(2, dtype=np.float32), "n": np.array(0, dtype=np.int64)}
    out = FedAvg().aggregate(base, [({"w": np.array([1.0, 2.0]), "n": np.array(3.0)}, 1),
                                    ({"w": np.array([2.0, 3.0]), "n": np.array(4.0)}, 1)])
    assert out["w"].dtype == np.float32 and out["n"].dtype == np.int64
    np.testing.assert_array_equal(out["w"], [1.5, 2.5])
    assert int(out["n"]) == 4  # 3.5 rounds half to even


# --- cap_shares: no silo above aggregation.max_weight_share (water-filling) -------------------


@pytest.mark.parametrize("weights, cap, expected", [
    # Nobody above the cap (3 of 6 is exactly 0.5, inclusive): unchanged.
    ([1.0, 2.0, 3.0], 0.5, [1.0, 2.0, 3.0]),
    # 8 of 10 is capped at 5; its excess 3 goes to the others in proportion (1:1): 2.5 each.
    ([8.0, 1.0, 1.0], 0.5, [5.0, 2.5, 2.5]),
    ([1.0, 1.0, 8.0], 0.5, [2.5, 2.5, 5.0]),  # order does not matter
    # In proportion to the others' weights: 9 of 12 capped at 6; the 3 left over splits 2:1.
    ([9.0, 2.0, 1.0], 0.5, [6.0, 4.0, 2.0]),
    # A cascade: capping 50 (share 0.5) at 35 lifts 30 to 39 of 100, over the cap in turn; then
    # both hold 35 and the other two share 30 equally.
    ([50.0, 30.0, 10.0, 10.0], 0.35, [35.0, 35.0, 15.0, 15.0]),
    # Two caps at once, one pass: 40 and 40 of 100 at 0.3 -> 30 each, the 40 left over to 10 and 10.
    ([40.0, 40.0, 10.0, 10.0], 0.3, [30.0, 30.0, 20.0, 20.0]),
    # Exactly at the limit (n x cap = 1): the cap holds only with equal weights.
    ([9.0, 1.0], 0.5, [5.0, 5.0]),
])
def test_cap_shares_water_fills_hand_computed_cases(weights, cap, expected):
    capped = cap_shares(weights, cap)
    assert capped == pytest.approx(expected, rel=1e-12)
    assert sum(capped) == pytest.approx(sum(weights), rel=1e-12)  # the total is kept
    assert max(capped) / sum(capped) <= cap + 1e-12


def test_cap_shares_when_no_cap_can_hold_gives_equal_weights():
    # Two silos cannot each stay below 0.4 of the sum (0.4 + 0.4 < 1): the closest is equal weights.
    assert cap_shares([5.0, 1.0], 0.4) == [3.0, 3.0]
    assert cap_shares([7.0, 2.0, 1.0, 2.0], 0.2) == [3.0, 3.0, 3.0, 3.0]
    assert cap_shares([100.0], 0.5) == [100.0]  # a lone silo holds everything, whatever the cap


def test_cap_shares_off_or_nothing_to_cap():
    assert cap_shares([8.0, 1.0, 1.0], None) == [8.0, 1.0, 1.0]
    assert cap_shares([], 0.5) == []
    assert cap_shares([0.0, 0.0], 0.5) == [0.0, 0.0]
    assert cap_shares([3.0, 1.0], 1.0) == [3.0, 1.0]  # a cap of 1 never binds


@pytest.mark.parametrize("seed", range(5))
def test_cap_shares_on_random_weights_keeps_the_cap_the_sum_and_the_uncapped_proportions(seed):
    rng = np.random.default_rng(seed)
    weights = list(rng.lognormal(0.0, 2.0, size=12))
    cap = 0.15
    capped = cap_shares(weights, cap)
    total = sum(weights)
    assert sum(capped) == pytest.approx(total, rel=1e-12)
    shares = [c / total for c in capped]
    assert max(shares) <= cap + 1e-12
    # Every silo below the cap keeps its weight relative to the others below it (they share
    # the excess in proportion) and gains, never loses; the order of the weights is kept.
    free = [i for i, s in enumerate(shares) if s < cap - 1e-12]
    ratios = [capped[i] / weights[i] for i in free]
    assert ratios and max(ratios) == pytest.approx(min(ratios), rel=1e-9) and min(ratios) >= 1.0
    assert len(free) < len(weights)  # lognormal(0, 2) weights: some silo is over 0.15 of the sum
    order = sorted(range(len(weights)), key=lambda i: weights[i])
    assert all(capped[a] <= capped[b] * (1 + 1e-12) for a, b in zip(order, order[1:]))
