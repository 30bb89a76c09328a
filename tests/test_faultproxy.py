"""The fault-injecting proxy itself, in front of a tiny HTTP server (no S3, no MLflow)."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.faultproxy import FaultProxy

BODY = bytes(range(256)) * 40  # 10240 bytes


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stored: dict[str, bytes] = {}

    def do_GET(self):
        body = self.stored.get(self.path, BODY)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()

    def do_PUT(self):
        self.stored[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def proxy(upstream):
    with FaultProxy("127.0.0.1", upstream) as proxy:
        yield proxy


def request(proxy, method="GET", path="/x", body=None, headers=None, timeout=5.0):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_passes_requests_and_bodies_through_on_one_connection(proxy):
    assert request(proxy, "PUT", "/a", b"hello", {"Expect": "100-continue"})[0] == 204
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    for _ in range(2):  # keep-alive: two requests, one client connection
        conn.request("GET", "/a")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"hello")
    conn.request("HEAD", "/b")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b""
    conn.close()
    assert proxy.seen == [("PUT", "/a", "pass"), ("GET", "/a", "pass"), ("GET", "/a", "pass"), ("HEAD", "/b", "pass")]


def test_fails_the_next_n_matching_requests_then_passes(proxy):
    proxy.fail(503, times=2, match=r"^GET /x")
    assert request(proxy, "GET", "/other")[0] == 200  # does not match: passes, keeps the turns
    assert request(proxy, "GET", "/x")[0] == 503
    status, body = request(proxy, "GET", "/x")
    assert status == 503 and b"ServiceUnavailable" in body
    assert request(proxy, "GET", "/x") == (200, BODY)
    proxy.fail(500, times=1)
    assert request(proxy, "HEAD", "/x") == (500, b"")  # no body after a HEAD
    assert [a for _, _, a in proxy.seen] == ["pass", "fail", "fail", "pass", "fail"]


def test_cut_sends_part_of_the_body_then_closes(proxy):
    proxy.cut(times=1, keep=0.25)
    with pytest.raises(http.client.IncompleteRead) as cut:
        request(proxy)
    assert len(cut.value.partial) == len(BODY) // 4
    assert request(proxy) == (200, BODY)


def test_reset_closes_without_an_answer(proxy):
    proxy.reset(times=1)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        request(proxy)
    assert proxy.actions("reset") == [("GET", "/x", "reset")]


def test_delay_makes_the_client_time_out(proxy):
    proxy.delay(1.5, times=1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        request(proxy, timeout=0.5)
    assert time.monotonic() - started < 1.4
    assert request(proxy) == (200, BODY)


def test_down_refuses_connections_until_up_on_the_same_port(proxy):
    port = proxy.port
    proxy.down()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    proxy.up()
    assert proxy.port == port and request(proxy) == (200, BODY)


def test_clear_ends_lasting_faults(proxy):
    proxy.fail(500, times=None)
    assert request(proxy)[0] == 500 and request(proxy)[0] == 500
    proxy.clear()
    assert request(proxy)[0] == 200


def test_down_at_kills_the_server_when_a_matching_request_arrives(proxy):
    proxy.down_at(match=r"^PUT /die")
    assert request(proxy, "GET", "/x")[0] == 200
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        request(proxy, "PUT", "/die", b"x")
    with pytest.raises(ConnectionRefusedError):
        request(proxy, "GET", "/x")
    proxy.up()
    assert request(proxy, "GET", "/x")[0] == 200
    assert Handler.stored.get("/die") is None  # the request that killed it never reached the server
