"""fl_tasks/aggregation server optimisers (Reddi et al. 2021; FedAvgM of Hsu et al. 2019).

delta = weighted_mean(client models) - base on floating tensors; integer buffers are the
rounded weighted mean. Moments persist between rounds only through get_state / set_state.
"""

from __future__ import annotations

import gc
import math
import tracemalloc
import zlib

import numpy as np
import pytest

from fl_tasks.aggregation import build
from fl_tasks.aggregation.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fl_tasks.protocol.codec import decode_state, encode_state

OPTIMISERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
DEFAULT_ETA = {"fedavgm": 0.3, "fedadam": 0.03, "fedyogi": 0.03, "fedadagrad": 0.3}  # benchmarks/server_lr.py

# --- reference: the update rules written out element by element, in Python floats ----------------


def ref_round(name, params, base, updates, state):
    """One round; `state` maps 'm/<k>' / 'v/<k>' -> list of floats (absent = zeros). Returns
    (new model as float lists / ints, new state)."""
    eta = params.get("eta", DEFAULT_ETA[name])
    b1, b2, tau = params.get("beta1", 0.9), params.get("beta2", 0.99), params.get("tau", 1e-3)
    momentum = params.get("momentum", 0.9)
    total = sum(n for _, n in updates)
    out, new_state = {}, {}
    for key, ref in base.items():
        flat_base = [float(x) for x in np.asarray(ref).ravel()]
        mean = [sum(float(np.asarray(s[key]).ravel()[j]) * n for s, n in updates) / total
                for j in range(len(flat_base))]
        if not np.issubdtype(ref.dtype, np.floating):
            out[key] = [round(x) for x in mean]  # Python round: half to even, like np.rint
            continue
        x_new, m_new, v_new = [], [], []
        for j, x in enumerate(flat_base):
            d = mean[j] - x
            m = state.get(f"m/{key}", [0.0] * len(flat_base))[j]
            v = state.get(f"v/{key}", [0.0] * len(flat_base))[j]
            if name == "fedavgm":
                v = momentum * v + d
                x_new.append(x + eta * v)
            else:
                m = b1 * m + (1 - b1) * d
                if name == "fedadam":
                    v = b2 * v + (1 - b2) * d * d
                elif name == "fedyogi":
                    v = v - (1 - b2) * d * d * (0.0 if v == d * d else math.copysign(1.0, v - d * d))
                else:
                    v = v + d * d
                x_new.append(x + eta * m / (math.sqrt(v) + tau))
            m_new.append(m)
            v_new.append(v)
        out[key] = x_new
        new_state[f"v/{key}"] = v_new
        if name != "fedavgm":
            new_state[f"m/{key}"] = m_new
    return out, new_state


SHAPES = {"w": (3, 4), "b": (4,), "s": ()}


def model(rng, scale=1.0, dtype=np.float64):
    state = {k: (scale * rng.standard_normal(s)).astype(dtype) for k, s in SHAPES.items()}
    state["bn.num_batches_tracked"] = np.array(int(rng.integers(50, 150)), dtype=np.int64)
    return state


def client_round(rng, base, n=4):
    return [({k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype) if np.issubdtype(v.dtype, np.floating)
              else np.array(int(v) + int(rng.integers(0, 20)), dtype=v.dtype) for k, v in base.items()},
             int(rng.integers(1, 100))) for _ in range(n)]


def assert_matches(out, ref, base, rtol=1e-10):
    assert list(out) == list(base)
    for key, value in base.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape
        expected = np.array(ref[key], dtype=np.float64).reshape(value.shape)
        if np.issubdtype(value.dtype, np.floating):
            np.testing.assert_allclose(out[key], expected, rtol=rtol, atol=1e-12)
        else:
            np.testing.assert_array_equal(out[key], expected.astype(value.dtype))


PARAMS = [("fedavgm", {}), ("fedavgm", {"eta": 0.5, "momentum": 0.0}), ("fedadam", {}),
          ("fedadam", {"eta": 0.1, "beta1": 0.5, "beta2": 0.9, "tau": 1e-2}), ("fedyogi", {}),
          ("fedyogi", {"eta": 0.1, "beta2": 0.5}), ("fedadagrad", {}), ("fedadagrad", {"eta": 1.0, "tau": 1e-9})]


