"""fl_tasks/models.py: seeded model factory and numpy views of state dicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_tasks.config import ModelSpec
from fl_tasks.tasks.models import FraudMLP, build_model, flatten_state, load_numpy_state, state_to_numpy

SPEC = ModelSpec(input_dim=30, hidden=(16, 8), batch_norm=True)
SPEC_NO_BN = ModelSpec(input_dim=30, hidden=(16, 8), batch_norm=False)


def assert_states_equal(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_architecture_and_state_layout():
    model = build_model(SPEC, seed=0)
    assert isinstance(model, FraudMLP)
    state = state_to_numpy(model)
    shapes = {k: v.shape for k, v in state.items()}
    assert shapes == {
        "net.0.weight": (16, 30), "net.0.bias": (16,),
        "net.1.weight": (16,), "net.1.bias": (16,), "net.1.running_mean": (16,), "net.1.running_var": (16,),
        "net.1.num_batches_tracked": (),
        "net.3.weight": (8, 16), "net.3.bias": (8,),
        "net.4.weight": (8,), "net.4.bias": (8,), "net.4.running_mean": (8,), "net.4.running_var": (8,),
        "net.4.num_batches_tracked": (),
        "net.6.weight": (1, 8), "net.6.bias": (1,),
    }
    assert state["net.1.num_batches_tracked"].dtype == np.int64
    assert state["net.0.weight"].dtype == np.float32
    # One logit per row.
    assert model.eval()(torch.zeros(5, 30)).shape == (5,)


def test_without_batch_norm_there_are_no_buffers():
    state = state_to_numpy(build_model(SPEC_NO_BN, seed=0))
    assert list(state) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"]


def test_seeded_build_is_deterministic_and_seeds_differ():
    a = state_to_numpy(build_model(SPEC, seed=7))
    b = state_to_numpy(build_model(SPEC, seed=7))
    c = state_to_numpy(build_model(SPEC, seed=8))
    assert_states_equal(a, b)
    assert not np.array_equal(a["net.0.weight"], c["net.0.weight"])
    assert not np.array_equal(a["net.6.weight"], c["net.6.weight"])


def test_seeded_build_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(SPEC, seed=7)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


def test_unknown_factory_rejected():
    with pytest.raises(ValueError, match="unknown model factory 'resnet'"):
        build_model(ModelSpec(factory="resnet"))


def test_state_to_numpy_returns_copies():
    model = build_model(SPEC, seed=0)
    state = state_to_numpy(model)
    state["net.0.bias"][:] = 99.0
    assert not torch.any(model.state_dict()["net.0.bias"] == 99.0)


def test_numpy_state_round_trip():
    source = build_model(SPEC, seed=1)
    # Make the buffers non-default so that their transfer is visible.
    source.train()
    source(torch.randn(64, 30, generator=torch.Generator().manual_seed(0)))
    state = state_to_numpy(source)
    assert int(state["net.1.num_batches_tracked"]) == 1
    target = build_model(SPEC, seed=2)
    assert not np.array_equal(state_to_numpy(target)["net.0.weight"], state["net.0.weight"])
    returned = load_numpy_state(target, state)
    assert returned is target
    assert_states_equal(state_to_numpy(target), state)
    x = torch.randn(10, 30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_array_equal(source.eval()(x).numpy(), target.eval()(x).numpy())


def test_loaded_state_is_copied_not_shared():
    state = state_to_numpy(build_model(SPEC, seed=1))
    model = load_numpy_state(build_model(SPEC, seed=2), state)
    state["net.0.bias"][:] = 42.0
    assert not torch.any(model.state_dict()["net.0.bias"] == 42.0)


def test_load_rejects_missing_key():
    model = build_model(SPEC, seed=0)
    state = state_to_numpy(model)
    del state["net.4.num_batches_tracked"]
    with pytest.raises(ValueError, match=r"state keys differ from the model: \['net.4.num_batches_tracked'\]"):
        load_numpy_state(model, state)


def test_load_rejects_extra_key():
    model = build_model(SPEC, seed=0)
    state = state_to_numpy(model)
    state["evil"] = np.zeros(1, dtype=np.float32)
    with pytest.raises(ValueError, match=r"\['evil'\]"):
        load_numpy_state(model, state)


def test_load_rejects_wrong_shape():
    model = build_model(SPEC, seed=0)
    before = state_to_numpy(model)
    state = state_to_numpy(model)
    state["net.0.weight"] = np.zeros((30, 16), dtype=np.float32)
    with pytest.raises(ValueError, match=r"tensor 'net.0.weight' is \(30, 16\) torch.float32, expected \(16, 30\)"):
        load_numpy_state(model, state)
    assert_states_equal(state_to_numpy(model), before)  # nothing was loaded


@pytest.mark.parametrize("name, dtype", [("net.0.weight", np.float64), ("net.0.bias", np.float16),
                                         ("net.1.num_batches_tracked", np.int32),
                                         ("net.1.num_batches_tracked", np.float32)])
def test_load_rejects_wrong_dtype(name, dtype):
    model = build_model(SPEC, seed=0)
    state = state_to_numpy(model)
    state[name] = state[name].astype(dtype)
    with pytest.raises(ValueError, match=f"tensor '{name}'"):
        load_numpy_state(model, state)


def test_flatten_state_counts_floating_tensors_only():
    model = build_model(SPEC, seed=0)
    state = state_to_numpy(model)
    flat = flatten_state(state)
    num_params = sum(p.numel() for p in model.parameters())
    # 30*16+16 + 2*16 + 16*8+8 + 2*8 + 8+1 = 496 + 32 + 136 + 16 + 9 = 689 parameters,
    # plus running mean and var (2*16 + 2*8 = 48); the two int64 counters are left out.
    assert num_params == 689
    assert flat.shape == (689 + 48,)
    assert flat.dtype == np.float64
    floating = sum(v.size for v in state.values() if np.issubdtype(v.dtype, np.floating))
    assert flat.size == floating
    state_no_bn = state_to_numpy(build_model(SPEC_NO_BN, seed=0))
    assert flatten_state(state_no_bn).size == sum(p.numel() for p in build_model(SPEC_NO_BN).parameters())


def test_flatten_state_order_and_values():
    state = {"b": np.array([3.0, 4.0], dtype=np.float32), "a": np.array([[1.0], [2.0]]),
             "n": np.array(7, dtype=np.int64)}
    np.testing.assert_array_equal(flatten_state(state), [1.0, 2.0, 3.0, 4.0])  # sorted by key, counter excluded
    assert flatten_state({"n": np.array(7)}).shape == (0,)
    # Distances between models are computed on these vectors.
    other = {**state, "b": np.array([3.0, 8.0], dtype=np.float32)}
    assert np.linalg.norm(flatten_state(other) - flatten_state(state)) == 4.0
