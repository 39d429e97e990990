"""Direction B end to end: the real service under gunicorn (several worker
processes, delivery in the web processes, a SQLite outbox) receives Vero
webhooks over HTTP and delivers them to a stand-in for Segment's HTTP API."""

import secrets
from collections import Counter

import pytest
import requests

from tests.conftest import wait_for
from tests.direction_b_samples import EVENT_NAMES, EXAMPLE, EXAMPLE_TRACK
from tests.support import Service, basic_auth

pytestmark = pytest.mark.e2e

WRITE_KEY = "wk_e2e_" + secrets.token_hex(6)
AT = 1700000000


def webhook(event_type: str, user: str, n: int) -> dict:
    return {
        "type": event_type,
        f"{event_type}_at": AT + n,
        "user": {"id": user},
        "campaign": {"id": 9, "name": "Onboarding"},
        "message_id": f"m-{user}",
    }


def test_webhooks_reach_segment_exactly_once_in_batches_with_the_write_key(segment, tmp_path):
    token = "e2e-hook-" + secrets.token_hex(12)
    env = {
        "SEGMENT_WRITE_KEY": WRITE_KEY,
        "SEGMENT_API_URL": segment.url,
        "VERO_WEBHOOK_TOKEN": token,
        "DATABASE_URL": f"sqlite:///{tmp_path}/outbox.db",
        "WEB_CONCURRENCY": "2",
        # The most the service ever writes, to show the token is in none of it.
        "LOG_LEVEL": "DEBUG",
    }
    expected = Counter()  # (userId, event, timestamp) of every message Segment must get
    # gunicorn's own access log on too: it sees the raw path, token included.
    with Service(env, tmp_path / "service.log", args=("--access-logfile", "-")) as service:
        hook = f"{service.url}/vero/webhooks/{token}"

        def post(body):
            return requests.post(hook, json=body, timeout=10)

        # One webhook of every forwarded type, each in its own request.
        for n, event_type in enumerate(EVENT_NAMES):
            response = post(webhook(event_type, f"user-{n}", n))
            assert (response.status_code, response.json()["accepted"]) == (200, 1), event_type
            expected[(f"user-{n}", EVENT_NAMES[event_type], f"2023-11-14T22:13:{20 + n}.000Z")] += 1
        # Acknowledged, never forwarded.
        for payload in (
            {"type": "user_created", "user": {"id": "x"}},
            {"type": "user_updated", "user": {"id": "x"}},
            {"action": "user_updated", "user": {"id": "x"}},
            {"type": "something_new", "user": {"id": "x"}},
        ):
            response = post(payload)
            assert (response.status_code, response.json()["skipped"]) == (200, 1), payload
        # The documented example, then Vero retrying it: delivered once.
        assert post(EXAMPLE).json()["accepted"] == 1
        assert post(EXAMPLE).json()["duplicate"] == 1
        # A burst in one body: one transaction, so one claim and one request.
        burst = [webhook("delivered", f"burst-{n}", 0) for n in range(50)]
        assert post(burst).json()["accepted"] == 50
        for n in range(50):
            expected[(f"burst-{n}", "Email Delivered", "2023-11-14T22:13:20.000Z")] += 1
        # Refused at the door, so never forwarded.
        assert (
            requests.post(
                f"{service.url}/vero/webhooks/not-{token}", json=EXAMPLE, timeout=10
            ).status_code
            == 401
        )
        assert post({"type": "opened", "user": {}}).status_code == 400

        total = sum(expected.values()) + 1  # and the example

        def received() -> int:
            return sum(len(request.json["batch"]) for request in segment.snapshot())

        wait_for(lambda: received() >= total, timeout=30)
        # A graceful stop lets anything still in flight finish, so the stand-in's
        # log below is everything the service will ever have sent.
    assert service.proc.returncode == 0

    batches = [request.json for request in segment.snapshot()]
    messages = [message for batch in batches for message in batch["batch"]]
    example = [m for m in messages if m.get("userId") == EXAMPLE["user"]["id"]]
    assert example == [EXAMPLE_TRACK]
    others = Counter(
        (m["userId"], m["event"], m["timestamp"]) for m in messages if m not in example
    )
    assert others == expected  # each exactly once, and nothing else
    assert len({m["messageId"] for m in messages}) == len(messages)

    for request in segment.snapshot():
        assert (request.method, request.path) == ("POST", "/v1/batch")
        assert request.headers["Authorization"] == basic_auth(WRITE_KEY)
    assert all(batch["writeKey"] == WRITE_KEY and batch["sentAt"] for batch in batches)
    assert len(batches) < len(messages)
    [burst_batch] = [b for b in batches if any(m["userId"] == "burst-0" for m in b["batch"])]
    assert {m["userId"] for m in burst_batch["batch"]} >= {f"burst-{n}" for n in range(50)}

    logs = service.logs()
    assert "/vero/webhooks/[redacted]" in logs  # the requests were logged ...
    assert token not in logs  # ... without the token
    assert WRITE_KEY not in logs
