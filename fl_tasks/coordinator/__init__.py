"""The coordinator: one method per step of a round (`steps`), and what the steps share.

Its names load on first use, so that importing a light submodule (the triggerer imports
`fl_tasks.coordinator.quorum`) does not import boto3, numpy and the rest.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"Coordinator": "steps", "run_round": "steps", "RoundFailed": "plan", "RoundPlan": "plan",
            "RunContext": "plan", "grace_period": "plan", "required_clients": "plan"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
