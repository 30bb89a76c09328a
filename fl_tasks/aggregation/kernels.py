"""Fast exact kernels behind the coordinate-wise robust rules (robust.py).

Selection by compare-exchange networks. For a small number of rows n, the order statistics
of every column come from a fixed network of comparators (a, b) -> (min, max), each run as
np.minimum / np.maximum over a chunk of columns at once: one vectorised pass per comparator
output, on buffers that stay in the CPU cache. min and max are exact, so the selected values
are the column's own values bit for bit, whatever the dtype (the float32 models are never
widened); only the final combination (the mean of the kept values) is done in float64. The
network is Batcher's odd-even merge sort (or, when it is cheaper, k bubble passes from each
end) pruned to what the rule needs:

- comparators at the end of the network that only reorder values inside one output class
  (the k lowest, the kept middle, the k highest) are dropped: the rule needs the middle as a
  multiset, not sorted;
- liveness: a comparator whose outputs no needed value depends on is dropped, one whose min
  (or max) alone is needed costs one ufunc call instead of two.

Registers are renamed at compile time (the input rows are read in place, never copied, and
a buffer is reused once its value is dead), so a chunk costs one ufunc call per live
comparator output and nothing else. For large n a network grows as n log^2 n comparators
and loses to numpy's vectorised sort of short contiguous rows (x86-simd-sort), so there each
chunk is transposed to (columns, n) and sorted along its rows instead: SORT_ROWS picks.

Inputs are finite (the coordinator's screening rejects NaN and Inf); a NaN still gives NaN
for its column in every coordinate kernel here (np.minimum / np.maximum propagate it along
every path of the network, and the sort path checks the largest value). The results equal
the numpy formulas: the median bit for bit (np.median's mean of the two middle values, in
float64), sums of the kept values up to float64 rounding (they are added in another order).

Kernels: middle_mean (trimmed mean; the median is its k = (n - 1) // 2), median,
mean_closest_to_median (Bulyan's coordinate step), and centred_gram (Krum's distances: one
float64 GEMM of the centred rows per cache-sized column block, on torch's threads); the
coordinate kernels run on one thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Rows above which a chunk is sorted (np.sort on contiguous rows) instead of run through a
# network: on a 2-core AVX-512 Xeon the networks win up to about 45 rows.
SORT_ROWS = 44
# Bytes of working set per chunk (input rows + scratch registers): about a core's L2 (1-2 MiB);
# larger chunks also spread the Python cost of each ufunc call over more columns.
CHUNK_BYTES = 1 << 21
MIN_CHUNK, MAX_CHUNK = 1024, 1 << 16

Comparator = tuple[int, int]


# --- networks ---------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def sorting_network(n: int) -> tuple[Comparator, ...]:
    """Batcher's odd-even merge sort for n inputs: comparators (a, b), a < b, in order; each
    puts min at a and max at b. Built for the next power of two; comparators touching the
    padding (which would hold +inf and never move) are left out."""
    size = 1
    while size < n:
        size *= 2
    comparators = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        comparators.append((a, b))
            k //= 2
        p *= 2
    return tuple(comparators)


def bubble_selection(n: int, k: int) -> tuple[Comparator, ...]:
    """k passes moving the maximum up, then k moving the minimum down: afterwards positions
    0..k-1 hold the k smallest, n-k..n-1 the k largest, and k..n-k-1 the rest."""
    comparators = [(i, i + 1) for t in range(k) for i in range(n - 1 - t)]
    comparators += [(i - 1, i) for t in range(k) for i in range(n - k - 1, t, -1)]
    return tuple(comparators)


Step = tuple[int, int, bool, bool]  # (a, b, min needed at a, max needed at b)


def pruned(comparators: Sequence[Comparator], classes: Sequence[int], needed: set[int]) -> list[Step]:
    """Drop the tail comparators that only reorder positions within one output class
    (classes[p]: the class of position p; -1 for a position whose exact value is needed),
    then every comparator no needed position depends on; keep, for each other, which of its
    two outputs is used."""
    cls = list(classes)
    kept: list[Comparator] = []
    for a, b in reversed(comparators):
        if cls[a] >= 0 and cls[a] == cls[b]:
            continue  # a swap inside one class: the class's multiset does not change
        kept.append((a, b))
        cls[a] = cls[b] = -1  # earlier comparators no longer commute with this one
    live = set(needed)
    steps: list[Step] = []
    for a, b in kept:  # kept is in reverse order
        use_min, use_max = a in live, b in live
        if use_min or use_max:
            steps.append((a, b, use_min, use_max))
            live.update((a, b))
    steps.reverse()
    return steps


def cost(steps: Sequence[Step]) -> int:
    """ufunc calls per chunk."""
    return sum(int(use_min) + int(use_max) for _, _, use_min, use_max in steps)


@dataclass(frozen=True)
class Program:
    """A pruned network with its registers allocated: registers 0..n-1 are the input rows
    (read, never written), n..n+buffers-1 scratch buffers. ops: (is_max, a, b, out)."""

    n: int
    buffers: int
    ops: tuple[tuple[bool, int, int, int], ...]
    outputs: tuple[int, ...]  # the register holding each requested position

    @staticmethod
    def compile(n: int, steps: Sequence[Step], outputs: Sequence[int]) -> Program:
        where = list(range(n))  # position -> register holding its current value
        free: list[int] = []
        count = 0
        ops: list[tuple[bool, int, int, int]] = []

        def scratch(*candidates: int) -> int:
            nonlocal count
            for register in candidates:
                if register >= n:  # an input's buffer whose value dies here
                    return register
            if free:
                return free.pop()
            count += 1
            return n + count - 1

        for a, b, use_min, use_max in steps:
            ra, rb = where[a], where[b]
            if use_min and use_max:
                rmax = scratch()  # written first, so it must not be ra or rb
                ops.append((True, ra, rb, rmax))
                rmin = scratch(ra, rb)
                ops.append((False, ra, rb, rmin))
                where[a], where[b] = rmin, rmax
                for register in (ra, rb):
                    if register >= n and register != rmin:
                        free.append(register)
            else:
                out = scratch(ra, rb)
                ops.append((use_max, ra, rb, out))
                for register in (ra, rb):
                    if register >= n and register != out:
                        free.append(register)
                where[a], where[b] = (-1, out) if use_max else (out, -1)
        return Program(n, count, tuple(ops), tuple(where[p] for p in outputs))


@lru_cache(maxsize=None)
def middle_program(n: int, k: int) -> Program:
    """Registers holding, as a multiset, the values left in each column once its k smallest
    and k largest are cut (0 <= 2k < n): the cheaper of the pruned Batcher network and k
    bubble passes from each end."""
    classes = [0] * k + [1] * (n - 2 * k) + [2] * k
    middle = set(range(k, n - k))
    candidates = [pruned(sorting_network(n), classes, middle)]
    if k > 0:
        candidates.append(pruned(bubble_selection(n, k), classes, middle))
    steps = min(candidates, key=cost)
    return Program.compile(n, steps, range(k, n - k))


@lru_cache(maxsize=None)
def sorted_program(n: int, exact: tuple[int, ...], classes: tuple[int, ...]) -> Program:
    """Registers holding positions 0..n-1 of each sorted column, where positions in `exact`
    get their exact value and the others only need their class's multiset right."""
    cls = [-1 if p in exact else classes[p] for p in range(n)]
    steps = pruned(sorting_network(n), cls, set(range(n)))
    return Program.compile(n, steps, range(n))


