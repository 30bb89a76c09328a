"""Bounded concurrency for the coordinator's per-silo S3 work, whatever the number of silos.

The settings live here, once:

- SILO_WORKERS: silos whose buckets are written or read at the same time (dispatch, the
  evaluation request, the close's and the quorum check's reads of every answer). Each
  request mostly waits on the network, so threads overlap them; boto3 clients are
  thread-safe, and each keeps `fl_tasks.protocol.storage.MAX_POOL_CONNECTIONS` connections
  open for them.
- READ_AHEAD: updates fetched and decoded ahead of screening and aggregation
  (`fl_tasks.coordinator.candidate`), and READ_AHEAD_BYTES: at most that many bytes of
  them (`window_for`: 4 updates of a 4 MB model, 2 of a 400 MB one). Each holds about one
  model in memory, so peak memory stays near (window + 2) x one model for a streaming
  strategy.

`per_silo` keeps the order of its input in its results, so what a step records (events,
dispatch times, answers) is in client order whatever order the requests finish in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

SILO_WORKERS = 32
READ_AHEAD = 4
# ... and at most this many bytes of them: large models are read fewer at a time.
READ_AHEAD_BYTES = 1 << 30

T = TypeVar("T")
R = TypeVar("R")


def per_silo(work: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """[work(item) for item in items], at most `workers` at a time, in the items' order. An
    exception raised by `work` is raised here (the first in the items' order), after every
    started call has finished; `work` handles the errors that are one silo's problem."""
    items, workers = list(items), workers or SILO_WORKERS  # read at call time: tests and benchmarks set it
    if len(items) <= 1 or workers <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="fl-silo") as pool:
        futures = [pool.submit(work, item) for item in items]
    return [future.result() for future in futures]


def window_for(model_bytes: int) -> int:
    """How many updates of `model_bytes` each to read ahead: READ_AHEAD, fewer for large
    models (READ_AHEAD_BYTES in all), at least one."""
    return max(1, min(READ_AHEAD, READ_AHEAD_BYTES // max(int(model_bytes), 1)))


def read_ahead(work: Callable[[T], R], items: Iterable[T], window: int | None = None) -> Iterator[R]:
    """work(item) for each item, yielded in the items' order, while at most `window` calls run
    or wait ahead of the consumer: item k + window starts only once item k was yielded, so at
    most `window` results not yet taken exist (plus the one the consumer holds). Exceptions
    come out in order, where the item's result would. Closing the iterator early cancels what
    has not started and waits for what has."""
    items, window = iter(items), window or READ_AHEAD
    if window <= 1:
        for item in items:
            yield work(item)
        return
    pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix="fl-read-ahead")
    pending: list[Future] = []
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
