"""fl_tasks/aggregation example-weighted robust strategies: weighted_median, weighted_trimmed_mean,
weighted_multi_krum, centered_clipping.

Hand-computed cases, reduction to the unweighted rules with equal weights, and centered clipping
against a direct loop over the formula of Karimireddy, He & Jaggi 2021.
"""

from __future__ import annotations

import numpy as np
import pytest

from fl_tasks.aggregation import build, robust

WEIGHTED = [("weighted_median", {}), ("weighted_trimmed_mean", {"beta": 0.2}),
            ("weighted_multi_krum", {"f": 1}), ("centered_clipping", {})]


def one_d(values, weights, dtype=np.float64):
    """Client models with a single 1-element tensor 'w' and the given weights."""
    return [({"w": np.array([v], dtype=dtype)}, w) for v, w in zip(values, weights)]


def aggregate(name, updates, base=None, **params):
    updates = list(updates)
    if base is None:
        base = {k: np.zeros_like(v) for k, v in updates[0][0].items()}
    return build(name, **params).aggregate(base, iter(updates))


def scalar(name, values, weights, **params):
    return float(aggregate(name, one_d(values, weights), **params)["w"][0])


def rows_as_updates(x, weights, base=None):
    """Rows of x as client models {'a': first 3 columns, 'b': the rest as (2, k)} (sorted keys
    'a' < 'b' keep the row order of the flat vector)."""
    out = []
    for row, w in zip(x, weights):
        out.append(({"a": row[:3].copy(), "b": row[3:].reshape(2, -1).copy()}, w))
    return out


def flat(state):
    return np.concatenate([np.asarray(state["a"]).ravel(), np.asarray(state["b"]).ravel()])


# --- weighted median ---------------------------------------------------------------------------------


def test_weighted_median_by_hand():
    assert scalar("weighted_median", [1.0, 2.0, 10.0], [1, 1, 5]) == 10.0  # 5/7 of the weight at 10
    assert scalar("weighted_median", [1.0, 2.0, 10.0], [5, 1, 1]) == 1.0
    assert scalar("weighted_median", [10.0, 1.0, 2.0], [1, 1, 1]) == 2.0  # equal weights: the median
    # sorted 1 2 3 4, weights 1 2 3 4 (total 10): cumulative 1 3 6 10 -> first >= 5 is 3
    assert scalar("weighted_median", [4.0, 2.0, 3.0, 1.0], [4, 2, 3, 1]) == 3.0
    # weights 2 2 1 3: cumulative 2 4 5 8, exactly half (4) at 2 -> mean of 2 and 3
    assert scalar("weighted_median", [3.0, 1.0, 4.0, 2.0], [1, 2, 3, 2]) == 2.5
    assert scalar("weighted_median", [1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1]) == 2.5


def test_weighted_median_per_column_by_hand():
    x = np.array([[1.0, 30.0], [2.0, 10.0], [10.0, 20.0]])
    # column 0 sorted 1 2 10 (w 1 1 5) -> 10; column 1 sorted 10 20 30 (w 1 5 1) -> 20
    np.testing.assert_array_equal(robust.weighted_median(x, [1, 1, 5]), [10.0, 20.0])


def test_weighted_median_leaves_zero_weights_out():
    # without the middle row: cumulative 1/2 exactly at 1 -> mean of 1 and 3, never 2
    assert robust.weighted_median(np.array([[1.0], [2.0], [3.0]]), [1, 0, 1])[0] == 2.0
    assert robust.weighted_median(np.array([[1.0], [2.0], [3.0]]), [0, 0, 1])[0] == 3.0


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8])
def test_weighted_median_with_equal_weights_is_the_median_exactly(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, 37)) + 3.0).astype(np.float32)
    x[:, 5] = x[0, 5]  # a column of ties
    for weight in (1.0, 7.3, 1e6):
        np.testing.assert_array_equal(robust.weighted_median(x, np.full(n, weight)), robust.coordinate_median(x))
    ups = rows_as_updates(x, [3] * n)
    np.testing.assert_array_equal(flat(aggregate("weighted_median", ups)), flat(aggregate("median", ups)))


