"""Direction A as deployed: gunicorn with its delivery workers, a stand-in Vero on
a loopback port, and Segment-shaped traffic, including Segment's own Python
library using the service as its host."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest
import requests
from segment.analytics import Client
from segment.analytics import request as library_request

from tests.conftest import wait_for
from tests.direction_a_samples import EXTRAS, every_type, with_credential
from tests.standin import user_of
from tests.support import ROOT, Service, metric, scrape, sign

pytestmark = pytest.mark.e2e

SECRET = "e2e-shared-secret"
TOKEN = "e2e-vero-token"
WAIT_SECONDS = 30


@pytest.fixture
def service(vero, tmp_path):
    env = {
        "VERO_AUTH_TOKEN": TOKEN,
        "VERO_API_URL": vero.url,
        "SEGMENT_SHARED_SECRET": SECRET,
        "DATABASE_URL": f"sqlite:///{tmp_path}/outbox.db",
        "WEB_CONCURRENCY": "2",
    }
    with Service(env, tmp_path / "log") as running:
        yield running
    assert TOKEN not in running.logs() and SECRET not in running.logs()


@pytest.fixture
def library_session(service):
    """Segment's Python library sends through one module-level requests
    session; closing it before the service stops (this fixture needs the
    service, so it is torn down first) saves the graceful stop waiting out the
    connections it keeps alive."""
    yield
    library_request._session.close()
    # urllib3 closes a pool's connections when the pool is collected; a caught
    # APIError's traceback holds its response (and so the pool) in a cycle.
    gc.collect()


def settled(service) -> tuple[float, float, float]:
    """(deliveries that succeeded, items pending or in flight, dead items), from
    the service's own metrics, across its gunicorn workers."""
    text = scrape(service.url)

    def value(name: str, **labels: str) -> float:
        return metric(text, name, **labels) or 0.0

    items = "vero_bridge_outbox_items"
    return (
        value(
            "vero_bridge_deliveries_total", upstream="vero", result="succeeded", status_class="2xx"
        ),
        value(items, direction="segment_to_vero", state="pending")
        + value(items, direction="segment_to_vero", state="in_flight"),
        value(items, direction="segment_to_vero", state="dead"),
    )


def wait_until_delivered(service, count: int) -> None:
    wait_for(lambda: settled(service)[0] >= count, timeout=WAIT_SECONDS, interval=0.1)
    # Every item is settled as delivered, so nothing more can be sent.
    assert settled(service) == (count, 0, 0)


def per_user(received):
    users: dict = {}
    for call in received:
        users.setdefault(user_of(call[2]), []).append(call)
    return users


def test_messages_of_every_type_reach_vero_exactly_once_in_each_users_order(service, vero):
    samples = {user: every_type(user) for user in ("u1", "u2")}
    # Interleave the two users' messages, each posted on its own as a Webhooks
    # (Actions) destination does with an Authorization header. (The samples'
    # timestamps are years old: X-Signature alone would no longer do.)
    for first, second in zip(samples["u1"], samples["u2"], strict=True):
        for message, _ in (first, second):
            raw = json.dumps(message).encode()
            response = requests.post(
                service.url + "/segment",
                data=raw,
                timeout=10,
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"},
            )
            assert response.status_code == 200, response.text
            assert response.json()["accepted"] == 1

    wait_until_delivered(service, len(samples["u1"]) + len(samples["u2"]))

    received = vero.received()
    expected = {
        user: [call for _, calls in pairs for call in with_credential(calls, "auth_token", TOKEN)]
        for user, pairs in samples.items()
    }
    # Users are delivered side by side; each user's calls keep their order.
    assert per_user(received) == expected
    assert len(received) == sum(len(calls) for calls in expected.values())
    assert set(vero.statuses()) == {200}


def test_a_signed_message_reaches_vero_and_a_signed_batch_is_refused(service, vero):
    """Segment's Webhooks destination signs each message (X-Signature); with
    batching on it signs only the first, so a batch needs another credential."""
    now = datetime.now(UTC).replace(microsecond=0)
    message = {
        "type": "track",
        "userId": "u7",
        "event": "Signed Up",
        "timestamp": now.isoformat().replace("+00:00", "Z"),
    }
    raw = json.dumps(message).encode()
    second = json.dumps({**message, "userId": "intruder"})
    batch = b"[" + raw + b"," + second.encode() + b"]"

    single = requests.post(
        service.url + "/segment", data=raw, timeout=10, headers={"X-Signature": sign(raw, SECRET)}
    )
    forged = requests.post(
        service.url + "/segment", data=batch, timeout=10, headers={"X-Signature": sign(raw, SECRET)}
    )

    assert single.status_code == 200, single.text
    assert forged.status_code == 401
    wait_until_delivered(service, 1)
    extras = {"created_at": int(now.timestamp()), "source": "segment"}
    assert vero.received() == [
        (
            "POST",
            "/events/track",
            {
                "identity": {"id": "u7"},
                "event_name": "Signed Up",
                "extras": extras,
                "auth_token": TOKEN,
            },
        )
    ]