# --- running over column chunks ------------------------------------------------------------------------


def chunk_columns(registers: int, itemsize: int, rows: int, limit: int | None) -> int:
    """Columns per chunk: the registers of one chunk fill about CHUNK_BYTES, and the chunk
    holds at most `limit` elements of the rows (the callers' bound on temporaries)."""
    columns = CHUNK_BYTES // max(1, registers * itemsize)
    columns = min(MAX_CHUNK, max(MIN_CHUNK, columns - columns % 256))
    if limit is not None:
        columns = min(columns, limit // max(rows, 1))
    return int(max(1, columns))


def work_dtype(x: np.ndarray) -> np.dtype:
    """float32 and float64 rows are selected as they are; anything else as float64."""
    return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)


def chunk_rows(x: np.ndarray, rows: np.ndarray | None, start: int, stop: int) -> list[np.ndarray]:
    """The rows' columns start..stop-1: views of x when its dtype is float32 / float64 (no
    copy), else a float64 copy."""
    if x.dtype not in (np.float32, np.float64):
        block = x[:, start:stop] if rows is None else x[rows, start:stop]
        return list(np.asarray(block, dtype=np.float64))
    if rows is None:
        return list(x[:, start:stop])
    return [x[r, start:stop] for r in rows]


class Runner:
    """Runs one Program chunk by chunk with preallocated scratch buffers."""

    def __init__(self, program: Program, dtype: np.dtype, step: int) -> None:
        self.ops = [(np.maximum if is_max else np.minimum, a, b, out) for is_max, a, b, out in program.ops]
        self.outputs = program.outputs
        self.scratch = list(np.empty((program.buffers, step), dtype=dtype))

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """The output registers for these input rows (views into the scratch buffers or the
        inputs: valid until the next call)."""
        columns = inputs[0].shape[0]
        registers = inputs + [buffer[:columns] for buffer in self.scratch]
        for ufunc, a, b, out in self.ops:
            ufunc(registers[a], registers[b], out=registers[out])
        return [registers[r] for r in self.outputs]


