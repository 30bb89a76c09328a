"""Model payloads as safetensors: a plain tensor container, so reading one never runs code.

Nothing a client sends is ever unpickled or passed to `torch.load`.
"""

from __future__ import annotations

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

CODECS = ("fp32",)


class CodecError(ValueError):
    """A payload is not a readable safetensors file of the expected codec."""


def encode_state(state: dict[str, np.ndarray], codec: str = "fp32") -> bytes:
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; supported: {', '.join(CODECS)}")
    # np.ascontiguousarray would turn 0-d tensors (batch-norm counters) into shape (1,).
    return save({name: np.asarray(value).copy(order="C") for name, value in state.items()})


def decode_state(data: bytes, codec: str = "fp32") -> dict[str, np.ndarray]:
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; supported: {', '.join(CODECS)}")
    try:
        return load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise CodecError(f"payload is not a valid safetensors file: {exc}") from None
    except (KeyError, TypeError) as exc:  # a dtype numpy cannot hold (BF16, F8_*): safetensors' numpy map misses it
        raise CodecError(f"payload has a tensor of unsupported dtype {exc}") from None
