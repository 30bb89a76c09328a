"""fl_tasks/protocol/codec.py: safetensors payloads round-trip exactly and never unpickle anything;
compressed updates decode within each codec's error bound, and hostile ones are refused by name."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load, save

from fl_tasks.protocol.codec import CODECS, Codec, CodecError, decode_state, decode_update, encode_state, encode_update


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
    assert CODECS == ("fp32", "fp16", "bf16", "int8", "topk")
    with pytest.raises(CodecError, match="unknown codec 'pickle'"):
        decode_state(encode_state(sample_state()), codec="pickle")
    # Full weights are fp32's format; the compressed codecs need the base to decode against.
    with pytest.raises(CodecError, match="codec 'int8' sends the change from the base model"):
        encode_state(sample_state(), codec="int8")


def test_codec_error_is_a_value_error():
    assert issubclass(CodecError, ValueError)


# --- codec names ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, codec, canonical", [
    ("fp32", Codec("fp32"), "fp32"),
    ("fp16", Codec("fp16"), "fp16"),
    ("bf16", Codec("bf16"), "bf16"),
    ("int8", Codec("int8"), "int8"),
    ("int8:channel", Codec("int8", scale="channel"), "int8:channel"),
    ("topk:0.01", Codec("topk", fraction=0.01), "topk:0.01"),
    ("topk:0.010", Codec("topk", fraction=0.01), "topk:0.01"),
    ("topk:1e-2", Codec("topk", fraction=0.01), "topk:0.01"),
    ("topk:.5", Codec("topk", fraction=0.5), "topk:0.5"),
    ("topk:1", Codec("topk", fraction=1.0), "topk:1.0"),
])
def test_codec_parse_and_canonical_text(text, codec, canonical):
    assert Codec.parse(text) == codec
    assert codec.text == canonical
    assert Codec.parse(canonical) == codec


@pytest.mark.parametrize("text, message", [
    ("pickle", "unknown codec 'pickle'; allowed: fp32, fp16, bf16, int8, int8:channel, topk:<fraction>"),
    ("", "unknown codec ''"),
    ("FP16", "unknown codec 'FP16'"),
    ("fp16:channel", "unknown codec 'fp16:channel'"),
    ("int8:row", "unknown codec 'int8:row'"),
    ("int4", "unknown codec 'int4'"),
    ("topk", "unknown codec 'topk'"),
    ("topk:", "the top-k fraction must be a number in (0, 1]"),
    ("topk:0", "the top-k fraction must be a number in (0, 1]"),
    ("topk:1.5", "the top-k fraction must be a number in (0, 1]"),
    ("topk:-0.1", "the top-k fraction must be a number in (0, 1]"),
    ("topk:nan", "the top-k fraction must be a number in (0, 1]"),
    ("topk:inf", "the top-k fraction must be a number in (0, 1]"),
    ("topk: 0.1", "the top-k fraction must be a number in (0, 1]"),
    ("topk:1_0", "the top-k fraction must be a number in (0, 1]"),
    (5, "codec 5 is not a string"),
])
def test_bad_codec_names_are_refused_with_the_allowed_forms(text, message):
    with pytest.raises(CodecError) as err:
        Codec.parse(text)
    assert message in str(err.value)


def test_bad_codec_objects_are_refused():
    with pytest.raises(CodecError, match="only int8 takes ':channel'"):
        Codec("fp16", scale="channel")
    with pytest.raises(CodecError, match="topk needs a fraction"):
        Codec("topk")
    with pytest.raises(CodecError, match="must be a number in"):
        Codec("topk", fraction=2.0)


@pytest.mark.parametrize("text, size, k", [
    ("topk:0.01", 4097, 41), ("topk:0.1", 4097, 410), ("topk:0.07", 100, 7),  # 0.07 * 100 is 7.000000000000001 in binary
    ("topk:1e-9", 10, 1), ("topk:1", 10, 10), ("topk:0.5", 0, 0),
])
def test_topk_k(text, size, k):
    assert Codec.parse(text).k(size) == k


def test_reading_codec_names_imports_no_numpy():
    """The federation config and the manifests parse codec names: DAG files stay light."""
    code = ("import sys, fl_tasks.config, fl_tasks.protocol; from fl_tasks.protocol.codec import Codec; "
            "Codec.parse('topk:0.01'); print('numpy' in sys.modules, 'safetensors' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --- compressed updates: what they send and the error bounds --------------------------------

ALL = ["fp32", "fp16", "bf16", "int8", "int8:channel", "topk:0.1", "topk:1"]


def small_base() -> dict[str, np.ndarray]:
    """Floating tensors of several shapes (0-d, empty, float64 included) and integer ones."""
    rng = np.random.default_rng(1)
    return {
        "net.0.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "net.0.bias": rng.standard_normal(4).astype(np.float32),
        "net.1.num_batches_tracked": np.array(17, dtype=np.int64),
        "double": rng.standard_normal((2, 2, 2)),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "scalar": np.array(0.25, dtype=np.float32),
        "mask": np.array([True, False, True]),
    }


def trained_from(base: dict[str, np.ndarray], scale: float = 0.01, seed: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (value + rng.normal(0, scale, value.shape)).astype(value.dtype)
            if np.issubdtype(value.dtype, np.floating) else value + 5 if value.dtype != bool else ~value
            for name, value in base.items()}


def zeros_like(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.zeros_like(value) for name, value in state.items()}


def floats_of(state: dict[str, np.ndarray]) -> np.ndarray:
    """The floating tensors as one float64 vector in the packed order (sorted names)."""
    names = sorted(n for n, v in state.items() if np.issubdtype(v.dtype, np.floating))
    return np.concatenate([np.asarray(state[n], dtype=np.float64).reshape(-1) for n in names])


def round_trip(state, base, text):
    payload = encode_update(state, base, text).payload
    return payload, decode_update(payload, text, base)


@pytest.mark.parametrize("text", ALL)
def test_decoded_update_has_the_bases_names_order_dtypes_and_shapes(text):
    base = small_base()
    _, decoded = round_trip(trained_from(base), base, text)
    assert sorted(decoded) == sorted(base)
    if text != "fp32":
        assert list(decoded) == list(base)
    for name, value in base.items():
        assert decoded[name].dtype == value.dtype and decoded[name].shape == value.shape, name


@pytest.mark.parametrize("text", ALL)
def test_integer_and_bool_tensors_pass_through(text):
    base = small_base()
    state = trained_from(base)
    payload, decoded = round_trip(state, base, text)
    assert int(decoded["net.1.num_batches_tracked"]) == 22 and decoded["net.1.num_batches_tracked"].shape == ()
    np.testing.assert_array_equal(decoded["mask"], [False, True, False])
    if text != "fp32":
        assert {k for k in load(payload) if k.startswith("raw/")} == {"raw/net.1.num_batches_tracked", "raw/mask"}


@pytest.mark.parametrize("text, keys", [
    ("fp16", {"delta": ("float16", 21)}),
    ("bf16", {"delta": ("uint16", 21)}),
    ("int8", {"q": ("int8", 21), "scale": ("float32", 5)}),  # one per floating tensor
    # double: 2 rows, net.0.bias: 1, empty: 0 rows, scalar: 1, x.weight: 2 rows
    ("int8:channel", {"q": ("int8", 21), "scale": ("float32", 6)}),
    ("topk:0.1", {"indices": ("int32", 3), "values": ("float32", 3)}),  # ceil(2.1)
])
def test_packed_layout(text, keys):
    base = {"net.0.bias": np.ones(4, np.float32), "double": np.ones((2, 2, 2)), "empty": np.zeros((0, 5), np.float32),
            "scalar": np.array(0.5, np.float32), "x.weight": np.ones((2, 4), np.float32)}  # d = 4 + 8 + 0 + 1 + 8
    tensors = load(encode_update(trained_from(base), base, text).payload)
    assert {k: (str(v.dtype), v.shape[0]) for k, v in tensors.items()} == keys


def test_fp16_relative_error_is_within_half_an_ulp():
    base = {"w": np.zeros(10_000, np.float32)}
    rng = np.random.default_rng(3)
    change = (rng.standard_normal(10_000) * np.exp(rng.uniform(-8, 4, 10_000))).astype(np.float32)
    _, decoded = round_trip({"w": change}, base, "fp16")
    got, want = decoded["w"].astype(np.float64), change.astype(np.float64)
    normal = np.abs(want) >= 2.0 ** -14  # float16's smallest normal number
    assert normal.sum() > 9000
    assert (np.abs(got - want)[normal] <= 2.0 ** -11 * np.abs(want)[normal]).all()
    assert (np.abs(got - want)[~normal] <= 2.0 ** -25).all()  # subnormals: half of float16's smallest step


def test_bf16_relative_error_is_within_half_an_ulp_and_rounds_to_nearest_even():
    import torch

    base = {"w": np.zeros(10_000, np.float32)}
    rng = np.random.default_rng(4)
    change = (rng.standard_normal(10_000) * np.exp(rng.uniform(-20, 10, 10_000))).astype(np.float32)
    # Ties: exactly halfway between two bfloat16 values, one of each parity.
    change[:2] = np.array([0x3F808000, 0x3F818000], dtype=np.uint32).view(np.float32)
    _, decoded = round_trip({"w": change}, base, "bf16")
    got, want = decoded["w"].astype(np.float64), change.astype(np.float64)
    assert (np.abs(got - want) <= 2.0 ** -8 * np.abs(want)).all()
    np.testing.assert_array_equal(decoded["w"], torch.from_numpy(change).to(torch.bfloat16).float().numpy())
    assert decoded["w"][:2].view(np.uint32).tolist() == [0x3F800000, 0x3F820000]  # down to even, up to even


def test_int8_per_tensor_scales_by_hand():
    base = {"b": np.zeros(3, np.float32), "w": np.zeros((2, 3), np.float32)}
    state = {"b": np.array([0.1, -0.05, 0.0], np.float32),  # max |x| 0.1
             "w": np.array([[0.5, -1.27, 0.1], [0.0, 0.3, -0.2]], np.float32)}  # max |x| 1.27
    payload, decoded = round_trip(state, base, "int8")
    tensors = load(payload)
    np.testing.assert_allclose(tensors["scale"], [0.1 / 127, 1.27 / 127], rtol=1e-7)  # sorted names: b, w
    np.testing.assert_array_equal(tensors["q"][:3], [127, -64, 0])  # 0.05 / (0.1/127) = 63.5: rounds to even
    np.testing.assert_array_equal(tensors["q"][3:], [50, -127, 10, 0, 30, -20])
    for name, scale in (("b", 0.1 / 127), ("w", 1.27 / 127)):
        assert (np.abs(decoded[name] - state[name]) <= scale / 2 * (1 + 1e-6)).all(), name


def test_int8_per_channel_scales_by_hand():
    base = {"b": np.zeros(3, np.float32), "w": np.zeros((2, 3), np.float32), "z": np.zeros((2, 2), np.float32)}
    state = {"b": np.array([0.1, -0.05, 0.0], np.float32),
             "w": np.array([[0.5, -1.27, 0.1], [0.0, 0.3, -0.2]], np.float32),  # rows: max 1.27, max 0.3
             "z": np.zeros((2, 2), np.float32)}  # all zero: scale 0, q 0
    payload, decoded = round_trip(state, base, "int8:channel")
    tensors = load(payload)
    np.testing.assert_allclose(tensors["scale"], [0.1 / 127, 1.27 / 127, 0.3 / 127, 0, 0], rtol=1e-7)
    np.testing.assert_array_equal(tensors["q"][3:9], [50, -127, 10, 0, 127, -85])  # -0.2/(0.3/127) = -84.67
    assert (np.abs(decoded["w"][0] - state["w"][0]) <= 1.27 / 127 / 2 * (1 + 1e-6)).all()
    assert (np.abs(decoded["w"][1] - state["w"][1]) <= 0.3 / 127 / 2 * (1 + 1e-6)).all()
    np.testing.assert_array_equal(decoded["z"], 0)


@pytest.mark.parametrize("text", ["int8", "int8:channel"])
def test_int8_error_is_at_most_half_a_scale_on_random_tensors(text):
    base = small_base()
    state = trained_from(base, scale=0.05)
    payload, decoded = round_trip(state, zeros_like(base), text)  # base zero: the update is the change
    scales = iter(load(payload)["scale"])
    bounds = []  # each element's scale, in the packed order
    for name in sorted(n for n, v in state.items() if np.issubdtype(v.dtype, np.floating)):
        value = state[name]
        if text == "int8:channel" and value.ndim >= 2:
            bounds += [np.full(value[row].size, next(scales)) for row in range(value.shape[0])]
        else:
            bounds.append(np.full(value.size, next(scales)))
    bound = np.concatenate(bounds)
    assert (np.abs(floats_of(decoded) - floats_of(state)) <= bound / 2 * (1 + 1e-6)).all()


def test_topk_sends_the_k_largest_changes_exactly_and_nothing_else():
    rng = np.random.default_rng(5)
    base = {"a": np.zeros((30, 10), np.float32), "b": np.zeros(100, np.float32), "c": np.zeros((), np.float32)}
    signs = rng.choice([-1.0, 1.0], 401)
    change = (signs * rng.permutation(np.linspace(0.001, 1, 401))).astype(np.float32)  # distinct magnitudes
    state = {"a": change[:300].reshape(30, 10), "b": change[300:400], "c": change[400].reshape(())}
    payload, decoded = round_trip(state, base, "topk:0.05")  # k = ceil(20.05) = 21
    flat, sent = floats_of(state), floats_of(decoded)
    top = np.argsort(-np.abs(flat), kind="stable")[:21]
    np.testing.assert_array_equal(sent[top], flat[top])
    rest = np.ones(flat.size, bool)
    rest[top] = False
    np.testing.assert_array_equal(sent[rest], 0)
    assert sorted(load(payload)["indices"].tolist()) == sorted(top.tolist())


@pytest.mark.parametrize("text", ["fp16", "bf16", "int8", "int8:channel", "topk:1"])
def test_decoded_update_is_base_plus_the_decoded_change(text):
    """On a real base, in the base's precision: one rounding of base + change."""
    base = small_base()
    state = trained_from(base)
    _, on_zero = round_trip(state_minus(state, base), zeros_like(base), text)
    _, decoded = round_trip(state, base, text)
    for name, value in base.items():
        if np.issubdtype(value.dtype, np.floating):
            expected = (value.astype(np.float64) + on_zero[name]).astype(value.dtype)
            np.testing.assert_allclose(decoded[name], expected, rtol=0, atol=4 * np.finfo(value.dtype).eps, err_msg=name)


