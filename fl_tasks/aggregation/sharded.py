"""Sharded aggregation: the same result as `build(name, clip_norm, **params).aggregate(base,
updates)`, computed one slice of the model at a time, so that each worker holds only its share
of every update.

The plan (`ShardPlan.build(base, shards)`) lays the base's floating tensors end to end in the
order of `flat.Layout` (sorted names) and cuts that vector into `shards` contiguous element
ranges of near-equal size; each shard is a list of pieces (tensor, start, stop) of the
flattened tensors. Integer and bool tensors (batch-norm counters) go whole to shard 0. A
shard's slice of a state dict names each piece by its tensor, as a 1-D array, so the
strategy classes run on slices unchanged.

    plan = ShardPlan.build(base, 3)
    stats = combine_statistics(plan, [shard_statistics(rule, k, plan.slice(k, base), ...) for k ...])
    parts = [aggregate_shard(rule, k, plan.slice(k, base), slices_with_weights, stats, state_k) for k ...]
    assembled = assemble(plan, parts)          # .model, .state, .outcome

Stage 1 (`shard_statistics`) runs only when the rule needs global quantities
(`Rule.needs_statistics`): each shard's float64 Gram matrix of the updates' deltas from the
base (and of the saved center, first, for centered_clipping); summed over the shards it gives
every norm (clip_norm's scale min(1, C / norm)) and every squared distance
(||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij) that Krum, Multi-Krum and Bulyan select from, and
centered clipping's iterations (v_l stays an affine combination of v_0 and the x_i, so each
distance ||x_i - v_l|| follows from the Gram matrix and the coefficients). Stage 2
(`aggregate_shard`) applies the rule to the shard's slice: coordinate-wise and elementwise
rules (fedavg, the server optimisers, the medians and trimmed means) run the strategy classes
on the slice and agree with the unsharded result exactly; the distance rules select from the
summed Gram matrix, which can round differently from the unsharded Gram product (float32
precision agreement, same selection). With clip_norm the norms come from the Gram diagonal,
so a clipped update may differ from the unsharded one in its last float32 bit.

Private rounds (DP-FedAvg) are not sharded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fl_tasks.aggregation import Outcome, build, robust
from fl_tasks.aggregation.checks import check_update
from fl_tasks.aggregation.flat import Layout, StateDict
from fl_tasks.aggregation.flat import assemble as assemble_stacked

DISTANCE_RULES = frozenset({"krum", "multi_krum", "weighted_multi_krum", "bulyan"})
CENTERED = "centered_clipping"
SERVER_OPTIMIZERS = frozenset({"fedavgm", "fedadam", "fedyogi", "fedadagrad"})
# Float64 Gram accumulation works on column blocks of this many elements per row.
BLOCK_ELEMENTS = 1 << 18


# --- the plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the base model: shape and numpy dtype name ('float32', 'int64', ...)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def floating(self) -> bool:
        return np.issubdtype(np.dtype(self.dtype), np.floating)


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of one tensor, flattened in C order."""

    tensor: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Shard:
    index: int
    pieces: tuple[Piece, ...]  # floating pieces, in layout order (one per tensor at most)
    whole: tuple[str, ...] = ()  # integer / bool tensors carried whole (shard 0 only)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces)


def _bad_plan(problem: str) -> ValueError:
    return ValueError(f"bad shard plan: {problem}")


