"""A loopback stand-in for Vero's or Segment's API, with precise control over
its answers: fail a share of calls, reset connections, go down and come back on
the same port, or hold answers while the service is killed.

It records every request it receives, in arrival order, with what became of
it. A request counts as *delivered* when the stand-in decided to take it (a 2xx
answer, or a held answer that was released): a real upstream would have
processed it even if the client never saw the answer.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support import free_port

# Outcomes a request can have.
DELIVERED, REFUSED, RESET, HELD = "delivered", "refused", "reset", "held"

# A held answer never waits longer than this, so no test can hang on one.
HOLD_LIMIT_SECONDS = 30.0


@dataclass(frozen=True)
class Reply:
    """One answer: a status (with headers and a body), or a connection reset."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"status": 200, "message": "Success."}'
    reset: bool = False


OK = Reply()
CONNECTION_RESET = Reply(reset=True)


@dataclass
class Received:
    number: int  # 1-based, in arrival order
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    outcome: str = HELD

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def always_ok(number: int, request: Received) -> Reply:
    return OK


class Upstream:
    """A threaded HTTP/1.0 server on 127.0.0.1. HTTP/1.0 closes each connection
    after its answer, so stopping the server leaves no connection behind that
    could still answer."""

    def __init__(self, reply: Callable[[int, Received], Reply] = always_ok):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.reply = reply
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._hold: Callable[[Received], bool] | None = None
        self._released = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Upstream:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        server.daemon_threads = True
        server.handle_error = lambda request, address: None  # a client gone is expected
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until `start` again."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- holding answers ---------------------------------------------------

    def hold(self, which: Callable[[Received], bool] = lambda request: True) -> None:
        """From now on, requests `which` selects wait for `release` before
        they are answered (200)."""
        self._released.clear()
        self._hold = which

    def release(self) -> None:
        self._hold = None
        self._released.set()

    def held(self, which: Callable[[Received], bool] = lambda request: True) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.outcome == HELD and which(r)]

    # -- what arrived ------------------------------------------------------

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def _take(self, request: Received) -> Reply | None:
        """Record the request; its reply, or None when it is to be held."""
        with self._lock:
            request.number = len(self.received) + 1
            self.received.append(request)
            hold = self._hold
            if hold is not None and hold(request):
                return None
            reply = self.reply(request.number, request)
            request.outcome = (
                RESET if reply.reset else DELIVERED if 200 <= reply.status < 300 else REFUSED
            )
            return reply

    def _wait_for_release(self, request: Received) -> Reply:
        self._released.wait(HOLD_LIMIT_SECONDS)
        with self._lock:
            # Taken even when the client is gone: the upstream got the call.
            request.outcome = DELIVERED
        return OK


def _handler_for(upstream: Upstream):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self._handle()

        def do_PUT(self):
            self._handle()

        def _handle(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            request = Received(0, self.command, self.path, dict(self.headers.items()), body)
            reply = upstream._take(request)
            if reply is None:
                reply = upstream._wait_for_release(request)
            if reply.reset:
                self._reset()
                return
            try:
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
            except OSError:
                pass  # the client died while we held its answer

        def _reset(self):
            # Linger 0: close() sends RST, as a crashing upstream or proxy would.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        def log_message(self, format, *args):
            pass

    return Handler
