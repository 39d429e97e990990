"""How a body arrives on the wire, against the real service under gunicorn:
chunked bodies are held to MAX_BODY_BYTES (413, never cut short), malformed
chunking and a body shorter than its Content-Length are refused (400) and
never stored, compressed chunked bodies and `Expect: 100-continue` work.

Requests are written byte by byte on raw sockets, as no HTTP client would
write the broken ones. "Nothing stored" is checked with a marker: after each
refused request one valid message is sent, and once the stand-in Vero has it,
nothing else may have reached Vero (the outbox delivers what it holds, and the
marker's user is the same, so it waits behind anything stored before it).
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import uuid

import pytest

from tests.conftest import wait_for
from tests.support import Service

pytestmark = pytest.mark.e2e

SECRET = "framing-shared-secret"
LIMIT = 8192
AUTH = "Basic " + base64.b64encode(f"{SECRET}:".encode()).decode()


@pytest.fixture
def service(vero, tmp_path):
    env = {
        "VERO_AUTH_TOKEN": "framing-vero-token",
        "VERO_API_URL": vero.url,
        "SEGMENT_SHARED_SECRET": SECRET,
        "DATABASE_URL": f"sqlite:///{tmp_path}/outbox.db",
        "MAX_BODY_BYTES": str(LIMIT),
        "WEB_CONCURRENCY": "1",
        "DELIVERY_POLL_SECONDS": "0.05",
    }
    with Service(env, tmp_path / "log") as running:
        yield running


def track(event: str, padding: int = 0) -> bytes:
    message = {"type": "track", "userId": "u1", "event": event, "messageId": str(uuid.uuid4())}
    if padding:
        message["properties"] = {"padding": "x" * padding}
    return json.dumps(message).encode()


def exchange(service, head: str, body: bytes = b"", half_close: bool = False) -> tuple[int, bytes]:
    """Send a request's head and body as given; the answer's status and body."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=15) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
    if not answer:
        return 0, b""
    # Skip an interim "100 Continue".
    while answer.startswith(b"HTTP/1.1 100"):
        answer = answer.split(b"\r\n\r\n", 1)[1]
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[-1]


def head(path: str = "/v1/track", **headers: str) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: {AUTH}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    lines.append("Connection: close")
    return "\n".join(lines) + "\n"


def chunked(body: bytes, size: int = 1000) -> bytes:
    pieces = [body[start : start + size] for start in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def events_at_vero(vero) -> list[str]:
    return [body["event_name"] for _, path, body in vero.received() if path == "/events/track"]


def assert_nothing_stored(service, vero, expected_before: list[str]) -> None:
    marker = track("Marker")
    status, _ = exchange(service, head(Content_Length=str(len(marker))), marker)
    assert status == 200
    wait_for(lambda: "Marker" in events_at_vero(vero), timeout=30)
    assert events_at_vero(vero) == [*expected_before, "Marker"]


def test_a_chunked_body_within_the_limit_is_accepted(service, vero):
    body = track("Chunked", padding=LIMIT - 200)
    assert len(body) <= LIMIT

    status, answer = exchange(service, head(Transfer_Encoding="chunked"), chunked(body, 700))

    assert status == 200, answer
    assert json.loads(answer)["accepted"] == 1
    wait_for(lambda: events_at_vero(vero) == ["Chunked"], timeout=30)


@pytest.mark.parametrize(
    "body",
    [
        track("TooBig", padding=LIMIT),
        # Valid JSON within the limit, padded past it: once accepted whole.
        track("Padded") + b" " * LIMIT,
        # Cut at the limit, the padding alone would read as valid JSON.
        track("Cut", padding=LIMIT // 2) + b" " * LIMIT + b"garbage",
    ],
    ids=["over", "padded", "cut-would-parse"],
)
def test_a_chunked_body_over_the_limit_is_413_never_cut_short(service, vero, body):
    status, answer = exchange(service, head(Transfer_Encoding="chunked"), chunked(body, 4000))

    assert status == 413, answer
    assert f"limit of {LIMIT} bytes".encode() in answer
    assert_nothing_stored(service, vero, [])


@pytest.mark.parametrize(
    "framing",
    [
        b"zz\r\n{}\r\n0\r\n\r\n",
        b"5\r\n{}\r\n0\r\n\r\n",
        b"2\r\n{}XX0\r\n\r\n",
    ],
    ids=["bad-size", "short-chunk", "missing-terminator"],
)
def test_a_malformed_chunked_body_is_400(service, vero, framing):
    status, answer = exchange(service, head(Transfer_Encoding="chunked"), framing, half_close=True)

    assert status == 400, answer
    assert b"could not be read" in answer
    assert_nothing_stored(service, vero, [])


def test_a_body_shorter_than_its_content_length_is_never_stored(service, vero):
    body = track("Short")
    status, answer = exchange(
        service, head(Content_Length=str(len(body) + 50)), body, half_close=True
    )

    assert status == 400, answer
    assert b"ended after" in answer
    assert_nothing_stored(service, vero, [])


def test_a_gzip_body_sent_chunked_is_accepted(service, vero):
    """What analytics-java's documented gzip interceptor sends: OkHttp streams
    the compressed body without a length."""
    body = json.dumps({"batch": [json.loads(track("Gzipped"))]}).encode()
    status, answer = exchange(
        service,
        head("/v1/import/", Transfer_Encoding="chunked", Content_Encoding="gzip"),
        chunked(gzip.compress(body), 50),
    )

    assert status == 200, answer
    wait_for(lambda: events_at_vero(vero) == ["Gzipped"], timeout=30)


def test_expect_100_continue_is_answered(service, vero):
    """curl, which analytics-php uses, asks for 100 Continue before a body of
    more than a kilobyte."""
    body = track("Continued", padding=2000)
    with socket.create_connection(("127.0.0.1", service.port), timeout=15) as sock:
        sock.sendall(
            head("/v1/batch", Content_Length=str(len(body)), Expect="100-continue")
            .replace("\n", "\r\n")
            .encode()
            + b"\r\n"
        )
        interim = sock.recv(1024)
        sock.sendall(body)
        rest = b""
        while data := sock.recv(65536):
            rest += data

    assert interim.startswith(b"HTTP/1.1 100 Continue")
    assert b" 200 " in rest.split(b"\r\n", 1)[0] + b" "
    wait_for(lambda: events_at_vero(vero) == ["Continued"], timeout=30)