@pytest.mark.usefixtures("library_session")
def test_segments_python_library_can_use_the_service_as_its_host(service, vero):
    when = datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    errors = []
    # One message per request (sync mode), as a server-side integration would...
    sync = Client(write_key=SECRET, host=service.url, sync_mode=True, max_retries=0)
    sync.identify(
        "u3", {"email": "u3@example.org", "plan": "pro"}, timestamp=when, message_id="lib-identify"
    )
    sync.track("u3", "Signed Up", {"plan": "pro"}, timestamp=when, message_id="lib-track")
    sync.page(
        "u3",
        "Docs",
        "Intro",
        {"url": "https://example.org/docs"},
        timestamp=when,
        message_id="lib-page",
    )
    # ...and queued messages sent together as one /v1/batch.
    batching = Client(
        write_key=SECRET,
        host=service.url,
        max_retries=0,
        on_error=lambda error, batch: errors.append(error),
        upload_interval=0.1,
    )
    batching.screen("u3", name="Home", timestamp=when, message_id="lib-screen")
    batching.group("u3", "g9", {"name": "Acme"}, timestamp=when, message_id="lib-group")
    batching.alias("anon-3", "u3", timestamp=when, message_id="lib-alias")
    batching.shutdown()
    assert errors == []

    wait_until_delivered(service, 6)

    def event(name, data):
        return (
            "POST",
            "/events/track",
            {
                "identity": {"id": "u3"},
                "event_name": name,
                "data": data,
                "extras": EXTRAS,
                "auth_token": TOKEN,
            },
        )

    assert vero.received() == [
        (
            "POST",
            "/users/track",
            {
                "id": "u3",
                "email": "u3@example.org",
                "auth_token": TOKEN,
                "data": {"email": "u3@example.org", "plan": "pro", "id": "u3"},
            },
        ),
        event("Signed Up", {"plan": "pro"}),
        event(
            "viewed_page", {"url": "https://example.org/docs", "name": "Intro", "category": "Docs"}
        ),
        event("viewed_screen", {"name": "Home"}),
        (
            "POST",
            "/users/track",
            {"id": "u3", "data": {"group": {"name": "Acme", "id": "g9"}}, "auth_token": TOKEN},
        ),
        ("PUT", "/users/reidentify", {"id": "anon-3", "new_id": "u3", "auth_token": TOKEN}),
    ]


@pytest.mark.usefixtures("library_session")
def test_the_library_hears_about_a_bad_write_key(service, vero):
    client = Client(write_key="not-the-secret", host=service.url, sync_mode=True, max_retries=0)

    with pytest.raises(Exception) as raised:
        client.track("u4", "Signed Up", timestamp=datetime.now(UTC))

    assert getattr(raised.value, "status", None) == 401
    assert vero.received() == []


def test_vero_failing_for_a_while_loses_nothing_and_a_refused_message_is_listed_as_dead(
    service, vero, tmp_path
):
    vero.answer(503, "/events/track", user="u5", body="maintenance", times=2)
    vero.answer(400, "/users/track", user="u6", body='{"message": "Invalid email"}', times=None)
    for message in (
        {
            "type": "track",
            "userId": "u5",
            "event": "Retried",
            "messageId": "r-1",
            "timestamp": "2023-11-14T22:13:20Z",
        },
        {"type": "identify", "userId": "u6", "messageId": "d-1"},
    ):
        response = requests.post(
            service.url + "/v1/batch", json={"batch": [message]}, timeout=10, auth=(SECRET, "")
        )
        assert response.json()["accepted"] == 1

    # Two backoffs (about 1 s, then about 2 s) before the third attempt succeeds.
    wait_for(lambda: settled(service) == (1, 0, 1), timeout=WAIT_SECONDS, interval=0.2)

    retried = (
        "POST",
        "/events/track",
        {"identity": {"id": "u5"}, "event_name": "Retried", "extras": EXTRAS, "auth_token": TOKEN},
    )
    refused = ("POST", "/users/track", {"id": "u6", "data": {"id": "u6"}, "auth_token": TOKEN})
    assert per_user(vero.received()) == {"u5": [retried] * 3, "u6": [refused]}
    dead = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "outbox", "dead"],
        cwd=ROOT,
        env=service.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead.returncode == 0, dead.stderr
    assert 'POST /users/track: Vero answered 400: {"message": "Invalid email"}' in dead.stdout
    assert TOKEN not in dead.stdout
