"""fl_tasks/aggregation robust strategies: median, trimmed mean, Krum, Multi-Krum, Bulyan.

Each one against hand-computed cases and against a slow reference written straight from the
published definition (explicit loops over pairs and coordinates).
"""

from __future__ import annotations

import numpy as np
import pytest

from fl_tasks.aggregation import build, robust

# --- reference implementations (slow, literal) --------------------------------------------------


def ref_vectors(states):
    """Floating tensors of each state, flattened in sorted key order, as lists of floats."""
    names = sorted(k for k, v in states[0].items() if np.issubdtype(v.dtype, np.floating))
    return [np.concatenate([np.asarray(s[k], dtype=np.float64).ravel() for k in names]) for s in states], names


def ref_sq_dist(a, b):
    return sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))


def ref_median_1d(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def ref_median(vectors):
    return np.array([ref_median_1d([v[j] for v in vectors]) for j in range(len(vectors[0]))])


def ref_trimmed_mean(vectors, beta):
    n = len(vectors)
    k = int(beta * n)
    out = []
    for j in range(len(vectors[0])):
        kept = sorted(v[j] for v in vectors)[k:n - k]
        out.append(sum(kept) / len(kept))
    return np.array(out)


def ref_krum_scores(vectors, f):
    n = len(vectors)
    k = min(max(1, n - f - 2), n - 1)
    scores = []
    for i in range(n):
        dists = sorted(ref_sq_dist(vectors[i], vectors[j]) for j in range(n) if j != i)
        scores.append(sum(dists[:k]))
    return scores


def ref_krum_order(vectors, f):
    scores = ref_krum_scores(vectors, f)
    return sorted(range(len(vectors)), key=lambda i: (scores[i], i))


def ref_multi_krum(vectors, f, m):
    chosen = ref_krum_order(vectors, f)[:m]
    return sum(vectors[i] for i in chosen) / m


def ref_bulyan(vectors, f):
    n = len(vectors)
    theta, beta = n - 2 * f, n - 4 * f
    remaining = list(range(n))
    picked = []
    while len(picked) < theta:
        best = ref_krum_order([vectors[i] for i in remaining], f)[0]
        picked.append(remaining.pop(best))
    out = []
    for j in range(len(vectors[0])):
        column = [vectors[i][j] for i in picked]
        med = ref_median_1d(column)
        closest = sorted(range(theta), key=lambda r: (abs(column[r] - med), r))[:beta]
        out.append(sum(column[r] for r in closest) / beta)
    return np.array(out)


def ref_int_median(states, name):
    return np.rint(np.median(np.stack([s[name] for s in states]).astype(np.float64), axis=0))


# --- helpers ---------------------------------------------------------------------------------------


def one_d(values, dtype=np.float64):
    """Client models with a single 1-element tensor, equal example counts."""
    return [({"w": np.array([v], dtype=dtype)}, 1) for v in values]


def aggregate(name, updates, base=None, **params):
    updates = list(updates)
    if base is None:
        base = {k: np.zeros_like(v) for k, v in updates[0][0].items()}
    return build(name, **params).aggregate(base, iter(updates))


SHAPES = {"conv.weight": (3, 2, 2), "conv.bias": (3,), "fc.weight": (2, 5), "scale": ()}


def random_states(n, seed, dtype=np.float32, with_ints=True):
    rng = np.random.default_rng(seed)
    states = []
    for i in range(n):
        state = {k: (rng.standard_normal(s) + 3.0).astype(dtype) for k, s in SHAPES.items()}
        if with_ints:
            state["bn.num_batches_tracked"] = np.array(int(rng.integers(90, 110)), dtype=np.int64)
            state["counts"] = rng.integers(0, 5, size=4).astype(np.int32)
            state["mask"] = rng.integers(0, 2, size=3).astype(np.bool_)
        states.append(state)
    return states


def check_against(out, states, expected_vector, *, exact=False):
    vectors, names = ref_vectors(states)
    start = 0
    for name in names:
        size = int(np.prod(SHAPES[name], dtype=np.int64))
        ref = np.asarray(expected_vector[start:start + size]).reshape(SHAPES[name])
        start += size
        assert out[name].dtype == states[0][name].dtype and out[name].shape == SHAPES[name]
        if exact:
            np.testing.assert_array_equal(out[name], ref.astype(out[name].dtype))
        else:
            np.testing.assert_allclose(out[name], ref, rtol=2e-6, atol=1e-6)
    for name in ("bn.num_batches_tracked", "counts", "mask"):
        if name in states[0]:
            assert out[name].dtype == states[0][name].dtype and out[name].shape == states[0][name].shape
            np.testing.assert_array_equal(out[name], ref_int_median(states, name).astype(states[0][name].dtype))


def base_like(states):
    return {k: np.zeros_like(v) for k, v in states[0].items()}


# --- median -----------------------------------------------------------------------------------------


def test_median_odd_and_even_by_hand():
    a, b, c, d = [1.0, 2.0, 3.0], [4.0, 0.0, 9.0], [7.0, 5.0, 6.0], [10.0, 1.0, 0.0]
    ups = [({"w": np.array(v, dtype=np.float32)}, 1) for v in (a, b, c)]
    np.testing.assert_array_equal(aggregate("median", ups)["w"], [4.0, 2.0, 6.0])
    ups.append(({"w": np.array(d, dtype=np.float32)}, 1))
    # columns sorted: 1 4 7 10 -> 5.5;  0 1 2 5 -> 1.5;  0 3 6 9 -> 4.5
    np.testing.assert_array_equal(aggregate("median", ups)["w"], [5.5, 1.5, 4.5])


def test_median_ignores_example_counts():
    ups = [({"w": np.array([0.0])}, 1), ({"w": np.array([1.0])}, 1), ({"w": np.array([100.0])}, 10**6)]
    assert aggregate("median", ups)["w"][0] == 1.0


def test_integer_buffers_take_the_rounded_median_never_zero():
    base = {"w": np.zeros(1, dtype=np.float32), "n": np.array(0, dtype=np.int64)}

    def ups(counts):
        return [({"w": np.array([float(i)], dtype=np.float32), "n": np.array(c, dtype=np.int64)}, 1)
                for i, c in enumerate(counts)]

    for name, params in (("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 0}),
                         ("multi_krum", {"f": 0}), ("bulyan", {"f": 0})):
        assert int(aggregate(name, ups([10, 11, 20, 13, 12]), base, **params)["n"]) == 12, name
        # even n: (11 + 13) / 2 = 12; (10 + 11) / 2 = 10.5 -> 10 and (11 + 12) / 2 -> 12 (half to even)
        assert int(aggregate(name, ups([10, 11, 13, 14]), base, **params)["n"]) == 12, name
        assert int(aggregate(name, ups([10, 10, 11, 11]), base, **params)["n"]) == 10, name
        assert int(aggregate(name, ups([11, 11, 12, 12]), base, **params)["n"]) == 12, name
        out = aggregate(name, ups([10, 11, 13, 14]), base, **params)
        assert out["n"].dtype == np.int64 and out["n"].shape == ()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 10, 16, 17, 33, 100])
