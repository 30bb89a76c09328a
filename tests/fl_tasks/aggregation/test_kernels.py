"""fl_tasks/aggregation/kernels.py: the fast robust kernels against the plain numpy formulas.

The median must equal np.median of the float64 columns bit for bit (min / max select the
values exactly, the two middle ones are averaged as np.median does); the means of selected
values (trimmed mean, Bulyan's coordinate step) must equal the numpy reference up to float64
rounding, since they add the same values in another order. Every case runs on both paths
(networks for small n, row sorts for large n), in several column chunks, on float32 and
float64 rows, with ties and with values of wildly different magnitudes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fl_tasks.aggregation import kernels, robust

CLIENTS = [1, 2, 3, 4, 5, 7, 8, 10, 16, 17, 33, 100]
EPS = np.finfo(np.float64).eps


def data(n, d, seed, dtype=np.float32):
    """Columns of four kinds: plain normal, heavy ties (a few repeated integers), equal
    values, and magnitudes from 1e-30 to 1e30 with both signs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    q = d // 4
    x[:, :q] = rng.integers(-2, 3, size=(n, q))  # ties
    x[:, q:q + 2] = 7.25  # every value equal
    big = x[:, q + 2:2 * q]
    big *= 10.0 ** rng.integers(-30, 31, size=big.shape)
    return x.astype(dtype)


def numpy_trimmed(x, k):
    """The sorted-slice trimmed mean in float64 (what np.partition + mean computes)."""
    n = x.shape[0]
    return np.sort(x.astype(np.float64), axis=0)[k:n - k].mean(axis=0)


