"""QuorumTrigger must never block the triggerer's event loop, and logs only what changed.

The triggerer runs all triggers on one event loop and warns ("Triggerer's async thread was
blocked for ... seconds") when a 0.1 s sleep takes longer than
`[triggerer] blocked_main_thread_warning_threshold` (0.2 s) more. The check runs in a fresh
interpreter, as a triggerer starts: the trigger's module and its S3 client are loaded while
the watchdog runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone

from fl_tasks.protocol.storage import ObjectStore
from tests.conftest import REPO
from tests.plugins.test_quorum_trigger import CLIENTS, ROUND, make_trigger, update_manifest
from fl_tasks import protocol

WARNING_THRESHOLD = 0.2  # airflow.cfg [triggerer] blocked_main_thread_warning_threshold, default

SCRIPT = textwrap.dedent("""
    import asyncio, importlib, json, sys, time

    import airflow.triggers.base  # loaded in every triggerer before any trigger
    import structlog

    lines, lags = [], []

    def keep(logger, method, event):  # triggers log through structlog
        lines.append(event["event"])
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.stdlib.PositionalArgumentsFormatter(), keep])

    async def watchdog():  # the triggerer's block_watchdog, measuring instead of warning
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.1)
            lags.append(time.monotonic() - started - 0.1)

    async def main(kwargs):
        watch = asyncio.create_task(watchdog())
        await asyncio.sleep(0.3)
        trigger_class = getattr(importlib.import_module("fl_airflow.triggers"), "QuorumTrigger")
        async for event in trigger_class(**kwargs).run():
            payload = event.payload
            break
        await asyncio.sleep(0.3)
        watch.cancel()
        return payload

    payload = asyncio.run(main(json.loads(sys.argv[1])))
    print(json.dumps({"event": payload, "max_lag": max(lags), "lines": lines}))
""")


def ahead_of_other_tests() -> None:
    """The watchdog measures wall time: on a 2-core machine shared with `make test`'s other
    worker (Airflow processes, silos), being preempted would read as blocking. Run the
    measured interpreter ahead of them where allowed (root, as in CI); the bound is unchanged."""
    try:
        os.nice(-10)
    except PermissionError:
        pass


def test_polling_never_blocks_the_event_loop_and_logs_only_changes(s3_server):
    store = ObjectStore(s3_server.endpoint_url)
    for c in CLIENTS:
        store.ensure_bucket(f"loop-{c}")
        store.delete(f"loop-{c}", protocol.update_manifest_key("", "trig", ROUND))
    store.put_bytes("loop-a", protocol.update_manifest_key("", "trig", ROUND), update_manifest("a"))
    kwargs = make_trigger(datetime.now(timezone.utc) + timedelta(seconds=4), min_clients=1,
                          endpoint_url=s3_server.endpoint_url, bucket_prefix="loop").serialize()[1]
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(kwargs)], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'plugins'}"},
                            preexec_fn=ahead_of_other_tests)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["event"]["state"] == "met" and out["event"]["committed"] == ["a"]
    assert out["max_lag"] < WARNING_THRESHOLD, f"the event loop was blocked for {out['max_lag']:.2f}s"
    # About 20 polls, two states: one line while waiting, one when the deadline closed it.
    round_lines = [line for line in out["lines"] if line.startswith(f"round {ROUND}")]
    assert len(round_lines) == 2, round_lines
    assert "waiting for ['b', 'c']" in round_lines[0] and "deadline passed" in round_lines[1]