def state_minus(state, base):
    return {n: (v - base[n]).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v for n, v in state.items()}


def test_fp32_update_is_the_full_weights_as_before():
    base = small_base()
    state = trained_from(base)
    encoded = encode_update(state, base, "fp32")
    assert encoded.payload == encode_state(state) and encoded.residual is None
    decoded = decode_update(encoded.payload, Codec.parse("fp32"), base)
    for name, value in state.items():
        np.testing.assert_array_equal(decoded[name], value)


@pytest.mark.parametrize("text", ["fp16", "bf16", "int8", "int8:channel", "topk:0.1"])
def test_compressed_payloads_are_smaller(text):
    base = {"w": np.zeros((64, 64), np.float32)}
    state = trained_from(base)
    ratio = len(encode_state(state)) / len(encode_update(state, base, text).payload)
    # One safetensors header (about 120 bytes) for the whole model keeps int8 near its 4x.
    assert ratio > {"fp16": 1.95, "bf16": 1.95, "int8": 3.85, "int8:channel": 3.5, "topk:0.1": 4.5}[text]


def test_encoder_refuses_what_it_cannot_send():
    base = small_base()
    state = trained_from(base)
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode_update({**state, "scalar": np.array(np.nan, np.float32)}, base, "int8")
    with pytest.raises(CodecError, match="beyond float16's range"):
        encode_update({**state, "scalar": np.array(1e5, np.float32)}, base, "fp16")
    with pytest.raises(CodecError, match="tensor names differ from the base model"):
        encode_update({k: v for k, v in state.items() if k != "scalar"}, base, "int8")
    with pytest.raises(CodecError, match="the residual's tensor 'double' has shape"):
        encode_update(state, base, "topk:0.1", residual={"net.0.weight": np.zeros((4, 3), np.float32),
                                                          "net.0.bias": np.zeros(4, np.float32),
                                                          "double": np.zeros(8, np.float32),
                                                          "empty": np.zeros((0, 5), np.float32),
                                                          "scalar": np.zeros((), np.float32)})