def test_median_matches_reference(n):
    states = random_states(n, seed=n)
    out = aggregate("median", [(s, i + 1) for i, s in enumerate(states)], base_like(states))
    check_against(out, states, ref_median(ref_vectors(states)[0]))


def test_median_with_ties_and_duplicates():
    states = random_states(3, seed=11)
    states = [states[0], states[0], states[1], states[2], states[1], states[0]]
    out = aggregate("median", [(s, 1) for s in states], base_like(states))
    check_against(out, states, ref_median(ref_vectors(states)[0]))


def test_median_float64_model():
    states = random_states(5, seed=3, dtype=np.float64)
    out = aggregate("median", [(s, 1) for s in states], base_like(states))
    check_against(out, states, ref_median(ref_vectors(states)[0]), exact=True)


# --- trimmed mean ---------------------------------------------------------------------------------


def test_trimmed_mean_by_hand():
    ups = one_d([4.0, 100.0, 2.0, -50.0, 3.0])
    # beta=0.2, n=5: cut 1 from each end: mean(2, 3, 4) = 3
    assert aggregate("trimmed_mean", ups, beta=0.2)["w"][0] == 3.0
    # beta=0.4: cut 2 from each end: the median
    assert aggregate("trimmed_mean", ups, beta=0.4)["w"][0] == 3.0
    # beta=0.1: int(0.5) = 0 cut, the plain unweighted mean
    assert aggregate("trimmed_mean", ups, beta=0.1)["w"][0] == pytest.approx(59 / 5)
    # n=4, beta=0.25: cut 1 from each end of [1, 2, 6, 10] -> 4
    assert aggregate("trimmed_mean", one_d([10.0, 1.0, 6.0, 2.0]), beta=0.25)["w"][0] == 4.0