# --- hand-computed ------------------------------------------------------------------------------------


def test_fedavgm_by_hand():
    strategy = build("fedavgm", eta=1.0)  # momentum 0.9 by default
    # round 1: mean of 1.5 (weight 1) and 2.5 (weight 3) = 2.25; delta 1.25; v = 1.25; x = 1 + 1.25
    out = strategy.aggregate({"w": np.array([1.0])}, [({"w": np.array([1.5])}, 1), ({"w": np.array([2.5])}, 3)])
    assert out["w"][0] == pytest.approx(2.25)
    # round 2 from 2.25: mean 2.75, delta 0.5; v = 0.9 * 1.25 + 0.5 = 1.625; x = 2.25 + 1.625
    out = strategy.aggregate(out, [({"w": np.array([2.75])}, 7)])
    assert out["w"][0] == pytest.approx(3.875)
    np.testing.assert_allclose(strategy.get_state()["v/w"], [1.625])


def test_fedadam_and_fedyogi_by_hand():
    base = {"w": np.array([0.0, 0.0])}
    ups = [({"w": np.array([1.0, -2.0])}, 1)]  # delta = (1, -2)
    for name in ("fedadam", "fedyogi"):
        strategy = build(name, eta=0.01)  # b1 0.9, b2 0.99, tau 1e-3 by default
        out = strategy.aggregate(base, ups)
        # m = 0.1 delta; v = 0.01 delta^2 (Yogi from v=0: v - 0.01 d^2 sign(-d^2) = 0.01 d^2)
        # x = 0.01 * 0.1 d / (0.1 |d| + 1e-3)
        expected = [0.01 * 0.1 / (0.1 + 1e-3), 0.01 * -0.2 / (0.2 + 1e-3)]
        np.testing.assert_allclose(out["w"], expected, rtol=1e-12)
        np.testing.assert_allclose(strategy.get_state()["m/w"], [0.1, -0.2], rtol=1e-12)
        np.testing.assert_allclose(strategy.get_state()["v/w"], [0.01, 0.04], rtol=1e-12)
    # second round, same client model again: delta = (1, -2) - x1. Adam and Yogi now differ.
    adam, yogi = build("fedadam", eta=0.01), build("fedyogi", eta=0.01)
    x1 = adam.aggregate(base, ups)
    yogi.aggregate(base, ups)
    adam.aggregate(x1, ups)
    yogi.aggregate(x1, ups)
    d = np.array([1.0, -2.0]) - x1["w"]
    np.testing.assert_allclose(adam.get_state()["v/w"], 0.99 * np.array([0.01, 0.04]) + 0.01 * d ** 2, rtol=1e-12)
    # Yogi: v = v - 0.01 d^2 sign(v - d^2); here d^2 > v, so v grows by 0.01 d^2
    np.testing.assert_allclose(yogi.get_state()["v/w"], np.array([0.01, 0.04]) + 0.01 * d ** 2, rtol=1e-12)


def test_fedadagrad_by_hand():
    strategy = build("fedadagrad", eta=1.0, tau=0.5)
    out = strategy.aggregate({"w": np.array([2.0])}, [({"w": np.array([4.0])}, 1)])  # delta 2
    # m = 0.2, v = 4, x = 2 + 0.2 / (2 + 0.5)
    assert out["w"][0] == pytest.approx(2.08)
    out = strategy.aggregate({"w": np.array([2.0])}, [({"w": np.array([2.0])}, 1)])  # delta 0
    # m = 0.18, v = 4, x = 2 + 0.18 / 2.5
    assert out["w"][0] == pytest.approx(2.072)
    np.testing.assert_allclose(strategy.get_state()["v/w"], [4.0])


def test_yogi_second_moment_shrinks_slowly():
    from fl_tasks.aggregation import server_opt

    v = np.array([1.0, 0.25, 0.0])
    d = np.array([0.5, 0.5, 0.0])  # d^2 = 0.25: v > d^2 shrinks; v == d^2 stays; 0 stays
    np.testing.assert_allclose(server_opt.yogi_second_moment(v, d, 0.9), [1.0 - 0.025, 0.25, 0.0])


