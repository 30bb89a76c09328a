"""The silos' answers to a round, read from the triggerer's event loop (see QuorumTrigger).

Loaded by the trigger in a worker thread: it imports boto3 and the manifest code, which
take long enough to block the triggerer's loop.

Requests per poll, whatever the number of silos: silos that share a bucket (same S3
connection, endpoint and bucket, different prefixes) are read by listing the longest common
prefix of their manifests' keys (ListObjectsV2: key, ETag and LastModified of 1,000 objects
a request), so such a group costs ceil(objects under that prefix / 1000) requests, plus a
GET for each manifest that is new or whose ETag changed. A silo counts only the exact keys
of its own manifests in a listing, never a key under another silo's prefix. Every other
silo is read by HEADs (answer manifest, then decline manifest), at most CONCURRENT_READS
requests at a time. A listing that would take more than one request per LIST_SAVING silos
of its group (other rounds' objects pile up under the common prefix) stops at that budget
and the group is read by HEADs from then on; so is a group whose listing is refused (a
bucket policy may allow GetObject without ListBucket); a listing that fails transiently is
replaced by HEADs for that poll. Listing or HEAD, a silo's answer is decided the same way.
"""

from __future__ import annotations

import asyncio
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fl_tasks.coordinator.intake import STORAGE_ERRORS, storage_reason, verify_answer
from fl_tasks.protocol import ANSWER_KINDS, MAX_MANIFEST_BYTES, DeclineManifest, ManifestError
from fl_tasks.protocol.signing import SignatureError
from fl_tasks.protocol.storage import AsyncObjectStore, is_transient_async

CONCURRENT_READS = 32  # silos read at the same time, whatever their number
LIST_SAVING = 10  # a shared bucket is listed while a listing takes at most one request per 10 of its silos


@dataclass
class Poll:
    committed: dict[str, datetime] = field(default_factory=dict)  # verified answers: commit times
    declined: dict[str, str] = field(default_factory=dict)  # verified declines: reasons
    problems: dict[str, str] = field(default_factory=dict)  # why a silo's answer does not count
    outage: str = ""  # every silo failed with a transient error: the endpoint(s) are down


@dataclass
class _Seen:
    etag: str
    written: datetime
    verdict: str | None  # None: verified; else why not
    reason: str = ""  # a decline's reason


@dataclass
class _Listing:
    """Silos that share a bucket, read by listing the common prefix of their manifests' keys."""

    bucket: str
    prefix: str
    clients: list[str]

    @property
    def max_pages(self) -> int:
        return max(1, math.ceil(len(self.clients) / LIST_SAVING))