def test_trimmed_mean_ignores_example_counts():
    ups = [({"w": np.array([v])}, w) for v, w in ((1.0, 1), (2.0, 1000), (3.0, 1), (4.0, 1))]
    assert aggregate("trimmed_mean", ups, beta=0.25)["w"][0] == 2.5


@pytest.mark.parametrize("n,beta", [(2, 0.0), (3, 0.34), (5, 0.2), (6, 0.3), (8, 0.25), (9, 0.45), (10, 0.1),
                                    (16, 0.2), (17, 0.1), (33, 0.3), (100, 0.1), (100, 0.49)])
def test_trimmed_mean_matches_reference(n, beta):
    states = random_states(n, seed=100 + n)
    out = aggregate("trimmed_mean", [(s, 1) for s in states], base_like(states), beta=beta)
    check_against(out, states, ref_trimmed_mean(ref_vectors(states)[0], beta))


def test_trimmed_mean_with_ties():
    values = [1.0, 1.0, 1.0, 5.0, 5.0, 9.0]
    assert aggregate("trimmed_mean", one_d(values), beta=1 / 6)["w"][0] == pytest.approx(12 / 4)


def test_trimmed_mean_over_several_column_blocks(monkeypatch):
    monkeypatch.setattr(robust, "BLOCK_ELEMENTS", 8)  # 7 rows -> one column per block
    states = random_states(7, seed=5)
    out = aggregate("trimmed_mean", [(s, 1) for s in states], base_like(states), beta=0.3)
    check_against(out, states, ref_trimmed_mean(ref_vectors(states)[0], 0.3))


# --- Krum and Multi-Krum ------------------------------------------------------------------------------

# Honest 0, 1, 2, 3 and an attacker at 104 (mean 22: centred distances are exact integers).
# f=1, n=5: k = n - f - 2 = 2 neighbours. Scores: 0 -> 1+4 = 5; 1 -> 1+1 = 2; 2 -> 1+1 = 2;
# 3 -> 1+4 = 5; 104 -> 101^2 + 102^2 = 20605.
KRUM_POINTS = [0.0, 1.0, 2.0, 3.0, 104.0]


def test_krum_scores_by_hand():
    x = np.array(KRUM_POINTS)[:, None]
    np.testing.assert_array_equal(robust.krum_scores(robust.pairwise_squared_distances(x), 1),
                                  [5.0, 2.0, 2.0, 5.0, 20605.0])


def test_krum_by_hand_ties_go_to_the_earlier_update():
    assert aggregate("krum", one_d(KRUM_POINTS), f=1)["w"][0] == 1.0
    # reversed order: 104, 3, 2, 1, 0 -> the tie 2 / 1 goes to 2 (now earlier)
    assert aggregate("krum", one_d(KRUM_POINTS[::-1]), f=1)["w"][0] == 2.0


