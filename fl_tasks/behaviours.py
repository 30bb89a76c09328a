"""Simulated client behaviours, for demos, tests and the robustness benchmark.

Honest silos train and report. The others model what a production federation must survive:
silos that never answer or answer late, and Byzantine silos that send poisoned models.
Attacks act on the floating tensors of `update - base`; integer buffers are left alone.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np

from fl_tasks.datasets import Table

HONEST, DROPOUT, STRAGGLER = "honest", "dropout", "straggler"
SIGN_FLIP, SCALED, NOISE, COLLUDING, LABEL_FLIP = "sign_flip", "scaled", "noise", "colluding", "label_flip"
BEHAVIOURS = (HONEST, DROPOUT, STRAGGLER, SIGN_FLIP, SCALED, NOISE, COLLUDING, LABEL_FLIP)
MODEL_ATTACKS = (SIGN_FLIP, SCALED, NOISE, COLLUDING)


def poison_data(behaviour: str, table: Table) -> Table:
    """Label-flip data poisoning: the silo trains on inverted labels."""
    if behaviour == LABEL_FLIP:
        return Table(table.x, (1 - table.y).astype(table.y.dtype), table.time)
    return table


def poison_model(behaviour: str, trained: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                 scale: float, round_id: str) -> dict[str, np.ndarray]:
    """The model a Byzantine silo reports instead of `trained`.

    sign_flip: base - scale * delta; scaled: base + scale * delta; noise: trained + N(0, scale);
    colluding: base + the same N(0, scale) draw for every colluder of the round (seeded by the
    round id), so their updates are identical.
    """
    if behaviour not in MODEL_ATTACKS:
        return dict(trained)
    shared = np.random.default_rng(zlib.crc32(round_id.encode()))
    private = np.random.default_rng()
    out = {}
    for name in sorted(trained):
        value, origin = trained[name], base[name]
        if not np.issubdtype(value.dtype, np.floating):
            out[name] = value
            continue
        delta = value.astype(np.float64) - origin
        if behaviour == SIGN_FLIP:
            poisoned = origin - scale * delta
        elif behaviour == SCALED:
            poisoned = origin + scale * delta
        elif behaviour == NOISE:
            poisoned = value + private.normal(0.0, scale, value.shape)
        else:
            poisoned = origin + shared.normal(0.0, scale, value.shape)
        out[name] = poisoned.astype(value.dtype)
    return out
