"""Put on the PYTHONPATH of the coordinator's processes by tests: the coordinator must never
read a silo's data. Opening a path under FL_GUARD_FORBIDDEN_PATHS (os.pathsep-separated), or
importing `fl_tasks.simulation` (the pooled example data the silos are simulated from), raises
PermissionError and is written to FL_GUARD_LOG, so that a test sees it even where the
coordinator's code would catch the error."""

import os
import sys

_FORBIDDEN = tuple(os.path.realpath(p) for p in os.environ.get("FL_GUARD_FORBIDDEN_PATHS", "").split(os.pathsep) if p)
_LOG = os.environ.get("FL_GUARD_LOG", "")


def _refuse(what: str) -> None:
    if _LOG:
        with open(_LOG, "a") as log:
            log.write(f"pid {os.getpid()}: {what}\n")
    raise PermissionError(f"the coordinator must not {what}")


def _guard(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if any(path == p or path.startswith(p + os.sep) for p in _FORBIDDEN):
            _refuse(f"open {path}")
    elif event == "import" and (args[0] == "fl_tasks.simulation" or str(args[0]).startswith("fl_tasks.simulation.")):
        _refuse(f"import {args[0]}")


if _FORBIDDEN:
    sys.addaudithook(_guard)
