"""The strategies' names and parameters: each parameter's default and allowed values, and the
fewest updates a strategy takes with them. No numpy here: DAG files build their trigger form
from the names, and federation files are checked (parameters, quorum against the strategy's
minimum) when the DAG file is parsed, without the maths. Importing numpy would double the
parse time, and the dag-processor parses every DAG file again and again."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any


def _number(strategy: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):  # numpy scalars are Reals too
        raise ValueError(f"{strategy}: {name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{strategy}: {name} must be finite, got {value!r}")
    return float(value)


def integer_param(strategy: str, name: str, value: object, minimum: int) -> int:
    """An integer >= minimum; 2.0 is accepted as 2 (YAML and JSON forms), 2.5 is not."""
    number = _number(strategy, name, value)
    if not number.is_integer() or number < minimum:
        raise ValueError(f"{strategy}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(number)


def positive_param(strategy: str, name: str, value: object) -> float:
    number = _number(strategy, name, value)
    if not number > 0:
        raise ValueError(f"{strategy}: {name} must be > 0, got {value!r}")
    return number


def unit_interval_param(strategy: str, name: str, value: object) -> float:
    """A decay rate: 0 <= value < 1."""
    number = _number(strategy, name, value)
    if not 0 <= number < 1:
        raise ValueError(f"{strategy}: {name} must satisfy 0 <= {name} < 1, got {value!r}")
    return number


def fraction_param(strategy: str, name: str, value: object, upper: float) -> float:
    """0 <= value < upper."""
    number = _number(strategy, name, value)
    if not 0 <= number < upper:
        raise ValueError(f"{strategy}: {name} must satisfy 0 <= {name} < {upper}, got {value!r}")
    return number


@dataclass(frozen=True)
class Parameter:
    """One strategy parameter: its default, and `check(strategy, name, value)`, which returns
    the value as the strategy takes it or raises ValueError naming both."""

    default: Any
    check: Callable[[str, str, object], Any]


def _whole(minimum: int) -> Callable[[str, str, object], int]:
    return lambda strategy, name, value: integer_param(strategy, name, value, minimum)


def _below(upper: float) -> Callable[[str, str, object], float]:
    return lambda strategy, name, value: fraction_param(strategy, name, value, upper)


def _optional(check: Callable[[str, str, object], Any]) -> Callable[[str, str, object], Any]:
    return lambda strategy, name, value: None if value is None else check(strategy, name, value)


_F = Parameter(1, _whole(0))  # Byzantine clients tolerated
_M = Parameter(None, _optional(_whole(1)))  # updates Multi-Krum averages; None: n - f
_BETA = Parameter(0.1, _below(0.5))  # share trimmed from each end
_ADAPTIVE = {"beta1": Parameter(0.9, unit_interval_param), "beta2": Parameter(0.99, unit_interval_param),
             "tau": Parameter(1e-3, positive_param)}

# The server learning rates (eta): the best of a sweep on the real-data run (benchmarks/server_lr.py;
# the classes in fedopt.py say more).
STRATEGIES: dict[str, dict[str, Parameter]] = {
    "fedavg": {},
    "fedavgm": {"eta": Parameter(0.3, positive_param), "momentum": Parameter(0.9, unit_interval_param)},
    "fedadam": {"eta": Parameter(0.03, positive_param), **_ADAPTIVE},
    "fedyogi": {"eta": Parameter(0.03, positive_param), **_ADAPTIVE},
    # Adagrad sums squares: no beta2 (Reddi et al. 2021, Alg. 2)
    "fedadagrad": {"eta": Parameter(0.3, positive_param), "beta1": _ADAPTIVE["beta1"],
                   "tau": _ADAPTIVE["tau"]},
    "median": {},
    "trimmed_mean": {"beta": _BETA},
    "krum": {"f": _F},
    "multi_krum": {"f": _F, "m": _M},
    "bulyan": {"f": _F},
    "weighted_median": {},
    "weighted_trimmed_mean": {"beta": _BETA},
    "weighted_multi_krum": {"f": _F, "m": _M},
    # tau 0: adaptive, tau_ratio x the median distance to the center
    "centered_clipping": {"tau": Parameter(0.0, _below(math.inf)), "tau_ratio": Parameter(1.0, positive_param),
                          "iterations": Parameter(3, _whole(1))},
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)
STRATEGY_PARAMS: dict[str, tuple[str, ...]] = {name: tuple(params) for name, params in STRATEGIES.items()}


def strategy_values(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Every parameter of strategy `name`: `params` checked, defaults for the rest. Raises
    ValueError for an unknown strategy, an unknown parameter or a value out of range."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown aggregation strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    allowed = STRATEGIES[name]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"strategy {name!r} does not take parameters {unknown}; "
                         f"allowed: {', '.join(allowed) or 'none'}")
    return {key: parameter.check(name, key, params[key]) if key in params else parameter.default
            for key, parameter in allowed.items()}


def krum_min_updates(f: int) -> int:
    """Krum's scores sum each update's n - f - 2 nearest distances: n >= 2f + 3."""
    return 2 * f + 3


def multi_krum_min_updates(f: int, m: int | None) -> int:
    """Krum's minimum, and room for m picks among the n - f the rule may pick from."""
    return max(krum_min_updates(f), 0 if m is None else m + f)


def bulyan_min_updates(f: int) -> int:
    """Bulyan (El Mhamdi et al. 2018): n >= 4f + 3."""
    return 4 * f + 3


_MIN_UPDATES: dict[str, Callable[..., int]] = {
    "krum": krum_min_updates, "multi_krum": multi_krum_min_updates, "weighted_multi_krum": multi_krum_min_updates,
    "bulyan": bulyan_min_updates,
}


def min_updates(name: str, values: Mapping[str, Any]) -> int:
    """The fewest client updates strategy `name` takes with `values` (from `strategy_values`)."""
    rule = _MIN_UPDATES.get(name)
    return 1 if rule is None else rule(**values)
