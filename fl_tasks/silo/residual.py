"""Error feedback for top-k updates: what a silo did not send, kept for its next round.

A `topk:<f>` update sends only the largest changes of the round. The small changes it drops
would be lost for good, round after round, so the silo keeps them (the residual) and adds them
to its next change before picking the top k again (error feedback, as in Seide et al. 2014
and Stich et al. 2018): a change too small to be sent in one round is sent once enough of it
has built up. The residual never leaves the silo; it lives in its state directory:

    <state_dir>/<federation>/residual/residual.safetensors  float32, shaped like the model's floating tensors
    <state_dir>/<federation>/residual/residual.json         codec, parameter count d, round, sha256 of the above

A residual kept under another codec or for another model (a different d, other tensor names
or shapes) does not fit: the silo starts again from zero and says so in its log. Both files
are written atomically (a temporary file, then os.replace), the tensors first; the sha256 in
the JSON ties the pair together, so a crash between the two writes reads as "no residual".
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fl_tasks.protocol.codec import Codec, CodecError, Packing
from fl_tasks.silo.kept import KeptTensors, state_folder

if TYPE_CHECKING:
    import numpy as np


def residual_folder(state_dir: Path, federation: str) -> Path:
    return state_folder(state_dir, federation, "residual")


class ResidualStore:
    """One silo's residual for one federation, in `folder`."""

    def __init__(self, folder: Path, log: Callable[[str], None] = print) -> None:
        self.folder, self.log = Path(folder), log
        self.kept = KeptTensors(self.folder, "residual")

    def load(self, codec: Codec, base: Mapping[str, "np.ndarray"],
             exact: Collection[str] = ()) -> dict[str, "np.ndarray"] | None:
        """The residual to add to this round's change (`exact` as for encode_update), or None
        (start from zero): none kept yet, or kept for another codec or model (logged), or
        unreadable (logged)."""
        import numpy as np

        if not self.kept.exists():
            return None
        packing = Packing(base, exact)
        try:
            residual, record = self.kept.load()
            kept = Codec.parse(record["codec"])
            if kept != codec:
                return self._reset(f"it was kept for codec {kept.text}, this round's is {codec.text}")
            if record["size"] != packing.size:
                return self._reset(f"it was kept for a model of {record['size']} parameters, this round's has "
                                   f"{packing.size}")
        except (OSError, ValueError, KeyError, TypeError, CodecError) as exc:
            return self._reset(f"it cannot be read: {type(exc).__name__}: {exc}")
        if set(residual) != set(packing.names) or any(
                residual[n].shape != packing.shapes[n] or residual[n].dtype != np.float32
                or not np.isfinite(residual[n]).all() for n in packing.names):
            return self._reset("its tensors do not match the model's floating tensors")
        return residual

    def _reset(self, why: str) -> None:
        self.log(f"error feedback: the residual in {self.folder} is not used, {why}; starting again from zero")
        return None

    def save(self, codec: Codec, residual: Mapping[str, "np.ndarray"], round_id: str) -> None:
        """Keep `residual` (what `round_id`'s update did not send) for the next round."""
        self.kept.save(residual, {"codec": codec.text, "size": sum(int(v.size) for v in residual.values()),
                                  "round_id": round_id})
