"""A silo's evaluation share: the rows it never trains on, kept for scoring models.

Which share a row belongs to depends only on the row's contents and the silo's salt (its id
and seed), never on the order or the number of rows read: the same transaction is in the
same share in every round and every evaluation, so a model is never scored on rows it
trained on. Identical rows land in the same share.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


def silo_salt(client_id: str, seed: int) -> str:
    """What draws a silo's evaluation share (with its rows' contents): its id and seed."""
    return f"{client_id}:{seed}"


def evaluation_mask(rows: "pd.DataFrame", fraction: float, salt: str) -> "np.ndarray":
    """True for the rows in the evaluation share (about `fraction` of them)."""
    import numpy as np
    import pandas as pd

    if fraction <= 0:
        return np.zeros(len(rows), dtype=bool)
    # pandas' row hash is stable across processes, but keys only text columns: the salt is
    # mixed in afterwards (splitmix64's finaliser), so each silo draws its own share.
    hashes = pd.util.hash_pandas_object(rows, index=False).to_numpy(dtype=np.uint64)
    mixed = _splitmix64(hashes ^ np.uint64(int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "big")))
    return mixed < np.uint64(min(fraction, 1.0) * float(2**64 - 1))


def _splitmix64(x: "np.ndarray") -> "np.ndarray":
    import numpy as np

    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def split_rows(rows: "pd.DataFrame", fraction: float, salt: str) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """(training share, evaluation share) of `rows`."""
    mask = evaluation_mask(rows, fraction, salt)
    return rows[~mask].reset_index(drop=True), rows[mask].reset_index(drop=True)
