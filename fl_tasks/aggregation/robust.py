"""Byzantine-robust aggregation rules as plain functions of an (n, d) matrix of client models.

Each row is one client's flattened floating tensors. Every rule here is UNWEIGHTED: example
counts are ignored, since a malicious client could inflate its own. Coordinate-wise rules run
over column blocks, cast to float64, so their temporaries stay O(n * block) instead of a
second copy of the matrix. Results are float64 vectors of length d.

References: Yin et al. 2018 (median, trimmed mean); Blanchard et al. 2017 (Krum, Multi-Krum);
El Mhamdi et al. 2018 (Bulyan).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# Matrix elements per column block (8 MiB of float64).
BLOCK_ELEMENTS = 1 << 20


def _by_columns(x: np.ndarray, rule: Callable[[np.ndarray], np.ndarray],
                rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """rule(block) for each float64 column block of x (optionally of the given rows only)."""
    if rows is not None:
        rows = np.asarray(rows, dtype=np.intp)
    n = x.shape[0] if rows is None else len(rows)
    d = x.shape[1]
    out = np.empty(d, dtype=np.float64)
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, d, step):
        block = x[:, start:start + step] if rows is None else x[rows, start:start + step]
        out[start:start + step] = rule(block.astype(np.float64))
    return out


def coordinate_median(x: np.ndarray) -> np.ndarray:
    """Median of each column (mean of the two middle values when n is even)."""
    return _by_columns(x, lambda block: np.median(block, axis=0))


def trimmed_count(n: int, beta: float) -> int:
    """How many values trimmed_mean cuts from EACH end of a column: int(beta * n)."""
    return int(beta * n)


def trimmed_mean(x: np.ndarray, beta: float) -> np.ndarray:
    """Per column: drop the k = int(beta * n) smallest and k largest values, average the rest."""
    n = x.shape[0]
    k = trimmed_count(n, beta)
    if not 0 <= beta < 0.5 or n - 2 * k < 1:
        raise ValueError(f"trimmed mean with beta={beta} and n={n} keeps {n - 2 * k} values per coordinate")
    if k == 0:
        return _by_columns(x, lambda block: block.mean(axis=0))

    def rule(block: np.ndarray) -> np.ndarray:
        # After partitioning around positions k and n-k-1, rows k..n-k-1 hold exactly the
        # kept values (in some order): no full sort needed.
        block.partition((k, n - k - 1), axis=0)
        return block[k:n - k].mean(axis=0)

    return _by_columns(x, rule)


def row_mean(x: np.ndarray, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """Unweighted mean of the given rows."""
    return _by_columns(x, lambda block: block.mean(axis=0), rows)


def pairwise_squared_distances(x: np.ndarray) -> np.ndarray:
    """(n, n) matrix of ||x_i - x_j||^2 from one Gram matrix: ||a||^2 + ||b||^2 - 2 a.b.

    The rows are centred on their column mean first (distances do not change): client models
    are full weights that differ by small updates, and uncentred norms would cancel away the
    digits the distances live in. The Gram product is accumulated over column blocks in
    float64; the result is symmetrised, clipped at 0, with an exact zero diagonal.
    """
    n, d = x.shape
    gram = np.zeros((n, n), dtype=np.float64)
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, d, step):
        block = x[:, start:start + step].astype(np.float64)
        block -= block.mean(axis=0)
        gram += block @ block.T
    sq_norms = np.diag(gram).copy()
    dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram
    dist = (dist + dist.T) / 2.0
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_neighbours(n: int, f: int) -> int:
    """Neighbours per Krum score: n - f - 2, kept within [1, n - 1] (as Flower does) so that
    the iterated Krum of Bulyan still ranks its last few candidates."""
    return min(max(1, n - f - 2), n - 1)


def krum_scores(sq_dists: np.ndarray, f: int) -> np.ndarray:
    """score_i = sum of the squared distances from i to its n - f - 2 nearest OTHER models."""
    n = sq_dists.shape[0]
    k = krum_neighbours(n, f)
    if k <= 0:
        return np.zeros(n)
    others = sq_dists.astype(np.float64, copy=True)
    np.fill_diagonal(others, np.inf)
    nearest = np.partition(others, k - 1, axis=1)[:, :k]
    return nearest.sum(axis=1)


def krum_select(sq_dists: np.ndarray, f: int, m: int = 1) -> np.ndarray:
    """Indices of the m lowest Krum scores, best first; equal scores go to the lower index."""
    scores = krum_scores(sq_dists, f)
    return np.argsort(scores, kind="stable")[:m]


def bulyan_select(sq_dists: np.ndarray, f: int, theta: int) -> np.ndarray:
    """Iterated Krum: pick the Krum winner, remove it, recompute the scores on the remaining
    models, until theta are picked. Returns the indices in the order picked."""
    remaining = list(range(sq_dists.shape[0]))
    picked: list[int] = []
    while len(picked) < theta:
        sub = sq_dists[np.ix_(remaining, remaining)]
        best = int(krum_select(sub, f, 1)[0])
        picked.append(remaining.pop(best))
    return np.asarray(picked, dtype=np.intp)


def mean_closest_to_median(x: np.ndarray, beta: int, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Per column: the mean of the beta values closest to the column's median. Equal
    distances go to the earlier row (stable sort), so the result is deterministic."""
    def rule(block: np.ndarray) -> np.ndarray:
        median = np.median(block, axis=0)
        order = np.argsort(np.abs(block - median), axis=0, kind="stable")[:beta]
        return np.take_along_axis(block, order, axis=0).mean(axis=0)

    return _by_columns(x, rule, rows)


def bulyan(x: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Bulyan: theta = n - 2f models by iterated Krum, then per coordinate the mean of the
    beta = theta - 2f values closest to the median of the selected ones. Returns the vector
    and the selected rows (in the order picked)."""
    n = x.shape[0]
    theta = n - 2 * f
    beta = theta - 2 * f
    if beta < 1:
        raise ValueError(f"bulyan with f={f} needs at least {4 * f + 1} models, got {n}")
    selected = bulyan_select(pairwise_squared_distances(x), f, theta)
    return mean_closest_to_median(x, beta, selected), selected
