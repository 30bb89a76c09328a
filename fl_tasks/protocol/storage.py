"""S3 access through boto3. The endpoint is configurable: AWS, MinIO or a local emulator.

Faults: every call goes through botocore's "standard" retry mode (`FL_S3_MAX_ATTEMPTS`
attempts, 5 by default, exponential backoff with jitter, on connection errors, timeouts,
HTTP 500/502/503/504 and throttling), with bounded connect and read timeouts. A response
body cut off mid-way (or failing its length or checksum check) is read again from the
start, never returned in part. When S3 still fails after all that, the call raises
`StorageUnavailable`, naming the operation and the object: the step that called it can be
retried as a whole, because every step writes its commit marker last.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    FlexibleChecksumError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_THROTTLING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
                     "ServiceUnavailable", "InternalError"}
# Errors while reading a response body, after botocore has already returned the response:
# its retries do not cover them, so get_bytes reads the object again itself.
_BODY_ERRORS = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError,
                FlexibleChecksumError)

MAX_ATTEMPTS = 5  # per call, first try included (botocore standard mode)
CONNECT_TIMEOUT = 5.0  # seconds
READ_TIMEOUT = 30.0  # seconds without a byte from S3
# Connections one client keeps open: as many as the requests it serves at once (the
# coordinator's per-silo thread pools, the quorum trigger's concurrent reads), so that none
# waits for a free connection or opens one it then discards.
MAX_POOL_CONNECTIONS = 32


class ObjectTooLarge(ValueError):
    """An object is larger than the reader accepts (e.g. a hostile oversized payload)."""


class StorageUnavailable(RuntimeError):
    """S3 kept failing (down, timing out, 5xx, cut responses) after every retry.

    Not a ValueError on purpose: an outage must fail the step (so that it is retried), never
    be mistaken for a bad object (which screening rejects).
    """


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def is_transient(exc: BaseException) -> bool:
    """An error worth retrying: no connection, a timeout, a cut response, HTTP 5xx or throttling."""
    if isinstance(exc, BotoCoreError):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or error.get("Code") in _THROTTLING_CODES
    return isinstance(exc, OSError)  # includes TimeoutError and ConnectionError


def _client_config(config_class, max_attempts: int, endpoint_url: str | None, connect_timeout: float | None = None,
                   read_timeout: float | None = None):
    """botocore's (or aiobotocore's) client config: bounded timeouts and total attempts."""
    # total_max_attempts counts the first try ("max_attempts" would count retries only).
    return config_class(retries={"total_max_attempts": max_attempts, "mode": "standard"},
                        connect_timeout=connect_timeout or _env_number("FL_S3_CONNECT_TIMEOUT", CONNECT_TIMEOUT),
                        read_timeout=read_timeout or _env_number("FL_S3_READ_TIMEOUT", READ_TIMEOUT),
                        max_pool_connections=MAX_POOL_CONNECTIONS,
                        s3={"addressing_style": "path"} if endpoint_url else None)


def _is_missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in _MISSING_CODES


@dataclass(frozen=True)
class S3Access:
    """How to reach one S3 endpoint: where, and with which credentials (None: the standard
    AWS chain of this process: environment, config files, instance role)."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None

    def client_kwargs(self) -> dict[str, str]:
        return {k: v for k, v in (("aws_access_key_id", self.access_key_id),
                                  ("aws_secret_access_key", self.secret_access_key),
                                  ("aws_session_token", self.session_token)) if v}


