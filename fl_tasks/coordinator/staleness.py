"""Stale updates: trained on an older model than the one the round dispatched.

Staleness s counts registered model versions between the update's base and the round's
base (one version per round, so roughly "rounds behind"); the seeded model counts as 0.
Under the `polynomial` policy a stale update keeps a share (1 + s) ** -exponent of its
example-count weight, as in FedAsync (Xie et al. 2019); under `reject` it is not used.
"""

from __future__ import annotations


def version_number(version: str) -> int | None:
    """'seed' -> 0, '7' -> 7, anything else -> None."""
    if version == "seed":
        return 0
    return int(version) if version.isdigit() else None


def versions_behind(round_base: str, update_base: str) -> int | None:
    """How many versions `update_base` is older than `round_base`; None when it is not an
    earlier version at all (unknown, newer or equal)."""
    current, claimed = version_number(round_base), version_number(update_base)
    if current is None or claimed is None or claimed >= current:
        return None
    return current - claimed


def staleness_weight(staleness: int, exponent: float) -> float:
    """The share of its weight a stale update keeps under the polynomial rule."""
    return (1.0 + staleness) ** -exponent