def test_weighted_median_matches_a_loop():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 20))
    w = rng.uniform(0.1, 3.0, 9)
    expected = []
    for j in range(20):
        pairs = sorted(zip(x[:, j], w))
        total, cumulative = sum(w), 0.0
        for value, weight in pairs:
            cumulative += weight
            if cumulative >= total / 2:
                expected.append(value)
                break
    np.testing.assert_array_equal(robust.weighted_median(x, w), expected)


# --- weighted trimmed mean -------------------------------------------------------------------------------


def test_weighted_trimmed_mean_by_hand():
    # total 4, beta 0.25 cuts weight 1 at each end: 0 keeps 1 of its 2 (fractional boundary),
    # 20 goes entirely: mean of 0 (weight 1) and 10 (weight 1) = 5
    assert scalar("weighted_trimmed_mean", [0.0, 10.0, 20.0], [2, 1, 1], beta=0.25) == pytest.approx(5.0)
    # total 8, beta 0.2 cuts 1.6 at each end: 0 goes, 10 keeps 0.4, 20 keeps 1, 30 keeps 5 - 1.6 = 3.4:
    # (10*0.4 + 20*1 + 30*3.4) / 4.8 = 126 / 4.8 = 26.25
    assert scalar("weighted_trimmed_mean", [30.0, 0.0, 20.0, 10.0], [5, 1, 1, 1], beta=0.2) == pytest.approx(26.25)
    # beta 0: the weighted mean (0*1 + 10*1 + 20*1 + 30*5) / 8 = 22.5
    assert scalar("weighted_trimmed_mean", [30.0, 0.0, 20.0, 10.0], [5, 1, 1, 1], beta=0.0) == pytest.approx(22.5)
    # one value holding most of the weight: the result is that value
    assert scalar("weighted_trimmed_mean", [1.0, 100.0, -50.0], [8, 1, 1], beta=0.1) == pytest.approx(1.0)
    # weights 1 2 3 4 on 1 2 3 4, beta 0.3 cuts 3 at each end: 1 and 2 go, 3 keeps 3, 4 keeps 1 -> 3.25
    assert scalar("weighted_trimmed_mean", [1.0, 2.0, 3.0, 4.0], [1, 2, 3, 4], beta=0.3) == pytest.approx(3.25)


@pytest.mark.parametrize("n,beta", [(2, 0.0), (4, 0.25), (5, 0.2), (8, 0.25), (10, 0.3), (10, 0.4)])
def test_weighted_trimmed_mean_with_equal_weights_is_the_trimmed_mean(n, beta):
    assert (beta * n).is_integer()
    rng = np.random.default_rng(100 + n)
    x = (rng.standard_normal((n, 41)) + 3.0).astype(np.float32)
    np.testing.assert_allclose(robust.weighted_trimmed_mean(x, np.full(n, 2.5), beta), robust.trimmed_mean(x, beta),
                               rtol=1e-12, atol=1e-12)
    ups = rows_as_updates(x, [7] * n)
    np.testing.assert_allclose(flat(aggregate("weighted_trimmed_mean", ups, beta=beta)),
                               flat(aggregate("trimmed_mean", ups, beta=beta)), rtol=1e-6)


def test_weighted_trimmed_mean_matches_a_loop():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((7, 15))
    w = rng.uniform(0.1, 3.0, 7)
    beta = 0.17
    expected = []
    for j in range(15):
        pairs = sorted(zip(x[:, j], w / w.sum()))
        lower, num, den = 0.0, 0.0, 0.0
        for value, weight in pairs:
            kept = max(0.0, min(lower + weight, 1 - beta) - max(lower, beta))
            num, den, lower = num + kept * value, den + kept, lower + weight
        expected.append(num / den)
    np.testing.assert_allclose(robust.weighted_trimmed_mean(x, w, beta), expected, rtol=1e-12)


def test_weighted_rules_over_several_column_blocks(monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 23)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, 6)
    whole = (robust.weighted_median(x, w), robust.weighted_trimmed_mean(x, w, 0.2),
             robust.centered_clip(x, w, np.zeros(23), 1.5, 3))
    monkeypatch.setattr(robust, "BLOCK_ELEMENTS", 7)  # one column per block
    np.testing.assert_array_equal(robust.weighted_median(x, w), whole[0])
    np.testing.assert_allclose(robust.weighted_trimmed_mean(x, w, 0.2), whole[1], rtol=1e-13)
    np.testing.assert_allclose(robust.centered_clip(x, w, np.zeros(23), 1.5, 3), whole[2], rtol=1e-12)


