"""Reading parts of a safetensors object by byte ranges (S3 ranged GETs), never the whole.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets}}), then the tensors' raw little-endian bytes. From the
header alone each tensor's place is known, so any run of elements of any tensor (C order) is
a byte range: `read_header` fetches the header (two small ranged reads), `byte_spans` maps
element ranges to byte ranges (adjacent ones merged into one request), `read_elements`
fetches and decodes them to numpy with `np.frombuffer` (no pickle, never torch.load).

Only full-weight payloads (the `fp32` codec: the tensors by name) can be read this way; the
compressed codecs pack one change vector for the whole model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fl_tasks.protocol.codec import CodecError

# safetensors dtype names -> numpy (little-endian, as the format stores them).
DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "i1", "U8": "u1", "I16": "<i2", "U16": "<u2",
          "I32": "<i4", "U32": "<u4", "I64": "<i8", "U64": "<u8", "BOOL": "?"}
MAX_HEADER_BYTES = 100 << 20  # what safetensors itself accepts

Fetch = Callable[[int, int], bytes]  # bytes [start, stop) of the object


@dataclass(frozen=True)
class TensorEntry:
    dtype: np.dtype  # little-endian, as stored
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the object
    stop: int

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorEntry]
    data_start: int  # 8 + N


def _bad(problem: str) -> CodecError:
    return CodecError(f"payload is not a valid safetensors file: {problem}")


def parse_header(length_bytes: bytes, json_bytes: bytes) -> Header:
    """The header from its 8 length bytes and its N JSON bytes; CodecError names what is wrong."""
    size = int.from_bytes(length_bytes, "little")
    if len(length_bytes) != 8 or len(json_bytes) != size:
        raise _bad("the header is cut short")
    try:
        raw = json.loads(bytes(json_bytes))
    except (UnicodeDecodeError, ValueError):
        raise _bad("the header is not JSON") from None
    if not isinstance(raw, dict):
        raise _bad("the header is not a JSON object")
    data_start = 8 + size
    tensors = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(DTYPES[info["dtype"]])
            shape = tuple(int(n) for n in info["shape"])
            start, stop = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _bad(f"tensor {name!r} has no valid dtype, shape and data_offsets") from None
        if min(shape, default=0) < 0 or not 0 <= start <= stop or stop - start != math.prod(shape) * dtype.itemsize:
            raise _bad(f"tensor {name!r} does not fit its {dtype} {list(shape)} into bytes {start}..{stop}")
        tensors[name] = TensorEntry(dtype, shape, data_start + start, data_start + stop)
    return Header(tensors, data_start)


def read_header(fetch: Fetch) -> Header:
    """The header of an object, by two ranged reads (its length, then its JSON)."""
    length = fetch(0, 8)
    size = int.from_bytes(length, "little")
    if len(length) != 8 or size > MAX_HEADER_BYTES:
        raise _bad(f"header length {size} is over the {MAX_HEADER_BYTES}-byte limit")
    return parse_header(length, fetch(8, 8 + size))


@dataclass(frozen=True)
class ElementRange:
    """Elements [start, stop) of tensor `key`, flattened in C order."""

    key: str
    start: int
    stop: int


@dataclass(frozen=True)
class ByteSpan:
    """One ranged read: bytes [start, stop), holding the element ranges `parts` in order."""

    start: int
    stop: int
    parts: tuple[ElementRange, ...]


def byte_spans(header: Header, requests: Sequence[ElementRange]) -> list[ByteSpan]:
    """The byte ranges that hold `requests`, in object order, adjacent ones merged."""
    located = []
    for r in requests:
        entry = header.tensors.get(r.key)
        if entry is None:
            raise _bad(f"it has no tensor {r.key!r}")
        if not 0 <= r.start <= r.stop <= entry.size:
            raise ValueError(f"elements [{r.start}, {r.stop}) are outside tensor {r.key!r} of {entry.size}")
        item = entry.dtype.itemsize
        located.append((entry.start + r.start * item, entry.start + r.stop * item, r))
    located.sort(key=lambda x: (x[0], x[1]))
    spans: list[ByteSpan] = []
    for start, stop, r in located:
        if spans and start == spans[-1].stop:
            last = spans[-1]
            spans[-1] = ByteSpan(last.start, stop, last.parts + (r,))
        elif spans and start < spans[-1].stop:
            raise ValueError(f"element ranges overlap in the object at byte {start}")
        else:
            spans.append(ByteSpan(start, stop, (r,)))
    return spans


def read_elements(header: Header, requests: Sequence[ElementRange], fetch: Fetch) -> dict[ElementRange, np.ndarray]:
    """Each requested element range as a 1-D numpy array in native byte order (a copy, not a
    view of the fetched bytes), fetched span by span."""
    out: dict[ElementRange, np.ndarray] = {}
    for span in byte_spans(header, requests):
        data = fetch(span.start, span.stop)
        if len(data) != span.stop - span.start:
            raise ValueError(f"a ranged read returned {len(data)} bytes, not {span.stop - span.start}")
        offset = 0
        for r in span.parts:
            dtype = header.tensors[r.key].dtype
            count = r.stop - r.start
            out[r] = np.frombuffer(data, dtype, count, offset).astype(dtype.newbyteorder("="), copy=True)
            offset += count * dtype.itemsize
    return out
