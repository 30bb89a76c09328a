"""The per-round settings: written once here, and everything else derives from this table.

Each one has a default in the federation file (at `path`), can be overridden for one round
in Airflow's trigger form (a typed, bounded `Param` named `name`), and ends up in the round's
plan. `fl_tasks.config` takes its defaults and bounds from here, `dags/fl_round.py` builds
the trigger form from here, and `fl_tasks.coordinator.plan` resolves a run's values here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fl_tasks.aggregation.parameters import STRATEGY_NAMES

CLIENTS = "clients"  # a bound that is the federation's number of clients
KIND_WORDS = {"integer": "a whole number", "number": "a number", "string": "a string", "object": "a mapping"}


@dataclass(frozen=True)
class RoundSetting:
    name: str  # trigger-form param and plan key
    path: str  # section.field in the federation file
    type: str  # JSON-schema type: integer | number | string | object
    default: Any
    description: str
    nullable: bool = False  # null switches the setting off
    minimum: float | str | None = None
    maximum: float | str | None = None  # a number, or CLIENTS
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    enum: tuple[str, ...] | None = None

    def bounds(self, num_clients: int) -> dict[str, Any]:
        """The JSON-schema keywords that bound this setting for a federation of `num_clients`."""
        schema: dict[str, Any] = {}
        for key, value in (("minimum", self.minimum), ("maximum", self.maximum),
                           ("exclusiveMinimum", self.exclusive_minimum), ("exclusiveMaximum", self.exclusive_maximum)):
            if value is not None:
                schema[key] = num_clients if value == CLIENTS else value
        if self.enum:
            schema["enum"] = list(self.enum)
        return schema

    def allowed(self, num_clients: int) -> str:
        """The values this setting takes, in words (the fix of an error message), e.g. 'a whole
        number >= 1 and <= 5'."""
        if self.enum:
            text = f"one of {', '.join(self.enum)}"
        else:
            words = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
            bounds = self.bounds(num_clients)
            limits = [f"{word} {bounds[key]}" for key, word in words.items() if key in bounds]
            text = " ".join([KIND_WORDS[self.type], " and ".join(limits)]).strip()
        if not self.nullable:
            return text
        return text + (", or null" if self.type == "object" else ", or null to switch it off")

    def json_type(self) -> str | list[str]:
        return [self.type, "null"] if self.nullable else self.type

    def problem(self, value: Any, num_clients: int) -> str | None:
        """Why `value` is not allowed, in words; None when it is."""
        if value is None:
            return None if self.nullable else "must be set"
        expected = {"integer": int, "number": (int, float), "string": str, "object": dict}[self.type]
        if isinstance(value, bool) or not isinstance(value, expected):
            return f"must be {KIND_WORDS[self.type]}, got {value!r}"
        if self.type in ("integer", "number"):
            if not math.isfinite(value):
                return f"must be a finite number, got {value!r}"
            bounds = self.bounds(num_clients)
            for key, ok, word in (("minimum", lambda b: value >= b, ">="), ("maximum", lambda b: value <= b, "<="),
                                  ("exclusiveMinimum", lambda b: value > b, ">"),
                                  ("exclusiveMaximum", lambda b: value < b, "<")):
                if key in bounds and not ok(bounds[key]):
                    return f"must be {word} {bounds[key]}, got {value!r}"
        if self.enum and value not in self.enum:
            return f"must be one of {', '.join(self.enum)}, got {value!r}"
        return None