class ObjectStore:
    """A thin owner of one boto3 S3 client; every method names bucket and key explicitly."""

    def __init__(self, endpoint_url: str | None = None, region: str | None = None, *,
                 max_attempts: int | None = None, connect_timeout: float | None = None,
                 read_timeout: float | None = None, access: S3Access | None = None):
        access = access or S3Access()
        self.endpoint_url = endpoint_url or access.endpoint_url or os.environ.get("FL_S3_ENDPOINT_URL") or None
        self.max_attempts = int(max_attempts or _env_number("FL_S3_MAX_ATTEMPTS", MAX_ATTEMPTS))
        self._client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=region or access.region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=_client_config(Config, self.max_attempts, self.endpoint_url, connect_timeout, read_timeout),
            **access.client_kwargs(),
        )

    @contextmanager
    def _call(self, operation: str, bucket: str, key: str = ""):
        """Turn what is left of an outage after botocore's retries into StorageUnavailable."""
        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            if not is_transient(exc):
                raise
            raise StorageUnavailable(f"S3 {operation} s3://{bucket}/{key} failed after {self.max_attempts} attempts "
                                     f"({self.endpoint_url or 'AWS'}): {exc}") from exc

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write the whole object; S3 stores a PUT atomically, so a failed one leaves the old object or none."""
        with self._call("PUT", bucket, key):
            self._client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    def put_if_absent(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        """Write the object only if the key is free (S3 conditional write); False when it was taken."""
        with self._call("PUT", bucket, key):
            try:
                self._client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, IfNoneMatch="*")
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                                 "ConditionalRequestConflict"):
                    return False
                raise

    def get_bytes(self, bucket: str, key: str, max_bytes: int | None = None) -> bytes | None:
        """The object's bytes, or None when it does not exist; never a part of them."""
        for attempt in range(1, self.max_attempts + 1):
            with self._call("GET", bucket, key):
                try:
                    response = self._client.get_object(Bucket=bucket, Key=key)
                except ClientError as exc:
                    if _is_missing(exc):
                        return None
                    raise
                body = response["Body"]
                length = response.get("ContentLength")
                if max_bytes is not None and (length or 0) > max_bytes:
                    body.close()
                    raise ObjectTooLarge(f"s3://{bucket}/{key} is {length} bytes, over the {max_bytes} limit")
                try:
                    data = body.read()
                    if length is not None and len(data) != length:
                        raise IncompleteReadError(actual_bytes=len(data), expected_bytes=length)
                    return data
                except _BODY_ERRORS:
                    body.close()
                    if attempt == self.max_attempts:
                        raise
                time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
        raise AssertionError("unreachable")

    def get_range(self, bucket: str, key: str, start: int, stop: int) -> bytes | None:
        """Bytes [start, stop) of the object (an HTTP Range GET), or None when it does not
        exist; never a part of the range: a range past the object's end is a ValueError, and a
        body cut off mid-way is read again, as in get_bytes."""
        if not 0 <= start <= stop:
            raise ValueError(f"bad byte range [{start}, {stop}) of s3://{bucket}/{key}")
        if start == stop:
            return b""
        for attempt in range(1, self.max_attempts + 1):
            with self._call("GET (range)", bucket, key):
                try:
                    response = self._client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}")
                except ClientError as exc:
                    if _is_missing(exc):
                        return None
                    if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                        raise ValueError(f"s3://{bucket}/{key} has no bytes [{start}, {stop})") from None
                    raise
                body = response["Body"]
                try:
                    data = body.read()
                    length = response.get("ContentLength")
                    if length is not None and len(data) != length:
                        raise IncompleteReadError(actual_bytes=len(data), expected_bytes=length)
                except _BODY_ERRORS:
                    body.close()
                    if attempt == self.max_attempts:
                        raise
                    time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
                    continue
                if len(data) != stop - start:
                    raise ValueError(f"s3://{bucket}/{key} ends before byte {stop} ({len(data)} of the "
                                     f"{stop - start} bytes from {start})")
                return data
        raise AssertionError("unreachable")

    def exists(self, bucket: str, key: str) -> bool:
        return self.last_modified(bucket, key) is not None

    def last_modified(self, bucket: str, key: str) -> datetime | None:
        """When the object was last written (the store's clock), or None when it does not exist."""
        with self._call("HEAD", bucket, key):
            try:
                return self._client.head_object(Bucket=bucket, Key=key)["LastModified"]
            except ClientError as exc:
                if _is_missing(exc):
                    return None
                raise

    def list_keys(self, bucket: str, prefix: str) -> Iterator[str]:
        with self._call("LIST", bucket, prefix):
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield item["Key"]

    def delete(self, bucket: str, key: str) -> None:
        with self._call("DELETE", bucket, key):
            self._client.delete_object(Bucket=bucket, Key=key)

    def ensure_bucket(self, bucket: str) -> None:
        with self._call("HEAD/CREATE bucket", bucket):
            try:
                self._client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if is_transient(exc):
                    raise
                self._client.create_bucket(Bucket=bucket)