# --- weighted multi-Krum ---------------------------------------------------------------------------------

# As in test_robust: honest 0 1 2 3 and an attacker at 104; f=1 scores 5 2 2 5 20605.
KRUM_POINTS = [0.0, 1.0, 2.0, 3.0, 104.0]


def test_weighted_multi_krum_by_hand():
    weights = [1, 3, 1, 1, 100]  # the attacker's huge count buys it nothing: it is not selected
    strategy = build("weighted_multi_krum", f=1)
    out = strategy.aggregate({"w": np.zeros(1)}, one_d(KRUM_POINTS, weights))
    assert out["w"][0] == pytest.approx((0 * 1 + 1 * 3 + 2 * 1 + 3 * 1) / 6)  # m = n - f = 4
    assert strategy.outcome.selected == (0, 1, 2, 3)
    np.testing.assert_allclose(strategy.outcome.influence, [1 / 6, 3 / 6, 1 / 6, 1 / 6, 0.0])
    assert strategy.outcome.scores == (5.0, 2.0, 2.0, 5.0, 20605.0)
    assert scalar("weighted_multi_krum", KRUM_POINTS, weights, f=1, m=2) == pytest.approx((1 * 3 + 2 * 1) / 4)
    assert scalar("weighted_multi_krum", KRUM_POINTS, weights, f=1, m=1) == 1.0  # Krum


@pytest.mark.parametrize("n,f,m", [(5, 1, None), (7, 2, 3), (9, 1, 8)])
def test_weighted_multi_krum_selects_like_multi_krum_and_weighs_the_average(n, f, m):
    rng = np.random.default_rng(300 + n)
    x = rng.standard_normal((n, 9)) + 2.0
    x[-1] *= 10
    weights = list(rng.integers(1, 1000, n))
    ups = rows_as_updates(x, weights)
    params = {"f": f} if m is None else {"f": f, "m": m}
    plain, weighted = build("multi_krum", **params), build("weighted_multi_krum", **params)
    plain.aggregate({"a": np.zeros(3), "b": np.zeros((2, 3))}, iter(ups))
    out = weighted.aggregate({"a": np.zeros(3), "b": np.zeros((2, 3))}, iter(ups))
    chosen = list(plain.outcome.selected)
    assert weighted.outcome.selected == plain.outcome.selected and weighted.outcome.scores == plain.outcome.scores
    w = np.array(weights, dtype=np.float64)[chosen]
    np.testing.assert_allclose(flat(out), (w @ x[chosen]) / w.sum(), rtol=1e-12)
    expected_influence = np.zeros(n)
    expected_influence[chosen] = w / w.sum()
    np.testing.assert_allclose(weighted.outcome.influence, expected_influence, rtol=1e-12)


def test_weighted_multi_krum_too_few_updates():
    with pytest.raises(ValueError, match=r"weighted_multi_krum with f=1 needs at least 5 client updates "
                                         r"\(n >= 2f \+ 3\), got 4"):
        aggregate("weighted_multi_krum", one_d(range(4), [1] * 4), f=1)
    with pytest.raises(ValueError, match=r"weighted_multi_krum with f=1, m=6 needs m <= n - f = 5"):
        aggregate("weighted_multi_krum", one_d(range(6), [1] * 6), f=1, m=6)


# --- centered clipping ---------------------------------------------------------------------------------


def ref_centered_clip(deltas, weights, center, tau, iterations):
    """Straight from the formula: v <- v + sum_i w_i (x_i - v) min(1, tau / ||x_i - v||)."""
    w = [float(x) / float(sum(weights)) for x in weights]
    v = np.array(center, dtype=np.float64)
    for _ in range(iterations):
        step = np.zeros_like(v)
        for i in range(len(deltas)):
            diff = np.asarray(deltas[i], dtype=np.float64) - v
            norm = float(np.sqrt(sum(float(d) ** 2 for d in diff)))
            step += w[i] * diff * (1.0 if norm == 0 else min(1.0, tau / norm))
        v = v + step
    return v


def ref_median_distance(deltas, center):
    return float(np.median([np.linalg.norm(np.asarray(d, dtype=np.float64) - center) for d in deltas]))