ROUND_SETTINGS: tuple[RoundSetting, ...] = (
    # The default defence (benchmarks/quality.py): nearly free on unequal silos, robust to one attacker of five.
    RoundSetting("aggregator", "aggregation.strategy", "string", "weighted_median",
                 "Aggregation strategy for this round",
                 enum=STRATEGY_NAMES),
    RoundSetting("aggregator_params", "aggregation.params", "object", None,
                 "Strategy parameters, e.g. {\"f\": 1} for krum; empty: the federation file's (for its own strategy)",
                 nullable=True),
    RoundSetting("min_clients", "quorum.min_clients", "integer", 1,
                 "Updates needed at the deadline for the round to proceed", minimum=1, maximum=CLIENTS),
    RoundSetting("min_fraction", "quorum.min_fraction", "number", None,
                 "Quorum as a share of the clients (the larger of this and min_clients counts); empty: min_clients "
                 "alone", nullable=True, exclusive_minimum=0, maximum=1),
    RoundSetting("round_timeout_minutes", "quorum.round_timeout_minutes", "number", 30.0,
                 "Minutes from dispatch to the deadline", exclusive_minimum=0, maximum=10080),
    RoundSetting("grace_period_minutes", "quorum.grace_period_minutes", "number", None,
                 "Once the quorum is in, minutes to wait for stragglers before closing; empty: wait until the "
                 "deadline", nullable=True, minimum=0, maximum=10080),
    RoundSetting("local_epochs", "training.local_epochs", "integer", 1, "Epochs each client trains locally",
                 minimum=1, maximum=100),
    RoundSetting("learning_rate", "training.learning_rate", "number", 0.001, "Client learning rate",
                 exclusive_minimum=0, exclusive_maximum=1),
    RoundSetting("gate_thresholds", "gates.thresholds", "object", None,
                 "Gate: each metric's threshold, e.g. {\"pr_auc\": 0.3} (at least, or at most for metrics where "
                 "lower is better); empty: the federation file's", nullable=True),
    RoundSetting("max_regression", "gates.max_regression", "number", 1.0,
                 "Gate: largest drop of the task's primary metric allowed against the champion",
                 minimum=0),
    # The federation file's default is 2 (1 with a single client): fl_tasks.config.
    RoundSetting("min_evaluating_silos", "evaluation.federated.min_silos", "integer", 1,
                 "Federated evaluation: silos that must score the candidate by the deadline, else it is rolled back",
                 minimum=1, maximum=CLIENTS),
    RoundSetting("evaluation_timeout_minutes", "evaluation.federated.timeout_minutes", "number", 10.0,
                 "Federated evaluation: minutes from the evaluation request to its deadline",
                 exclusive_minimum=0, maximum=10080),
    RoundSetting("evaluation_statistic", "evaluation.federated.statistic", "string", "mean",
                 "Federated evaluation: the figure the gates read, the mean weighted by each silo's evaluation rows "
                 "or the median (one lying silo cannot move it far)", enum=("mean", "median")),
    RoundSetting("max_silo_regression", "evaluation.federated.max_silo_regression", "number", None,
                 "Federated evaluation gate: largest drop of the primary metric against the champion on any one "
                 "silo's own data; empty: no per-silo bound", nullable=True, minimum=0),
)
# The settings that exist only when the federation evaluates on its silos.
FEDERATED_EVALUATION_PREFIX = "evaluation.federated."
SETTINGS_BY_NAME: dict[str, RoundSetting] = {s.name: s for s in ROUND_SETTINGS}
SETTINGS_BY_PATH: dict[str, RoundSetting] = {s.path: s for s in ROUND_SETTINGS}


def default(path: str) -> Any:
    """The built-in default of the setting at `path` (for the federation file's dataclasses)."""
    return SETTINGS_BY_PATH[path].default


def resolve(file_values: Mapping[str, Any], params: Mapping[str, Any], num_clients: int) -> dict[str, Any]:
    """Each setting's value for one round: the run's param when given, else the file's.

    Raises ValueError naming the param and its bound when a value is not allowed (the trigger
    form refuses these before a run exists; the CLI and API may not).
    """
    values = {}
    for setting in ROUND_SETTINGS:
        given = params.get(setting.name)
        value = given if given is not None else file_values[setting.name]
        problem = setting.problem(value, num_clients)
        if problem:
            raise ValueError(f"param '{setting.name}' {problem}")
        values[setting.name] = value
    return values