_async_session_lock = threading.Lock()
_async_sessions: list = []


def _async_session():
    """One aiobotocore session per process, its S3 data loaded once: a triggerer pays for
    that on its first trigger only."""
    with _async_session_lock:
        if not _async_sessions:
            from aiobotocore.session import get_session

            session = get_session()
            loader = session.get_component("data_loader")  # create_client reads the same cache
            loader.load_service_model("s3", "service-2")
            loader.load_service_model("s3", "endpoint-rule-set-1")
            loader.load_data("endpoints")
            loader.load_data("partitions")
            _async_sessions.append(session)
        return _async_sessions[0]


class AsyncObjectStore:
    """S3 from an event loop (the triggerer's), through aiobotocore.

    The triggerer runs every trigger on one event loop and warns when anything blocks it
    for more than 0.2 s. Importing aiobotocore and loading botocore's service data take
    about that long on an idle machine and seconds on a busy one, so entering the context
    does both in a worker thread, once per process; the calls themselves are asynchronous. Use it as an async context
    manager: `async with AsyncObjectStore(endpoint_url) as store: ...`.
    """

    def __init__(self, endpoint_url: str | None = None, region: str | None = None, *, max_attempts: int = 2,
                 access: S3Access | None = None):
        self.access = access or S3Access()
        self.endpoint_url = endpoint_url or self.access.endpoint_url or os.environ.get("FL_S3_ENDPOINT_URL") or None
        self.region = region or self.access.region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        # Few attempts per call: a caller that polls (the quorum trigger) retries by polling again.
        self.max_attempts = max_attempts
        self._client = None
        self._context = None

    def _prepare(self):
        from aiobotocore.config import AioConfig

        return _async_session(), _client_config(AioConfig, self.max_attempts, self.endpoint_url)

    async def __aenter__(self) -> "AsyncObjectStore":
        session, config = await asyncio.to_thread(self._prepare)
        self._context = session.create_client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                                              config=config, **self.access.client_kwargs())
        self._client = await self._context.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._context.__aexit__(*exc)

    async def head(self, bucket: str, key: str) -> tuple[str, datetime] | None:
        """(ETag, LastModified) of the object, or None when it does not exist; other errors raise."""
        try:
            answer = await self._client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        return answer.get("ETag", ""), answer["LastModified"]

    async def get_bytes(self, bucket: str, key: str, max_bytes: int | None = None) -> bytes | None:
        """The object's bytes (at most `max_bytes`: ObjectTooLarge above), or None when it does not exist."""
        try:
            answer = await self._client.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        async with answer["Body"] as body:
            length = answer.get("ContentLength") or 0
            if max_bytes is not None and length > max_bytes:
                raise ObjectTooLarge(f"s3://{bucket}/{key} is {length} bytes, over the {max_bytes} limit")
            data = await body.read()
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(f"s3://{bucket}/{key} is {len(data)} bytes, over the {max_bytes} limit")
        return data

    async def list_objects(self, bucket: str, prefix: str,
                           max_pages: int | None = None) -> dict[str, tuple[str, datetime]] | None:
        """{key: (ETag, LastModified)} of every object under `prefix`, by ListObjectsV2 pages
        of 1,000 keys (one request each, in sequence: each page names the next). None when
        the listing would take more than `max_pages` requests (what is listed so far is
        dropped). LastModified is cut to whole seconds, as HEAD's Last-Modified header gives
        it, so that a listing and a HEAD name the same commit time; other errors raise."""
        found: dict[str, tuple[str, datetime]] = {}
        token, pages = None, 0
        while True:
            if max_pages is not None and pages >= max_pages:
                return None
            page = await self._client.list_objects_v2(
                Bucket=bucket, Prefix=prefix, MaxKeys=1000, **({"ContinuationToken": token} if token else {}))
            pages += 1
            for item in page.get("Contents", []):
                found[item["Key"]] = (item.get("ETag", ""), item["LastModified"].replace(microsecond=0))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return found


def is_transient_async(exc: BaseException) -> bool:
    """`is_transient`, plus the errors aiohttp and asyncio raise for an unreachable endpoint."""
    import aiohttp

    return is_transient(exc) or isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError))