def sum_into(out: np.ndarray, values: Sequence[np.ndarray]) -> None:
    """out = values[0] + values[1] + ... in float64, left to right."""
    if len(values) == 1:
        out[...] = values[0]
        return
    np.add(values[0], values[1], out=out, dtype=np.float64)
    for value in values[2:]:
        np.add(out, value, out=out, dtype=np.float64)


def sorted_chunk(inputs: list[np.ndarray], buffer: np.ndarray) -> np.ndarray:
    """The chunk's columns as rows of `buffer` (columns, n), each sorted ascending."""
    columns = inputs[0].shape[0]
    view = buffer[:columns]
    for i, row in enumerate(inputs):
        view[:, i] = row
    view.sort(axis=1)
    return view


# --- the kernels ---------------------------------------------------------------------------------------


def _rows(x: np.ndarray, rows: Sequence[int] | np.ndarray | None) -> tuple[np.ndarray | None, int]:
    if rows is None:
        return None, x.shape[0]
    rows = np.asarray(rows, dtype=np.intp)
    return rows, len(rows)


def middle_mean(x: np.ndarray, k: int, rows: Sequence[int] | np.ndarray | None = None,
                limit: int | None = None) -> np.ndarray:
    """Per column (of the given rows): the mean, in float64, of the values left once the k
    smallest and the k largest are cut (0 <= 2k < n). k = (n - 1) // 2 is the median (the
    mean of the two middle values for even n, exactly as np.median computes it). A chunk
    holds at most `limit` elements of the rows."""
    rows, n = _rows(x, rows)
    if not 0 <= 2 * k < n:
        raise ValueError(f"cannot cut {k} values from each end of {n}")
    d = x.shape[1]
    out = np.empty(d, dtype=np.float64)
    kept = n - 2 * k
    dtype = work_dtype(x)
    if k == 0:  # the plain mean: rows added in order, as ndarray.mean(axis=0) does
        step = chunk_columns(n + 2, dtype.itemsize, n, limit)
        for start in range(0, d, step):
            chunk = out[start:start + step]
            sum_into(chunk, chunk_rows(x, rows, start, start + step))
            chunk /= n
    elif n > SORT_ROWS:
        step = chunk_columns(n, dtype.itemsize, n, limit)
        buffer = np.empty((step, n), dtype=dtype)
        for start in range(0, d, step):
            ordered = sorted_chunk(chunk_rows(x, rows, start, start + step), buffer)
            chunk = out[start:start + step]
            if kept <= 2:
                sum_into(chunk, [ordered[:, j] for j in range(k, n - k)])
            else:
                np.sum(ordered[:, k:n - k], axis=1, dtype=np.float64, out=chunk)
            chunk /= kept
            chunk[np.isnan(ordered[:, n - 1])] = np.nan  # np.sort puts NaN last
    else:
        program = middle_program(n, k)
        step = chunk_columns(n + program.buffers, dtype.itemsize, n, limit)
        run = Runner(program, dtype, step)
        for start in range(0, d, step):
            chunk = out[start:start + step]
            sum_into(chunk, run(chunk_rows(x, rows, start, start + step)))
            if kept > 1:
                chunk /= kept
    return out