def numpy_closest(x, beta):
    """Per column the mean of the beta values closest to np.median, ties to the earlier row."""
    block = x.astype(np.float64)
    med = np.median(block, axis=0)
    order = np.argsort(np.abs(block - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(block, order, axis=0).mean(axis=0)


def assert_sum_close(got, expected, values, count):
    """Equal up to the rounding of adding `count` float64 values of at most `values` size."""
    bound = 2 * count * EPS * np.abs(values.astype(np.float64)).max(axis=0)
    assert np.all(np.abs(got - expected) <= bound), np.max(np.abs(got - expected) - bound)


@pytest.fixture(params=["network", "sort"])
def path(request, monkeypatch):
    """Run on the selection networks, or on the row sorts (SORT_ROWS moved out of the way)."""
    monkeypatch.setattr(kernels, "SORT_ROWS", 10**6 if request.param == "network" else 0)
    return request.param


# --- the networks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 13))
def test_sorting_network_sorts_every_zero_one_input(n):
    # the 0-1 principle: a comparator network that sorts all 2^n bit vectors sorts everything
    bits = ((np.arange(2 ** n)[None, :] >> np.arange(n)[:, None]) & 1).astype(np.int8)
    for a, b in kernels.sorting_network(n):
        bits[a], bits[b] = np.minimum(bits[a], bits[b]), np.maximum(bits[a], bits[b])
    assert np.all(bits[:-1] <= bits[1:])


@pytest.mark.parametrize("n", [13, 16, 17, 33, 100])
def test_sorting_network_sorts_random_columns(n):
    x = np.random.default_rng(n).integers(0, 5, size=(n, 500))
    for a, b in kernels.sorting_network(n):
        x[a], x[b] = np.minimum(x[a], x[b]), np.maximum(x[a], x[b])
    assert np.all(x[:-1] <= x[1:])


@pytest.mark.parametrize("n", range(2, 12))
def test_middle_program_keeps_the_middle_of_every_zero_one_input(n):
    bits = ((np.arange(2 ** n)[None, :] >> np.arange(n)[:, None]) & 1).astype(np.float32)
    for k in range(0, (n - 1) // 2 + 1):
        kept = kernels.Runner(kernels.middle_program(n, k), np.float32, bits.shape[1])(list(bits))
        expected = np.sort(bits, axis=0)[k:n - k].sum(axis=0)
        np.testing.assert_array_equal(np.sum(kept, axis=0), expected)


def test_pruning_saves_work():
    # the median of 16 needs far fewer than the 2 x 63 calls of the full sort
    assert len(kernels.middle_program(16, 7).ops) < 100
    # cutting one value from each end of 10 is cheaper than the median
    assert len(kernels.middle_program(10, 1).ops) < len(kernels.middle_program(10, 4).ops)


# --- median and trimmed mean ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", CLIENTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_is_np_median_bit_for_bit(n, dtype, path):
    x = data(n, 203, seed=n, dtype=dtype)
    expected = np.median(x.astype(np.float64), axis=0)
    np.testing.assert_array_equal(kernels.median(x), expected)
    np.testing.assert_array_equal(kernels.median(x, limit=7 * n), expected)  # 29 chunks, the last one short
    np.testing.assert_array_equal(robust.coordinate_median(x), expected)


@pytest.mark.parametrize("n", CLIENTS)
def test_trimmed_mean_is_the_sorted_slice_mean(n, path):
    x = data(n, 203, seed=100 + n)
    ks = range(0, (n - 1) // 2 + 1) if n <= 17 else (0, 1, n // 10, n // 5, (n - 1) // 2)
    for k in ks:
        expected = numpy_trimmed(x, k)
        kept = np.sort(x, axis=0)[k:n - k]
        assert_sum_close(kernels.middle_mean(x, k), expected, kept, n - 2 * k)
        assert_sum_close(kernels.middle_mean(x, k, limit=5 * n), expected, kept, n - 2 * k)
    for beta in (0.0, 0.1, 0.2, 0.3, 0.45):
        k = int(beta * n)
        if n - 2 * k >= 1:
            assert_sum_close(robust.trimmed_mean(x, beta), numpy_trimmed(x, k), np.sort(x, axis=0)[k:n - k],
                             n - 2 * k)


def test_plain_mean_adds_the_rows_in_order():
    x = data(9, 101, seed=3)
    np.testing.assert_array_equal(kernels.middle_mean(x, 0), x.astype(np.float64).mean(axis=0))


def test_median_of_selected_rows_and_other_dtypes(path):
    x = data(12, 57, seed=4)
    rows = [11, 3, 3, 0, 7, 5, 9]
    np.testing.assert_array_equal(kernels.median(x, rows), np.median(x[rows].astype(np.float64), axis=0))
    for y in (x.clip(-6e4, 6e4).astype(np.float16), np.round(x.clip(-1e6, 1e6) * 3).astype(np.int32)):
        np.testing.assert_array_equal(kernels.median(y), np.median(y.astype(np.float64), axis=0))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10, 16, 17, 33, 100])
def test_a_nan_gives_nan_for_its_column(n, path):
    x = data(n, 4 * n, seed=5)
    for i in range(n):
        x[i, 4 * i] = np.nan  # one NaN in each row, each in its own column
    nan_columns = np.zeros(4 * n, dtype=bool)
    nan_columns[::4] = True
    for k in range(0, (n - 1) // 2 + 1, max(1, n // 8)):
        np.testing.assert_array_equal(np.isnan(kernels.middle_mean(x, k)), nan_columns)


# --- Bulyan's coordinate step ----------------------------------------------------------------------------


def bulyan_cases():
    for t in [1, 2, 3, 4, 5, 7, 8, 10, 16, 17, 33, 98]:
        for f in sorted({0, 1, 2, (t - 1) // 4}):
            if t - 2 * f >= 1 and 4 * f <= t - 1:
                yield t, t - 2 * f  # Bulyan: beta = theta - 2f, theta >= 4f + 1


@pytest.mark.parametrize("t,beta", list(bulyan_cases()))
def test_mean_closest_to_median_is_the_stable_sort_rule(t, beta, path):
    x = data(t + 3, 151, seed=t * 100 + beta)
    rows = np.random.default_rng(t).permutation(t + 3)[:t]  # the pick order decides ties
    expected = numpy_closest(x[rows], beta)
    assert_sum_close(kernels.mean_closest_to_median(x, beta, rows), expected, x[rows], beta)
    assert_sum_close(kernels.mean_closest_to_median(x, beta, rows, limit=6 * t), expected, x[rows], beta)


def test_mean_closest_to_median_ties_across_the_median_go_to_the_earlier_row(path):
    # median 2; 1 and 3 both at distance 1, only one of them kept: the earlier row's
    x = np.array([[2.0, 2.0], [3.0, 1.0], [1.0, 3.0], [2.0, 2.0], [9.0, 9.0]], dtype=np.float32)
    np.testing.assert_array_equal(kernels.mean_closest_to_median(x, 3), [7 / 3, 5 / 3])
    np.testing.assert_array_equal(kernels.mean_closest_to_median(x, 3, [0, 2, 1, 3, 4]), [5 / 3, 7 / 3])


def test_mean_closest_to_median_with_equal_distances_from_rounding():
    # the median 1e10 and values 1 and 1 + 2^-23 below it: float64 distances round equal
    x = np.full((7, 1), 1e10, dtype=np.float32)
    x[0, 0], x[1, 0], x[2, 0] = np.float32(1 + 2**-23), np.float32(1.0), np.float32(3e10)
    for rows in ([0, 1, 2, 3, 4, 5, 6], [1, 0, 2, 3, 4, 5, 6]):
        np.testing.assert_array_equal(kernels.mean_closest_to_median(x, 5, rows), numpy_closest(x[rows], 5))


@pytest.mark.parametrize("t,beta", [(5, 1), (6, 2), (9, 3), (9, 4), (10, 5)])
def test_mean_closest_to_median_keeping_half_or_less(t, beta):
    x = data(t, 120, seed=t + beta)
    assert_sum_close(kernels.mean_closest_to_median(x, beta, list(range(t))[::-1]),
                     numpy_closest(x[::-1], beta), x, beta)


@pytest.mark.parametrize("t", [5, 9, 17, 98])
def test_mean_closest_to_median_nan(t, path):
    x = data(t, 3 * t, seed=t)
    x[np.arange(t), 3 * np.arange(t)] = np.nan
    got = kernels.mean_closest_to_median(x, t - 2 * ((t - 1) // 4))
    np.testing.assert_array_equal(np.isnan(got), np.arange(3 * t) % 3 == 0)


# --- Krum distances --------------------------------------------------------------------------------------


def brute_force_distances(x):
    x = x.astype(np.float64)
    return np.array([[float(np.sum((a - b) ** 2)) for b in x] for a in x])


@pytest.mark.parametrize("n", CLIENTS)
def test_pairwise_distances_match_the_pairwise_loop(n):
    rng = np.random.default_rng(n)
    x = (50.0 + 0.01 * rng.standard_normal((n, 300))).astype(np.float32)  # full weights, small updates
    x[-1] += 3.0  # one far away
    expected = brute_force_distances(x)
    for limit in (None, 17 * n):
        dist = robust.pairwise_squared_distances(x) if limit is None else None
        if limit is not None:
            gram = kernels.centred_gram(x, limit=limit)
            norms = np.diag(gram)
            dist = norms[:, None] + norms[None, :] - 2 * gram
        np.fill_diagonal(dist, 0.0)
        np.testing.assert_allclose(dist, expected, rtol=1e-9, atol=1e-12 * expected.max())


@pytest.mark.parametrize("n,f", [(5, 1), (7, 2), (10, 2), (16, 3), (17, 5), (33, 10), (100, 20)])
def test_krum_scores_and_choice_match_brute_force(n, f):
    x = data(n, 64, seed=n + f)
    x[:f] += 25.0  # f attackers
    dist = brute_force_distances(x)
    k = robust.krum_neighbours(n, f)
    expected = np.array([np.sort(np.delete(dist[i], i))[:k].sum() for i in range(n)])
    scores = robust.krum_scores(robust.pairwise_squared_distances(x), f)
    np.testing.assert_allclose(scores, expected, rtol=1e-9)
    assert int(robust.krum_select(robust.pairwise_squared_distances(x), f)[0]) == int(np.argmin(expected))


# --- Bulyan as a whole -----------------------------------------------------------------------------------


def reference_bulyan(x, f):
    """Flower's aggregate_bulyan, written from the formula: iterated brute-force Krum, then
    the mean of the beta values closest to the median of the picked rows."""
    n = x.shape[0]
    theta, beta = n - 2 * f, n - 4 * f
    dist = brute_force_distances(x)
    remaining, picked = list(range(n)), []
    while len(picked) < theta:
        sub = dist[np.ix_(remaining, remaining)]
        k = robust.krum_neighbours(len(remaining), f)
        scores = [np.sort(np.delete(sub[i], i))[:k].sum() for i in range(len(remaining))]
        picked.append(remaining.pop(int(np.argmin(scores))))
    return numpy_closest(x[picked], beta), picked


@pytest.mark.parametrize("n,f", [(3, 0), (7, 1), (10, 1), (16, 3), (17, 2), (33, 5), (100, 24)])
def test_bulyan_matches_the_reference(n, f, path):
    x = data(n, 80, seed=n)
    x[:f] -= 40.0
    vector, selected = robust.bulyan(x, f)
    expected, picked = reference_bulyan(x, f)
    assert selected.tolist() == picked
    assert_sum_close(vector, expected, x, n)


def test_results_do_not_depend_on_the_chunking(monkeypatch):
    x = data(10, 3000, seed=1)
    whole = (kernels.median(x), kernels.middle_mean(x, 2), kernels.mean_closest_to_median(x, 6, range(8)))
    for chunk_bytes, min_chunk in itertools.product((1 << 12, 1 << 16), (1, 100)):
        monkeypatch.setattr(kernels, "CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(kernels, "MIN_CHUNK", min_chunk)
        np.testing.assert_array_equal(kernels.median(x), whole[0])
        np.testing.assert_allclose(kernels.middle_mean(x, 2), whole[1], rtol=0, atol=0)
        np.testing.assert_allclose(kernels.mean_closest_to_median(x, 6, range(8)), whole[2], rtol=0, atol=0)
