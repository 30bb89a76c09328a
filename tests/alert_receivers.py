"""Loopback servers that receive alerts in tests: a tiny SMTP server and a webhook receiver,
each on 127.0.0.1 in a thread, keeping what they were sent."""

from __future__ import annotations

import base64
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


# --- a tiny SMTP server: EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT ---------------------------------
class SmtpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), SmtpHandler)
        self.messages: list[dict] = []
        self.port = self.server_address[1]


class SmtpHandler(socketserver.StreamRequestHandler):
    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        try:
            self.converse()
        except ConnectionResetError:  # a client that gave up (e.g. after a failed TLS handshake)
            pass

    def converse(self) -> None:
        current: dict = {"rcpt": [], "auth": None}
        self.reply("220 loopback ESMTP test")
        while line := self.rfile.readline():
            command = line.decode("latin-1").rstrip("\r\n")  # a TLS hello is bytes, not a command
            verb = command.split(" ", 1)[0].upper()
            if verb == "EHLO":
                self.wfile.write(b"250-loopback\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n")
            elif verb == "HELO":
                self.reply("250 loopback")
            elif verb == "AUTH":
                _, user, password = base64.b64decode(command.split()[2]).decode().split("\0")
                current["auth"] = (user, password)
                self.reply("235 2.7.0 authenticated")
            elif verb == "MAIL":
                current["from"] = command[len("MAIL FROM:"):].split()[0].strip("<>")
                self.reply("250 ok")
            elif verb == "RCPT":
                current["rcpt"].append(command[len("RCPT TO:"):].split()[0].strip("<>"))
                self.reply("250 ok")
            elif verb == "DATA":
                self.reply("354 end with <CRLF>.<CRLF>")
                data = []
                while (row := self.rfile.readline()) != b".\r\n":
                    data.append(row[1:] if row.startswith(b"..") else row)
                current["data"] = b"".join(data)
                self.server.messages.append(current)
                current = {"rcpt": [], "auth": current["auth"]}
                self.reply("250 queued")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 ok")


# --- a webhook receiver ---------------------------------------------------------------------------
class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.requests: list[dict] = []
        self.status = 200
        self.port = self.server_address[1]


class ReceiverHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        self.send_response(self.server.status)
        self.send_header("Content-Type", "text/plain")
        if 300 <= self.server.status < 400:
            self.send_header("Location", "/moved")
        self.end_headers()
        self.wfile.write(b"ok" if self.server.status < 400 else b"receiver broke")

    def do_GET(self) -> None:  # where urllib would send a redirected POST, body dropped
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": b""})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


def serve(server):
    """Start `server` in a daemon thread; returns it (stop with `stop`)."""
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def stop(server) -> None:
    server.shutdown()
    server.server_close()