# --- hostile payloads -------------------------------------------------------------------------

D = 4097  # the fraud model's size: 6 float32 tensors


def fraud_like_base() -> dict[str, np.ndarray]:
    shapes = {"0.weight": (64, 30), "0.bias": (64,), "2.weight": (32, 64), "2.bias": (32,), "4.weight": (1, 32),
              "4.bias": (1,)}
    rng = np.random.default_rng(6)
    base = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    assert sum(v.size for v in base.values()) == D
    return base


def good(text: str, base: dict | None = None) -> dict[str, np.ndarray]:
    base = base or fraud_like_base()
    return load(encode_update(trained_from(base), base, text).payload)


def hostile(text: str, change) -> bytes:
    tensors = good(text)
    change(tensors)
    return save(tensors)


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


TOPK_K = Codec.parse("topk:0.01").k(D)  # 41


@pytest.mark.parametrize("text, change, reason", [
    ("int8", lambda t: t.pop("scale"), "int8 payload is missing tensors ['scale']"),
    ("int8", _set("backdoor", np.zeros(3, np.float32)), "int8 payload has unexpected tensors ['backdoor']"),
    ("fp16", lambda t: t.update(q=t.pop("delta")), "fp16 payload is missing tensors ['delta']; has unexpected tensors ['q']"),
    ("int8", _set("scale", np.full(5, 0.01, np.float32)), "int8 scale has shape (5,), expected (6,)"),
    ("int8:channel", _set("scale", np.full(6, 0.01, np.float32)), "int8:channel scale has shape (6,), expected (100,)"),
    ("int8", _set("scale", np.full((6, 1), 0.01, np.float32)), "int8 scale has shape (6, 1), expected (6,)"),
    ("int8", _set("scale", np.full(6, 0.01, np.float64)), "int8 scale has dtype float64, expected float32"),
    ("int8", _set("scale", np.array([0.01] * 5 + [-0.01], np.float32)), "int8 scale has a negative, NaN or Inf value"),
    ("int8", _set("scale", np.array([0.01] * 5 + [np.nan], np.float32)), "int8 scale has a negative, NaN or Inf value"),
    ("int8", _set("scale", np.array([0.01] * 5 + [np.inf], np.float32)), "int8 scale has a negative, NaN or Inf value"),
    ("int8", _set("q", np.zeros(D, np.int16)), "int8 q has dtype int16, expected int8"),
    ("int8", _set("q", np.zeros(D - 1, np.int8)), f"int8 q has shape ({D - 1},), expected ({D},)"),
    ("int8", _set("q", np.full(D, -128, np.int8)), "int8 q holds -128, outside -127..127"),
    ("fp16", _set("delta", np.zeros(D + 1, np.float16)), f"fp16 delta has shape ({D + 1},), expected ({D},)"),
    ("fp16", _set("delta", np.zeros(D, np.float32)), "fp16 delta has dtype float32, expected float16"),
    ("fp16", _set("delta", np.full(D, np.inf, np.float16)), "fp16 delta has NaN or Inf values"),
    ("fp16", _set("delta", np.full(D, np.nan, np.float16)), "fp16 delta has NaN or Inf values"),
    ("bf16", _set("delta", np.full(D, 0x7FC0, np.uint16)), "bf16 delta has NaN or Inf values"),  # NaN
    ("bf16", _set("delta", np.full(D, 0xFF80, np.uint16)), "bf16 delta has NaN or Inf values"),  # -inf
    ("topk:0.01", _set("indices", np.append(np.arange(TOPK_K - 1), 5000).astype(np.int32)),
     "index 5000 out of range 0..4096"),
    ("topk:0.01", _set("indices", np.append(np.arange(TOPK_K - 1), -1).astype(np.int32)),
     "index -1 out of range 0..4096"),
    ("topk:0.01", _set("indices", np.append(np.arange(TOPK_K - 1), 7).astype(np.int32)), "duplicate indices (7 twice)"),
    ("topk:0.01", lambda t: t.update(indices=np.arange(5000, dtype=np.int32), values=np.ones(5000, np.float32)),
     "k=5000 is larger than the 4097 parameters"),
    ("topk:0.01", lambda t: t.update(indices=np.arange(40, dtype=np.int32), values=np.ones(40, np.float32)),
     "k=40, but topk:0.01 of 4097 parameters sends k=41"),
    ("topk:0.01", _set("values", np.ones(TOPK_K - 1, np.float32)), f"values has shape ({TOPK_K - 1},), expected ({TOPK_K},)"),
    ("topk:0.01", _set("values", np.full(TOPK_K, np.nan, np.float32)), "topk:0.01 values has NaN or Inf values"),
    ("topk:0.01", _set("values", np.ones(TOPK_K, np.float64)), "values has dtype float64, expected float32"),
    ("topk:0.01", _set("indices", np.arange(TOPK_K, dtype=np.int64)), "indices has dtype int64, expected int32"),
    ("topk:0.01", _set("indices", np.arange(TOPK_K, dtype=np.int32).reshape(1, -1)), "indices has shape (1, 41)"),
])
def test_hostile_payload_is_refused_by_name(text, change, reason):
    with pytest.raises(CodecError) as err:
        decode_update(hostile(text, change), text, fraud_like_base())
    assert reason in str(err.value)


