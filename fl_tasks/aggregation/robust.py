"""Byzantine-robust aggregation rules as plain functions of an (n, d) matrix of client models.

Each row is one client's flattened floating tensors. The published rules (median, trimmed
mean, Krum, Multi-Krum, Bulyan) are UNWEIGHTED: example counts are ignored, since a malicious
client could inflate its own. The example-weighted variants at the end (weighted median,
weighted trimmed mean, weighted row mean, centered clipping) take one weight w_i >= 0 per row,
normalised to sum 1; they keep a big silo's data from being thrown away on unequal splits,
and lean on the caller to bound each weight (the coordinator caps shares first). Coordinate-wise
rules run over column blocks, so their temporaries stay O(n * block) instead of a second copy
of the matrix. Results are float64 vectors of length d.

The unweighted median, trimmed mean, Bulyan's coordinate step and the Krum distances run on
the fast kernels of `kernels.py` (compare-exchange networks on the rows' own dtype, a float64
Gram product), which give the numpy formulas' results: the median bit for bit, the means up
to float64 rounding (tests/fl_tasks/aggregation/test_kernels.py checks them against numpy).

References: Yin et al. 2018 (median, trimmed mean); Blanchard et al. 2017 (Krum, Multi-Krum);
El Mhamdi et al. 2018 (Bulyan); Karimireddy, He & Jaggi 2021, "Learning from History for
Byzantine Robust Optimization" (centered clipping).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fl_tasks.aggregation import kernels

# Matrix elements per column block (8 MiB of float64); the kernels' chunks are smaller still.
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
    """Median of each column (mean of the two middle values when n is even): np.median of
    the float64 columns, bit for bit."""
    return kernels.median(x, limit=BLOCK_ELEMENTS)


def trimmed_count(n: int, beta: float) -> int:
    """How many values trimmed_mean cuts from EACH end of a column: int(beta * n)."""
    return int(beta * n)


def trimmed_mean(x: np.ndarray, beta: float) -> np.ndarray:
    """Per column: drop the k = int(beta * n) smallest and k largest values, average the rest."""
    n = x.shape[0]
    k = trimmed_count(n, beta)
    if not 0 <= beta < 0.5 or n - 2 * k < 1:
        raise ValueError(f"trimmed mean with beta={beta} and n={n} keeps {n - 2 * k} values per coordinate")
    # The kept values are selected exactly (a selection network, or a sort for large n) and
    # added in float64; k = 0 adds the rows in order, as ndarray.mean(axis=0) does.
    return kernels.middle_mean(x, k, limit=BLOCK_ELEMENTS)


def row_mean(x: np.ndarray, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """Unweighted mean of the given rows."""
    return _by_columns(x, lambda block: block.mean(axis=0), rows)


def pairwise_squared_distances(x: np.ndarray) -> np.ndarray:
    """(n, n) matrix of ||x_i - x_j||^2 from one Gram matrix: ||a||^2 + ||b||^2 - 2 a.b.

    The rows are centred on their column mean first (distances do not change): client models
    are full weights that differ by small updates, and uncentred norms would cancel away the
    digits the distances live in. The Gram product is accumulated over column blocks in
    float64 (kernels.centred_gram: O(n * block) extra memory); the result is symmetrised,
    clipped at 0, with an exact zero diagonal, and copies of a row get its distances.
    """
    copies = RowCopies(x.shape[0])
    step = max(1, BLOCK_ELEMENTS // max(1, x.shape[0]))
    for start in range(0, x.shape[1], step):
        if not copies.add(x[:, start:start + step]):
            break
    return distances_from_gram(kernels.centred_gram(x, limit=BLOCK_ELEMENTS), copies.labels)


class RowCopies:
    """Which rows are exact copies of an earlier one, read a column block at a time: for each
    row, the index of the earliest row equal to it on every block so far (itself if none).

    Krum's and Bulyan's tie rule (the earlier update wins) needs copies of one update to get
    identical distances, and the Gram product does not give them that: BLAS rounds a row's
    products by where the row sits in the matrix, and which kernel takes which rows differs
    by CPU. Only rows that still have a copy are compared on the next block, so rows that
    differ from the start cost one block."""

    def __init__(self, n: int) -> None:
        self.labels = np.zeros(n, dtype=np.intp)  # one group until a block tells rows apart

    def add(self, block: np.ndarray) -> bool:
        """Split the groups by this block of columns (a row per row); False once every row
        is on its own (further blocks change nothing)."""
        counts = np.bincount(self.labels, minlength=len(self.labels))
        shared = np.flatnonzero(counts[self.labels] > 1)
        first: dict[tuple[int, bytes], int] = {}
        for i in shared:  # in row order, so a group's label is its earliest row
            values = np.asarray(block[i], dtype=np.float64) + 0.0  # -0.0 and 0.0 are one value
            self.labels[i] = first.setdefault((int(self.labels[i]), values.tobytes()), int(i))
        return bool(shared.size) and len(set(first.values())) < shared.size

    @staticmethod
    def combine(parts: Sequence[np.ndarray]) -> np.ndarray:
        """The copies over all columns from each column range's labels (one array per shard):
        rows are copies when they are on every range."""
        keys = list(zip(*(np.asarray(p).tolist() for p in parts)))
        first: dict[tuple[int, ...], int] = {}
        return np.array([first.setdefault(key, j) for j, key in enumerate(keys)], dtype=np.intp)


def distances_from_gram(gram: np.ndarray, copies: np.ndarray | None = None) -> np.ndarray:
    """(n, n) squared distances ||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij from a Gram matrix of
    the rows (of any translate of them: deltas from a base, centred rows), symmetrised,
    clipped at 0, with an exact zero diagonal. `copies` (RowCopies.labels): a row that copies
    an earlier one gets that row's distances, so that ties between copies are exact.
    Sharded aggregation sums the Gram over shards."""
    gram = np.asarray(gram, dtype=np.float64)
    sq_norms = np.diag(gram).copy()
    dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram
    dist = (dist + dist.T) / 2.0
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    for j in ([] if copies is None else np.flatnonzero(copies != np.arange(len(copies)))):
        i = int(copies[j])
        dist[j, :] = dist[i, :]
        dist[:, j] = dist[:, i]
        dist[j, j] = dist[i, j] = dist[j, i] = 0.0
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
    distances go to the earlier row (stable sort), so the result is deterministic. When more
    than half the values are kept (Bulyan) the kernel selects them as a window of the sorted
    column and recomputes by the stable sort only the columns where two different values tie
    at the cut."""
    return kernels.mean_closest_to_median(x, beta, rows, limit=BLOCK_ELEMENTS)


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


