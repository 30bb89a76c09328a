"""Server-optimiser strategies: FedAvgM, FedAdam, FedYogi, FedAdagrad.

Each round they stream the example-weighted mean of the client models in float64 (a float64
running sum: O(one model) whatever the number of clients, and exact where FedAvg's float32
running mean rounds once per client), take the pseudo-gradient delta = mean - base on the
floating tensors and apply one optimiser step (maths in `server_opt`). Integer and bool
tensors (batch-norm counters) are not optimised: they are the weighted mean, rounded half to
even, in their dtype.

The optimiser moments live OUTSIDE the object between rounds: `get_state()` returns them as a
flat dict ('m/<tensor>', 'v/<tensor>' for each floating tensor of the model) and
`set_state(state)` loads them into a fresh object, which then continues exactly. With no
state set, the moments start at zero (as in Flower; the paper allows any v_{-1} >= tau^2,
and starting at 0 just makes the first step of FedAdam / FedYogi / FedAdagrad larger).
Moments are kept in the tensor's floating dtype, at least float32; the steps run in float64,
chunk by chunk, so peak memory is a few model copies whatever the number of clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fl_tasks.aggregation import Outcome, server_opt
from fl_tasks.aggregation.checks import check_update, floating_names
from fl_tasks.aggregation.mean import CHUNK, StateDict, StreamingWeightedMean, cast_like, weight_shares


def _moment_dtype(value: np.ndarray) -> np.dtype:
    return np.promote_types(np.asarray(value).dtype, np.float32)


class ServerOptimizer:
    """Common part: streaming weighted mean, state checks, per-tensor step."""

    name = "server_optimizer"
    stateful = True
    min_updates = 1
    outcome: Outcome | None = None
    slots: tuple[str, ...] = ()  # the moment names in the state, e.g. ('m', 'v')

    def __init__(self) -> None:
        self._state: dict[str, np.ndarray] = {}

    # --- state ------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """The moments after the last aggregate (or as set), '<slot>/<tensor>' -> array; {} when fresh."""
        return dict(self._state)

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from saved moments; {} means start from zeros. Checked against the model
        at the next aggregate (names and shapes), before any update is read."""
        bad = sorted(key for key in state if key.partition("/")[0] not in self.slots or "/" not in key)
        if bad:
            raise ValueError(f"{self.name} state has unknown entries {bad}; expected "
                             f"{' or '.join(repr(s + '/<tensor>') for s in self.slots)}")
        self._state = {key: np.array(value, copy=True) for key, value in state.items()}

    def _moments(self, base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = floating_names(base)
        expected = {f"{slot}/{name}" for slot in self.slots for name in names}
        if not self._state:
            return {key: np.zeros(np.shape(base[key.partition("/")[2]]),
                                  dtype=_moment_dtype(base[key.partition("/")[2]])) for key in expected}
        if set(self._state) != expected:
            missing, extra = sorted(expected - set(self._state)), sorted(set(self._state) - expected)
            raise ValueError(f"{self.name} state does not match the base model: missing {missing}, "
                             f"unexpected {extra}")
        moments = {}
        for key, value in self._state.items():
            ref = base[key.partition("/")[2]]
            if np.shape(value) != np.shape(ref):
                raise ValueError(f"{self.name} state '{key}' has shape {np.shape(value)}, "
                                 f"expected {np.shape(ref)}")
            moments[key] = np.asarray(value).astype(_moment_dtype(ref), copy=False)
        return moments

    # --- aggregation ----------------------------------------------------------------------------
    def aggregate(self, base: Mapping[str, np.ndarray],
                  updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> StateDict:
        moments = self._moments(base)  # fails before any update is read
        acc = StreamingWeightedMean(float64=True)
        weights = []
        for state, num_examples in updates:
            check_update(state, base)
            acc.add(state, num_examples)
            weights.append(num_examples)
        mean = acc.result(cast=False)
        out: StateDict = {}
        new_state: dict[str, np.ndarray] = {}
        for name in base:
            ref = np.asarray(base[name])
            average = mean.pop(name)
            if not np.issubdtype(ref.dtype, np.floating):
                out.update(cast_like({name: average}, {name: ref}))
                continue
            out[name], fresh = self._step_tensor(ref, average, {s: moments[f"{s}/{name}"] for s in self.slots})
            del average
            new_state.update({f"{slot}/{name}": value for slot, value in fresh.items()})
        self._state = new_state  # only once every tensor succeeded
        self.outcome = Outcome(f"example-weighted mean, then one {self.name} server step", weight_shares(weights))
        return out

    def _step_tensor(self, ref: np.ndarray, average: np.ndarray,
                     moments: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One tensor's step, CHUNK elements at a time in float64, written straight into the
        new tensor (base dtype) and the new moments (moment dtype): the float64 temporaries
        stay cache-sized instead of costing several model copies."""
        x_out = np.empty(ref.shape, dtype=ref.dtype)
        fresh = {slot: np.empty(ref.shape, dtype=_moment_dtype(ref)) for slot in self.slots}
        flat_x, flat_mean = ref.reshape(-1), average.reshape(-1)
        flat_out = x_out.reshape(-1)
        flat_old = {slot: value.reshape(-1) for slot, value in moments.items()}
        flat_new = {slot: value.reshape(-1) for slot, value in fresh.items()}
        for start in range(0, flat_x.size, CHUNK):
            part = slice(start, start + CHUNK)
            x = flat_x[part].astype(np.float64)
            delta = server_opt.pseudo_gradient(flat_mean[part], x)
            x_new, updated = self.step(x, delta, {s: v[part].astype(np.float64) for s, v in flat_old.items()})
            flat_out[part] = x_new
            for slot, value in updated.items():
                flat_new[slot][part] = value
        return x_out, fresh

    def step(self, x: np.ndarray, delta: np.ndarray,
             moments: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """x_new and the new moments from float64 x, delta and old moments (one chunk)."""
        raise NotImplementedError


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019): v = momentum * v + delta; x = base + eta * v.

    Weighted by example counts: delta = (sum_i n_i x_i / sum_i n_i) - base. State: 'v/<tensor>'.
    With eta=1 and momentum=0 it is exactly FedAvg (up to float rounding). Default eta 0.3
    (with momentum 0.9 the steady step is eta / (1 - momentum) = 3 FedAvg steps): the best of
    0.1 / 0.3 / 1 on the real-data run of benchmarks/server_lr.py, where eta 1 diverged once.
    """

    name = "fedavgm"
    slots = ("v",)

    def __init__(self, eta: float, momentum: float) -> None:
        super().__init__()
        self.eta, self.momentum = eta, momentum

    def step(self, x, delta, moments):
        v = server_opt.momentum_buffer(moments["v"], delta, self.momentum)
        return server_opt.momentum_step(x, v, self.eta), {"v": v}


class _Adaptive(ServerOptimizer):
    """FedAdam / FedYogi / FedAdagrad differ only in the second moment.

    The default server learning rates are those with the best validation ROC-AUC in a sweep
    of eta on the clean real-data run (benchmarks/server_lr.py, results in the README); as in
    Reddi et al. 2021, eta is task-dependent and worth tuning per federation. tau stays 1e-3.
    """

    slots = ("m", "v")

    def __init__(self, eta: float, beta1: float, tau: float) -> None:
        super().__init__()
        self.eta, self.beta1, self.tau = eta, beta1, tau

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, x, delta, moments):
        m = server_opt.first_moment(moments["m"], delta, self.beta1)
        v = self.second_moment(moments["v"], delta)
        return server_opt.adaptive_step(x, m, v, self.eta, self.tau), {"m": m, "v": v}


class FedAdam(_Adaptive):
    """FedAdam (Reddi et al. 2021, Alg. 2): m = b1 m + (1-b1) delta; v = b2 v + (1-b2) delta^2;
    x = base + eta * m / (sqrt(v) + tau). No bias correction. Default eta 0.03.

    Weighted by example counts: delta = (sum_i n_i x_i / sum_i n_i) - base.
    State: 'm/<tensor>', 'v/<tensor>', both starting at zero.
    """

    name = "fedadam"

    def __init__(self, eta: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(eta, beta1, tau)
        self.beta2 = beta2

    def second_moment(self, v, delta):
        return server_opt.adam_second_moment(v, delta, self.beta2)


class FedYogi(_Adaptive):
    """FedYogi (Reddi et al. 2021, Alg. 2): as FedAdam, but v = v - (1-b2) delta^2 sign(v - delta^2),
    which lets v grow fast and shrink slowly. Default eta 0.03.

    Weighted by example counts: delta = (sum_i n_i x_i / sum_i n_i) - base.
    State: 'm/<tensor>', 'v/<tensor>', both starting at zero (as Flower).
    """

    name = "fedyogi"

    def __init__(self, eta: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(eta, beta1, tau)
        self.beta2 = beta2

    def second_moment(self, v, delta):
        return server_opt.yogi_second_moment(v, delta, self.beta2)


class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al. 2021, Alg. 2): v = v + delta^2 (no beta2), m and x as FedAdam.
    Default eta 0.3: v only grows, so the steps shrink round after round.

    Weighted by example counts: delta = (sum_i n_i x_i / sum_i n_i) - base.
    State: 'm/<tensor>', 'v/<tensor>', both starting at zero (as Flower).
    """

    name = "fedadagrad"

    def second_moment(self, v, delta):
        return server_opt.adagrad_second_moment(v, delta)