def test_multi_krum_by_hand():
    ups = one_d(KRUM_POINTS)
    # default m = n - f = 4: the four honest points, plain mean 1.5
    assert aggregate("multi_krum", ups, f=1)["w"][0] == 1.5
    assert aggregate("multi_krum", ups, f=1, m=2)["w"][0] == 1.5  # {1, 2}
    assert aggregate("multi_krum", ups, f=1, m=3)["w"][0] == 1.0  # {1, 2, 0}: 0 beats 3 on the tie
    assert aggregate("multi_krum", ups, f=1, m=1)["w"][0] == 1.0  # Krum


def test_multi_krum_average_is_unweighted():
    ups = [({"w": np.array([v])}, n) for v, n in zip(KRUM_POINTS, (1, 1000, 1, 1, 1))]
    assert aggregate("multi_krum", ups, f=1, m=2)["w"][0] == 1.5


def test_krum_ignores_example_counts():
    ups = [({"w": np.array([v])}, n) for v, n in zip(KRUM_POINTS, (1, 1, 1, 1, 10**9))]
    assert aggregate("krum", ups, f=1)["w"][0] == 1.0


def test_pairwise_distances_match_the_loop():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((9, 40)) * 0.01 + 50.0).astype(np.float32)  # full weights, small spread
    dist = robust.pairwise_squared_distances(x)
    for i in range(9):
        for j in range(9):
            expected = ref_sq_dist(x[i].astype(np.float64), x[j].astype(np.float64))
            assert dist[i, j] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert np.all(np.diag(dist) == 0) and np.array_equal(dist, dist.T)