def bulyan_counts(n: int, f: int) -> tuple[int, int]:
    """Bulyan's theta = n - 2f (models picked by iterated Krum) and beta = theta - 2f (values
    kept per coordinate)."""
    return n - 2 * f, n - 4 * f


# --- example-weighted rules ------------------------------------------------------------------------

# Cumulative weights within this of a half (of weights normalised to sum 1) count as exactly
# a half: equal weights then give the two middle values' mean, as np.median does.
HALF_TOLERANCE = 1e-12


def normalised_weights(weights: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """The n weights as float64 summing to 1. Raises ValueError unless every weight is finite
    and >= 0 and their sum is > 0."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"{w.shape[0]} weights for {n} updates")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    total = float(w.sum())
    if not total > 0:
        raise ValueError(f"weights must not all be zero, got {w.tolist()}")
    return w / total


def _weighted_by_columns(x: np.ndarray, weights: Sequence[float] | np.ndarray,
                         rule: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """rule(block, w) per float64 column block, w normalised to sum 1. Rows of weight 0 are left
    out: they carry nothing, and the median's tie rule must not land on one of them."""
    w = normalised_weights(weights, x.shape[0])
    rows = None if np.all(w > 0) else np.flatnonzero(w > 0)
    if rows is not None:
        w = w[rows] / w[rows].sum()
    return _by_columns(x, lambda block: rule(block, w), rows)


def _sorted_with_weights(block: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column sorted, and the weights of its values in that order (both (n, b))."""
    order = np.argsort(block, axis=0, kind="stable")
    return np.take_along_axis(block, order, axis=0), w[order]


def weighted_median(x: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per column, the weighted median: with the values sorted, the smallest x_(j) whose
    cumulative weight reaches half the total; where that cumulative weight IS half (within
    HALF_TOLERANCE of the normalised total), the mean of x_(j) and x_(j+1). Equal weights give
    np.median exactly. Rows of weight 0 are left out."""
    def rule(block: np.ndarray, w: np.ndarray) -> np.ndarray:
        n = block.shape[0]
        values, sorted_w = _sorted_with_weights(block, w)
        cumulative = np.cumsum(sorted_w, axis=0)
        cols = np.arange(block.shape[1])
        j = np.argmax(cumulative >= 0.5 - HALF_TOLERANCE, axis=0)  # the first row that reaches half
        at_j = values[j, cols]
        tie = (np.abs(cumulative[j, cols] - 0.5) <= HALF_TOLERANCE) & (j < n - 1)
        after = values[np.minimum(j + 1, n - 1), cols]
        return np.where(tie, (at_j + after) / 2, at_j)

    return _weighted_by_columns(x, weights, rule)


def weighted_trimmed_mean(x: np.ndarray, weights: Sequence[float] | np.ndarray, beta: float) -> np.ndarray:
    """Per column: sort the values, remove weight beta (of a total 1) from each end, the
    boundary value removed fractionally, and return the weighted mean of the remaining weight
    1 - 2*beta. Value i (in sorted order) covers [C_{i-1}, C_i) of the cumulative weight and
    keeps the part of it inside [beta, 1 - beta]. Equal weights with integer beta*n give the
    unweighted trimmed_mean (up to float rounding); beta = 0 is the weighted mean."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"weighted trimmed mean needs 0 <= beta < 0.5, got {beta}")

    def rule(block: np.ndarray, w: np.ndarray) -> np.ndarray:
        values, sorted_w = _sorted_with_weights(block, w)
        upper = np.cumsum(sorted_w, axis=0)
        lower = np.empty_like(upper)
        lower[0] = 0.0
        lower[1:] = upper[:-1]
        kept = np.minimum(upper, 1.0 - beta)
        kept -= np.maximum(lower, beta)
        np.maximum(kept, 0.0, out=kept)
        # Divided by the kept weight as summed (1 - 2*beta up to rounding): a convex combination.
        return (kept * values).sum(axis=0) / kept.sum(axis=0)

    return _weighted_by_columns(x, weights, rule)


def weighted_row_mean(x: np.ndarray, rows: Sequence[int] | np.ndarray,
                      weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """sum_i w_i x_i / sum_i w_i over the given rows, `weights` being those rows' weights."""
    rows = np.asarray(rows, dtype=np.intp)
    w = normalised_weights(weights, len(rows))
    return _by_columns(x, lambda block: w @ block, rows)


def row_distances(x: np.ndarray, center: np.ndarray) -> np.ndarray:
    """||x_i - center|| for every row, accumulated over float64 column blocks."""
    n, d = x.shape
    total = np.zeros(n, dtype=np.float64)
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, d, step):
        block = x[:, start:start + step].astype(np.float64)
        block -= center[start:start + step]
        total += np.einsum("ij,ij->i", block, block)
    return np.sqrt(total)


@dataclass(frozen=True)
class CenteredClip:
    """What centered_clipping did: the result, and how each row entered it."""

    vector: np.ndarray  # v_L, float64 (d,)
    influence: np.ndarray  # e_i with v_L = (1 - sum e) v_0 + sum_i e_i x_i: each row's share
    history_share: float  # 1 - sum e: the starting center's share of v_L
    clipped: np.ndarray  # (L, n) bool: row i was clipped (||x_i - v_l|| > tau) in iteration l


def centered_clipping(x: np.ndarray, weights: Sequence[float] | np.ndarray, center: np.ndarray,
                      tau: float, iterations: int) -> CenteredClip:
    """Centered clipping (Karimireddy, He & Jaggi 2021) from v_0 = center, L = iterations:

        v_{l+1} = v_l + sum_i w_i (x_i - v_l) min(1, tau / ||x_i - v_l||),   w normalised to sum 1.

    A row at the center (distance 0) enters unclipped; tau = 0 keeps v_0. The rule commutes
    with translation (x_i + b and v_0 + b give v_L + b), so the rows may be client models and
    the center base + previous delta, without an (n, d) matrix of deltas. Each iteration is
    two passes over x in float64 column blocks (distances, then the step)."""
    n, d = x.shape
    w = normalised_weights(weights, n)
    if not (np.isfinite(tau) and tau >= 0):
        raise ValueError(f"centered clipping needs a finite radius tau >= 0, got {tau}")
    if iterations < 1:
        raise ValueError(f"centered clipping needs iterations >= 1, got {iterations}")
    v = np.array(center, dtype=np.float64).reshape(-1)
    if v.shape[0] != d:
        raise ValueError(f"center has {v.shape[0]} elements, the rows {d}")
    influence = np.zeros(n, dtype=np.float64)
    history = 1.0
    clipped = np.zeros((iterations, n), dtype=bool)
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    for it in range(iterations):
        dist = row_distances(x, v)
        c, clipped[it] = clip_coefficients(dist, w, tau)
        influence = (1.0 - c.sum()) * influence + c
        history *= 1.0 - c.sum()
        for start in range(0, d, step):
            block = x[:, start:start + step].astype(np.float64)
            block -= v[start:start + step]
            v[start:start + step] += c @ block
    return CenteredClip(v, influence, history, clipped)


def clip_coefficients(dist: np.ndarray, w: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """One centered-clipping step's coefficients c_i = w_i min(1, tau / dist_i), with
    v_{l+1} = (1 - sum c) v_l + sum_i c_i x_i, and which rows were clipped (dist_i > tau)."""
    clipped = dist > tau
    scale = np.ones(dist.shape[0], dtype=np.float64)
    np.divide(tau, dist, out=scale, where=clipped)
    return w * scale, clipped


def gram_distances(gram: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """||z_i - v|| for the rows z_1..z_n of a set {z_0 .. z_n} with Gram matrix `gram` and
    v = sum_k coefficients_k z_k: ||z_i||^2 - 2 (G a)_i + a.G.a, clipped at 0."""
    a = np.asarray(coefficients, dtype=np.float64)
    ga = gram @ a
    squared = np.diag(gram)[1:] - 2.0 * ga[1:] + float(a @ ga)
    return np.sqrt(np.maximum(squared, 0.0))


def centered_clipping_gram(gram: np.ndarray, weights: Sequence[float] | np.ndarray, tau: float,
                           iterations: int) -> CenteredClip:
    """`centered_clipping` from the Gram matrix of {v_0, x_1 .. x_n} alone (deltas: the center
    and the updates minus any common point): v_l stays the affine combination
    a_0 v_0 + sum_i a_i x_i, so every distance follows from the Gram matrix. `vector` is the
    final coefficient vector a (length n + 1, a_0 the center's share); applying it to the
    rows, shard by shard, gives v_L."""
    gram = np.asarray(gram, dtype=np.float64)
    n = gram.shape[0] - 1
    w = normalised_weights(weights, n)
    if not (np.isfinite(tau) and tau >= 0):
        raise ValueError(f"centered clipping needs a finite radius tau >= 0, got {tau}")
    if iterations < 1:
        raise ValueError(f"centered clipping needs iterations >= 1, got {iterations}")
    a = np.zeros(n + 1, dtype=np.float64)
    a[0] = 1.0
    clipped = np.zeros((iterations, n), dtype=bool)
    for it in range(iterations):
        c, clipped[it] = clip_coefficients(gram_distances(gram, a), w, tau)
        a *= 1.0 - c.sum()
        a[1:] += c
    return CenteredClip(a, a[1:].copy(), float(a[0]), clipped)


def centered_clip(x: np.ndarray, weights: Sequence[float] | np.ndarray, center: np.ndarray,
                  tau: float, iterations: int) -> np.ndarray:
    """The vector v_L of `centered_clipping` (rows: deltas with the center a previous delta,
    or models with the center base + previous delta)."""
    return centered_clipping(x, weights, center, tau, iterations).vector