@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_centered_clip_matches_the_formula(iterations):
    rng = np.random.default_rng(iterations)
    deltas = rng.standard_normal((6, 17)) * rng.uniform(0.1, 5.0, (6, 1))
    weights = rng.uniform(1, 10, 6)
    for center in (np.zeros(17), rng.standard_normal(17)):
        for tau in (0.0, 0.5, 2.0, 1e9):
            np.testing.assert_allclose(robust.centered_clip(deltas, weights, center, tau, iterations),
                                       ref_centered_clip(deltas, weights, center, tau, iterations),
                                       rtol=1e-12, atol=1e-12)
    # no clipping at all: one iteration is the weighted mean
    np.testing.assert_allclose(robust.centered_clip(deltas, weights, np.zeros(17), 1e9, 1),
                               weights @ deltas / weights.sum(), rtol=1e-12)


def model_round(rng, base, n=5, scale=0.1):
    deltas = rng.standard_normal((n, base.size)) * scale + 0.05
    return deltas, [(dict(zip(("a", "b"), (row[:3] + base[:3], (row[3:] + base[3:]).reshape(2, -1)))), w)
                    for row, w in zip(deltas, rng.integers(10, 500, n))]


def test_centered_clipping_strategy_first_round_and_carried_state():
    rng = np.random.default_rng(11)
    base = rng.standard_normal(9) + 1.0
    base_state = {"a": base[:3].copy(), "b": base[3:].reshape(2, 3).copy()}
    deltas, ups = model_round(rng, base)
    weights = [w for _, w in ups]
    strategy = build("centered_clipping")
    assert strategy.stateful and strategy.get_state() == {}
    out = strategy.aggregate(base_state, iter(ups))
    tau = ref_median_distance(deltas, np.zeros(9))
    v1 = ref_centered_clip(deltas, weights, np.zeros(9), tau, 3)
    np.testing.assert_allclose(flat(out), base + v1, rtol=1e-12, atol=1e-12)
    assert strategy.radius == pytest.approx(tau, rel=1e-12)
    state = strategy.get_state()
    assert set(state) == {"v/a", "v/b"} and state["v/b"].shape == (2, 3)
    np.testing.assert_allclose(np.concatenate([state["v/a"], state["v/b"].ravel()]), v1, rtol=1e-12, atol=1e-14)

    # round 2 from the new model: the center is round 1's delta
    base2 = base + v1
    base2_state = {"a": base2[:3].copy(), "b": base2[3:].reshape(2, 3).copy()}
    deltas2, ups2 = model_round(rng, base2, scale=0.3)
    weights2 = [w for _, w in ups2]
    fresh = build("centered_clipping")
    fresh.set_state(state)  # as the coordinator does, from the saved state
    out2 = fresh.aggregate(base2_state, iter(ups2))
    continued = strategy.aggregate(base2_state, iter(ups2))
    tau2 = ref_median_distance(deltas2, v1)
    v2 = ref_centered_clip(deltas2, weights2, v1, tau2, 3)
    np.testing.assert_allclose(flat(out2), base2 + v2, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(flat(out2), flat(continued))
    assert "from the previous round's delta" in fresh.outcome.rule
    for key in ("v/a", "v/b"):
        np.testing.assert_array_equal(fresh.get_state()[key], strategy.get_state()[key])


def test_centered_clipping_fixed_tau_ratio_and_iterations():
    rng = np.random.default_rng(12)
    base = np.zeros(9)
    base_state = {"a": np.zeros(3), "b": np.zeros((2, 3))}
    deltas, ups = model_round(rng, base)
    weights = [w for _, w in ups]
    out = aggregate("centered_clipping", ups, base_state, tau=0.2, iterations=2)
    np.testing.assert_allclose(flat(out), ref_centered_clip(deltas, weights, np.zeros(9), 0.2, 2), rtol=1e-12)
    out = aggregate("centered_clipping", ups, base_state, tau_ratio=0.5, iterations=4)
    tau = 0.5 * ref_median_distance(deltas, np.zeros(9))
    np.testing.assert_allclose(flat(out), ref_centered_clip(deltas, weights, np.zeros(9), tau, 4), rtol=1e-12)


def test_centered_clipping_clips_an_outlier_to_tau():
    honest = [np.array([0.1, -0.2, 0.05]), np.array([0.0, 0.1, 0.1]), np.array([-0.1, 0.0, 0.2]),
              np.array([0.2, 0.1, -0.1])]
    outlier = 100.0 * np.array([3.0, 4.0, 0.0])  # norm 500
    weights = [1, 1, 1, 1, 1]
    strategy = build("centered_clipping", tau=1.0, iterations=1)
    out = strategy.aggregate({"w": np.zeros(3)}, [({"w": d}, w) for d, w in zip(honest + [outlier], weights)])
    # every honest delta is within 1 of 0, the outlier enters as 1.0 x its direction (0.6, 0.8, 0)
    expected = (sum(honest) + np.array([0.6, 0.8, 0.0])) / 5
    np.testing.assert_allclose(out["w"], expected, rtol=1e-12)
    assert strategy.clipped == (False, False, False, False, True) and strategy.radius == 1.0
    np.testing.assert_allclose(strategy.outcome.influence, [0.2, 0.2, 0.2, 0.2, 0.2 / 500], rtol=1e-12)
    assert "radius 1 (fixed)" in strategy.outcome.rule and "clipped in the first iteration [4]" in strategy.outcome.rule
    # the outlier's pull on the result is w * tau, not w * 500
    assert np.linalg.norm(out["w"] - sum(honest) / 5) == pytest.approx(0.2, rel=1e-12)


def test_centered_clipping_influence_explains_the_result():
    rng = np.random.default_rng(13)
    deltas = rng.standard_normal((5, 4))
    center = rng.standard_normal(4)
    result = robust.centered_clipping(deltas, [1, 2, 3, 4, 5], center, 0.8, 3)
    np.testing.assert_allclose(result.history_share * center + result.influence @ deltas, result.vector, rtol=1e-12)
    assert result.history_share == pytest.approx(1 - result.influence.sum())
    assert result.clipped.shape == (3, 5)


def test_centered_clipping_state_checks():
    strategy = build("centered_clipping", tau=1.0)
    with pytest.raises(ValueError, match=r"centered_clipping state has unknown entries \['m/w'\]"):
        strategy.set_state({"m/w": np.zeros(2)})
    # a center of another shape (the model changed) restarts from zero
    strategy.set_state({"v/w": np.ones(3)})
    out = strategy.aggregate({"w": np.zeros(2)}, [({"w": np.array([0.5, 0.0])}, 1)])
    np.testing.assert_allclose(out["w"], [0.5, 0.0])
    assert "from zero (the saved center did not match the model)" in strategy.outcome.rule
    np.testing.assert_allclose(strategy.get_state()["v/w"], [0.5, 0.0])
    strategy.set_state({})
    strategy.aggregate({"w": np.zeros(2)}, [({"w": np.array([0.5, 0.0])}, 1)])
    assert "from zero (no previous center)" in strategy.outcome.rule


def test_centered_clipping_keeps_state_under_the_clip_wrapper_and_float32():
    strategy = build("centered_clipping", clip_norm=10.0)
    assert strategy.stateful
    base = {"w": np.ones(4, np.float32), "n": np.array(3, np.int64)}
    ups = [({"w": np.full(4, 1.0 + i, np.float32), "n": np.array(3 + i, np.int64)}, 10) for i in range(3)]
    out = strategy.aggregate(base, iter(ups))
    assert out["w"].dtype == np.float32 and int(out["n"]) == 4
    state = strategy.get_state()
    assert state["v/w"].dtype == np.float32
    np.testing.assert_allclose(state["v/w"], out["w"] - 1.0, rtol=1e-6)
    assert "clipped to norm 10 first" in strategy.outcome.rule


# --- robustness sanity -------------------------------------------------------------------------------------


def test_one_sign_flipped_update_barely_moves_the_weighted_rules():
    rng = np.random.default_rng(21)
    d = 40
    direction = rng.standard_normal(d) * 0.1
    honest = [direction + 0.01 * rng.standard_normal(d) for _ in range(4)]
    counts = [300, 200, 400, 100]
    clean = [({"w": h}, c) for h, c in zip(honest, counts)]
    attacked = clean + [({"w": -10.0 * direction}, 250)]
    base = {"w": np.zeros(d)}
    size = np.linalg.norm(direction)

    def moved(name, **params):
        return np.linalg.norm(aggregate(name, attacked, base, **params)["w"] -
                              aggregate(name, clean, base, **params)["w"]) / size

    assert moved("fedavg") > 2.0
    assert moved("weighted_median") < 0.15
    assert moved("weighted_trimmed_mean", beta=0.2) < 0.15
    assert moved("centered_clipping") < 0.35  # first round: clipped around zero
    # with the history of a clean round the center starts near the honest direction
    history = build("centered_clipping")
    history.aggregate(base, iter(clean))
    with_history = build("centered_clipping")
    with_history.set_state(history.get_state())
    with_history_clean = build("centered_clipping")
    with_history_clean.set_state(history.get_state())
    shift = np.linalg.norm(with_history.aggregate(base, iter(attacked))["w"]
                           - with_history_clean.aggregate(base, iter(clean))["w"]) / size
    assert shift < 0.1
    assert with_history.clipped[-1]


# --- common contract and wrong use ------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", WEIGHTED)
def test_output_keeps_keys_shapes_dtypes_and_integer_medians(name, params):
    rng = np.random.default_rng(3)
    base = {"conv.weight": np.zeros((2, 3), np.float32), "bn.running_mean": np.zeros(3, np.float64),
            "half": np.zeros(2, np.float16), "bn.num_batches_tracked": np.array(0, np.int64),
            "mask": np.zeros(3, np.bool_)}
    ups = []
    for i, count in enumerate([10, 11, 20, 13, 12]):
        state = {k: (rng.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()
                 if np.issubdtype(v.dtype, np.floating)}
        state["bn.num_batches_tracked"] = np.array(count, np.int64)
        state["mask"] = np.array([True, i % 2 == 0, False])
        ups.append((state, 100 * (i + 1)))
    copies = [{k: v.copy() for k, v in s.items()} for s, _ in ups]
    out = build(name, **params).aggregate(base, iter(ups))
    assert list(out) == list(base)
    for key, value in base.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
    assert int(out["bn.num_batches_tracked"]) == 12  # rounded unweighted median, as the other robust rules
    np.testing.assert_array_equal(out["mask"], [True, True, False])
    for (s, _), c in zip(ups, copies):
        for key in s:
            np.testing.assert_array_equal(s[key], c[key])


@pytest.mark.parametrize("name,params", WEIGHTED)
def test_bad_weights_fail(name, params):
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        aggregate(name, one_d(range(5), [1, 1, -1, 1, 1]), **params)
    with pytest.raises(ValueError, match="weights must not all be zero"):
        aggregate(name, one_d(range(5), [0] * 5), **params)
    with pytest.raises(ValueError, match="no updates"):
        build(name, **params).aggregate({"w": np.zeros(1)}, [])


@pytest.mark.parametrize("name,params,message", [
    ("weighted_trimmed_mean", {"beta": 0.6}, "weighted_trimmed_mean: beta must satisfy 0 <= beta < 0.5, got 0.6"),
    ("weighted_trimmed_mean", {"beta": -0.1}, "weighted_trimmed_mean: beta must satisfy 0 <= beta < 0.5, got -0.1"),
    ("weighted_multi_krum", {"f": -1}, "weighted_multi_krum: f must be an integer >= 0, got -1"),
    ("weighted_multi_krum", {"f": 1, "m": 0}, "weighted_multi_krum: m must be an integer >= 1, got 0"),
    ("centered_clipping", {"tau": -1}, "centered_clipping: tau must satisfy 0 <= tau < inf, got -1"),
    ("centered_clipping", {"tau": float("inf")}, "centered_clipping: tau must be finite, got inf"),
    ("centered_clipping", {"tau_ratio": 0}, "centered_clipping: tau_ratio must be > 0, got 0"),
    ("centered_clipping", {"iterations": 0}, "centered_clipping: iterations must be an integer >= 1, got 0"),
    ("centered_clipping", {"iterations": 1.5}, "centered_clipping: iterations must be an integer >= 1, got 1.5"),
    ("centered_clipping", {"iterations": True}, "centered_clipping: iterations must be a number, got True"),
])
def test_bad_parameters_fail_at_build(name, params, message):
    with pytest.raises(ValueError) as info:
        build(name, **params)
    assert str(info.value) == message
