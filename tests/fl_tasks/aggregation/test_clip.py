"""fl_tasks/aggregation clipping: client - base scaled to at most max_norm, before any strategy."""

from __future__ import annotations

import numpy as np
import pytest

from fl_tasks.aggregation import build, clip_update
from fl_tasks.aggregation.clip import Clipped, update_norm
from fl_tasks.aggregation.fedavg import FedAvg


def test_clip_by_hand():
    base = {"w": np.array([1.0, 1.0]), "b": np.array([0.0])}
    state = {"w": np.array([4.0, 5.0]), "b": np.array([0.0])}  # delta (3, 4, 0): norm 5
    out = clip_update(state, base, 1.0)
    np.testing.assert_allclose(out["w"], [1.6, 1.8], rtol=1e-15)
    np.testing.assert_array_equal(out["b"], [0.0])
    assert update_norm(out, base) == pytest.approx(1.0, rel=1e-15)
    assert update_norm(state, base) == 5.0


def test_within_the_bound_is_unchanged():
    base = {"w": np.array([1.0, 1.0])}
    state = {"w": np.array([4.0, 5.0])}
    for bound in (5.0, 6.0):
        out = clip_update(state, base, bound)
        assert out is not state and out["w"] is state["w"]


def test_exact_norms_on_random_float32_models():
    rng = np.random.default_rng(0)
    shapes = {"a": (30, 20), "b": (20,), "c": ()}
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    base["n"] = np.array(7, dtype=np.int64)
    for scale in (0.1, 1.0, 10.0):
        state = {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items() if k != "n"}
        state["n"] = np.array(99, dtype=np.int64)
        norm = update_norm(state, base)
        out = clip_update(state, base, 2.0)
        for k in base:
            assert out[k].dtype == base[k].dtype and out[k].shape == base[k].shape
        assert int(out["n"]) == 99  # integer buffers pass through
        if norm > 2.0:
            assert update_norm(out, base) == pytest.approx(2.0, rel=1e-5)  # up to float32 rounding
            # the direction is kept
            d_in = np.concatenate([(state[k].astype(np.float64) - base[k]).ravel() for k in "abc"])
            d_out = np.concatenate([(out[k].astype(np.float64) - base[k]).ravel() for k in "abc"])
            np.testing.assert_allclose(d_out, d_in * 2.0 / norm, rtol=1e-4, atol=1e-6)
        else:
            for k in base:
                np.testing.assert_array_equal(out[k], state[k])


def test_clip_errors():
    base = {"w": np.zeros(2)}
    for bound in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            clip_update({"w": np.ones(2)}, base, bound)
    with pytest.raises(ValueError, match="non-finite norm"):
        clip_update({"w": np.array([np.inf, 0.0])}, base, 1.0)
    with pytest.raises(ValueError, match=r"keys differ from the base model: \['w'\]"):
        clip_update({"v": np.ones(2)}, {"v": np.ones(2), "w": np.ones(2)}, 1.0)
    for bound in (0, -2.0):
        with pytest.raises(ValueError, match="clip_norm must be > 0"):
            build("fedavg", clip_norm=bound)


def test_build_with_clip_norm_clips_each_update_before_the_strategy():
    base = {"w": np.array([0.0, 0.0])}
    ups = [({"w": np.array([3.0, 4.0])}, 1), ({"w": np.array([0.0, -0.5])}, 1)]
    strategy = build("fedavg", clip_norm=1.0)
    assert isinstance(strategy, Clipped) and isinstance(strategy.inner, FedAvg)
    assert strategy.name == "fedavg" and strategy.stateful is False and strategy.clip_norm == 1.0
    out = strategy.aggregate(base, iter(ups))
    np.testing.assert_allclose(out["w"], [0.3, (0.8 - 0.5) / 2])
    # no clip_norm: the bare strategy
    assert isinstance(build("fedavg"), FedAvg) and isinstance(build("fedavg", clip_norm=None), FedAvg)


@pytest.mark.parametrize("name,params", [("median", {}), ("krum", {"f": 1}), ("bulyan", {"f": 1}),
                                         ("fedadam", {}), ("trimmed_mean", {"beta": 0.2})])
def test_clipping_applies_to_every_strategy(name, params):
    rng = np.random.default_rng(1)
    base = {"w": rng.standard_normal(6)}
    ups = [({"w": base["w"] + rng.standard_normal(6) * (1 + 10 * (i == 0))}, 1 + i) for i in range(7)]
    clipped = build(name, clip_norm=0.5, **params).aggregate(base, iter(ups))
    expected = build(name, **params).aggregate(base, [(clip_update(s, base, 0.5), n) for s, n in ups])
    np.testing.assert_allclose(clipped["w"], expected["w"], rtol=1e-12)


def test_clipped_stateful_strategy_passes_its_state_through():
    base = {"w": np.zeros(2)}
    strategy = build("fedadam", clip_norm=1.0)
    assert strategy.stateful is True and strategy.name == "fedadam"
    strategy.aggregate(base, [({"w": np.array([3.0, 4.0])}, 1)])  # clipped to (0.6, 0.8)
    state = strategy.get_state()
    np.testing.assert_allclose(state["m/w"], [0.06, 0.08])
    other = build("fedadam", clip_norm=1.0)
    other.set_state(state)
    assert other.inner.get_state().keys() == state.keys()


def test_clipping_keeps_streaming():
    produced = []

    def lazy():
        for i in range(5):
            produced.append(i)
            yield {"w": np.full(3, float(i))}, 1

    seen = []

    class Recorder:
        name = "recorder"
        stateful = False

        def aggregate(self, base, updates):
            for state, _ in updates:
                seen.append(len(produced))  # how many were read when this one arrived
            return base

    Clipped(Recorder(), 1.0).aggregate({"w": np.zeros(3)}, lazy())
    assert seen == [1, 2, 3, 4, 5]