class AnswerWatcher:
    """Polls every silo's answer (update or evaluation) and decline manifests; verifies each
    manifest once per ETag."""

    def __init__(self, trigger):
        self.trigger = trigger
        self.stores: dict[tuple[str | None, str | None], AsyncObjectStore] = {}
        self.unreachable: dict[tuple[str | None, str | None], str] = {}
        self.seen: dict[tuple[str, str], _Seen] = {}
        self.keys: dict[str, bytes | None] = {}
        self.limit = asyncio.Semaphore(CONCURRENT_READS)
        # (store group, bucket) -> the silos read by listing; silos not in one are read by HEADs.
        self.listings: dict[tuple[tuple[str | None, str | None], str], _Listing] = {}

    async def __aenter__(self) -> "AnswerWatcher":
        from fl_airflow.connections import s3_access

        for info in self.trigger.clients.values():
            group = (info.get("aws_conn_id"), info.get("endpoint_url"))
            if group in self.stores or group in self.unreachable:
                continue
            try:
                access = await asyncio.to_thread(s3_access, group[0])
            except ValueError as exc:  # the silo's connection is missing: that silo's problem only
                self.unreachable[group] = f"bucket unreachable: {exc}"
                continue
            # The same order as the coordinator's (fl_tasks.coordinator.access): the client's own
            # endpoint, the connection's, then the federation's.
            store = AsyncObjectStore(group[1] or access.endpoint_url or info.get("federation_endpoint_url"),
                                     access=access)
            self.stores[group] = await store.__aenter__()
        shared: dict[tuple[tuple[str | None, str | None], str], list[str]] = {}
        for client_id, info in self.trigger.clients.items():
            group = (info.get("aws_conn_id"), info.get("endpoint_url"))
            if group in self.stores:
                shared.setdefault((group, info["bucket"]), []).append(client_id)
        for (group, bucket), clients in shared.items():
            if len(clients) > 1:
                keys = [self.trigger.clients[c][k] for c in clients for k in ("answer_key", "decline_key")]
                self.listings[group, bucket] = _Listing(bucket, os.path.commonprefix(keys), clients)
        return self

    async def __aexit__(self, *exc) -> None:
        for store in self.stores.values():
            await store.__aexit__(*exc)

    async def key_of(self, client_id: str) -> bytes | None:
        if client_id not in self.keys:
            conn_id = self.trigger.clients[client_id]["signing_conn_id"]
            self.keys[client_id] = await asyncio.to_thread(_connection_password, conn_id)
        return self.keys[client_id]

    async def poll(self) -> Poll:
        listings = list(self.listings.items())
        listed: dict[str, dict[str, tuple[str, datetime]]] = {}
        for (where, listing), found in zip(listings, await asyncio.gather(*(self._list(w, l) for w, l in listings))):
            if found is not None:
                listed.update((client_id, found) for client_id in listing.clients)
        results = await asyncio.gather(*(self._read_client(c, listed.get(c)) for c in self.trigger.clients),
                                       return_exceptions=False)
        poll = Poll()
        transient = []
        for client_id, (kind, value, problem, was_transient) in zip(self.trigger.clients, results):
            if kind == self.trigger.answers:
                poll.committed[client_id] = value
            elif kind == "decline":
                poll.declined[client_id] = value
            if problem:
                poll.problems[client_id] = problem
                transient.append(was_transient)
        if transient and len(transient) == len(self.trigger.clients) and all(transient):
            poll.outage = next(iter(poll.problems.values()))
        return poll

    async def _list(self, where, listing: _Listing) -> dict[str, tuple[str, datetime]] | None:
        """The listing of a shared bucket's common prefix, or None: read its silos by HEADs
        this poll (the listing failed transiently), or from now on (it is refused, or it
        costs more requests than its budget)."""
        log = getattr(self.trigger, "log", None)
        async with self.limit:
            try:
                found = await self.stores[where[0]].list_objects(listing.bucket, listing.prefix, listing.max_pages)
            except Exception as exc:  # noqa: BLE001 - storage errors, aiohttp/asyncio ones of an unreachable endpoint
                transient = is_transient_async(exc)
                if not transient and not isinstance(exc, STORAGE_ERRORS):
                    raise
                if not transient:
                    del self.listings[where]
                if log:
                    log.warning("listing s3://%s/%s failed (%s); reading its %d silos by HEADs %s",
                                listing.bucket, listing.prefix, storage_reason(exc), len(listing.clients),
                                "this poll" if transient else "from now on")
                return None
        if found is None:
            del self.listings[where]
            if log:
                log.info("s3://%s/%s holds more than %d objects: reading its %d silos by HEADs", listing.bucket,
                         listing.prefix, 1000 * listing.max_pages, len(listing.clients))
        return found

    async def _read_client(self, client_id: str, listed: dict[str, tuple[str, datetime]] | None = None
                           ) -> tuple[str | None, Any, str, bool]:
        """(kind, commit time or decline reason, problem, the problem is transient), decided as
        the coordinator's `Intake.read_answer` decides: the answer manifest first, and a
        decline only when there is no answer manifest at all. `listed`: the listing of the
        silo's shared bucket (only this silo's exact keys are looked up in it); None: HEADs."""
        info = self.trigger.clients[client_id]
        group = (info.get("aws_conn_id"), info.get("endpoint_url"))
        if group in self.unreachable:
            return None, None, self.unreachable[group], False
        store = self.stores[group]
        for kind, key in ((self.trigger.answers, info["answer_key"]), ("decline", info["decline_key"])):
            async with self.limit:
                try:
                    head = listed.get(key) if listed is not None else await store.head(info["bucket"], key)
                    seen = await self._verified(store, client_id, kind, info["bucket"], key, head)
                except STORAGE_ERRORS as exc:
                    return None, None, f"{kind} manifest unreadable: {storage_reason(exc)}", is_transient_async(exc)
                except Exception as exc:  # noqa: BLE001 - aiohttp/asyncio errors of an unreachable endpoint
                    if not is_transient_async(exc):
                        raise
                    return None, None, f"{kind} manifest unreadable: {type(exc).__name__}: {exc}", True
            if seen is None:
                continue
            if seen.verdict is not None:
                return None, None, f"{kind} manifest rejected: {seen.verdict}", False
            return kind, seen.reason if kind == "decline" else seen.written, "", False
        return None, None, "", False

    async def _verified(self, store: AsyncObjectStore, client_id: str, kind: str, bucket: str, key: str,
                        head: tuple[str, datetime] | None) -> _Seen | None:
        """The verdict on the manifest at `key`, whose (ETag, LastModified) is `head` (None:
        absent); fetched and verified only when its ETag is new."""
        if head is None:
            self.seen.pop((client_id, kind), None)
            return None
        etag, written = head
        cached = self.seen.get((client_id, kind))
        if cached is not None and cached.etag == etag:
            return cached
        raw = await store.get_bytes(bucket, key, max_bytes=MAX_MANIFEST_BYTES)
        if raw is None:
            return None
        trigger = self.trigger
        try:
            answer = kind != "decline"
            manifest = verify_answer(raw, ANSWER_KINDS[kind].manifest if answer else DeclineManifest, client_id,
                                     trigger.federation, trigger.round_id, trigger.require_signatures,
                                     await self.key_of(client_id),
                                     f"Airflow connection '{trigger.clients[client_id]['signing_conn_id']}'",
                                     trigger.binding if answer else None)
            seen = _Seen(etag, written, None, getattr(manifest, "reason", ""))
        except (ManifestError, SignatureError, ValueError) as exc:
            seen = _Seen(etag, written, str(exc))
        self.seen[(client_id, kind)] = seen
        return seen


def _connection_password(conn_id: str) -> bytes | None:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        password = BaseHook.get_connection(conn_id).password
    except AirflowNotFoundException:
        return None
    return password.encode() if password else None