def test_pairwise_distances_over_several_column_blocks(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 23))
    whole = robust.pairwise_squared_distances(x)
    monkeypatch.setattr(robust, "BLOCK_ELEMENTS", 10)
    np.testing.assert_allclose(robust.pairwise_squared_distances(x), whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,f", [(3, 0), (5, 1), (6, 1), (7, 2), (8, 2), (10, 3), (16, 2), (33, 5)])
def test_krum_matches_reference(n, f):
    states = random_states(n, seed=200 + n)
    states[-1] = {k: (v * 10 if np.issubdtype(v.dtype, np.floating) else v) for k, v in states[-1].items()}
    out = aggregate("krum", [(s, 1) for s in states], base_like(states), f=f)
    vectors, _ = ref_vectors(states)
    best = ref_krum_order(vectors, f)[0]
    check_against(out, states, vectors[best], exact=True)  # Krum returns one client's weights verbatim


@pytest.mark.parametrize("n,f,m", [(5, 1, None), (6, 1, 2), (7, 2, 5), (8, 2, None), (9, 3, 1), (9, 1, 8)])
def test_multi_krum_matches_reference(n, f, m):
    states = random_states(n, seed=300 + n)
    params = {"f": f} if m is None else {"f": f, "m": m}
    out = aggregate("multi_krum", [(s, i + 1) for i, s in enumerate(states)], base_like(states), **params)
    vectors, _ = ref_vectors(states)
    check_against(out, states, ref_multi_krum(vectors, f, n - f if m is None else m))


def test_krum_with_duplicate_updates_picks_the_duplicated_model():
    states = random_states(7, seed=9)
    states[2] = states[4] = states[5] = states[0]
    out = aggregate("krum", [(s, 1) for s in states], base_like(states), f=2)
    check_against(out, states, ref_vectors(states)[0][0], exact=True)


def test_krum_all_updates_identical():
    states = [random_states(1, seed=4)[0]] * 5
    out = aggregate("krum", [(s, 1) for s in states], base_like(states), f=1)
    check_against(out, states, ref_vectors(states)[0][0], exact=True)


def test_krum_distances_ignore_integer_tensors():
    # Client 2 has the best score (0.5) and a huge counter: the counter must not push it away.
    ups = [({"w": np.array([v]), "n": np.array(c, dtype=np.int64)}, 1)
           for v, c in zip([0.0, 1.5, 2.0, 2.5, 4.0], [1, 1, 10**9, 1, 1])]
    out = aggregate("krum", ups, f=1)
    assert out["w"][0] == 2.0 and int(out["n"]) == 1


# --- Bulyan --------------------------------------------------------------------------------------------


def test_bulyan_by_hand():
    # f=1, n=7: theta=5 by iterated Krum, beta=3. Honest 0..4, attackers 100 and 205 (mean 45,
    # so centred distances are exact). Picks: 2 (score 10), then 1 (tie 14 with 3, earlier),
    # then 3, then 0 (tie 16 with 4, earlier), then 4 (tie 96^2 with 100, earlier).
    # Selected {0, 1, 2, 3, 4}: median 2, the 3 closest are 2, 1, 3 -> 2.
    values = [0.0, 1.0, 2.0, 3.0, 4.0, 100.0, 205.0]
    x = np.array(values)[:, None]
    np.testing.assert_array_equal(robust.bulyan_select(robust.pairwise_squared_distances(x), 1, 5),
                                  [2, 1, 3, 0, 4])
    assert aggregate("bulyan", one_d(values), f=1)["w"][0] == 2.0


def test_mean_closest_to_median_by_hand():
    x = np.array([[0.0], [1.0], [5.0], [6.0], [7.0]])
    assert robust.mean_closest_to_median(x, 3)[0] == 6.0  # median 5: 5, 6, 7
    # median 2; distances 2, 2, 0, 1, 1: 2 then the tie 1 / 3 goes to the earlier row (1)
    x = np.array([[0.0], [4.0], [2.0], [1.0], [3.0]])
    assert robust.mean_closest_to_median(x, 2)[0] == 1.5
    # rows given in pick order: the tie goes to the earlier pick
    assert robust.mean_closest_to_median(x, 2, rows=[0, 1, 2, 4, 3])[0] == 2.5


@pytest.mark.parametrize("n,f", [(3, 0), (4, 0), (7, 1), (8, 1), (11, 2), (12, 2), (16, 3), (17, 1)])
def test_bulyan_matches_reference(n, f):
    states = random_states(n, seed=400 + n)
    for i in range(f):  # f attackers far away
        states[i] = {k: (v - 40 if np.issubdtype(v.dtype, np.floating) else v) for k, v in states[i].items()}
    out = aggregate("bulyan", [(s, i + 1) for i, s in enumerate(states)], base_like(states), f=f)
    vectors, _ = ref_vectors(states)
    check_against(out, states, ref_bulyan(vectors, f))


def test_bulyan_with_duplicates_and_ties():
    states = random_states(4, seed=12)
    states = [states[0], states[1], states[0], states[2], states[3], states[1], states[0]]
    out = aggregate("bulyan", [(s, 1) for s in states], base_like(states), f=1)
    check_against(out, states, ref_bulyan(ref_vectors(states)[0], 1))


def test_bulyan_over_several_column_blocks(monkeypatch):
    monkeypatch.setattr(robust, "BLOCK_ELEMENTS", 15)
    states = random_states(7, seed=13)
    out = aggregate("bulyan", [(s, 1) for s in states], base_like(states), f=1)
    check_against(out, states, ref_bulyan(ref_vectors(states)[0], 1))


def test_bulyan_resists_an_attack_the_mean_does_not():
    rng = np.random.default_rng(0)
    honest = [({"w": (1.0 + 0.01 * rng.standard_normal(50))}, 100) for _ in range(9)]
    attack = [({"w": np.full(50, -1000.0)}, 100) for _ in range(2)]
    ups = honest + attack
    assert np.all(np.abs(aggregate("bulyan", ups, f=2)["w"] - 1.0) < 0.05)
    assert np.all(np.abs(aggregate("fedavg", ups)["w"] - 1.0) > 100)


# --- shape, dtype and key contract ---------------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 1}),
                                         ("multi_krum", {"f": 1}), ("bulyan", {"f": 1})])
