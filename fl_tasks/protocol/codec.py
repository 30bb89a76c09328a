"""Model payloads as safetensors: a plain tensor container, so reading one never runs code.

Nothing a client sends is ever unpickled or passed to `torch.load`.

Global models, candidates and `fp32` updates carry the full weights (`encode_state`,
`decode_state`). The compressed update codecs (`training.codec`) send the change from the
round's base model instead, since rounding full weights to 8 or 16 bits would wipe out a
round's small change. Every floating tensor of the base, in sorted-name order, is one slice
of a flat vector of d elements (one safetensors header for the whole model, not one per
tensor: on a 4,097-parameter model per-tensor headers would eat the savings):

    fp16          delta    float16[d]
    bf16          delta    uint16[d]: the top 16 bits of the float32, rounded to nearest even
    int8          q        int8[d] in -127..127, symmetric; scale float32[one per tensor]
    int8:channel  q        as int8; scale float32[one per row of each tensor of 2+ dims, one
                           per tensor of 0 or 1 dim]
    topk:<f>      indices  int32[k] (int64 when d >= 2**31), values float32[k]: the k =
                           max(1, ceil(f * d)) largest changes by magnitude over the whole vector

Integer and bool tensors (batch-norm counters) travel as they are, as `raw/<name>`, and so do
the floating tensors named by `exact` (the task's bounded tensors, `Task.tensor_ranges`: a
rounded batch-norm variance near zero could come out negative, and the coordinator would
reject the update). An update decodes to full weights (base + change) in the base's dtypes,
after checks that name what is wrong with a hostile payload (`CodecError`, which the
coordinator records as the reason).

Only the standard library is imported here at module level: the federation config and the
manifests parse codec names without loading numpy.
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

CODECS = ("fp32", "fp16", "bf16", "int8", "topk")
CODEC_FORMS = "fp32, fp16, bf16, int8, int8:channel, topk:<fraction> (0 < fraction <= 1, e.g. topk:0.01)"
# Elements per block of the decoder's widen-and-add: its float32 scratch (1 MiB) stays in cache.
BLOCK = 1 << 18
INT8_MAX = 127  # symmetric: -128 is never sent, so that q and -q are both representable
# A decimal number as people write it; float() alone would also take ' 0.1', '1_0', 'nan', 'inf'.
_FRACTION = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class CodecError(ValueError):
    """A payload is not a readable safetensors file of the expected codec, or a codec name
    is not one of CODEC_FORMS; the message says what is wrong."""


@dataclass(frozen=True)
class Codec:
    """One update codec: `name` in CODECS; int8's `scale` ("tensor" or "channel"); topk's
    `fraction` of the parameters sent."""

    name: str
    scale: str = "tensor"
    fraction: float | None = None

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise CodecError(f"unknown codec {self.name!r}; allowed: {CODEC_FORMS}")
        if self.scale not in ("tensor", "channel") or (self.scale == "channel" and self.name != "int8"):
            raise CodecError(f"codec {self.name!r} has no scale {self.scale!r}; only int8 takes ':channel'")
        if (self.fraction is not None) != (self.name == "topk"):
            raise CodecError("topk needs a fraction (e.g. topk:0.01) and the other codecs take none")
        if self.fraction is not None and not (isinstance(self.fraction, float) and 0 < self.fraction <= 1):
            raise CodecError(f"topk fraction {self.fraction!r} must be a number in (0, 1], e.g. topk:0.01")

    @classmethod
    def parse(cls, text: str) -> "Codec":
        """The codec `text` names (one of CODEC_FORMS); CodecError naming the problem otherwise."""
        if not isinstance(text, str):
            raise CodecError(f"codec {text!r} is not a string; allowed: {CODEC_FORMS}")
        name, colon, option = text.partition(":")
        if name in ("fp32", "fp16", "bf16") and not colon:
            return cls(name)
        if name == "int8" and (not colon or option == "channel"):
            return cls("int8", scale=option or "tensor")
        if name == "topk" and colon:
            if not _FRACTION.fullmatch(option) or not 0 < float(option) <= 1:
                raise CodecError(f"codec {text!r}: the top-k fraction must be a number in (0, 1], e.g. topk:0.01")
            return cls("topk", fraction=float(option))
        raise CodecError(f"unknown codec {text!r}; allowed: {CODEC_FORMS}")

    @property
    def text(self) -> str:
        """The canonical spelling, which parses back to this codec."""
        if self.name == "topk":
            return f"topk:{self.fraction!r}"
        return "int8:channel" if self.scale == "channel" else self.name

    @property
    def sends_change(self) -> bool:
        """False for fp32 (full weights), True for every codec that sends update - base."""
        return self.name != "fp32"

    def k(self, size: int) -> int:
        """How many of `size` parameters a topk update sends: max(1, ceil(fraction * size))."""
        if self.fraction is None:
            raise CodecError(f"codec {self.text!r} is not topk")
        # In decimal, as the fraction was written: 0.07 * 100 is 7.000000000000001 in binary.
        return min(size, max(1, math.ceil(Fraction(repr(self.fraction)) * size)))


def as_codec(codec: "Codec | str") -> Codec:
    return codec if isinstance(codec, Codec) else Codec.parse(codec)


# --- full weights -------------------------------------------------------------------------

def _full_weights(codec: "Codec | str") -> None:
    if as_codec(codec).sends_change:
        raise CodecError(f"codec {codec!r} sends the change from the base model, not full weights: use "
                         "encode_update / decode_update with the base")


def encode_state(state: dict[str, "np.ndarray"], codec: str = "fp32") -> bytes:
    import numpy as np
    from safetensors.numpy import save

    _full_weights(codec)
    # np.ascontiguousarray would turn 0-d tensors (batch-norm counters) into shape (1,).
    return save({name: np.asarray(value).copy(order="C") for name, value in state.items()})


def _load(data: bytes) -> dict[str, "np.ndarray"]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise CodecError(f"payload is not a valid safetensors file: {exc}") from None
    except (KeyError, TypeError) as exc:  # a dtype numpy cannot hold (BF16, F8_*): safetensors' numpy map misses it
        raise CodecError(f"payload has a tensor of unsupported dtype {exc}") from None


def _views(data: bytes) -> dict[str, "np.ndarray"]:
    """A safetensors payload's tensors as read-only views into `data`, without the copy that
    safetensors.numpy.load makes (a quarter of an int8 update's decoding time). Parsed
    strictly (`fl_tasks.protocol.ranges.parse_header`): an 8-byte header length, a JSON object
    of {dtype, shape, data_offsets}, every tensor inside the data and no two overlapping;
    anything else is a CodecError."""
    import numpy as np

    from fl_tasks.protocol.ranges import MAX_HEADER_BYTES, parse_header

    def bad(problem: str) -> CodecError:
        return CodecError(f"payload is not a valid safetensors file: {problem}")

    if len(data) < 8:
        raise bad("shorter than its 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, MAX_HEADER_BYTES):
        raise bad(f"header length {size} runs past the {len(data)} bytes")
    header = parse_header(data[:8], data[8:8 + size])
    buffer = memoryview(data)
    out, spans = {}, []
    for name, entry in header.tensors.items():
        if entry.stop > len(data):
            raise bad(f"tensor {name!r} does not fit its {entry.dtype} {list(entry.shape)} into bytes "
                      f"{entry.start - header.data_start}..{entry.stop - header.data_start} of "
                      f"{len(data) - header.data_start}")
        spans.append((entry.start, entry.stop, name))
        out[name] = np.frombuffer(buffer, entry.dtype, entry.size, entry.start).reshape(entry.shape)
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise bad(f"tensors {first!r} and {second!r} overlap")
    return out


def decode_state(data: bytes, codec: str = "fp32") -> dict[str, "np.ndarray"]:
    _full_weights(codec)
    return _load(data)


# --- updates as changes from the base -----------------------------------------------------

class Packing:
    """Where each floating tensor of the base sits in the flat vector of d elements (sorted
    names), and which tensors travel raw: integer and bool ones, and floating ones whose name
    matches a pattern (fnmatch) in `exact`."""

    def __init__(self, base: Mapping[str, "np.ndarray"], exact: Collection[str] = ()) -> None:
        import numpy as np

        self.base = base
        self.names = sorted(n for n, v in base.items() if np.issubdtype(np.asarray(v).dtype, np.floating)
                            and not any(fnmatch.fnmatchcase(n, pattern) for pattern in exact))
        packed = set(self.names)
        self.raw = [n for n in base if n not in packed]
        self.shapes = {n: np.shape(base[n]) for n in self.names}
        self.slices: dict[str, slice] = {}
        start = 0
        for name in self.names:
            size = math.prod(self.shapes[name])
            self.slices[name] = slice(start, start + size)
            start += size
        self.size = start

    def scale_rows(self, codec: Codec) -> list[int]:
        """int8 scales per floating tensor: 1, or under int8:channel its rows when it has 2+ dims."""
        return [self.shapes[n][0] if codec.scale == "channel" and len(self.shapes[n]) >= 2 else 1
                for n in self.names]

    def flatten(self, state: Mapping[str, "np.ndarray"], minus: Mapping[str, "np.ndarray"] | None = None) -> "np.ndarray":
        """The floating tensors of `state` (less `minus`'s) as one float32 vector."""
        import numpy as np

        flat = np.empty(self.size, dtype=np.float32)
        for name in self.names:
            value = np.asarray(state[name])
            if minus is not None:  # in the tensors' own precision, then rounded once to float32
                value = value - np.asarray(minus[name])
            flat[self.slices[name]] = value.reshape(-1)
        return flat

    def unflatten(self, flat: "np.ndarray") -> dict[str, "np.ndarray"]:
        """float32 tensors shaped like the base's floating ones, copied out of `flat`."""
        return {n: flat[self.slices[n]].reshape(self.shapes[n]).copy() for n in self.names}


@dataclass(frozen=True)
class EncodedUpdate:
    payload: bytes
    # topk with error feedback: what was not sent (float32, shaped like the base's floating
    # tensors), to be added to the next round's change; None for the other codecs.
    residual: dict[str, "np.ndarray"] | None


def _check_like_base(state: Mapping[str, "np.ndarray"], base: Mapping[str, "np.ndarray"], what: str) -> None:
    import numpy as np

    if set(state) != set(base):
        raise CodecError(f"{what} tensor names differ from the base model: {sorted(set(state) ^ set(base))}")
    for name, value in state.items():
        if np.shape(value) != np.shape(base[name]):
            raise CodecError(f"{what} tensor '{name}' has shape {np.shape(value)}, expected {np.shape(base[name])}")


def _to_bf16(flat: "np.ndarray") -> "np.ndarray":
    """The top 16 bits of each float32, rounded to nearest even (finite inputs)."""
    import numpy as np

    bits = flat.view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def _quantise(flat: "np.ndarray", packing: Packing, codec: Codec) -> tuple["np.ndarray", "np.ndarray"]:
    """(q, scale): symmetric int8 with scale = max|x| / 127 per tensor or per row (0: all zero)."""
    import numpy as np

    q = np.empty(packing.size, dtype=np.int8)
    scales = []
    for name, rows in zip(packing.names, packing.scale_rows(codec)):
        where = packing.slices[name]
        part = flat[where].reshape(rows, (where.stop - where.start) // rows if rows else 0)
        scale = (np.abs(part).max(axis=1, keepdims=True, initial=0.0) / INT8_MAX).astype(np.float32)
        ratio = np.divide(part, scale, out=np.zeros_like(part), where=scale > 0)
        q[where] = np.clip(np.rint(ratio), -INT8_MAX, INT8_MAX).reshape(-1)
        scales.append(scale.reshape(-1))
    return q, np.concatenate(scales) if scales else np.zeros(0, np.float32)


def _top_indices(flat: "np.ndarray", k: int) -> "np.ndarray":
    """The indices of the k largest magnitudes, ascending, int32 (int64 when d >= 2**31)."""
    import numpy as np

    if k >= flat.size:
        chosen = np.arange(flat.size)
    else:
        chosen = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
        chosen.sort()
    return chosen.astype(np.int32 if flat.size < 2**31 else np.int64)


def encode_update(state: Mapping[str, "np.ndarray"], base: Mapping[str, "np.ndarray"], codec: "Codec | str",
                  residual: Mapping[str, "np.ndarray"] | None = None, exact: Collection[str] = ()) -> EncodedUpdate:
    """The update payload of `state` (full trained weights) under `codec`: fp32 the weights as
    they are (`encode_state`), every other codec the change from `base`, except the tensors
    `exact` names (fnmatch patterns, e.g. the task's tensor_ranges), sent as they are. For
    topk, `residual` (what earlier rounds did not send; None: nothing) is added to the change
    before the top k are picked, and what is left unsent comes back in `residual` (error
    feedback)."""
    import numpy as np
    from safetensors.numpy import save

    codec = as_codec(codec)
    if not codec.sends_change:
        return EncodedUpdate(encode_state(dict(state)), None)
    _check_like_base(state, base, "the update's")
    packing = Packing(base, exact)
    flat = packing.flatten(state, minus=base)
    if not np.isfinite(flat).all():
        raise CodecError("the update has NaN or Inf values (or changes beyond float32's range): nothing to encode")
    tensors: dict[str, np.ndarray] = {f"raw/{n}": np.asarray(state[n], dtype=np.asarray(base[n]).dtype).copy(order="C")
                                      for n in packing.raw}
    left = None
    if codec.name == "fp16":
        with np.errstate(over="ignore"):  # refused just below, by name
            tensors["delta"] = flat.astype(np.float16)
        if not np.isfinite(tensors["delta"]).all():
            raise CodecError("a change is beyond float16's range (65504): use bf16, int8 or fp32")
    elif codec.name == "bf16":
        tensors["delta"] = _to_bf16(flat)
        if ((tensors["delta"] & 0x7F80) == 0x7F80).any():
            raise CodecError("a change rounds beyond bfloat16's range: use fp32")
    elif codec.name == "int8":
        tensors["q"], tensors["scale"] = _quantise(flat, packing, codec)
    else:
        if residual is not None:
            _check_like_base(residual, {n: base[n] for n in packing.names}, "the residual's")
            flat += packing.flatten(residual)
            if not np.isfinite(flat).all():
                raise CodecError("the change plus the residual is not finite: nothing to encode")
        indices = _top_indices(flat, codec.k(packing.size))
        tensors["indices"], tensors["values"] = indices, flat[indices]
        flat[indices] = 0
        left = packing.unflatten(flat)
    return EncodedUpdate(save(tensors), left)


def _decode_change(data: bytes, codec: Codec, packing: Packing) -> tuple[dict[str, "np.ndarray"], dict[str, "np.ndarray"]]:
    """(the codec's tensors, the raw tensors) of a payload, every length, dtype and value checked."""
    import numpy as np

    def fail(problem: str) -> CodecError:
        return CodecError(f"{codec.text} {problem}")

    tensors = _views(data)
    expected = {"fp16": ("delta",), "bf16": ("delta",), "int8": ("q", "scale"), "topk": ("indices", "values")}[codec.name]
    names = set(expected) | {f"raw/{n}" for n in packing.raw}
    if set(tensors) != names:
        missing, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
        raise fail("payload " + "; ".join(([f"is missing tensors {missing}"] if missing else [])
                                          + ([f"has unexpected tensors {extra}"] if extra else [])))
    raw = {}
    for name in packing.raw:
        value, ref = tensors[f"raw/{name}"], np.asarray(packing.base[name])
        if value.dtype != ref.dtype or value.shape != ref.shape:
            raise fail(f"raw/{name} is {value.dtype}{list(value.shape)}, expected {ref.dtype}{list(ref.shape)}")
        raw[name] = value.copy()  # a view into the payload: the decoded model owns its arrays
    d = packing.size

    def check(key: str, dtypes: tuple, length: int | None = None) -> "np.ndarray":
        value = tensors[key]
        if value.dtype not in [np.dtype(t) for t in dtypes]:
            raise fail(f"{key} has dtype {value.dtype}, expected {' or '.join(np.dtype(t).name for t in dtypes)}")
        if value.ndim != 1 or (length is not None and value.shape[0] != length):
            raise fail(f"{key} has shape {value.shape}, expected ({'k' if length is None else length},)")
        return value

    if codec.name in ("fp16", "bf16"):
        delta = check("delta", (np.float16,) if codec.name == "fp16" else (np.uint16,), d)
        # Inf and NaN are the all-ones exponent: an integer test, no float pass over d.
        exponent = 0x7C00 if codec.name == "fp16" else 0x7F80
        if ((delta.view(np.uint16) & exponent) == exponent).any():
            raise fail("delta has NaN or Inf values")
    elif codec.name == "int8":
        q = check("q", (np.int8,), d)
        rows = packing.scale_rows(codec)
        scale = tensors["scale"]
        if scale.shape != (sum(rows),):
            raise fail(f"scale has shape {scale.shape}, expected ({sum(rows)},)")
        check("scale", (np.float32,))
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise fail("scale has a negative, NaN or Inf value")
        lowest = _threaded_min(q) if d else 0
        if lowest < -INT8_MAX:
            raise fail(f"q holds {lowest}, outside -{INT8_MAX}..{INT8_MAX}")
    else:
        width = np.int32 if d < 2**31 else np.int64
        indices = check("indices", (width,))
        k = indices.shape[0]
        values = check("values", (np.float32,), k)
        if k > d:
            raise fail(f"indices: k={k} is larger than the {d} parameters")
        if k != codec.k(d):
            raise fail(f"indices: k={k}, but {codec.text} of {d} parameters sends k={codec.k(d)}")
        if not np.isfinite(values).all():
            raise fail("values has NaN or Inf values")
    return tensors, raw


def _threaded_min(values: "np.ndarray") -> int:
    """min over a large integer array on torch's threads (numpy's takes one core)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only payload array: it is only read
        return int(torch.from_numpy(values).min())


def decode_update(data: bytes, codec: "Codec | str", base: Mapping[str, "np.ndarray"],
                  exact: Collection[str] = ()) -> dict[str, "np.ndarray"]:
    """The full weights an update payload stands for, in the base's dtypes and key order:
    base + the decoded change (fp32: the payload's own tensors, as `decode_state`); `exact`
    as the encoder's. CodecError names what is wrong with a payload that does not fit `codec`
    and `base`."""
    codec = as_codec(codec)
    if not codec.sends_change:
        return decode_state(data)
    import numpy as np
    import torch  # only for the change codecs: a full-weight update costs no torch import

    packing = Packing(base, exact)
    tensors, raw = _decode_change(data, codec, packing)
    out: dict[str, np.ndarray] = {}
    if codec.name == "topk":
        order, where = _sorted_indices(tensors["indices"], packing.size, codec)
        values = tensors["values"]
    else:
        change = tensors["delta" if codec.name != "int8" else "q"]
        if codec.name == "bf16":  # the top half of a float32 is a bfloat16: torch reads it as one, no copy
            change = change.view(np.int16)
        scale_at = np.cumsum([0] + packing.scale_rows(codec)) if codec.name == "int8" else None
    scratch = torch.empty(min(BLOCK, max(packing.size, 1)), dtype=torch.float32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", UserWarning)  # payload arrays are read-only: they are only read
        for index, name in enumerate(packing.names):
            ref = np.asarray(base[name])
            result = np.empty(ref.shape, dtype=ref.dtype)
            # Fault the new pages in here, one write per 4 KiB page: torch's threads faulting them
            # in side by side stall each other (seen at 3-5x the pass's own time on a 2-vCPU VM).
            result.reshape(-1)[::4096 // result.itemsize] = 0
            origin = torch.from_numpy(ref if ref.flags.c_contiguous else ref.copy(order="C"))
            target, where_in = torch.from_numpy(result), packing.slices[name]
            if codec.name == "topk":
                target.copy_(origin)
                lo, hi = np.searchsorted(where, [where_in.start, where_in.stop])
                result.reshape(-1)[where[lo:hi] - where_in.start] += values[order[lo:hi]]  # unique: no np.add.at
            elif result.size:
                rows = int(scale_at[index + 1] - scale_at[index]) if scale_at is not None else 1
                part = torch.from_numpy(change[where_in]).view(rows, -1)
                scale = None if scale_at is None else torch.from_numpy(
                    tensors["scale"][scale_at[index]:scale_at[index + 1]]).view(rows, 1)
                _base_plus_change(target.view(rows, -1), origin.view(rows, -1),
                                  part.view(torch.bfloat16) if codec.name == "bf16" else part, scale, scratch)
            out[name] = result
    return {name: out[name] if name in out else raw[name] for name in base}


def _base_plus_change(target: "torch.Tensor", origin: "torch.Tensor", change: "torch.Tensor",
                      scale: "torch.Tensor | None", scratch: "torch.Tensor") -> None:
    """target = origin + change (* scale, one per row), block by block: each block of the
    change is widened to float32 in the cache-sized `scratch`, then one fused pass on torch's
    threads reads the base and writes the result. (torch's mixed-dtype kernels, int8 or
    float16 straight into float32, run several times slower than the widening copy.)"""
    import torch

    rows, cols = target.shape
    step = max(1, BLOCK // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        for c0 in range(0, cols, BLOCK):
            c1 = min(cols, c0 + BLOCK)
            block = scratch[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            block.copy_(change[r0:r1, c0:c1])
            if scale is None:
                torch.add(origin[r0:r1, c0:c1], block, out=target[r0:r1, c0:c1])
            elif rows == 1:  # one scale for the tensor: a scalar multiplier
                torch.add(origin[r0:r1, c0:c1], block, alpha=float(scale[0, 0]), out=target[r0:r1, c0:c1])
            else:
                torch.addcmul(origin[r0:r1, c0:c1], block, scale[r0:r1], out=target[r0:r1, c0:c1])


def _sorted_indices(indices: "np.ndarray", size: int, codec: Codec) -> tuple["np.ndarray", "np.ndarray"]:
    """(the order that sorts `indices`, the sorted indices), after the range and duplicate checks."""
    import numpy as np

    order = np.argsort(indices, kind="stable")
    where = indices[order].astype(np.int64)
    if where.size and (where[0] < 0 or where[-1] >= size):
        bad = where[0] if where[0] < 0 else where[-1]
        raise CodecError(f"{codec.text} indices: index {int(bad)} out of range 0..{size - 1}")
    repeated = np.flatnonzero(where[1:] == where[:-1])
    if repeated.size:
        first = int(where[repeated[0]])
        more = f" and {repeated.size - 1} more repeats" if repeated.size > 1 else ""
        raise CodecError(f"{codec.text} indices: duplicate indices ({first} twice{more})")
    return order, where
