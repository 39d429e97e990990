"""A stand-in for Vero's REST API on a real loopback port (pytest-httpserver).

It answers 200 with Vero's success body unless a test scripted another answer,
and keeps every request it received, so tests can assert exactly what reached
"Vero" and in what order.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from werkzeug import Request, Response

BASE_PATH = "/api/v2"
SUCCESS = {"status": 200, "message": "Success."}


@dataclass
class _Scripted:
    matches: Callable[[str, dict], bool]
    status: int
    body: str
    headers: dict[str, str]
    times: int | None  # None: every time


class VeroStandIn:
    def __init__(self, httpserver):
        self.server = httpserver
        self.url = httpserver.url_for(BASE_PATH)
        self._scripted: list[_Scripted] = []
        self._lock = threading.Lock()
        httpserver.expect_request(re.compile(".*")).respond_with_handler(self._answer)

    def answer(
        self,
        status: int,
        path: str | None = None,
        user: str | None = None,
        body: Any = "",
        headers: dict[str, str] | None = None,
        times: int | None = 1,
    ) -> None:
        """Answer `status` to requests for `path` (relative to the API base)
        whose body is about `user`, `times` times (None: always)."""

        def matches(request_path: str, payload: dict) -> bool:
            return (path is None or request_path == BASE_PATH + path) and (
                user is None or user_of(payload) == user
            )

        text = body if isinstance(body, str) else json.dumps(body)
        with self._lock:
            self._scripted.append(_Scripted(matches, status, text, headers or {}, times))

    def received(self) -> list[tuple[str, str, Any]]:
        """(method, path relative to the API base, JSON body) of every request, in order."""
        return [
            (request.method, request.path.removeprefix(BASE_PATH), request.get_json(silent=True))
            for request, _ in list(self.server.log)
        ]

    def statuses(self) -> list[int]:
        return [response.status_code for _, response in list(self.server.log)]

    def _answer(self, request: Request) -> Response:
        payload = request.get_json(silent=True)
        payload = payload if isinstance(payload, dict) else {}
        with self._lock:
            for scripted in self._scripted:
                if scripted.times != 0 and scripted.matches(request.path, payload):
                    if scripted.times is not None:
                        scripted.times -= 1
                    return Response(scripted.body, status=scripted.status, headers=scripted.headers)
        return Response(json.dumps(SUCCESS), status=200, content_type="application/json")


def user_of(body: dict) -> Any:
    """The user a Vero call is about, as the outbox orders them: `id`,
    `identity.id` for events, the new id of a reidentify."""
    if "new_id" in body:
        return body["new_id"]
    identity = body.get("identity")
    if isinstance(identity, dict):
        return identity.get("id")
    return body.get("id")
