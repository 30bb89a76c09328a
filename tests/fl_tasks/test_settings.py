"""fl_tasks/settings.py: the per-round settings table, its JSON-schema bounds, the check of one
value, and how a run's params and the federation file's values resolve into a round's settings."""

from __future__ import annotations

import math

import pytest

from fl_tasks.aggregation.parameters import STRATEGY_NAMES
from fl_tasks.settings import (CLIENTS, ROUND_SETTINGS, SETTINGS_BY_NAME, SETTINGS_BY_PATH, RoundSetting, default,
                               resolve)

FILE_VALUES = {s.name: s.default for s in ROUND_SETTINGS} | {"aggregator_params": {}, "gate_thresholds": {}}


def test_names_and_paths_are_unique_and_indexed():
    names = [s.name for s in ROUND_SETTINGS]
    paths = [s.path for s in ROUND_SETTINGS]
    assert len(set(names)) == len(names) and len(set(paths)) == len(paths)
    assert SETTINGS_BY_NAME == {s.name: s for s in ROUND_SETTINGS}
    assert SETTINGS_BY_PATH == {s.path: s for s in ROUND_SETTINGS}
    assert all(s.path.count(".") == 1 or s.path.startswith("evaluation.federated.")
               for s in ROUND_SETTINGS)  # section.field of the federation file
    assert all(s.description for s in ROUND_SETTINGS)  # the trigger form shows them


def test_the_table_holds_the_documented_settings():
    assert [s.name for s in ROUND_SETTINGS] == [
        "aggregator", "aggregator_params", "min_clients", "min_fraction", "round_timeout_minutes",
        "grace_period_minutes", "local_epochs", "learning_rate", "gate_thresholds", "max_regression",
        "min_evaluating_silos", "evaluation_timeout_minutes", "evaluation_statistic", "max_silo_regression"]
    assert SETTINGS_BY_NAME["aggregator"].enum == STRATEGY_NAMES


def test_every_default_is_allowed_by_its_own_bounds():
    for setting in ROUND_SETTINGS:
        assert setting.problem(setting.default, 1) is None, setting.name


def test_default_looks_up_by_path():
    assert default("quorum.min_clients") == 1
    assert default("training.learning_rate") == 0.001
    assert default("aggregation.strategy") == "weighted_median"
    assert default("quorum.min_fraction") is None
    with pytest.raises(KeyError):
        default("quorum.min_client")


def test_bounds_are_json_schema_keywords():
    assert SETTINGS_BY_NAME["min_clients"].bounds(5) == {"minimum": 1, "maximum": 5}  # CLIENTS: this federation's
    assert SETTINGS_BY_NAME["min_clients"].maximum == CLIENTS
    assert SETTINGS_BY_NAME["min_fraction"].bounds(5) == {"maximum": 1, "exclusiveMinimum": 0}
    assert SETTINGS_BY_NAME["learning_rate"].bounds(5) == {"exclusiveMinimum": 0, "exclusiveMaximum": 1}
    assert SETTINGS_BY_NAME["aggregator"].bounds(5) == {"enum": list(STRATEGY_NAMES)}
    assert SETTINGS_BY_NAME["gate_thresholds"].bounds(5) == {}


def test_json_type_allows_null_where_null_switches_a_setting_off():
    assert SETTINGS_BY_NAME["min_fraction"].json_type() == ["number", "null"]
    assert SETTINGS_BY_NAME["min_clients"].json_type() == "integer"
    assert SETTINGS_BY_NAME["aggregator_params"].json_type() == ["object", "null"]