def test_output_keeps_keys_shapes_dtypes_and_inputs(name, params):
    states = random_states(7, seed=21)
    states[0]["half"] = np.ones((2, 2), dtype=np.float16)
    for s in states[1:]:
        s["half"] = np.full((2, 2), 2.0, dtype=np.float16)
    copies = [{k: v.copy() for k, v in s.items()} for s in states]
    base = base_like(states)
    out = build(name, **params).aggregate(base, ((s, 1) for s in states))
    assert list(out) == list(base)
    for key, value in base.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
    np.testing.assert_array_equal(out["half"], np.full((2, 2), 2.0, dtype=np.float16))
    for s, c in zip(states, copies):
        for key in s:
            np.testing.assert_array_equal(s[key], c[key])


def test_model_without_floating_tensors():
    ups = [({"n": np.array(c, dtype=np.int64)}, 1) for c in (5, 9, 7)]
    assert int(aggregate("median", ups)["n"]) == 7
    assert int(aggregate("krum", ups, f=0)["n"]) == 7


# --- wrong use fails before aggregation ------------------------------------------------------------------


def no_combine(monkeypatch, cls):
    def boom(self, matrix):
        raise AssertionError("aggregation ran")

    monkeypatch.setattr(cls, "combine", boom)


def test_krum_too_few_updates(monkeypatch):
    from fl_tasks.aggregation.krum import Krum, MultiKrum

    no_combine(monkeypatch, Krum)
    no_combine(monkeypatch, MultiKrum)
    with pytest.raises(ValueError) as info:
        aggregate("krum", one_d(range(5)), f=2)
    assert str(info.value) == "krum with f=2 needs at least 7 client updates (n >= 2f + 3), got 5"
    with pytest.raises(ValueError,
                       match=r"multi_krum with f=1 needs at least 5 client updates \(n >= 2f \+ 3\), got 4"):
        aggregate("multi_krum", one_d(range(4)), f=1)


def test_bulyan_too_few_updates(monkeypatch):
    from fl_tasks.aggregation.bulyan import Bulyan

    no_combine(monkeypatch, Bulyan)
    with pytest.raises(ValueError) as info:
        aggregate("bulyan", one_d(range(9)), f=2)
    assert str(info.value) == "bulyan with f=2 needs at least 11 client updates (n >= 4f + 3), got 9"


def test_multi_krum_m_too_large_for_n(monkeypatch):
    from fl_tasks.aggregation.krum import MultiKrum

    no_combine(monkeypatch, MultiKrum)
    with pytest.raises(ValueError) as info:
        aggregate("multi_krum", one_d(range(6)), f=1, m=6)
    assert str(info.value) == "multi_krum with f=1, m=6 needs m <= n - f = 5 (n=6 client updates)"


@pytest.mark.parametrize("name,params,message", [
    ("krum", {"f": -1}, "krum: f must be an integer >= 0, got -1"),
    ("krum", {"f": 1.5}, "krum: f must be an integer >= 0, got 1.5"),
    ("krum", {"f": True}, "krum: f must be a number, got True"),
    ("bulyan", {"f": -2}, "bulyan: f must be an integer >= 0, got -2"),
    ("multi_krum", {"f": 1, "m": 0}, "multi_krum: m must be an integer >= 1, got 0"),
    ("multi_krum", {"f": -1}, "multi_krum: f must be an integer >= 0, got -1"),
    ("trimmed_mean", {"beta": 0.5}, "trimmed_mean: beta must satisfy 0 <= beta < 0.5, got 0.5"),
    ("trimmed_mean", {"beta": -0.1}, "trimmed_mean: beta must satisfy 0 <= beta < 0.5, got -0.1"),
    ("trimmed_mean", {"beta": float("nan")}, "trimmed_mean: beta must be finite, got nan"),
])
def test_bad_parameters_fail_at_build(name, params, message):
    with pytest.raises(ValueError) as info:
        build(name, **params)
    assert str(info.value) == message