def test_raw_tensors_must_keep_the_bases_dtype_and_shape():
    base = small_base()
    tensors = good("int8", base)
    tensors["raw/net.1.num_batches_tracked"] = np.array(17, np.int32)
    with pytest.raises(CodecError, match=r"raw/net.1.num_batches_tracked is int32\[\], expected int64\[\]"):
        decode_update(save(tensors), "int8", base)
    tensors["raw/net.1.num_batches_tracked"] = np.array([17], np.int64)
    with pytest.raises(CodecError, match=r"is int64\[1\], expected int64\[\]"):
        decode_update(save(tensors), "int8", base)


@pytest.mark.parametrize("text", ["fp16", "bf16", "int8", "int8:channel", "topk:0.01"])
@pytest.mark.parametrize("data", [pickle.dumps({"q": np.zeros(3, np.int8)}), b"", b"\x00" * 8])
def test_compressed_garbage_is_refused(text, data):
    with pytest.raises(CodecError, match="not a valid safetensors file"):
        decode_update(data, text, fraud_like_base())


def test_an_update_decoded_with_another_codec_is_refused():
    base = fraud_like_base()
    payload = encode_update(trained_from(base), base, "fp16").payload
    with pytest.raises(CodecError, match=r"int8 payload is missing tensors \['q', 'scale'\]"):
        decode_update(payload, "int8", base)
    with pytest.raises(CodecError, match="bf16 delta has dtype float16, expected uint16"):
        decode_update(payload, "bf16", base)


