"""The Vero sender on its own: real HTTP to a stand-in Vero, one claimed item at
a time, and what each kind of answer turns into."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from werkzeug import Response

from service.config import Config
from service.outbox import Item
from service.outbox.delivery import PERMANENT, RELEASE, RELEASED, RETRY, SUCCEEDED
from service.segment_to_vero.sender import VeroSender, retry_after_seconds
from tests.conftest import wait_for
from tests.senders import gate
from tests.support import free_port

TOKEN = "dG9rZW46c2VjcmV0/+bXk="  # base64-like, with the characters encoders escape

IDENTIFY = {
    "method": "POST",
    "path": "/users/track",
    "body": {"id": "u1", "email": "u1@example.org"},
}
EVENT = {
    "method": "POST",
    "path": "/events/track",
    "body": {
        "identity": {"id": "u1"},
        "event_name": "Signed Up",
        "extras": {"created_at": 1700000000, "source": "segment"},
    },
}
TAGS = {"method": "PUT", "path": "/users/tags/edit", "body": {"id": "u1", "add": ["vip"]}}


def item(calls, progress=0, item_id=1, user="u1"):
    return Item(
        id=item_id,
        direction="segment_to_vero",
        order_key=user,
        payload={"calls": calls},
        attempts=1,
        progress=progress,
        created_at=time.time(),
        lease="lease",
    )


def sender_for(httpserver, **settings) -> VeroSender:
    settings.setdefault("vero_auth_token", TOKEN)
    return VeroSender(Config(vero_api_url=httpserver.url_for("/api/v2"), **settings))


def received(httpserver):
    return [(request.method, request.path, request.get_json()) for request, _ in httpserver.log]


def with_token(call, name="auth_token", value=TOKEN):
    return (call["method"], "/api/v2" + call["path"], {**call["body"], name: value})


def send_one(sender, one):
    return sender.send([one], gate(sender))[0]


def test_every_call_is_sent_in_order_with_the_credential_in_its_json_body(httpserver):
    httpserver.expect_request("/api/v2/users/track").respond_with_json({"status": 200})
    httpserver.expect_request("/api/v2/events/track").respond_with_json({"status": 200})
    httpserver.expect_request("/api/v2/users/tags/edit").respond_with_json({"status": 200})

    outcome = send_one(sender_for(httpserver), item([IDENTIFY, EVENT, TAGS]))

    assert (outcome.kind, outcome.status, outcome.progress) == (SUCCEEDED, "2xx", 3)
    assert received(httpserver) == [with_token(IDENTIFY), with_token(EVENT), with_token(TAGS)]
    request = httpserver.log[0][0]
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("vero-bridge/")


def test_the_tracking_api_key_is_sent_under_its_own_name(httpserver):
    httpserver.expect_request("/api/v2/users/track").respond_with_json({"status": 200})

    outcome = send_one(
        sender_for(httpserver, vero_auth_token=None, vero_tracking_api_key="key-1"),
        item([IDENTIFY]),
    )

    assert outcome.kind == SUCCEEDED
    assert received(httpserver) == [with_token(IDENTIFY, "tracking_api_key", "key-1")]


def test_calls_already_delivered_are_not_sent_again(httpserver):
    httpserver.expect_request("/api/v2/users/tags/edit").respond_with_json({"status": 200})

    outcome = send_one(sender_for(httpserver), item([IDENTIFY, EVENT, TAGS], progress=2))

    assert (outcome.kind, outcome.progress) == (SUCCEEDED, 3)
    assert received(httpserver) == [with_token(TAGS)]


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_any_2xx_is_delivered(httpserver, status):
    httpserver.expect_request("/api/v2/users/track").respond_with_data("", status=status)

    assert send_one(sender_for(httpserver), item([IDENTIFY])).kind == SUCCEEDED


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_temporary_answers_are_retried_from_the_call_that_failed(httpserver, status):
    httpserver.expect_request("/api/v2/users/track").respond_with_json({"status": 200})
    httpserver.expect_request("/api/v2/events/track").respond_with_data("busy", status=status)

    outcome = send_one(sender_for(httpserver), item([IDENTIFY, EVENT, TAGS]))

    assert outcome.kind == RETRY
    assert outcome.progress == 1  # the identify is delivered and will not be sent again
    assert outcome.status == f"{status // 100}xx"
    assert outcome.error == f"POST /events/track: Vero answered {status}: busy"
    assert outcome.retry_after is None
    assert received(httpserver) == [with_token(IDENTIFY), with_token(EVENT)]


@pytest.mark.parametrize("status", [301, 400, 401, 403, 404, 409, 422, 501, 505])
def test_other_answers_are_permanent_and_the_later_calls_are_not_sent(httpserver, status):
    httpserver.expect_request("/api/v2/users/track").respond_with_data(
        '{"status": %d, "message": "Invalid data"}' % status,
        status=status,
        headers={"Location": "https://elsewhere.example/"},
    )

    outcome = send_one(sender_for(httpserver), item([IDENTIFY, EVENT, TAGS]))

    assert outcome.kind == PERMANENT
    assert outcome.progress == 0
    assert outcome.status == f"{status // 100}xx"
    assert outcome.error == (
        f'POST /users/track: Vero answered {status}: {{"status": {status},'
        ' "message": "Invalid data"} (2 later calls of this message not sent)'
    )
    # A redirect is not followed either: only the one request reached Vero.
    assert received(httpserver) == [with_token(IDENTIFY)]


def test_a_failure_of_the_last_call_mentions_no_later_calls(httpserver):
    httpserver.expect_request("/api/v2/users/track").respond_with_data("", status=404)

    outcome = send_one(sender_for(httpserver), item([IDENTIFY]))

    assert outcome.error == "POST /users/track: Vero answered 404: (empty answer)"


def test_a_long_answer_is_cut_to_a_short_excerpt_on_one_line(httpserver):
    httpserver.expect_request("/api/v2/users/track").respond_with_data(
        "<html>\n  <body>" + "x" * 5000 + "</body></html>", status=400
    )

    error = send_one(sender_for(httpserver), item([IDENTIFY])).error

    assert error.startswith("POST /users/track: Vero answered 400: <html> <body>xxx")
    assert error.endswith("x...")
    assert len(error) < 300


def test_the_credential_is_redacted_when_an_answer_echoes_it(httpserver):
    escaped = TOKEN.replace("/", "\\/")
    httpserver.expect_request("/api/v2/users/track").respond_with_data(
        f'{{"auth_token": "{TOKEN}", "echo": "{escaped}"}} invalid', status=401
    )

    error = send_one(sender_for(httpserver), item([IDENTIFY])).error

    assert TOKEN not in error and escaped not in error
    assert error == (
        'POST /users/track: Vero answered 401: {"auth_token": "[redacted]",'
        ' "echo": "[redacted]"} invalid'
    )


def test_retry_after_in_seconds_is_passed_on(httpserver):
    httpserver.expect_request("/api/v2/users/track").respond_with_data(
        "slow down", status=429, headers={"Retry-After": "7"}
    )

    outcome = send_one(sender_for(httpserver), item([IDENTIFY]))

    assert (outcome.kind, outcome.status, outcome.retry_after) == (RETRY, "4xx", 7.0)


def test_retry_after_as_an_http_date_is_passed_on_as_seconds_from_now(httpserver):
    httpserver.expect_request("/api/v2/users/track").respond_with_data(
        "down for maintenance", status=503, headers={"Retry-After": "Fri, 31 Dec 2100 23:59:59 GMT"}
    )

    outcome = send_one(sender_for(httpserver), item([IDENTIFY]))

    assert outcome.kind == RETRY
    assert outcome.retry_after == pytest.approx(4133980799 - time.time(), abs=60)


@pytest.mark.parametrize(
    "header, expected",
    [
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        ("-5", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 07:26:00 GMT", 0.0),  # in the past: now
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_retry_after_reads_seconds_or_an_http_date(header, expected):
    now = 1445412420.0  # Wed, 21 Oct 2015 07:27:00 GMT
    assert retry_after_seconds(header, now=now) == expected


def test_a_closed_port_is_a_network_error_to_retry(httpserver):
    port = free_port()  # bound and released: nothing listens there
    sender = VeroSender(
        Config(vero_auth_token=TOKEN, vero_api_url=f"http://127.0.0.1:{port}/api/v2")
    )

    outcome = send_one(sender, item([IDENTIFY, EVENT], progress=1))

    assert (outcome.kind, outcome.status, outcome.progress) == (RETRY, "network", 1)
    assert outcome.error.startswith("POST /events/track: could not reach Vero (ConnectionError: ")
    assert TOKEN not in outcome.error


def test_no_answer_in_time_is_a_network_error_to_retry(httpserver):
    def slow(request):
        time.sleep(1.0)
        return Response("late", status=200)

    httpserver.expect_request("/api/v2/users/track").respond_with_handler(slow)
    sender = sender_for(httpserver)
    sender.timeouts = (1.0, 0.2)

    outcome = send_one(sender, item([IDENTIFY]))

    assert (outcome.kind, outcome.status, outcome.progress) == (RETRY, "network", 0)
    assert outcome.error == "POST /users/track: no answer from Vero in time (ReadTimeout)"
    # Let the stand-in finish the late answer, so it is not logged in the next test.
    wait_for(lambda: len(httpserver.log) == 1, timeout=5)


def test_items_are_independent_one_failing_does_not_stop_the_next(httpserver):
    def by_user(request):
        return Response("bad", status=400 if request.get_json()["id"] == "bad" else 200)

    httpserver.expect_request("/api/v2/users/track").respond_with_handler(by_user)
    bad = {"method": "POST", "path": "/users/track", "body": {"id": "bad"}}

    sender = sender_for(httpserver)
    outcomes = sender.send(
        [item([bad], item_id=1, user="bad"), item([IDENTIFY], item_id=2)], gate(sender)
    )

    assert [outcome.kind for outcome in outcomes] == [PERMANENT, SUCCEEDED]
    assert received(httpserver) == [with_token(bad), with_token(IDENTIFY)]


def test_nothing_is_sent_once_stopping_is_set(httpserver):
    stopping = threading.Event()
    stopping.set()

    sender = sender_for(httpserver)
    outcomes = sender.send([item([IDENTIFY]), item([EVENT], item_id=2)], gate(sender, stopping))

    assert outcomes == [RELEASE, RELEASE]
    assert received(httpserver) == []


def test_a_round_starts_no_call_its_lease_might_not_cover(httpserver):
    # With a one-second lease, a second call could outlive the claim (and be
    # sent twice by another worker); the first call is always made.
    httpserver.expect_request("/api/v2/users/track").respond_with_json({"status": 200})
    sender = sender_for(httpserver)

    outcomes = sender.send(
        [item([IDENTIFY, EVENT]), item([IDENTIFY], item_id=2, user="u2")],
        gate(sender, lease_seconds=1.0),
    )

    assert [(o.kind, o.progress) for o in outcomes] == [(RELEASED, 1), (RELEASED, None)]
    assert received(httpserver) == [with_token(IDENTIFY)]


def test_an_item_without_a_valid_call_list_is_dead_at_once(httpserver):
    broken = Item(
        id=1,
        direction="segment_to_vero",
        order_key="u1",
        payload={"calls": [{"path": 3}]},
        attempts=1,
        progress=0,
        created_at=time.time(),
        lease="lease",
    )

    outcome = send_one(sender_for(httpserver), broken)

    assert outcome.kind == PERMANENT
    assert "no valid list of Vero calls" in outcome.error
    assert received(httpserver) == []


def test_the_sender_refuses_to_start_without_a_credential():
    with pytest.raises(ValueError, match="VERO_AUTH_TOKEN"):
        VeroSender(Config())


def test_the_sender_describes_itself_to_the_delivery_loop():
    sender = VeroSender(
        Config(vero_auth_token=TOKEN, delivery_max_in_flight=6, vero_max_requests_per_second=20)
    )
    assert (sender.direction, sender.upstream, sender.max_in_flight) == (
        "segment_to_vero",
        "vero",
        6,
    )
    assert (sender.items_per_call, sender.calls_per_second, sender.call_seconds) == (1, 20, 13.05)
    # A connection for each call the window may keep in flight.
    adapter = sender.session.get_adapter("https://api.getvero.com/api/v2")
    assert adapter._pool_maxsize == 6


def test_vero_s_answer_goes_to_the_dead_letter_and_never_to_the_log(httpserver, caplog):
    # An answer can echo the message's personal data.
    httpserver.expect_request("/api/v2/users/track").respond_with_data(
        '{"message": "u1@example.org is not a valid address"}', status=400
    )
    caplog.set_level(logging.INFO)

    outcome = send_one(sender_for(httpserver), item([IDENTIFY]))

    assert "u1@example.org is not a valid address" in outcome.error
    [record] = [r for r in caplog.records if r.name == "service.segment_to_vero.sender"]
    assert (record.levelname, record.getMessage()) == ("WARNING", "Vero delivery failed")
    assert (record.item, record.call, record.status) == (1, "POST /users/track", 400)
    assert "example.org" not in str(record.__dict__)


def test_calls_go_through_the_proxy_the_environment_names(monkeypatch):
    # Read once when the sender is made (service/upstream.py), then used for every call.
    from tests.standin import Upstream

    proxy = Upstream().start()
    try:
        for name in ("NO_PROXY", "no_proxy", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        sender = VeroSender(Config(vero_auth_token=TOKEN, vero_api_url="http://vero.invalid/v2"))
        for _ in range(2):
            assert send_one(sender, item([IDENTIFY])).kind == SUCCEEDED
        paths = [received.path for received in proxy.snapshot()]
        assert paths == ["http://vero.invalid/v2/users/track"] * 2
    finally:
        proxy.stop()