def test_integral_float_parameters_are_accepted():
    assert build("krum", f=2.0).f == 2 and isinstance(build("krum", f=2.0).f, int)
    assert build("multi_krum", f=1, m=3.0).m == 3


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multi_krum", "bulyan"])
def test_no_updates(name):
    with pytest.raises(ValueError, match="no updates"):
        build(name, **({"f": 0} if "krum" in name or name == "bulyan" else {})).aggregate({"w": np.zeros(1)}, [])


def test_update_structure_is_checked():
    base = {"w": np.zeros(2), "b": np.zeros(1)}
    with pytest.raises(ValueError, match=r"keys differ from the base model: \['b'\]"):
        build("median").aggregate(base, [({"w": np.ones(2)}, 1)])
    with pytest.raises(ValueError, match=r"tensor 'w' has shape \(3,\), expected \(2,\)"):
        build("median").aggregate(base, [({"w": np.ones(3), "b": np.ones(1)}, 1)])


# --- copies: exact ties whatever the Gram's rounding ------------------------------------------------


def test_row_copies_are_exact_equality_read_block_by_block():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 40)).astype(np.float32)
    x[2] = x[0]
    x[4] = x[0]
    x[4, 39] = np.nextafter(x[4, 39], np.float32(np.inf))  # one ulp in the last block: not a copy
    x[5] = x[1]
    x[5, 7] = -0.0 if x[1, 7] == 0.0 else x[5, 7]
    x[1, 3], x[5, 3] = 0.0, -0.0  # one value
    copies = robust.RowCopies(6)
    blocks = [x[:, i:i + 8] for i in range(0, 40, 8)]
    for block in blocks:
        copies.add(block)
    assert copies.labels.tolist() == [0, 1, 0, 3, 4, 1]
    # Per column range (shard) the labels may join more rows; combined, only rows equal everywhere.
    parts = []
    for block in (x[:, :32], x[:, 32:]):
        part = robust.RowCopies(6)
        part.add(block)
        parts.append(part.labels)
    assert parts[0].tolist() == [0, 1, 0, 3, 0, 1]
    assert robust.RowCopies.combine(parts).tolist() == [0, 1, 0, 3, 4, 1]


def test_distinct_rows_are_told_apart_by_the_first_block():
    x = np.random.default_rng(4).normal(size=(5, 30))
    copies = robust.RowCopies(5)
    assert copies.add(x[:, :10]) is False  # nothing more to read
    assert copies.labels.tolist() == list(range(5))


def test_copies_get_identical_distances_from_a_gram_rounded_by_row_position():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 50))
    x[3] = x[1]
    c = x - x.mean(axis=0)
    gram = c @ c.T
    noisy = gram.copy()  # what BLAS may do: row 3's products rounded differently from row 1's
    noisy[3, :] *= 1 + 1e-14
    noisy[:, 3] = noisy[3, :]
    plain = robust.distances_from_gram(noisy)
    assert not np.array_equal(plain[3, [0, 2, 4]], plain[1, [0, 2, 4]])  # the noise reaches the distances ...
    dist = robust.distances_from_gram(noisy, np.array([0, 1, 2, 1, 4]))
    assert np.array_equal(dist[3, [0, 2, 4]], dist[1, [0, 2, 4]])  # ... and the copies undo it
    assert dist[1, 3] == dist[3, 1] == dist[3, 3] == 0.0 and np.array_equal(dist, dist.T)
    scores = robust.krum_scores(dist, 1)
    assert scores[1] == scores[3] and robust.krum_select(dist, 1, 5).tolist().index(1) < \
        robust.krum_select(dist, 1, 5).tolist().index(3)