def test_an_update_decoded_against_another_base_size_is_refused():
    base = fraud_like_base()
    payload = encode_update(trained_from(base), base, "int8").payload
    smaller = {**base, "4.bias": np.zeros(0, np.float32)}
    with pytest.raises(CodecError, match=r"int8 q has shape \(4097,\), expected \(4096,\)"):
        decode_update(payload, "int8", smaller)


@pytest.mark.parametrize("text", ["fp16", "bf16", "int8", "int8:channel", "topk:0.5"])
def test_exact_tensors_travel_as_they_are(text):
    """A variance that trained down to nearly zero: rounded as a change from 1 it could come
    out negative (and the coordinator would reject the update); named in `exact` it is sent as is."""
    base = {"bn.running_var": np.ones(64, np.float32), "w": np.zeros((8, 8), np.float32),
            "bn.num_batches_tracked": np.array(3, np.int64)}
    state = {"bn.running_var": np.full(64, 1e-6, np.float32), "w": np.full((8, 8), 0.3, np.float32),
             "bn.num_batches_tracked": np.array(4, np.int64)}
    state["bn.running_var"][0] = 0.9
    payload = encode_update(state, base, text, exact=["*running_var"]).payload
    assert "raw/bn.running_var" in load(payload)
    decoded = decode_update(payload, text, base, exact=["*running_var"])
    np.testing.assert_array_equal(decoded["bn.running_var"], state["bn.running_var"])
    assert list(decoded) == list(base)
    # Without it, the decoder expects the variance in the packed change: a mismatch is named.
    with pytest.raises(CodecError, match=r"payload has unexpected tensors \['raw/bn.running_var'\]"):
        decode_update(payload, text, base)