@pytest.mark.parametrize("name, value, problem", [
    ("min_clients", 0, "must be >= 1, got 0"),
    ("min_clients", 4, "must be <= 3, got 4"),
    ("min_clients", 2.0, "must be a whole number, got 2.0"),
    ("min_clients", True, "must be a whole number, got True"),
    ("min_clients", "2", "must be a whole number, got '2'"),
    ("min_clients", None, "must be set"),
    ("learning_rate", 0, "must be > 0, got 0"),
    ("learning_rate", 1.0, "must be < 1, got 1.0"),
    ("learning_rate", math.nan, "must be a finite number, got nan"),
    ("round_timeout_minutes", math.inf, "must be a finite number, got inf"),
    ("round_timeout_minutes", False, "must be a number, got False"),
    ("min_fraction", 0.0, "must be > 0, got 0.0"),
    ("min_fraction", 1.5, "must be <= 1, got 1.5"),
    ("grace_period_minutes", -1, "must be >= 0, got -1"),
    ("max_regression", -0.01, "must be >= 0, got -0.01"),
    ("aggregator", "fedmedian", "must be one of fedavg"),
    ("aggregator", 3, "must be a string, got 3"),
    ("aggregator_params", [1], "must be a mapping, got [1]"),
])
def test_problem_names_what_is_wrong(name, value, problem):
    found = SETTINGS_BY_NAME[name].problem(value, 3)
    assert found is not None and found.startswith(problem), found


@pytest.mark.parametrize("name, value", [("min_clients", 3), ("min_clients", 1), ("learning_rate", 0.5),
                                         ("round_timeout_minutes", 10), ("min_fraction", 1), ("min_fraction", None),
                                         ("grace_period_minutes", 0), ("grace_period_minutes", None),
                                         ("aggregator", "krum"), ("aggregator_params", {"f": 1}),
                                         ("aggregator_params", None), ("gate_thresholds", {"pr_auc": 0.3}),
                                         ("max_regression", 0)])
def test_allowed_values_have_no_problem(name, value):
    assert SETTINGS_BY_NAME[name].problem(value, 3) is None


def test_allowed_describes_the_values_in_words():
    assert SETTINGS_BY_NAME["min_clients"].allowed(4) == "a whole number >= 1 and <= 4"
    assert SETTINGS_BY_NAME["learning_rate"].allowed(4) == "a number > 0 and < 1"
    assert SETTINGS_BY_NAME["min_fraction"].allowed(4) == "a number > 0 and <= 1, or null to switch it off"
    assert SETTINGS_BY_NAME["max_regression"].allowed(4) == "a number >= 0"
    assert SETTINGS_BY_NAME["aggregator"].allowed(4) == f"one of {', '.join(STRATEGY_NAMES)}"
    assert SETTINGS_BY_NAME["gate_thresholds"].allowed(4) == "a mapping, or null"


def test_resolve_takes_the_run_param_else_the_files_value():
    values = resolve(FILE_VALUES | {"min_clients": 2}, {"learning_rate": 0.01, "min_clients": None}, 3)
    assert set(values) == {s.name for s in ROUND_SETTINGS}
    assert values["learning_rate"] == 0.01  # the run's param
    assert values["min_clients"] == 2  # null in the form: the file's value
    assert values["aggregator"] == "weighted_median" and values["gate_thresholds"] == {}


def test_resolve_ignores_params_that_are_not_settings():
    assert "round_id" not in resolve(FILE_VALUES, {"round_id": "r-1"}, 3)


@pytest.mark.parametrize("params, message", [
    ({"min_clients": 4}, "param 'min_clients' must be <= 3, got 4"),
    ({"learning_rate": 2}, "param 'learning_rate' must be < 1, got 2"),
    ({"aggregator": "fedsgd"}, "param 'aggregator' must be one of"),
    ({"local_epochs": 1.5}, "param 'local_epochs' must be a whole number, got 1.5"),
])
def test_resolve_refuses_values_out_of_bounds_naming_the_param(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resolve(FILE_VALUES, params, 3)


def test_resolve_checks_the_files_values_too():
    with pytest.raises(ValueError, match="param 'min_clients' must be <= 2, got 3"):
        resolve(FILE_VALUES | {"min_clients": 3}, {}, 2)


def test_a_file_value_of_none_for_a_required_setting_is_refused():
    with pytest.raises(ValueError, match="param 'local_epochs' must be set"):
        resolve(FILE_VALUES | {"local_epochs": None}, {}, 3)


def test_a_setting_is_a_frozen_record():
    setting = RoundSetting("x", "a.x", "integer", 1, "an example", minimum=0)
    with pytest.raises(AttributeError):
        setting.default = 2  # type: ignore[misc]
    assert setting.problem(-1, 1) == "must be >= 0, got -1"