def test_integer_buffers_are_the_rounded_weighted_mean():
    base = {"w": np.zeros(1), "n": np.array(10, dtype=np.int64)}
    ups = [({"w": np.ones(1), "n": np.array(10, dtype=np.int64)}, 1),
           ({"w": np.ones(1), "n": np.array(15, dtype=np.int64)}, 3)]
    for name in OPTIMISERS:
        strategy = build(name)
        out = strategy.aggregate(base, ups)
        assert out["n"].dtype == np.int64 and int(out["n"]) == 14  # 13.75, not optimised, not zeroed
        assert set(strategy.get_state()) <= {"m/w", "v/w"}  # no state for integer buffers


def test_fedavgm_without_momentum_is_fedavg():
    rng = np.random.default_rng(0)
    base = model(rng, dtype=np.float32)
    ups = client_round(rng, base)
    a = build("fedavgm", eta=1.0, momentum=0.0).aggregate(base, ups)
    b = build("fedavg").aggregate(base, ups)
    for key in base:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-6)


# --- against the reference, several rounds ---------------------------------------------------------------


@pytest.mark.parametrize("name,params", PARAMS)
def test_three_rounds_match_the_reference(name, params):
    rng = np.random.default_rng(zlib.crc32(repr((name, params)).encode()))
    strategy = build(name, **params)
    base = model(rng)
    ref_state = {}
    for _ in range(3):
        ups = client_round(rng, base)
        out = strategy.aggregate(base, iter(ups))
        ref, ref_state = ref_round(name, params, base, ups, ref_state)
        assert_matches(out, ref, base)
        state = strategy.get_state()
        assert set(state) == set(ref_state)
        for key, value in ref_state.items():
            np.testing.assert_allclose(state[key], np.reshape(value, state[key].shape), rtol=1e-10, atol=1e-15)
        base = out


@pytest.mark.parametrize("name", OPTIMISERS)
def test_state_carried_outside_equals_one_object(name):
    rng = np.random.default_rng(7)
    base0 = model(rng, dtype=np.float32)
    round1 = client_round(rng, base0, n=3)

    one = build(name)
    x1 = one.aggregate(base0, round1)
    round2 = client_round(rng, x1, n=5)
    x2 = one.aggregate(x1, round2)

    first = build(name)
    y1 = first.aggregate(base0, round1)
    saved = encode_state(first.get_state())  # what the coordinator stores between rounds
    second = build(name)
    second.set_state(decode_state(saved))
    y2 = second.aggregate(y1, round2)

    for key in base0:
        np.testing.assert_array_equal(y1[key], x1[key])
        np.testing.assert_array_equal(y2[key], x2[key])
    for key, value in one.get_state().items():
        np.testing.assert_array_equal(second.get_state()[key], value)
    # without the state, round 2 is different (the moments matter)
    fresh = build(name).aggregate(y1, round2)
    assert not all(np.array_equal(fresh[k], x2[k]) for k in SHAPES)


@pytest.mark.parametrize("name", OPTIMISERS)
def test_state_names_dtypes_and_fresh_start(name):
    rng = np.random.default_rng(3)
    base = model(rng, dtype=np.float32)
    base["half"] = np.zeros(2, dtype=np.float16)
    strategy = build(name)
    assert strategy.stateful is True and strategy.get_state() == {}
    out = strategy.aggregate(base, [({k: v.copy() for k, v in base.items()}, 1)])
    slots = ("v",) if name == "fedavgm" else ("m", "v")
    floating = ["b", "half", "s", "w"]
    assert sorted(strategy.get_state()) == sorted(f"{s}/{k}" for s in slots for k in floating)
    for key, value in strategy.get_state().items():
        tensor = key.partition("/")[2]
        assert value.shape == base[tensor].shape
        assert value.dtype == (np.float32 if base[tensor].dtype != np.float64 else np.float64)
        np.testing.assert_array_equal(value, 0)  # clients returned the base: zero pseudo-gradient
    for key in base:
        assert out[key].dtype == base[key].dtype
        np.testing.assert_array_equal(out[key], base[key])
    # set_state({}) restarts from zeros
    strategy.set_state({})
    assert strategy.get_state() == {}


def test_stateless_strategies_say_so():
    for name in ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"):
        assert build(name).stateful is False