def _forged(header: dict, body: bytes) -> bytes:
    """A safetensors file with a hand-written header (what a hostile silo can send)."""
    import json

    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


@pytest.mark.parametrize("payload, reason", [
    (b"\x10\x00", "shorter than its 8-byte header length"),
    ((10**9).to_bytes(8, "little") + b"{}", "header length 1000000000 runs past"),
    (b"\x02" + b"\x00" * 7 + b"[]", "the header is not a JSON object"),
    (b"\x02" + b"\x00" * 7 + b"{x", "the header is not JSON"),
    (_forged({"q": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]},
              "scale": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, bytes(6)), "overlap"),
    (_forged({"q": {"dtype": "I8", "shape": [8], "data_offsets": [0, 8]}}, bytes(4)), "does not fit"),
    (_forged({"q": {"dtype": "PICKLE", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)), "no valid dtype"),
    (_forged({"q": {"dtype": "I8", "shape": [-4], "data_offsets": [0, 4]}}, bytes(4)), "does not fit"),
])
def test_the_in_place_reader_refuses_a_forged_header(payload, reason):
    base = {"w": np.zeros(4, np.float32)}
    with pytest.raises(CodecError, match="not a valid safetensors file") as error:
        decode_update(payload, "int8", base)
    assert reason in str(error.value)


def test_the_in_place_reader_reads_what_safetensors_writes_without_copying_the_payload():
    base = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, np.float32)}
    state = {"a": base["a"] + 0.5, "b": base["b"] - 0.25}
    payload = encode_update(state, base, "int8").payload
    from fl_tasks.protocol.codec import _views

    views = _views(payload)
    assert set(views) == {"q", "scale"} and not views["q"].flags.writeable
    np.testing.assert_array_equal(views["q"], load(payload)["q"])
    np.testing.assert_array_equal(views["scale"], load(payload)["scale"])
