"""A loopback stand-in for Vero's or Segment's API, with precise control over
its answers: script an answer for one path or user, fail a share of calls,
reset connections, go down and come back on the same port, or hold answers
while the service is killed.

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

# Outcomes a request can have.
DELIVERED, REFUSED, RESET, HELD = "delivered", "refused", "reset", "held"

# A held answer never waits longer than this, so no test can hang on one.
HOLD_LIMIT_SECONDS = 30.0

# Where each API lives below its host, as the service's *_API_URL settings name it.
VERO_BASE_PATH = "/api/v2"
SEGMENT_BASE_PATH = "/v1"


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
    status: int | None = None  # what was answered; None: reset, or still held

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def always_ok(number: int, request: Received) -> Reply:
    return OK


def user_of(body: Any) -> Any:
    """The user a Vero call is about, as the outbox orders them: `id`,
    `identity.id` for events, the new id of a reidentify."""
    if not isinstance(body, dict):
        return None
    if "new_id" in body:
        return body["new_id"]
    identity = body.get("identity")
    if isinstance(identity, dict):
        return identity.get("id")
    return body.get("id")


@dataclass
class _Scripted:
    path: str | None
    user: str | None
    reply: Reply
    times: int | None  # None: every time

    def takes(self, path: str, body: Any) -> bool:
        return (
            self.times != 0
            and (self.path is None or path == self.path)
            and (self.user is None or user_of(body) == self.user)
        )


class Upstream:
    """A threaded HTTP/1.0 server on 127.0.0.1, serving its API below
    `base_path`. HTTP/1.0 closes each connection after its answer, so stopping
    the server leaves no connection behind that could still answer.

    Each request gets the first scripted answer (`answer`) that takes it, else
    `reply(number, request)`: 200 with Vero's success body unless a test says
    otherwise."""

    def __init__(self, reply: Callable[[int, Received], Reply] = always_ok, base_path: str = ""):
        self.port = 0  # chosen by the system at the first start, kept after
        self.base_path = base_path
        self.reply = reply
        self._received: list[Received] = []
        self._scripted: list[_Scripted] = []
        self._lock = threading.Lock()
        self._hold: Callable[[Received], bool] | None = None
        self._released = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The API's base URL, for the service's VERO_API_URL or SEGMENT_API_URL."""
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Upstream:
        """Listen (again on the same port, after a `stop`)."""
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        self.port = server.server_address[1]
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

    # -- scripted answers --------------------------------------------------

    def answer(
        self,
        status: int,
        path: str | None = None,
        user: str | None = None,
        body: Any = "",
        headers: dict[str, str] | None = None,
        times: int | None = 1,
    ) -> None:
        """Answer `status` to requests for `path` (below the base path) whose
        JSON body is about `user` (see `user_of`), `times` times (None: always)."""
        text = body if isinstance(body, str) else json.dumps(body)
        reply = Reply(status, headers or {}, text.encode())
        with self._lock:
            self._scripted.append(_Scripted(path, user, reply, times))

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
            return [r for r in self._received if r.outcome == HELD and which(r)]

    # -- what arrived ------------------------------------------------------

    def snapshot(self) -> list[Received]:
        """Every request so far, with its outcome."""
        with self._lock:
            return list(self._received)

    def received(self) -> list[tuple[str, str, Any]]:
        """(method, path below the base path, JSON body) of every request, in order."""
        return [
            (request.method, request.path.removeprefix(self.base_path), request.json)
            for request in self.snapshot()
        ]

    def statuses(self) -> list[int | None]:
        """The status answered to each request (None: reset, or still held)."""
        return [request.status for request in self.snapshot()]

    def _take(self, request: Received) -> Reply | None:
        """Record the request; its reply, or None when it is to be held."""
        with self._lock:
            request.number = len(self._received) + 1
            self._received.append(request)
            hold = self._hold
            if hold is not None and hold(request):
                return None
            reply = self._scripted_reply(request) or self.reply(request.number, request)
            request.status = None if reply.reset else reply.status
            request.outcome = (
                RESET if reply.reset else DELIVERED if 200 <= reply.status < 300 else REFUSED
            )
            return reply

    def _scripted_reply(self, request: Received) -> Reply | None:
        path = request.path.removeprefix(self.base_path)
        for scripted in self._scripted:
            if scripted.takes(path, request.json):
                if scripted.times is not None:
                    scripted.times -= 1
                return scripted.reply
        return None

    def _wait_for_release(self, request: Received) -> Reply:
        self._released.wait(HOLD_LIMIT_SECONDS)
        with self._lock:
            # Taken even when the client is gone: the upstream got the call.
            request.outcome = DELIVERED
            request.status = OK.status
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
                headers = {"Content-Type": "application/json", **reply.headers}
                for name, value in headers.items():
                    self.send_header(name, value)
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
