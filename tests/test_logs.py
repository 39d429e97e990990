"""Secrets never reach logs, errors or answers, and email addresses stay out
of the logs at the default level: checked on the real service under gunicorn
(with gunicorn's own access log on), against upstreams whose error answers
echo everything they were sent, credential and personal data included."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from service.outbox import DEAD, open_store
from tests.conftest import wait_for
from tests.standin import Reply, Upstream
from tests.support import GUNICORN, ROOT, Service, sign

pytestmark = pytest.mark.e2e

FLASK = Path(sys.executable).with_name("flask")
WAIT = 30.0  # bounds each wait; a healthy run needs a fraction


def secret(name: str) -> str:
    # Distinctive, and with characters an encoder would escape or quote.
    return f"{name.lower()}-{uuid.uuid4().hex[:12]}/+="


def forms(value: str) -> set[str]:
    """The spellings a leak could take: as is, JSON-escaped, URL-quoted, and as
    the user name of an HTTP Basic header."""
    return {
        value,
        json.dumps(value)[1:-1],
        quote(value, safe=""),
        quote(value),
        base64.b64encode(f"{value}:".encode()).decode().rstrip("="),
    }


def echo_everything(number: int, request) -> Reply:
    """An upstream that repeats the request (body, credential, headers) in its
    error answer: first a retryable 500, then a permanent 400."""
    echo = json.dumps(
        {"you_sent": request.body.decode("utf-8", "replace"), "headers": request.headers}
    ).encode()
    return Reply(500 if number == 1 else 400, {"Retry-After": "0"}, echo)


@pytest.fixture
def upstreams():
    vero, segment = Upstream(echo_everything).start(), Upstream(echo_everything).start()
    yield vero, segment
    vero.stop()
    segment.stop()


@pytest.mark.parametrize("credential", ["VERO_AUTH_TOKEN", "VERO_TRACKING_API_KEY"])
def test_no_secret_and_no_email_reaches_logs_errors_or_answers(credential, upstreams, tmp_path):
    vero, segment = upstreams
    secrets = {
        name: secret(name) for name in (credential, "SEGMENT_SHARED_SECRET", "SEGMENT_WRITE_KEY")
    }
    # A path segment: no "/", which a URL could only carry as %2F.
    secrets["VERO_WEBHOOK_TOKEN"] = secret("VERO_WEBHOOK_TOKEN").replace("/", "~")
    emails = [f"person-{uuid.uuid4().hex[:8]}@example.org" for _ in range(4)]
    store_url = f"sqlite:///{tmp_path}/outbox.db"
    env = {
        **secrets,
        "DATABASE_URL": store_url,
        "VERO_API_URL": vero.url,
        "SEGMENT_API_URL": segment.url,
        "WEB_CONCURRENCY": "2",
        "DELIVERY_POLL_SECONDS": "0.05",
    }
    shared, token = secrets["SEGMENT_SHARED_SECRET"], secrets["VERO_WEBHOOK_TOKEN"]
    answers: list[requests.Response] = []

    with Service(env, tmp_path / "service.log", ("--access-logfile", "-")) as service:

        def post(path: str, body: object, **kwargs) -> requests.Response:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            answer = requests.post(
                service.url + path,
                data=data,
                timeout=10,
                headers={"Content-Type": "application/json", **kwargs.pop("headers", {})},
                **kwargs,
            )
            answers.append(answer)
            return answer

        # Direction A: accepted messages carrying emails, both ways of signing.
        # A message signed with X-Signature alone must be recent (SERVICE.md).
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        identify = {
            "type": "identify",
            "userId": "u1",
            "traits": {"email": emails[0]},
            "timestamp": now,
        }
        track = {
            "type": "track",
            "userId": "u2",
            "event": "Signed Up",
            "context": {"traits": {"email": emails[1]}},
        }
        signed = json.dumps(identify).encode()
        assert (
            post("/segment", signed, headers={"X-Signature": sign(signed, shared)}).status_code
            == 200
        )
        assert post("/v1/track", track, auth=(shared, "")).status_code == 200
        # Refused ones: a bad signature, the write key offered as the secret, an
        # invalid message holding an email.
        assert post("/segment", signed, headers={"X-Signature": "0" * 40}).status_code == 401
        assert post("/v1/track", track, auth=(secrets["SEGMENT_WRITE_KEY"], "")).status_code == 401
        invalid = {"type": "identify", "userId": "x" * 300, "traits": {"email": emails[0]}}
        assert post("/v1/identify", invalid, auth=(shared, "")).status_code == 400

        # Direction B: the token travels in the path, right and wrong.
        webhook = {
            "type": "opened",
            "opened_at": 1_700_000_000,
            "message_id": "m1",
            "user": {"id": "u3", "email": emails[2]},
            "campaign": {"id": 1},
        }
        assert post(f"/vero/webhooks/{quote(token, safe='')}", webhook).status_code == 200
        assert post(f"/vero/webhooks/{quote(token, safe='')}x", webhook).status_code == 401
        no_user = {"type": "clicked", "user": {"email": f"not valid {emails[3]}"}, "campaign": "x"}
        assert post(f"/vero/webhooks/{quote(token, safe='')}", no_user).status_code == 400
        answers.append(
            requests.get(f"{service.url}/vero/webhooks/{quote(token, safe='')}", timeout=10)
        )
        answers.append(
            requests.post(f"{service.url}/vero/webhooks/{quote(token, safe='')}/more", timeout=10)
        )
        answers.append(requests.get(service.url + "/metrics", timeout=10))

        # Both upstreams echo the credential back, first retryably, then for good.
        wait_for(lambda: dead_in_both_directions(store_url), timeout=WAIT)
        assert len(vero.snapshot()) >= 2 and len(segment.snapshot()) >= 2
        dead_listing = outbox_command(env, "dead", "--json")

    logs = service.logs()
    # The service did log what happened, so the checks below look at real lines.
    assert "vero_bridge.access" in logs and "/vero/webhooks/[redacted]" in logs
    assert "Vero delivery failed" in logs
    assert "Segment refused a batch" in logs
    seen_by_users = "\n".join(
        [answer.text + json.dumps(dict(answer.headers)) for answer in answers] + [dead_listing]
    )
    for name, value in secrets.items():
        for form in forms(value):
            assert form not in logs, f"{name} reached the logs"
            assert form not in seen_by_users, f"{name} reached an answer or the dead-letter errors"
    for email in emails:
        assert email not in logs, "an email address reached the logs at the default level"


def dead_in_both_directions(store_url: str) -> bool:
    store = open_store(store_url)
    try:
        counts = store.counts(time.time())
    finally:
        store.close()
    return (
        counts.get(("segment_to_vero", DEAD), 0) >= 2
        and counts.get(("vero_to_segment", DEAD), 0) >= 1
    )


def outbox_command(env: dict, *args: str) -> str:
    result = subprocess.run(
        [str(FLASK), "--app", "wsgi", "outbox", *args],
        cwd=ROOT,
        env={**env, "PATH": str(FLASK.parent) + ":/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_a_configuration_error_names_the_variable_but_never_a_secret(tmp_path):
    token, key = secret("VERO_AUTH_TOKEN"), secret("VERO_TRACKING_API_KEY")
    env = {
        "VERO_AUTH_TOKEN": token,
        "VERO_TRACKING_API_KEY": key,
        "DATABASE_URL": f"sqlite:///{tmp_path}/outbox.db",
        "PATH": str(GUNICORN.parent) + ":/usr/bin:/bin",
    }
    result = subprocess.run(
        [str(GUNICORN), "wsgi:app", "--bind", "127.0.0.1:0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "VERO_AUTH_TOKEN" in output
    for value in (token, key):
        assert not any(form in output for form in forms(value))


def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send exactly these bytes (a request line of any shape) and read the
    whole answer, headers included."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_webhook_tokens_never_show_whatever_the_path_shape(tmp_path):
    # "~" is what an older URL quoter writes as %7E.
    token, previous = (f"tok~{uuid.uuid4().hex}", f"old~{uuid.uuid4().hex}")
    env = {
        "VERO_WEBHOOK_TOKEN": token,
        "VERO_WEBHOOK_TOKEN_PREVIOUS": previous,
        "SEGMENT_WRITE_KEY": secret("SEGMENT_WRITE_KEY"),
        "SEGMENT_API_URL": "http://127.0.0.1:9/v1",  # never reached: nothing is delivered
        "DELIVERY_IN_WEB": "false",
        "DATABASE_URL": f"sqlite:///{tmp_path}/outbox.db",
        "LOG_LEVEL": "DEBUG",
    }
    webhook = json.dumps(
        {
            "type": "opened",
            "opened_at": 1_700_000_000,
            "message_id": "m1",
            "user": {"id": "u3"},
            "campaign": {"id": 1},
        }
    ).encode()
    answers = []
    with Service(env, tmp_path / "service.log", ("--access-logfile", "-")) as service:
        for value in (token, previous):
            encoded = value.replace("~", "%7E")
            for path in (
                f"/vero/webhooks/{value}",
                f"//vero/webhooks/{value}",
                f"/vero//webhooks//{value}",
                f"/VERO/webhooks/{value}",
                f"/vero/WEBHOOKS/{value}",
                f"/vero/webhooks/{value}/extra/segments",
                f"/vero/webhooks/{value}/",
                f"/vero/webhooks/{encoded}",
                f"/vero/webhooks/{value}?token={value}",
                f"/vero/webhooks?token={value}",
                f"/healthz?token={encoded}",
                f"/{value}",
                "/vero/webhooks/not-the-token",  # refused: 401
            ):
                for method in (b"POST", b"GET"):
                    head = (
                        method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/json\r\nConnection: close\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(webhook)
                    )
                    answers.append(raw_request(service.port, head, webhook))
            # Request lines and headers gunicorn cannot parse: it answers 400
            # itself, quoting what it could not read.
            for head in (
                f"GET /vero/webhooks/{value} HTTP/1.1 trailing\r\n\r\n",
                f"GET /vero/webhooks/{value} HTTP/9.9\r\n\r\n",
                f"G\x01T /vero/webhooks/{value} HTTP/1.1\r\n\r\n",
                f"GET /vero/webhooks/{value}\x7f HTTP/1.1\r\n\r\n",
                f"GET /healthz HTTP/1.1\r\nBad Header {value}: x\r\n\r\n",
                f"GET /healthz HTTP/1.1\r\nX-Token: {value}\x00\r\n\r\n",
            ):
                answers.append(raw_request(service.port, head.encode("latin-1")))
        assert all(answers)
    logs = service.logs()
    # The shapes were seen and logged: accepted, refused and unreadable.
    assert '"status": 200' in logs and '"status": 401' in logs and '"status": 404' in logs
    assert "Invalid request from ip=127.0.0.1" in logs and b" 400 " in b"".join(answers)
    assert all(line.startswith("{") for line in logs.splitlines())
    for value in (token, previous):
        hexpart = value.split("~")[1]
        for name, text in (("logs", logs), ("answers", b"\n".join(answers).decode("latin-1"))):
            assert hexpart not in text, f"a webhook token reached the {name}"
            assert hexpart[:12] not in text.replace("-", ""), f"part of a token reached the {name}"
