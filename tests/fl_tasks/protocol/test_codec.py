"""fl_tasks/protocol/codec.py: safetensors payloads round-trip exactly and never unpickle anything."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fl_tasks.protocol.codec import CODECS, CodecError, decode_state, encode_state


def sample_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "net.0.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "net.0.bias": rng.standard_normal(4).astype(np.float32),
        "net.1.running_mean": rng.standard_normal(4).astype(np.float32),
        "net.1.num_batches_tracked": np.array(17, dtype=np.int64),  # 0-d, like torch's batch-norm counter
        "double": rng.standard_normal((2, 2, 2)),
        "empty": np.zeros((0, 5), dtype=np.float32),
    }


def test_round_trip_preserves_values_dtypes_and_shapes():
    state = sample_state()
    decoded = decode_state(encode_state(state))
    assert set(decoded) == set(state)
    for name, value in state.items():
        assert decoded[name].dtype == value.dtype, name
        assert decoded[name].shape == value.shape, name
        np.testing.assert_array_equal(decoded[name], value)


def test_zero_dim_counter_stays_zero_dim():
    decoded = decode_state(encode_state({"n": np.array(5, dtype=np.int64)}))
    assert decoded["n"].shape == ()
    assert decoded["n"].dtype == np.int64
    assert int(decoded["n"]) == 5


def test_numpy_scalar_and_non_contiguous_input():
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = {"t": base.T, "s": np.float32(2.5)}  # transposed view: not C-contiguous; a numpy scalar
    decoded = decode_state(encode_state(state))
    np.testing.assert_array_equal(decoded["t"], base.T)
    assert decoded["t"].shape == (4, 3)
    assert decoded["s"].shape == () and decoded["s"].dtype == np.float32 and float(decoded["s"]) == 2.5


def test_encoding_is_deterministic():
    assert encode_state(sample_state()) == encode_state(sample_state())


def test_pickle_bytes_rejected():
    data = pickle.dumps({"net.0.weight": np.zeros((4, 3), dtype=np.float32)})
    with pytest.raises(CodecError, match="not a valid safetensors file"):
        decode_state(data)


@pytest.mark.parametrize("cut", [1, 8, 20, -1, -16])
def test_truncated_payload_rejected(cut):
    data = encode_state(sample_state())
    with pytest.raises(CodecError):
        decode_state(data[:cut])


@pytest.mark.parametrize("data", [b"", b"\x00" * 8, b"garbage that is not a safetensors file"])
def test_garbage_rejected(data):
    with pytest.raises(CodecError):
        decode_state(data)


def test_unknown_codec_rejected():
    assert CODECS == ("fp32",)
    with pytest.raises(CodecError, match="unknown codec 'int8'"):
        encode_state(sample_state(), codec="int8")
    with pytest.raises(CodecError, match="unknown codec 'pickle'"):
        decode_state(encode_state(sample_state()), codec="pickle")


def test_codec_error_is_a_value_error():
    assert issubclass(CodecError, ValueError)