@dataclass(frozen=True)
class ShardPlan:
    """Which elements of which tensors each shard aggregates; JSON-serialisable (`to_dict`)."""

    tensors: dict[str, TensorInfo]  # every tensor of the base model, in the base's key order
    shards: tuple[Shard, ...]

    @classmethod
    def build(cls, base: Mapping[str, Any], shards: int) -> "ShardPlan":
        """`shards` near-equal contiguous ranges of the floating tensors of `base` (arrays, or
        TensorInfo from a safetensors header). ValueError when shards < 1 or more shards than
        floating elements."""
        if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
            raise ValueError(f"shards must be a whole number >= 1, got {shards!r}")
        tensors = {name: value if isinstance(value, TensorInfo) else
                   TensorInfo(tuple(int(d) for d in np.shape(value)), np.asarray(value).dtype.name)
                   for name, value in base.items()}
        unsharded = cls(tensors, ())
        names, size = unsharded.floating_names, unsharded.size
        if shards > size:
            raise ValueError(f"{shards} shards for a model of {size} floating elements: at most one shard per "
                             "element")
        bounds = [k * size // shards for k in range(shards + 1)]
        starts, offset = {}, 0
        for name in names:
            starts[name] = offset
            offset += tensors[name].size
        out = []
        for k in range(shards):
            lo, hi = bounds[k], bounds[k + 1]
            pieces = []
            for name in names:
                first, last = starts[name], starts[name] + tensors[name].size
                a, b = max(lo, first), min(hi, last)
                if a < b:
                    pieces.append(Piece(name, a - first, b - first))
            whole = tuple(name for name in tensors if not tensors[name].floating) if k == 0 else ()
            out.append(Shard(k, tuple(pieces), whole))
        return cls(tensors, tuple(out))

    @property
    def floating_names(self) -> list[str]:
        return sorted(name for name, info in self.tensors.items() if info.floating)

    @property
    def size(self) -> int:
        return sum(self.tensors[name].size for name in self.floating_names)

    def shard(self, index: int) -> Shard:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.shards):
            raise ValueError(f"shard {index!r} is not in 0..{len(self.shards) - 1}")
        return self.shards[int(index)]

    # --- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        # A list, not a mapping: the base's key order survives JSON written with sorted keys.
        return {"tensors": [{"name": name, "shape": list(info.shape), "dtype": info.dtype}
                            for name, info in self.tensors.items()],
                "shards": [{"pieces": [[p.tensor, p.start, p.stop] for p in s.pieces], "whole": list(s.whole)}
                           for s in self.shards]}

    @classmethod
    def from_dict(cls, data: Any) -> "ShardPlan":
        """The plan `to_dict` wrote; ValueError ('bad shard plan: ...') unless it is one that
        `build` could have made: every floating element in exactly one shard, in layout
        order, the other tensors whole in shard 0."""
        try:
            tensors = {str(info["name"]): TensorInfo(tuple(int(d) for d in info["shape"]), np.dtype(info["dtype"]).name)
                       for info in data["tensors"]}
            if len(tensors) != len(data["tensors"]):
                raise ValueError("a tensor is named twice")
            shards = tuple(Shard(k, tuple(Piece(str(t), int(a), int(b)) for t, a, b in s["pieces"]),
                                 tuple(str(w) for w in s.get("whole", ())))
                           for k, s in enumerate(data["shards"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _bad_plan(f"not a plan's JSON ({type(exc).__name__}: {exc})") from None
        plan = cls(tensors, shards)
        plan.check()
        return plan

    def check(self) -> None:
        if not self.shards:
            raise _bad_plan("no shards")
        if any(min(info.shape, default=1) < 0 for info in self.tensors.values()):
            raise _bad_plan("a negative dimension")
        expected = [(name, 0) for name in self.floating_names]
        cursor = {name: 0 for name in self.floating_names}
        order = []
        for s in self.shards:
            if not s.pieces:
                raise _bad_plan(f"shard {s.index} has no elements")
            for p in s.pieces:
                if p.tensor not in cursor:
                    raise _bad_plan(f"shard {s.index} names {p.tensor!r}, not a floating tensor of the model")
                if p.start != cursor[p.tensor] or not p.start < p.stop <= self.tensors[p.tensor].size:
                    raise _bad_plan(f"shard {s.index}: piece {p.tensor}[{p.start}:{p.stop}] does not continue "
                                    f"at element {cursor[p.tensor]} of {self.tensors[p.tensor].size}")
                if not order or order[-1] != p.tensor:
                    order.append(p.tensor)
                cursor[p.tensor] = p.stop
        if order != [name for name, _ in expected] or any(cursor[n] != self.tensors[n].size for n in cursor):
            raise _bad_plan("the pieces do not cover the floating tensors once, in sorted-name order")
        others = tuple(name for name, info in self.tensors.items() if not info.floating)
        if self.shards[0].whole != others or any(s.whole for s in self.shards[1:]):
            raise _bad_plan(f"the integer / bool tensors {list(others)} must all go whole to shard 0")

    # --- slicing -------------------------------------------------------------------------------
    def slice(self, index: int, state: Mapping[str, np.ndarray]) -> StateDict:
        """Shard `index`'s slice of a model state dict: each piece as a 1-D view named by its
        tensor, the whole tensors as they are."""
        shard = self.shard(index)
        out: StateDict = {}
        for p in shard.pieces:
            out[p.tensor] = np.asarray(state[p.tensor]).reshape(-1)[p.start:p.stop]
        for name in shard.whole:
            out[name] = np.asarray(state[name])
        return out

    def slice_state(self, index: int, state: Mapping[str, np.ndarray]) -> StateDict:
        """Shard `index`'s slice of a strategy's state ('<slot>/<tensor>' keys), for the
        floating tensors in the shard."""
        shard = self.shard(index)
        pieces = {p.tensor: p for p in shard.pieces}
        out: StateDict = {}
        for key, value in state.items():
            piece = pieces.get(key.partition("/")[2])
            if piece is not None:
                out[key] = np.asarray(value).reshape(-1)[piece.start:piece.stop]
        return out


# --- the rule ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """A strategy as `build(strategy, clip_norm, **params)` makes it."""

    strategy: str
    params: Mapping[str, Any] = field(default_factory=dict)
    clip_norm: float | None = None

    def inner(self):
        """A fresh, unclipped strategy object (clipping is applied by the shards)."""
        return build(self.strategy, **dict(self.params))

    @property
    def centered(self) -> bool:
        return self.strategy == CENTERED

    @property
    def needs_statistics(self) -> bool:
        """Whether stage 1 (the Gram matrix over every shard) must run first."""
        return self.clip_norm is not None or self.strategy in DISTANCE_RULES or self.centered


@dataclass(frozen=True)
class StateSlice:
    """A shard's slice of the strategy's saved state, and whether the saved state is used:
    'none' (none saved: zeros), 'saved', or 'mismatch' (centered_clipping: it does not fit the
    model, so the center starts from zero)."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    origin: str = "none"


def state_origin(rule: Rule, plan: ShardPlan, shapes: Mapping[str, Sequence[int]]) -> str:
    """How the saved state with these keys and shapes ('<slot>/<tensor>' -> shape; {} when none)
    enters the round: 'none', 'saved' or 'mismatch'. A server optimiser's state that does not
    fit the model raises ValueError, as its unsharded `aggregate` does."""
    from fl_tasks.aggregation.centered import center_fits

    if not shapes:
        return "none"
    floating = {name: plan.tensors[name].shape for name in plan.floating_names}
    if rule.centered:
        return "saved" if center_fits({k: tuple(v) for k, v in shapes.items()}, floating) else "mismatch"
    inner = rule.inner()
    if not getattr(inner, "stateful", False):
        return "none"
    expected = {f"{slot}/{name}" for slot in inner.slots for name in floating}
    if set(shapes) != expected:
        missing, extra = sorted(expected - set(shapes)), sorted(set(shapes) - expected)
        raise ValueError(f"{inner.name} state does not match the base model: missing {missing}, unexpected {extra}")
    for key, shape in shapes.items():
        if tuple(shape) != floating[key.partition("/")[2]]:
            raise ValueError(f"{inner.name} state '{key}' has shape {tuple(shape)}, "
                             f"expected {floating[key.partition('/')[2]]}")
    return "saved"


def slice_strategy_state(rule: Rule, plan: ShardPlan, index: int, state: Mapping[str, np.ndarray] | None) -> StateSlice:
    """Shard `index`'s StateSlice of a whole saved state held in memory (None or {}: none)."""
    origin = state_origin(rule, plan, {k: np.shape(v) for k, v in (state or {}).items()})
    return StateSlice(plan.slice_state(index, state) if origin == "saved" else {}, origin)


# --- stage 1: statistics -------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardStatistics:
    """One shard's partial float64 Gram matrix of [saved center (centered_clipping only)] +
    the updates' deltas from the base, and which updates are copies of an earlier one on
    this shard's slice (`robust.RowCopies` labels)."""

    shard: int
    gram: np.ndarray
    center: bool  # row 0 is the saved center
    center_finite: bool = True
    copies: tuple[int, ...] | None = None  # None: not read (statistics written before copies were)

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "gram": self.gram.tolist(), "center": self.center,
                "center_finite": self.center_finite, "copies": None if self.copies is None else list(self.copies)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShardStatistics":
        gram = np.asarray(data["gram"], dtype=np.float64)
        if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"shard statistics: the Gram matrix has shape {gram.shape}, not square")
        copies = data.get("copies")
        return cls(int(data["shard"]), gram, bool(data["center"]), bool(data["center_finite"]),
                   None if copies is None else tuple(int(c) for c in copies))


def _rows(base: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]],
          center: Mapping[str, np.ndarray] | None):
    """(name, float64 block of rows [center] + deltas) for each column block of the slice."""
    for name in Layout(base).names:
        ref = np.asarray(base[name]).reshape(-1)
        size = ref.size
        step = max(1, BLOCK_ELEMENTS // max(len(updates) + 1, 1))
        for start in range(0, size, step):
            stop = min(size, start + step)
            rows = [np.asarray(u[name]).reshape(-1)[start:stop].astype(np.float64) for u in updates]
            block = np.stack(rows) if rows else np.empty((0, stop - start))
            block -= ref[start:stop].astype(np.float64)
            if center is not None:
                v = center.get(f"v/{name}")
                first = (np.zeros(stop - start) if v is None else
                         np.asarray(v).reshape(-1)[start:stop].astype(np.float64))
                block = np.vstack([first[None, :], block])
            yield block


def shard_statistics(rule: Rule, index: int, base: Mapping[str, np.ndarray],
                     updates: Sequence[Mapping[str, np.ndarray]], state: StateSlice | None = None) -> ShardStatistics:
    """Stage 1 on one shard's slices: the partial Gram matrix of the deltas from `base` (the
    saved center first for centered_clipping, zeros unless `state.origin` is 'saved')."""
    for update in updates:
        check_update(update, base)
    state = state or StateSlice()
    center = (state.tensors if state.origin == "saved" else {}) if rule.centered else None
    k = len(updates) + (1 if rule.centered else 0)
    gram = np.zeros((k, k), dtype=np.float64)
    finite = True
    copies = robust.RowCopies(len(updates))
    for block in _rows(base, updates, center):
        if center is not None and not np.all(np.isfinite(block[0])):
            finite = False
            block[0] = 0.0
        gram += block @ block.T
        copies.add(block[k - len(updates):])  # once every row is on its own, only a count of labels
    return ShardStatistics(index, gram, rule.centered, finite, tuple(int(c) for c in copies.labels))


@dataclass(frozen=True)
class Statistics:
    """The Gram matrix summed over every shard, and which updates are copies of an earlier
    one on every shard."""

    gram: np.ndarray
    center: bool
    center_finite: bool
    copies: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.gram.shape[0] - (1 if self.center else 0)

    def norms(self) -> np.ndarray:
        """||x_i - base|| of every update."""
        offset = 1 if self.center else 0
        return np.sqrt(np.maximum(np.diag(self.gram)[offset:], 0.0))

    def scales(self, clip_norm: float | None) -> np.ndarray:
        """clip_norm's factor min(1, C / ||x_i - base||) per update (ones without clipping)."""
        from fl_tasks.aggregation.clip import clip_scale

        if clip_norm is None:
            return np.ones(self.n)
        norms = self.norms()
        bad = [i for i, v in enumerate(np.diag(self.gram)[1 if self.center else 0:]) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"update has a non-finite norm ({norms[bad[0]]}); it cannot be clipped")
        return np.array([clip_scale(float(norm), clip_norm) for norm in norms])

    def scaled(self, scales: np.ndarray) -> np.ndarray:
        """The Gram matrix of the (clipped) deltas: rows and columns scaled, the center unscaled."""
        factors = np.concatenate([[1.0], scales]) if self.center else np.asarray(scales, dtype=np.float64)
        return self.gram * factors[:, None] * factors[None, :]


def combine_statistics(plan: ShardPlan, parts: Iterable[ShardStatistics]) -> Statistics:
    """The sum of every shard's statistics (exactly one per shard of `plan`)."""
    parts = sorted(parts, key=lambda p: p.shard)
    if [p.shard for p in parts] != list(range(len(plan.shards))):
        raise ValueError(f"statistics of shards {[p.shard for p in parts]}, the plan has {len(plan.shards)} shards")
    shapes = {p.gram.shape for p in parts}
    if len(shapes) != 1 or len({p.center for p in parts}) != 1:
        raise ValueError(f"the shards' statistics do not match: Gram shapes {sorted(shapes)}")
    gram = np.zeros(parts[0].gram.shape, dtype=np.float64)
    for p in parts:
        gram += p.gram
    finite = all(p.center_finite for p in parts)
    center = parts[0].center
    if center and not finite:  # the saved center is dropped for zeros everywhere
        gram[0, :] = 0.0
        gram[:, 0] = 0.0
    copies = None if any(p.copies is None for p in parts) else robust.RowCopies.combine([p.copies for p in parts])
    return Statistics(gram, center, finite, copies)


# --- stage 2: one shard's slice of the result ---------------------------------------------------

@dataclass(frozen=True)
class ShardResult:
    shard: int
    tensors: StateDict  # the shard's slice of the new model (as `ShardPlan.slice` names it)
    outcome: Outcome
    state: StateDict | None  # the shard's slice of the new strategy state; None when stateless


def aggregate_shard(rule: Rule, index: int, base: Mapping[str, np.ndarray],
                    updates: Iterable[tuple[Mapping[str, np.ndarray], float]], statistics: Statistics | None = None,
                    state: StateSlice | None = None) -> ShardResult:
    """Stage 2: the rule applied to shard `index`'s slices of the base and of the updates
    (with their weights), given the summed statistics when `rule.needs_statistics` and the
    shard's slice of the saved strategy state."""
    from fl_tasks.aggregation.clip import Clipped, scale_update

    state = state or StateSlice()
    if rule.needs_statistics and statistics is None:
        raise ValueError(f"{rule.strategy}{' with clip_norm' if rule.clip_norm is not None else ''} needs the "
                         "statistics of every shard (stage 1) first")
    inner = rule.inner()
    scales = statistics.scales(rule.clip_norm) if rule.clip_norm is not None else None

    def fed():
        for i, (update, weight) in enumerate(updates):
            check_update(update, base)
            if scales is not None:
                if i >= len(scales):
                    raise ValueError(f"more updates than the statistics' {len(scales)}")
                update = scale_update(update, base, float(scales[i]))
            yield update, weight

    if rule.strategy in DISTANCE_RULES:
        stacked = inner.stack(base, fed())
        _check_count(stacked.n, statistics)
        chosen = inner.select(robust.distances_from_gram(statistics.scaled(_ones(scales, stacked.n)),
                                                         statistics.copies))
        out = assemble_stacked(stacked, inner.combine_selected(stacked.matrix, chosen))
        new_state = None
    elif rule.centered:
        out, new_state = _centered(inner, base, fed(), statistics, scales, state)
    else:
        if getattr(inner, "stateful", False) and state.origin == "saved":
            inner.set_state(state.tensors)
        out = dict(inner.aggregate(base, fed()))
        if statistics is not None:
            _check_count(len(inner.outcome.influence) if inner.outcome.influence is not None else statistics.n,
                         statistics)
        new_state = inner.get_state() if getattr(inner, "stateful", False) else None
    outcome = Clipped(inner, rule.clip_norm).outcome if rule.clip_norm is not None else inner.outcome
    return ShardResult(index, out, outcome, new_state)


def _ones(scales: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n) if scales is None else scales


def _check_count(n: int, statistics: Statistics) -> None:
    if n != statistics.n:
        raise ValueError(f"{n} updates, but the statistics were computed over {statistics.n}")


def _centered(inner, base, updates, statistics: Statistics, scales, state: StateSlice):
    from fl_tasks.aggregation import centered

    stacked = inner.stack(base, updates)
    n = stacked.n
    _check_count(n, statistics)
    if state.origin == "mismatch":
        origin = centered.CENTER_MISMATCH
    elif state.origin != "saved":
        origin = centered.NO_CENTER
    elif not statistics.center_finite:
        origin = centered.CENTER_NOT_FINITE
    else:
        origin = centered.CENTER_SAVED
    use_center = origin == centered.CENTER_SAVED
    gram = statistics.scaled(_ones(scales, n))
    start = np.zeros(n + 1)
    start[0] = 1.0
    tau, how = inner.radius_for(robust.gram_distances(gram, start) if inner.tau == 0 else np.zeros(0))
    result = robust.centered_clipping_gram(gram, inner.weights, tau, inner.iterations)
    a = result.vector
    layout, matrix = stacked.layout, stacked.matrix
    base_vector = layout.flatten(base, out=np.empty(layout.size, dtype=np.float64))
    delta = np.zeros(layout.size, dtype=np.float64)
    if use_center and a[0] != 0:
        for name in layout.names:
            delta[layout.slices[name]] = a[0] * np.asarray(state.tensors[f"v/{name}"], dtype=np.float64).reshape(-1)
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    for lo in range(0, layout.size, step):
        block = matrix[:, lo:lo + step].astype(np.float64)
        block -= base_vector[lo:lo + step]
        delta[lo:lo + step] += a[1:] @ block
    vector = base_vector + delta
    new_state = centered.center_state(delta, layout)
    out = assemble_stacked(stacked, vector)
    inner.record(n, origin, tau, how, result)
    return out, new_state


# --- assembly -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Assembled:
    model: StateDict  # the new model, in the base's key order
    state: StateDict | None  # the strategy's new state (whole tensors); None when stateless
    outcome: Outcome


def assemble(plan: ShardPlan, results: Iterable[ShardResult]) -> Assembled:
    """The new model and strategy state from every shard's result (one per shard); the
    shards must agree on the outcome."""
    results = sorted(results, key=lambda r: r.shard)
    if [r.shard for r in results] != list(range(len(plan.shards))):
        raise ValueError(f"results of shards {[r.shard for r in results]}, the plan has {len(plan.shards)} shards")
    outcomes = {r.outcome for r in results}
    if len(outcomes) != 1:
        raise ValueError("the shards' outcomes disagree: their results come from different rounds or inputs")
    model: StateDict = {}
    for name, info in plan.tensors.items():
        if not info.floating:
            model[name] = np.asarray(results[0].tensors[name]).reshape(info.shape)
    model.update(_join(plan, results, lambda r: r.tensors, lambda key: key))
    stateful = [r.state is not None for r in results]
    if any(stateful) and not all(stateful):
        raise ValueError("some shards returned a strategy state and others none")
    state = _join(plan, results, lambda r: r.state, lambda key: key.partition("/")[2]) if all(stateful) else None
    return Assembled({name: model[name] for name in plan.tensors}, state, results[0].outcome)


def _join(plan: ShardPlan, results: Sequence[ShardResult], part, tensor_of) -> StateDict:
    """Whole tensors from the shards' 1-D pieces (keys: tensor names, or '<slot>/<tensor>')."""
    out: StateDict = {}
    filled: dict[str, int] = {}
    for result in results:
        shard = plan.shard(result.shard)
        pieces = {p.tensor: p for p in shard.pieces}
        tensors = part(result)
        for key, value in tensors.items():
            piece = pieces.get(tensor_of(key))
            if piece is None:
                continue
            value = np.asarray(value).reshape(-1)
            if value.size != piece.size:
                raise ValueError(f"shard {result.shard}: '{key}' has {value.size} elements, the plan {piece.size}")
            if key not in out:
                out[key] = np.empty(plan.tensors[tensor_of(key)].size, dtype=value.dtype)
            out[key][piece.start:piece.stop] = value
            filled[key] = filled.get(key, 0) + value.size
    short = sorted(key for key in out if filled[key] != out[key].size)
    if short:
        raise ValueError(f"the shards' results do not cover {short}")
    for key in list(out):
        out[key] = out[key].reshape(plan.tensors[tensor_of(key)].shape)
    return out
