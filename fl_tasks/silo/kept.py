"""Tensors a silo keeps for itself between rounds, in its state directory.

Error feedback's residual, Adam's moments, the personal and local-only models: each is a pair
of files in `<state_dir>/<federation>/<what>/`,

    <name>.safetensors   the tensors
    <name>.json          what they are (free-form record) and the sha256 of the tensors

both written atomically (a temporary file, then os.replace), the tensors first, the record
last: the sha256 in the record ties the pair together, so a crash between the two writes, or
a file edited by hand, reads as "nothing kept" rather than as a mismatched pair. Nothing here
is ever sent anywhere, and nothing is unpickled: the tensors are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def state_folder(state_dir: Path, federation: str, what: str) -> Path:
    return Path(state_dir) / federation / what


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class KeptTensors:
    """One named set of tensors with its record, in `folder`."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = Path(folder)
        self.tensors, self.record = self.folder / f"{name}.safetensors", self.folder / f"{name}.json"

    def exists(self) -> bool:
        return self.record.exists()

    def load(self) -> tuple[dict[str, "np.ndarray"], dict[str, Any]]:
        """(tensors, record); raises ValueError (or OSError) saying why they cannot be used."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        record = json.loads(self.record.read_text())
        data = self.tensors.read_bytes()
        if not isinstance(record, dict) or hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise ValueError(f"{self.tensors.name} does not match the sha256 in {self.record.name}")
        try:
            return load(data), record
        except SafetensorError as exc:
            raise ValueError(f"{self.tensors.name} is not safetensors: {exc}") from None

    def save(self, tensors: Mapping[str, "np.ndarray"], record: Mapping[str, Any]) -> str:
        """Keep `tensors` with `record` (plus their sha256, returned)."""
        from safetensors.numpy import save

        data = save({name: value for name, value in tensors.items()})
        self.folder.mkdir(parents=True, exist_ok=True)
        # The old record goes first: if a write below fails, the next read finds nothing rather
        # than the old record paired with new tensors.
        self.record.unlink(missing_ok=True)
        write_atomically(self.tensors, data)
        digest = hashlib.sha256(data).hexdigest()
        write_atomically(self.record, json.dumps({**record, "sha256": digest}, indent=2).encode())
        return digest

    def discard(self) -> None:
        self.record.unlink(missing_ok=True)
        self.tensors.unlink(missing_ok=True)