def median(x: np.ndarray, rows: Sequence[int] | np.ndarray | None = None, limit: int | None = None) -> np.ndarray:
    """np.median(x[rows], axis=0) in float64, bit for bit."""
    n = x.shape[0] if rows is None else len(rows)
    return middle_mean(x, (n - 1) // 2, rows, limit)


def _closest_by_sorting(block: np.ndarray, beta: int) -> np.ndarray:
    """The reference rule on a float64 (t, b) block: per column the mean of the beta values
    closest to the median, equal distances to the earlier row (stable sort); NaN where the
    column holds a NaN."""
    med = np.median(block, axis=0)
    order = np.argsort(np.abs(block - med), axis=0, kind="stable")[:beta]
    result = np.take_along_axis(block, order, axis=0).mean(axis=0)
    result[np.isnan(med)] = np.nan
    return result


def mean_closest_to_median(x: np.ndarray, beta: int, rows: Sequence[int] | np.ndarray | None = None,
                           limit: int | None = None) -> np.ndarray:
    """Per column of the given rows (t of them, in that order): the mean of the beta values
    closest to the column's median, equal distances going to the earlier row.

    With more than half the values kept (beta > t / 2, as in Bulyan: beta = t - 2f, t >= 4f + 1),
    the kept values are a window of the sorted column: the e = t - beta dropped ones are the
    j* lowest and e - j* highest, where j* counts the j < e whose s_j lies farther from the
    median than s_{j+beta} (a monotone test, s_j below and s_{j+beta} above the median). The
    sorted values come from a network (or a sort), the window test and the sum run in float64
    over whole chunks. Where a kept and a dropped value on opposite sides of the median lie
    at the same float64 distance (then a pair s_j, s_{j+beta} does: the distances fall with j
    on the left and grow on the right), the earlier-row rule decides: those (rare) columns
    are recomputed by the stable-sort rule itself. On one side of the median the exact sorted
    order decides: of two values whose float64 distances only round equal (values over 2^28
    times smaller than the median), the window keeps the truly nearer one where the float64
    formula falls back to the row order; the means then differ by less than the rounding at
    the median's magnitude. Equal values at the cut need no such care."""
    rows, t = _rows(x, rows)
    if not 1 <= beta <= t:
        raise ValueError(f"cannot keep {beta} of {t} values")
    if beta == t:
        return middle_mean(x, 0, rows, limit)
    d = x.shape[1]
    dtype = work_dtype(x)
    e = t - beta
    out = np.empty(d, dtype=np.float64)
    if 2 * beta <= t:  # outside the window regime: the rule itself, over float64 blocks
        step = chunk_columns(4 * t, 8, t, limit)
        for start in range(0, d, step):
            block = np.array(chunk_rows(x, rows, start, start + step), dtype=np.float64)
            out[start:start + step] = _closest_by_sorting(block, beta)
        return out
    lo, hi = (t - 1) // 2, t // 2
    if t > SORT_ROWS:
        program = None
        step = chunk_columns(3 * t, dtype.itemsize, t, limit)
        buffer = np.empty((step, t), dtype=dtype)
    else:
        # Positions e..beta-1 are kept whatever the window: only their sum matters (one class),
        # except the two middle ones (the median).
        classes = tuple(1 if e <= p < beta else -1 for p in range(t))
        program = sorted_program(t, (lo, hi), classes)
        step = chunk_columns(3 * t + program.buffers, dtype.itemsize, t, limit)
        run = Runner(program, dtype, step)
    values = np.empty((t, step))  # the sorted column values, float64
    med = np.empty(step)
    near = np.empty((e, step))  # per pair (s_j, s_{j+beta}): s_j's distance to the median ...
    far = np.empty((e, step))  # ... and s_{j+beta}'s
    farther = np.empty((e, step), dtype=bool)
    mask = np.empty((e, step), dtype=np.int64)
    kept = np.empty((e, step))
    tie = np.empty((e, step), dtype=bool)
    for start in range(0, d, step):
        inputs = chunk_rows(x, rows, start, start + step)
        c = inputs[0].shape[0]
        s = values[:, :c]
        if program is None:
            np.copyto(s, sorted_chunk(inputs, buffer).T)
        else:
            for j, register in enumerate(run(inputs)):
                np.copyto(s[j], register)
        chunk, m = out[start:start + c], med[:c]
        np.add(s[lo], s[hi], out=m)
        m *= 0.5  # np.median: (a + b) / 2
        # row by row: a reduce along the first axis of a strided block is several times slower
        sum_into(chunk, s[e:beta])
        left, right = s[:e], s[beta:]
        dl, dr, g, k = near[:, :c], far[:, :c], farther[:, :c], kept[:, :c]
        np.subtract(m, left, out=dl)  # |s_j - med|: s_j <= med
        np.subtract(right, m, out=dr)  # |s_{j+beta} - med|: s_{j+beta} >= med
        np.greater(dl, dr, out=g)  # s_j farther: dropped, s_{j+beta} kept
        # k = g ? right : left, selected bitwise (exact; a masked copy mispredicts its branches)
        bits = mask[:, :c]
        np.subtract(0, g, out=bits, dtype=np.int64)
        kb = k.view(np.int64)
        np.bitwise_xor(left.view(np.int64), right.view(np.int64), out=kb)
        np.bitwise_and(kb, bits, out=kb)
        np.bitwise_xor(kb, left.view(np.int64), out=kb)
        for row in k:
            chunk += row
        chunk /= beta
        # dl falls and dr grows with j, so a kept and a dropped value at the same distance on
        # opposite sides of the median are always a pair at equal distances; a pair at
        # distance 0 holds the median's own value twice and is not ambiguous.
        ties = tie[:, :c]
        np.equal(dl, dr, out=ties)
        np.greater(dl, 0.0, out=g)
        ties &= g
        for row in ties[1:]:
            ties[0] |= row
        tied = np.flatnonzero(ties[0])
        if tied.size:
            columns = start + tied
            block = (x[:, columns] if rows is None else x[np.ix_(rows, columns)]).astype(np.float64)
            chunk[tied] = _closest_by_sorting(block, beta)
        nan = np.isnan(m)  # a NaN reaches the median registers through the network
        if program is None:
            nan |= np.isnan(s[t - 1])
        if nan.any():
            chunk[nan] = np.nan
    return out


# --- Gram matrix for Krum -----------------------------------------------------------------------------

GRAM_BLOCK_BYTES = 1 << 20  # float64 centred block per Gram step: stays in L2
GRAM_MIN_COLUMNS = 256

_torch = None


def _get_torch():
    global _torch
    if _torch is None:
        import torch

        _torch = torch
    return _torch


def centred_gram(x: np.ndarray, limit: int | None = None) -> np.ndarray:
    """G = Y Y^T in float64, Y = x minus its column means (so distances lose no digits to a
    common offset), accumulated over column blocks that stay in the CPU cache: per block one
    cast into a float64 buffer, its column means (rows added in order, as ndarray.mean does),
    the subtraction in place, and one float64 GEMM (torch's, on torch's threads). Extra
    memory: one float64 block (at most `limit` elements) and n x n."""
    torch = _get_torch()
    n, d = x.shape
    step = max(GRAM_MIN_COLUMNS, GRAM_BLOCK_BYTES // (8 * max(n, 1)))
    if limit is not None:
        step = max(1, min(step, limit // max(n, 1)))
    step = min(step, max(d, 1))
    buffer = np.empty((n, step), dtype=np.float64)
    means = np.empty(step, dtype=np.float64)
    gram = torch.zeros((n, n), dtype=torch.float64)
    for start in range(0, d, step):
        block = x[:, start:start + step]
        c = block.shape[1]
        y, m = buffer[:, :c], means[:c]
        np.copyto(y, block)
        np.add.reduce(y, axis=0, out=m)
        m /= n
        y -= m
        t = torch.from_numpy(y)
        gram.addmm_(t, t.T)
    return gram.numpy()
