"""Aggregation strategies behind one entry point: `build(name, clip_norm=None, **params)`.

Every strategy has `name`, `stateful` and `aggregate(base, updates) -> state dict`, where
`base` is the round's starting model and `updates` an iterable of (client model, num_examples)
with full client weights (not deltas). After `aggregate`, `outcome` (an `Outcome`) says what
the rule did with each update, for logs and MLflow. Stateful ones (the server optimisers,
centered_clipping) also have `get_state()` / `set_state(state)`; the caller keeps that state
between rounds.

    fedavg                                  weighted mean, streamed                 fedavg.py
    fedavgm, fedadam, fedyogi, fedadagrad   server optimisers: weighted, stateful   fedopt.py
    median, trimmed_mean                    coordinate-wise, unweighted             coordinate.py
    krum, multi_krum                        distance-based selection, unweighted    krum.py
    bulyan                                  iterated Krum + trimmed coordinates     bulyan.py
    weighted_median, weighted_trimmed_mean  coordinate-wise, example-weighted       coordinate.py
    weighted_multi_krum                     Krum selection, weighted average        krum.py
    centered_clipping                       weighted, stateful, clip around center  centered.py

The maths lives in plain functions: `mean`, `server_opt`, `robust`, `clip`. This module and
`parameters` import no numpy until a strategy is built, so DAG files can read the names and
check a federation's strategy cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fl_tasks.aggregation.parameters import STRATEGY_NAMES, STRATEGY_PARAMS, strategy_values


@dataclass(frozen=True)
class Outcome:
    """What a strategy did with the updates of its last `aggregate`, in the updates' order.

    `influence` is each update's share of the result where the rule has one (the weight in
    a weighted mean, 1/m for each of the m updates a Krum rule averages, 0 for the others),
    and None where no per-update weight exists (coordinate-wise rules: every update enters
    every coordinate's statistic unweighted). Never the example share under another rule.
    """

    rule: str  # one line: the rule as applied, with its parameters
    influence: tuple[float, ...] | None
    selected: tuple[int, ...] | None = None  # rules that pick whole updates: the picked ones
    scores: tuple[float, ...] | None = None  # Krum scores (lower is more central)


class Strategy(Protocol):
    name: str
    stateful: bool
    min_updates: int  # fewest client updates aggregate() accepts with these parameters
    outcome: Outcome | None  # set by aggregate()

    def aggregate(self, base, updates):  # (state dict, iterable of (state dict, n)) -> state dict
        ...


def build(name: str, clip_norm: float | None = None, **params: Any) -> Strategy:
    """The strategy called `name`, with `params` (names in STRATEGY_PARAMS[name]; defaults
    and allowed values in `parameters.STRATEGIES`).

    With `clip_norm`, every update is clipped to that L2 norm (of client - base over the
    floating tensors) on its way into the strategy, one at a time; the wrapper keeps the
    strategy's `name`, `stateful`, `get_state` and `set_state`. Unknown names, parameters or
    bad values fail here with a ValueError.
    """
    values = strategy_values(name, params)
    from fl_tasks.aggregation.clip import Clipped
    from fl_tasks.aggregation.strategies import REGISTRY

    strategy = REGISTRY[name](**values)
    return strategy if clip_norm is None else Clipped(strategy, clip_norm)


def __getattr__(attr: str) -> Any:
    if attr == "clip_update":
        from fl_tasks.aggregation.clip import clip_update

        return clip_update
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["STRATEGY_NAMES", "STRATEGY_PARAMS", "Outcome", "Strategy", "build", "clip_update"]
