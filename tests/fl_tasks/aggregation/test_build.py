"""fl_tasks/aggregation entry point: names, parameter lists, build errors, common contract."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import numpy as np
import pytest

from fl_tasks.aggregation import STRATEGY_NAMES, STRATEGY_PARAMS, build
from fl_tasks.aggregation.parameters import min_updates, strategy_values
from fl_tasks.aggregation.strategies import REGISTRY


def test_names_in_order():
    assert STRATEGY_NAMES == ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                              "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
                              "weighted_median", "weighted_trimmed_mean", "weighted_multi_krum", "centered_clipping")
    assert tuple(STRATEGY_PARAMS) == STRATEGY_NAMES
    assert tuple(REGISTRY) == STRATEGY_NAMES


def test_params_list_matches_the_constructors():
    for name in STRATEGY_NAMES:
        signature = inspect.signature(REGISTRY[name])
        accepted = tuple(p for p in signature.parameters if p != "self")
        assert accepted == STRATEGY_PARAMS[name], name
        assert REGISTRY[name].name == name
        # The defaults live in parameters.STRATEGIES alone: build() passes every value.
        assert all(p.default is inspect.Parameter.empty for p in signature.parameters.values()), name


def test_parameters_are_checked_without_numpy():
    code = ("import sys; from fl_tasks.aggregation.parameters import STRATEGY_NAMES, min_updates, strategy_values; "
            "import fl_tasks.aggregation; "
            "print(sum(min_updates(n, strategy_values(n, {})) for n in STRATEGY_NAMES)); "
            "assert 'numpy' not in sys.modules, 'numpy imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sum(build(name).min_updates for name in STRATEGY_NAMES))


def test_strategy_values_fill_defaults_and_check_each_value():
    assert strategy_values("multi_krum", {"f": 2.0}) == {"f": 2, "m": None}
    assert strategy_values("fedadam", {"eta": 0.1}) == {"eta": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert strategy_values("trimmed_mean", {"beta": np.float32(0.25)}) == {"beta": 0.25}
    assert strategy_values("krum", {"f": np.int64(3)}) == {"f": 3}
    for name, params, message in [
        ("krum", {"f": 1.5}, "krum: f must be an integer >= 0, got 1.5"),
        ("multi_krum", {"m": 0}, "multi_krum: m must be an integer >= 1, got 0"),
        ("trimmed_mean", {"beta": 0.5}, "trimmed_mean: beta must satisfy 0 <= beta < 0.5, got 0.5"),
        ("fedavgm", {"momentum": 1}, "fedavgm: momentum must satisfy 0 <= momentum < 1, got 1"),
        ("fedyogi", {"eta": True}, "fedyogi: eta must be a number, got True"),
        ("centered_clipping", {"tau_ratio": float("nan")}, "centered_clipping: tau_ratio must be finite, got nan"),
        ("centered_clipping", {"tau": -1}, "centered_clipping: tau must satisfy 0 <= tau < inf, got -1"),
    ]:
        with pytest.raises(ValueError) as info:
            strategy_values(name, params)
        assert str(info.value) == message
        with pytest.raises(ValueError, match=re.escape(message)):
            build(name, **params)


def test_unknown_parameters_name_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        build("krum", f=1, beta=0.1)
    assert str(info.value) == "strategy 'krum' does not take parameters ['beta']; allowed: f"
    with pytest.raises(ValueError) as info:
        build("median", f=1)
    assert str(info.value) == "strategy 'median' does not take parameters ['f']; allowed: none"
    with pytest.raises(ValueError, match="allowed: eta, beta1, beta2, tau"):
        build("fedadam", momentum=0.9)


DEFAULT_OK = {"krum": {"f": 1}, "multi_krum": {"f": 1}, "bulyan": {"f": 1}, "weighted_multi_krum": {"f": 1}}


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_keeps_keys_shapes_dtypes(name):
    rng = np.random.default_rng(0)
    base = {"conv.weight": rng.standard_normal((2, 3)).astype(np.float32), "conv.bias": np.zeros(3, np.float32),
            "bn.running_mean": np.zeros(3, np.float64), "bn.num_batches_tracked": np.array(100, np.int64)}
    ups = []
    for i in range(7):
        state = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()
                 if np.issubdtype(v.dtype, np.floating)}
        state["bn.num_batches_tracked"] = np.array(100 + 10 * i, np.int64)
        ups.append((state, 10 * (i + 1)))
    strategy = build(name, **DEFAULT_OK.get(name, {}))
    assert strategy.name == name
    out = strategy.aggregate(base, iter(ups))
    assert list(out) == list(base)
    for key, value in base.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
        assert np.all(np.isfinite(out[key]))
    assert 100 <= int(out["bn.num_batches_tracked"]) <= 160  # a count, never zeroed


def test_default_parameters():
    assert build("trimmed_mean").beta == 0.1
    assert build("krum").f == 1 and build("bulyan").f == 1
    assert build("multi_krum").f == 1 and build("multi_krum").m is None
    assert build("weighted_trimmed_mean").beta == 0.1
    assert build("weighted_multi_krum").f == 1 and build("weighted_multi_krum").m is None
    clipping = build("centered_clipping")
    assert (clipping.tau, clipping.tau_ratio, clipping.iterations) == (0.0, 1.0, 3) and clipping.stateful


@pytest.mark.parametrize("name,params,expected", [
    ("fedavg", {}, 1), ("fedadam", {}, 1), ("median", {}, 1), ("trimmed_mean", {"beta": 0.4}, 1),
    ("krum", {"f": 0}, 3), ("krum", {"f": 2}, 7), ("multi_krum", {"f": 1}, 5), ("multi_krum", {"f": 1, "m": 6}, 7),
    ("bulyan", {"f": 0}, 3), ("bulyan", {"f": 2}, 11),
    ("weighted_median", {}, 1), ("weighted_trimmed_mean", {"beta": 0.4}, 1), ("weighted_multi_krum", {"f": 1}, 5),
    ("weighted_multi_krum", {"f": 1, "m": 6}, 7), ("centered_clipping", {}, 1),
])
def test_min_updates_is_exactly_the_threshold(name, params, expected):
    strategy = build(name, **params)
    assert strategy.min_updates == expected
    assert min_updates(name, strategy_values(name, params)) == expected  # what configs check, without numpy
    assert build(name, clip_norm=1.0, **params).min_updates == expected
    ups = [({"w": np.array([float(i)])}, 1) for i in range(expected + 3)]
    for n in range(1, expected + 3):
        if n < expected:
            with pytest.raises(ValueError, match=f"got {n}|n={n}"):
                build(name, **params).aggregate({"w": np.zeros(1)}, ups[:n])
        else:
            build(name, **params).aggregate({"w": np.zeros(1)}, ups[:n])