def test_classes_and_defaults():
    assert isinstance(build("fedavgm"), FedAvgM) and isinstance(build("fedadam"), FedAdam)
    assert isinstance(build("fedyogi"), FedYogi) and isinstance(build("fedadagrad"), FedAdagrad)
    m = build("fedavgm")
    assert (m.eta, m.momentum) == (0.3, 0.9)
    for name in ("fedadam", "fedyogi"):
        s = build(name)
        assert (s.eta, s.beta1, s.beta2, s.tau) == (0.03, 0.9, 0.99, 1e-3)
    s = build("fedadagrad")
    assert (s.eta, s.beta1, s.tau) == (0.3, 0.9, 1e-3)


# --- errors ---------------------------------------------------------------------------------------------


def never_read():
    raise AssertionError("an update was read")
    yield  # pragma: no cover


def test_state_for_another_model_fails_before_reading_updates():
    strategy = build("fedadam")
    strategy.set_state({"m/w": np.zeros(2, dtype=np.float32), "v/w": np.zeros(2, dtype=np.float32)})
    with pytest.raises(ValueError) as info:
        strategy.aggregate({"w": np.zeros(2, dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}, never_read())
    assert str(info.value) == "fedadam state does not match the base model: missing ['m/b', 'v/b'], unexpected []"
    with pytest.raises(ValueError, match=r"fedadam state 'm/w' has shape \(2,\), expected \(3,\)"):
        strategy.aggregate({"w": np.zeros(3, dtype=np.float32)}, never_read())


def test_set_state_rejects_unknown_entries():
    with pytest.raises(ValueError, match=r"fedavgm state has unknown entries \['m/w'\]; expected 'v/<tensor>'"):
        build("fedavgm").set_state({"m/w": np.zeros(1)})
    with pytest.raises(ValueError, match=r"unknown entries \['w'\]"):
        build("fedyogi").set_state({"w": np.zeros(1)})


def test_failed_round_leaves_the_state_untouched():
    strategy = build("fedyogi")
    base = {"w": np.zeros(2)}
    strategy.aggregate(base, [({"w": np.ones(2)}, 1)])
    before = strategy.get_state()
    with pytest.raises(ValueError, match="shape"):
        strategy.aggregate(base, [({"w": np.ones(2)}, 1), ({"w": np.ones(3)}, 1)])
    with pytest.raises(ValueError, match="no updates"):
        strategy.aggregate(base, [])
    after = strategy.get_state()
    assert set(after) == set(before) and all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("name,params,message", [
    ("fedavgm", {"eta": 0}, "fedavgm: eta must be > 0, got 0"),
    ("fedavgm", {"momentum": 1.0}, "fedavgm: momentum must satisfy 0 <= momentum < 1, got 1.0"),
    ("fedadam", {"beta1": -0.1}, "fedadam: beta1 must satisfy 0 <= beta1 < 1, got -0.1"),
    ("fedyogi", {"beta2": 1}, "fedyogi: beta2 must satisfy 0 <= beta2 < 1, got 1"),
    ("fedadagrad", {"tau": 0.0}, "fedadagrad: tau must be > 0, got 0.0"),
    ("fedadam", {"eta": "big"}, "fedadam: eta must be a number, got 'big'"),
    ("fedadam", {"eta": float("inf")}, "fedadam: eta must be finite, got inf"),
])
def test_bad_parameters(name, params, message):
    with pytest.raises(ValueError) as info:
        build(name, **params)
    assert str(info.value) == message


def test_fedadagrad_takes_no_beta2():
    with pytest.raises(ValueError, match=r"strategy 'fedadagrad' does not take parameters \['beta2'\]; "
                                         r"allowed: eta, beta1, tau"):
        build("fedadagrad", beta2=0.9)


# --- memory: the weighted mean is streamed ---------------------------------------------------------------


def test_server_optimiser_streams_the_updates():
    shape = (512, 256)  # 128k floats

    def lazy(n):
        for i in range(n):
            yield {"w": np.random.default_rng(i).standard_normal(shape, dtype=np.float32)}, 10 + i

    base = {"w": np.zeros(shape, dtype=np.float32)}

    def peak(n):
        strategy = build("fedadam")
        gc.collect()
        tracemalloc.start()
        try:
            strategy.aggregate(base, lazy(n))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak_2, peak_16 = peak(2), peak(16)
    assert peak_16 < 1.3 * peak_2, (peak_2, peak_16)
