"""A fault-injecting HTTP/1.1 proxy on loopback, for tests of S3 and MLflow outages.

It sits in front of a real server (the moto S3 server, an `mlflow server`) and forwards
each request as it is, until a test switches a fault on:

    proxy = FaultProxy("127.0.0.1", s3_port).start()
    proxy.fail(503, times=3)                   # the next 3 requests get HTTP 503
    proxy.reset(times=2, match=r"^PUT .*/candidate/")  # close the connection instead of answering
    proxy.delay(5.0, times=1)                  # answer the next request 5 s late (read timeouts)
    proxy.cut(times=1, match=r"^GET ")         # send half of the response body, then close
    proxy.down(); proxy.up()                   # refuse every connection (server down), then back
    proxy.down_at(match=r"^POST .*/alias")     # the server dies when such a request arrives
    proxy.clear()                              # pass-through again

Faults apply to the requests whose "METHOD /path?query" matches `match` (a regex; None for
all), the first matching rule with turns left wins, `times=None` lasts until `clear()`.
Every request is recorded in `proxy.seen` as (method, path, action). The proxy reads each
request whole (it answers `Expect: 100-continue` itself), sends it upstream on a fresh
connection, and reads the whole response, so it knows the body it cuts. It runs an asyncio
loop in a daemon thread; the control methods are thread-safe.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass, field

PASS, FAIL, RESET, DELAY, CUT, DOWN = "pass", "fail", "reset", "delay", "cut", "down"
_REASONS = {403: "Forbidden", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}
_CODES = {403: "AccessDenied", 500: "InternalError", 503: "ServiceUnavailable"}  # S3's error codes


@dataclass
class Rule:
    action: str
    times: int | None  # None: until cleared
    match: re.Pattern | None
    status: int = 503
    seconds: float = 0.0
    keep: float = 0.5

    def applies(self, line: str) -> bool:
        return (self.times is None or self.times > 0) and (self.match is None or bool(self.match.search(line)))


@dataclass
class _Message:
    head: bytes  # status line and headers, up to and including the blank line
    body: bytes
    status: int
    headers: dict[str, str] = field(default_factory=dict)


def _parse_head(raw: bytes) -> tuple[str, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body as raw bytes, framing included, through the last chunk and trailers."""
    out = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        out += size_line
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, then the blank line
                line = await reader.readuntil(b"\r\n")
                out += line
                if line == b"\r\n":
                    return bytes(out)
        out += await reader.readexactly(size + 2)


async def _read_response(reader: asyncio.StreamReader, method: str) -> _Message:
    head = await reader.readuntil(b"\r\n\r\n")
    start, headers = _parse_head(head)
    status = int(start.split(" ")[1])
    if method == "HEAD" or status < 200 or status in (204, 304):
        body = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()  # no framing: the body ends when the server closes
    return _Message(head, body, status, headers)


class FaultProxy:
    """See the module docstring."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.seen: list[tuple[str, str, str]] = []
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- control (any thread) ---------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._thread.start()
        self.up()
        return self

    def stop(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def up(self) -> None:
        """Listen again (on the same port once it is known)."""
        self._call(self._listen())

    def down(self) -> None:
        """Server down: new connections are refused, open ones are reset."""
        self._call(self._close())

    def fail(self, status: int = 503, times: int | None = 1, match: str | None = None) -> None:
        self._add(Rule(FAIL, times, _compile(match), status=status))

    def reset(self, times: int | None = 1, match: str | None = None) -> None:
        self._add(Rule(RESET, times, _compile(match)))

    def delay(self, seconds: float, times: int | None = 1, match: str | None = None) -> None:
        self._add(Rule(DELAY, times, _compile(match), seconds=seconds))

    def cut(self, times: int | None = 1, match: str | None = None, keep: float = 0.5) -> None:
        self._add(Rule(CUT, times, _compile(match), keep=keep))

    def down_at(self, match: str | None = None, times: int | None = 1) -> None:
        """The server dies when a matching request arrives: that request is reset unanswered
        and every later connection is refused until `up()`."""
        self._add(Rule(DOWN, times, _compile(match)))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def actions(self, action: str, match: str | None = None) -> list[tuple[str, str, str]]:
        """The recorded requests that got `action` (and match the regex, if given)."""
        pattern = _compile(match)
        with self._lock:
            return [s for s in self.seen if s[2] == action and (pattern is None or pattern.search(f"{s[0]} {s[1]}"))]

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- internals (the loop's thread) ----------------------------------------------------
    def _add(self, rule: Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _shutdown(self) -> None:
        await self._close()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _decide(self, method: str, path: str) -> Rule | None:
        line = f"{method} {path}"
        with self._lock:
            rule = next((r for r in self._rules if r.applies(line)), None)
            if rule is not None and rule.times is not None:
                rule.times -= 1
            self.seen.append((method, path, rule.action if rule else PASS))
        return rule

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio's stream callback chokes on a cancelled handler)
        finally:
            self._writers.discard(writer)
            writer.transport.abort() if self._server is None else writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Handle one request; False when the client connection is done."""
        head = await reader.readuntil(b"\r\n\r\n")
        start, headers = _parse_head(head)
        method, path = start.split(" ")[:2]
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            head = b"".join(line + b"\r\n" for line in head.split(b"\r\n")[:-2]
                            if not line.lower().startswith(b"expect:")) + b"\r\n"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))

        rule = self._decide(method, path)
        if rule is not None and rule.action in (RESET, DOWN):
            writer.transport.abort()
            if rule.action == DOWN:
                await self._close()
            return False
        if rule is not None and rule.action == FAIL:
            text = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{_CODES.get(rule.status, 'Error')}</Code>"
                    f"<Message>injected {rule.status}</Message></Error>").encode()
            writer.write(f"HTTP/1.1 {rule.status} {_REASONS.get(rule.status, 'Error')}\r\nContent-Type: application/xml"
                         f"\r\nContent-Length: {len(text)}\r\nConnection: close\r\n\r\n".encode()
                         + (b"" if method == "HEAD" else text))
            await writer.drain()
            return False

        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(head + body)
            await up_writer.drain()
            response = await _read_response(up_reader, method)
            while 100 <= response.status < 200 and response.status != 101:  # interim answers
                response = await _read_response(up_reader, method)
        finally:
            up_writer.close()
        if rule is not None and rule.action == DELAY:
            await asyncio.sleep(rule.seconds)
        if rule is not None and rule.action == CUT:
            writer.write(response.head + response.body[:int(len(response.body) * rule.keep)])
            await writer.drain()
            writer.close()  # FIN after part of the body: the client sees a short read
            return False
        framed = ("content-length" in response.headers or "chunked" in response.headers.get("transfer-encoding", "")
                  or response.status in (204, 304))
        writer.write(response.head + response.body)
        await writer.drain()
        keep_alive = response.headers.get("connection", "").lower() != "close" and (framed or method == "HEAD")
        return keep_alive


def _compile(match: str | None) -> re.Pattern | None:
    return re.compile(match) if match else None
