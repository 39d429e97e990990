"""Direction B through the real app: Vero webhooks in at the door, Segment
batches out of the outbox. The Flask test client posts the webhooks; delivery
rounds are run by hand (`run_once`) with the real Segment sender talking to a
pytest-httpserver stand-in for Segment's HTTP API."""

import gzip
import json
import time
from datetime import UTC, datetime
from urllib.parse import quote, urlencode

import pytest
from werkzeug import Response

from service.directions import VERO_TO_SEGMENT
from service.outbox import DEAD, DELIVERED, PENDING
from service.runtime import get_runtime
from service.vero_to_segment.sender import MAX_REQUEST_BYTES
from tests.conftest import wait_for
from tests.direction_b_samples import EVENT_NAMES, EXAMPLE, EXAMPLE_TRACK, LIBRARY
from tests.support import basic_auth

TOKEN = "hook-token-7c1e52"
WRITE_KEY = "wk_edge_51b2d0"
HOOK = f"/vero/webhooks/{TOKEN}"


def webhook(event_type: str = "opened", user: str = "u_1", at: int = 1700000000, **extra) -> dict:
    return {
        "type": event_type,
        f"{event_type}_at": at,
        "user": {"id": user},
        "campaign": {"id": 7, "name": "Digest"},
        "message_id": f"m-{user}",
        **extra,
    }


@pytest.fixture
def env(httpserver):
    return {
        "SEGMENT_WRITE_KEY": WRITE_KEY,
        "SEGMENT_API_URL": httpserver.url_for("/v1"),
        "VERO_WEBHOOK_TOKEN": TOKEN,
    }


@pytest.fixture
def app(make_app, env):
    return make_app(env)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def segment_ok(httpserver):
    httpserver.expect_request("/v1/batch", method="POST").respond_with_json({"success": True})
    return httpserver


def post(client, body, path=HOOK, **kwargs):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    kwargs.setdefault("content_type", "application/json")
    return client.post(path, data=data, **kwargs)


def ok(accepted=0, duplicate=0, skipped=0, rejected=()):
    return {
        "success": True,
        "accepted": accepted,
        "duplicate": duplicate,
        "skipped": skipped,
        "rejected": list(rejected),
    }


def deliver(app) -> int:
    return get_runtime(app).deliverer.run_once(VERO_TO_SEGMENT)


def store(app):
    return get_runtime(app).store


def states(app) -> dict[str, int]:
    return {
        state: n
        for (direction, state), n in store(app).counts(time.time()).items()
        if direction == VERO_TO_SEGMENT
    }


def sent_requests(httpserver) -> list:
    return [request for request, _ in httpserver.log]


def batch_of(request) -> list[dict]:
    return json.loads(request.get_data())["batch"]


def all_sent(httpserver) -> list[dict]:
    return [message for request in sent_requests(httpserver) for message in batch_of(request)]


# ---------------------------------------------------------------------------
# The door: configuration and the token


def test_the_right_token_is_accepted_and_delivery_sends_the_exact_request(app, client, segment_ok):
    response = post(client, EXAMPLE)
    assert (response.status_code, response.json) == (200, ok(accepted=1))
    assert segment_ok.log == []  # delivery happens after the answer

    before = time.time()
    assert deliver(app) == 1
    after = time.time()

    [request] = sent_requests(segment_ok)
    assert (request.method, request.path) == ("POST", "/v1/batch")
    assert request.headers["Authorization"] == basic_auth(WRITE_KEY)
    body = json.loads(request.get_data())
    assert set(body) == {"batch", "sentAt", "writeKey"}
    assert body["batch"] == [EXAMPLE_TRACK]
    assert body["writeKey"] == WRITE_KEY
    sent_at = datetime.fromisoformat(body["sentAt"].replace("Z", "+00:00")).timestamp()
    assert before - 0.001 <= sent_at <= after + 0.001
    assert states(app) == {DELIVERED: 1}
    assert deliver(app) == 0  # nothing left to send


def test_a_wrong_token_is_401_and_nothing_is_stored(app, client, segment_ok):
    for path in (
        "/vero/webhooks/wrong",
        f"/vero/webhooks/{TOKEN}x",
        f"/vero/webhooks/{TOKEN[:-1]}",
    ):
        response = post(client, EXAMPLE, path=path)
        assert (response.status_code, response.json) == (
            401,
            {"error": "unauthorized: the token in the URL is not valid"},
        )
    assert states(app) == {}
    assert deliver(app) == 0 and segment_ok.log == []


def test_without_a_webhook_token_every_request_is_401_saying_why(make_app, env):
    client = make_app({**env, "VERO_WEBHOOK_TOKEN": ""}).test_client()
    response = post(client, EXAMPLE)
    assert response.status_code == 401
    assert "VERO_WEBHOOK_TOKEN is not set" in response.json["error"]


def test_without_a_write_key_direction_b_is_503_not_configured(make_app, env):
    client = make_app({**env, "SEGMENT_WRITE_KEY": ""}).test_client()
    for path in (HOOK, "/vero/webhooks/wrong"):  # configuration is checked before the token
        response = post(client, EXAMPLE, path=path)
        assert (response.status_code, response.json) == (
            503,
            {"error": "not configured: set SEGMENT_WRITE_KEY"},
        )


# ---------------------------------------------------------------------------
# The door: bodies


def test_a_body_that_is_not_json_is_400(client):
    response = post(client, '{"type": "opened", ')
    assert response.status_code == 400
    assert response.json["error"].startswith("body is not valid JSON")


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: quote(text),
        lambda text: urlencode({"payload": text}),
    ],
    ids=["whole-body", "form-field"],
)
def test_url_encoded_bodies_are_the_same_webhook(app, client, segment_ok, encode):
    response = post(
        client, encode(json.dumps(EXAMPLE)), content_type="application/x-www-form-urlencoded"
    )
    assert (response.status_code, response.json) == (200, ok(accepted=1))
    # The plain JSON of the same event is recognised as the same event.
    assert post(client, EXAMPLE).json == ok(duplicate=1)
    deliver(app)
    assert all_sent(segment_ok) == [EXAMPLE_TRACK]


def test_an_array_body_accepts_the_valid_items_and_lists_the_rejected(app, client, segment_ok):
    body = [
        webhook(user="a"),
        42,
        webhook(user="b"),
        {"type": "user_created", "user": {"id": "c"}},
        {"type": "opened", "user": {}},
    ]
    response = post(client, body)
    assert response.status_code == 200
    assert response.json == ok(
        accepted=2,
        skipped=1,
        rejected=[
            {"index": 1, "error": "webhook must be a JSON object"},
            {"index": 4, "error": "user.id or user.email is required"},
        ],
    )
    deliver(app)
    assert sorted(m["userId"] for m in all_sent(segment_ok)) == ["a", "b"]


def test_an_empty_array_is_400(client):
    assert post(client, []).status_code == 400


def test_every_vero_email_event_type_is_forwarded_under_its_segment_name(app, client, segment_ok):
    at = 1700000000
    for n, event_type in enumerate(EVENT_NAMES):
        extra = {}
        if event_type == "bounced":
            extra = {"bounce_type": "hard", "bounce_code": 550, "bounce_message": "no such user"}
        if event_type == "clicked":
            extra = {"link_url": "https://example.org/offer"}
        response = post(client, webhook(event_type, user=f"u{n}", at=at + n, **extra))
        assert (response.status_code, response.json) == (200, ok(accepted=1)), event_type

    assert deliver(app) == len(EVENT_NAMES)
    [request] = sent_requests(segment_ok)  # distinct users: one claim, one request
    by_user = {m["userId"]: m for m in batch_of(request)}
    for n, name in enumerate(EVENT_NAMES.values()):
        message = by_user[f"u{n}"]
        assert (message["type"], message["event"]) == ("track", name)
        assert message["timestamp"] == datetime.fromtimestamp(at + n, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.000Z"
        )
        assert message["properties"]["email_id"] == f"m-u{n}"
        assert message["properties"]["campaign_id"] == 7
        assert message["context"]["integration"] == {"name": "vero", "version": LIBRARY["version"]}
    bounced = by_user[f"u{list(EVENT_NAMES).index('bounced')}"]["properties"]
    assert (bounced["bounce_type"], bounced["bounce_code"], bounced["bounce_message"]) == (
        "hard",
        550,
        "no such user",
    )
    clicked = by_user[f"u{list(EVENT_NAMES).index('clicked')}"]["properties"]
    assert clicked["link_url"] == "https://example.org/offer"
    assert len({m["messageId"] for m in by_user.values()}) == len(EVENT_NAMES)


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "user_created", "user_created_at": 1700000000, "user": {"id": "u1"}},
        {"type": "user_updated", "user": {"id": "u1"}, "changes": {"plan": "pro"}},
        {"action": "user_updated", "user": {"id": "u1"}},
        {"type": "page_viewed", "user": {"id": "u1"}},
        # Not forwarded, so not validated either: Vero would only log our refusal.
        {"type": "user_updated", "user": "not an object"},
    ],
    ids=["user_created", "user_updated", "action", "unknown", "invalid-user-event"],
)
def test_user_events_and_unknown_types_are_acknowledged_and_never_forwarded(
    app, client, segment_ok, payload
):
    response = post(client, payload)
    assert (response.status_code, response.json) == (200, ok(skipped=1))
    assert states(app) == {}
    assert deliver(app) == 0 and segment_ok.log == []


def test_vero_event_names_renames_and_null_stops_forwarding(make_app, env, segment_ok):
    app = make_app(
        {**env, "VERO_EVENT_NAMES": json.dumps({"opened": None, "Clicked": "Link Clicked"})}
    )
    client = app.test_client()
    assert post(client, webhook("opened", user="a")).json == ok(skipped=1)
    assert post(client, webhook("clicked", user="b")).json == ok(accepted=1)
    deliver(app)
    assert [(m["userId"], m["event"]) for m in all_sent(segment_ok)] == [("b", "Link Clicked")]


@pytest.mark.parametrize("user", [None, {}, {"id": None, "email": None}, {"id": " ", "email": ""}])
def test_a_webhook_without_a_user_is_400_naming_the_field(app, client, user):
    payload = {**webhook(), "user": user}
    if user is None:
        del payload["user"]
    response = post(client, payload)
    assert (response.status_code, response.json) == (
        400,
        {"error": "user.id or user.email is required"},
    )
    assert states(app) == {}


def test_an_invalid_field_is_400_naming_it(client):
    response = post(client, {**webhook(), "opened_at": "yesterday"})
    assert (response.status_code, response.json) == (
        400,
        {"error": "opened_at: must be a Unix time in seconds"},
    )


def test_an_email_only_user_is_sent_as_anonymous_id(app, client, segment_ok):
    post(client, {"type": "sent", "sent_at": 1700000000, "user": {"email": "x@example.org"}})
    deliver(app)
    [message] = all_sent(segment_ok)
    assert "userId" not in message
    assert message["anonymousId"] == "x@example.org"
    assert message["context"]["traits"] == {"email": "x@example.org"}


def test_the_same_event_twice_is_a_duplicate_and_delivered_once(app, client, segment_ok):
    assert post(client, EXAMPLE).json == ok(accepted=1)
    # A retry by Vero: same identity, even with other details changed.
    again = {
        **EXAMPLE,
        "user": {"id": "u_42", "email": "new@example.org"},
        "user_agent": "Other/1.0",
    }
    assert post(client, again).json == ok(duplicate=1)
    assert post(client, [EXAMPLE, EXAMPLE]).json == ok(duplicate=2)
    assert deliver(app) == 1
    # Still recognised after delivery (kept for the retention period).
    assert post(client, EXAMPLE).json == ok(duplicate=1)
    assert deliver(app) == 0
    assert all_sent(segment_ok) == [EXAMPLE_TRACK]


def test_the_same_event_twice_in_one_array_is_stored_once(app, client, segment_ok):
    response = post(client, [webhook(user="a"), webhook(user="a")])
    assert response.json == ok(accepted=1, duplicate=1)
    deliver(app)
    assert len(all_sent(segment_ok)) == 1


def test_a_message_too_large_for_segment_is_refused_at_the_door(app, client):
    response = post(client, webhook(campaign={"id": 7, "name": "x" * 33_000}))
    assert response.status_code == 400
    assert "over Segment's limit of 32768" in response.json["error"]
    assert states(app) == {}


def test_a_body_over_max_body_bytes_is_413(make_app, env):
    client = make_app({**env, "MAX_BODY_BYTES": "1024"}).test_client()
    response = post(client, webhook(campaign={"id": 7, "name": "x" * 2000}))
    assert (response.status_code, response.json) == (
        413,
        {"error": "request body is larger than the limit of 1024 bytes"},
    )


def test_an_unwritable_outbox_is_503_so_vero_may_retry(make_app, env, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's folder should be")
    client = make_app({**env, "DATABASE_URL": f"sqlite:///{blocker}/outbox.db"}).test_client()
    response = post(client, EXAMPLE)
    assert (response.status_code, response.json) == (
        503,
        {"error": "the outbox cannot be written; retry later"},
    )


# ---------------------------------------------------------------------------
# Delivery


def test_a_burst_of_webhooks_for_distinct_users_leaves_in_one_request(app, client, segment_ok):
    for n in range(300):
        assert post(client, webhook(user=f"user-{n}")).status_code == 200
    assert deliver(app) == 300
    [request] = sent_requests(segment_ok)
    assert sorted(m["userId"] for m in batch_of(request)) == sorted(f"user-{n}" for n in range(300))
    assert states(app) == {DELIVERED: 300}


def test_one_users_events_leave_in_the_order_they_came(app, client, segment_ok):
    post(client, webhook("sent", user="a", at=1))
    post(client, webhook("opened", user="a", at=2))
    post(client, webhook("clicked", user="a", at=3))
    while deliver(app):
        pass
    # One user's burst leaves together, in order.
    assert [[m["event"] for m in batch_of(r)] for r in sent_requests(segment_ok)] == [
        ["Email Sent", "Email Opened", "Email Link Clicked"]
    ]


def test_large_messages_are_spread_over_as_few_requests_as_the_size_limit_allows(
    app, client, segment_ok
):
    count = 40
    for n in range(count):
        post(client, webhook(user=f"u{n}", campaign={"id": 7, "name": f"{n:02d}" + "x" * 20_000}))
    assert deliver(app) == count

    requests = sent_requests(segment_ok)
    sizes = [len(r.get_data()) for r in requests]
    assert len(requests) > 1 and max(sizes) <= MAX_REQUEST_BYTES
    envelope = len(
        json.dumps(
            {"batch": [], "sentAt": "2023-11-14T22:13:20.000Z", "writeKey": WRITE_KEY},
            separators=(",", ":"),
        )
    )
    # As few as possible: no two requests could have been sent as one.
    for i in range(len(sizes)):
        for j in range(i + 1, len(sizes)):
            assert sizes[i] + sizes[j] - envelope + 1 > MAX_REQUEST_BYTES
    assert sorted(m["userId"] for m in all_sent(segment_ok)) == sorted(
        f"u{n}" for n in range(count)
    )


def test_a_refused_batch_is_split_so_only_the_bad_message_is_dead_lettered(app, client, httpserver):
    reason = {"success": False, "message": "Invalid messageId"}

    def segment(request):
        if any(m["userId"] == "bad" for m in batch_of(request)):
            return Response(json.dumps(reason), status=400, content_type="application/json")
        return Response('{"success":true}', status=200, content_type="application/json")

    httpserver.expect_request("/v1/batch").respond_with_handler(segment)
    users = [f"u{n}" for n in range(7)]
    post(
        client,
        [webhook(user=u) for u in users[:3]]
        + [webhook(user="bad")]
        + [webhook(user=u) for u in users[3:]],
    )
    assert deliver(app) == 8

    assert states(app) == {DELIVERED: 7, DEAD: 1}
    [dead] = store(app).dead(VERO_TO_SEGMENT, 10)
    assert dead.payload["message"]["userId"] == "bad"
    assert dead.error == "Segment answered 400: " + json.dumps(reason)
    delivered = [
        m["userId"] for r, resp in httpserver.log if resp.status_code == 200 for m in batch_of(r)
    ]
    assert sorted(delivered) == sorted(users)  # each good one exactly once


def test_a_5xx_is_retried_later_with_the_same_message_ids(app, client, httpserver):
    httpserver.expect_oneshot_request("/v1/batch").respond_with_data("unavailable", status=500)
    httpserver.expect_request("/v1/batch").respond_with_json({"success": True})
    post(client, [webhook(user="a"), webhook(user="b")])

    assert deliver(app) == 2
    assert states(app) == {PENDING: 2}
    assert deliver(app) == 0  # backing off, not due yet

    def all_delivered():
        deliver(app)
        return states(app) == {DELIVERED: 2}

    wait_for(all_delivered)  # the first backoff is at most a second (with jitter, per item)

    first, *retries = sent_requests(httpserver)
    by_user = lambda messages: sorted(messages, key=lambda m: m["userId"])  # noqa: E731
    retried = [m for r in retries for m in batch_of(r)]
    assert by_user(retried) == by_user(batch_of(first))  # same messages, same messageIds
    assert {m["userId"] for m in retried} == {"a", "b"}


def test_429_retry_after_is_honoured(app, client, httpserver):
    httpserver.expect_request("/v1/batch").respond_with_data(
        "rate limited", status=429, headers={"Retry-After": "120"}
    )
    post(client, webhook(user="a"))
    before = time.time()
    assert deliver(app) == 1
    after = time.time()
    assert states(app) == {PENDING: 1}
    # Backoff alone would make it due within a second; Segment asked for 120.
    assert store(app).claim(VERO_TO_SEGMENT, 10, 30, before + 119) == []
    [item] = store(app).claim(VERO_TO_SEGMENT, 10, 30, after + 121)
    assert item.payload["message"]["userId"] == "a"


def test_a_permanent_refusal_is_dead_lettered_with_segments_reason(app, client, httpserver):
    httpserver.expect_request("/v1/batch").respond_with_data("forbidden source", status=403)
    post(client, webhook(user="a"))
    deliver(app)
    [dead] = store(app).dead(VERO_TO_SEGMENT, 10)
    assert dead.error == "Segment answered 403: forbidden source"
    assert WRITE_KEY not in dead.error


# ---------------------------------------------------------------------------
# The door: the previous token, compressed bodies, body shapes, numbers


def test_while_a_previous_token_is_set_both_are_accepted(make_app, env, segment_ok):
    app = make_app({**env, "VERO_WEBHOOK_TOKEN_PREVIOUS": "old-token-3f9a"})
    client = app.test_client()

    assert post(client, webhook(user="a"), path="/vero/webhooks/old-token-3f9a").status_code == 200
    assert post(client, webhook(user="b")).status_code == 200
    assert post(client, webhook(user="c"), path="/vero/webhooks/other").status_code == 401
    deliver(app)
    assert sorted(m["userId"] for m in all_sent(segment_ok)) == ["a", "b"]


def test_without_a_previous_token_the_old_one_is_refused(app, client):
    assert post(client, webhook(), path="/vero/webhooks/old-token-3f9a").status_code == 401
    assert states(app) == {}


def test_a_gzip_webhook_is_decompressed(app, client, segment_ok):
    response = post(
        client,
        gzip.compress(json.dumps(EXAMPLE).encode()),
        headers={"Content-Encoding": "gzip"},
    )
    assert (response.status_code, response.json) == (200, ok(accepted=1))
    deliver(app)
    assert all_sent(segment_ok) == [EXAMPLE_TRACK]


def test_a_corrupt_or_unknown_encoding_is_refused(app, client):
    corrupt = post(client, b"\x1f\x8b broken", headers={"Content-Encoding": "gzip"})
    unknown = post(client, json.dumps(EXAMPLE), headers={"Content-Encoding": "br"})
    assert corrupt.status_code == 400 and "gzip" in corrupt.json["error"]
    assert unknown.status_code == 415
    # Not Segment's API: errors keep their one key.
    assert set(corrupt.json) == set(unknown.json) == {"error"}
    assert states(app) == {}


INVALID = {"type": "opened", "user": {}}
ONE_INVALID_ARRAY = ok(rejected=[{"index": 0, "error": "user.id or user.email is required"}])


@pytest.mark.parametrize(
    "body, content_type",
    [
        (json.dumps([INVALID]).encode(), "application/json"),
        (b"\xef\xbb\xbf" + json.dumps([INVALID]).encode(), "application/json"),
        (b"  \n" + json.dumps([INVALID]).encode(), "text/plain"),
        (quote(json.dumps([INVALID])).encode(), "application/x-www-form-urlencoded"),
        (
            urlencode({"payload": json.dumps([INVALID])}).encode(),
            "application/x-www-form-urlencoded",
        ),
        (b"\xef\xbb\xbf" + urlencode({"data": json.dumps([INVALID])}).encode(), None),
        (gzip.compress(b"\xef\xbb\xbf" + json.dumps([INVALID]).encode()), "application/json"),
    ],
    ids=["plain", "bom", "whitespace", "percent", "form-field", "bom-form-field", "gzip-bom"],
)
def test_a_one_element_array_is_an_array_however_it_is_written(app, client, body, content_type):
    """Issue 9's defect: a BOM or a form field made it count as one webhook (400)."""
    headers = {"Content-Encoding": "gzip"} if body[:2] == b"\x1f\x8b" else {}
    response = client.post(HOOK, data=body, content_type=content_type, headers=headers)
    assert (response.status_code, response.json) == (200, ONE_INVALID_ARRAY)


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(INVALID).encode(),
        b"\xef\xbb\xbf" + json.dumps(INVALID).encode(),
        urlencode({"payload": json.dumps(INVALID)}).encode(),
    ],
    ids=["plain", "bom", "form-field"],
)
def test_a_lone_invalid_webhook_is_400_however_it_is_written(app, client, body):
    response = client.post(HOOK, data=body)
    assert (response.status_code, response.json) == (
        400,
        {"error": "user.id or user.email is required"},
    )


def test_a_number_too_large_for_a_float_refuses_its_webhook_not_the_array(app, client, segment_ok):
    bad = b'{"type": "opened", "opened_at": 1e400, "user": {"id": "x"}}'
    good = json.dumps(webhook(user="a")).encode()

    single = post(client, bad)
    array = post(client, b"[" + good + b", " + bad + b"]")

    assert (single.status_code, single.json) == (
        400,
        {"error": "opened_at is a number too large for a float (1e400)"},
    )
    assert (array.status_code, array.json) == (
        200,
        ok(
            accepted=1,
            rejected=[{"index": 1, "error": "opened_at is a number too large for a float (1e400)"}],
        ),
    )
    deliver(app)
    assert [m["userId"] for m in all_sent(segment_ok)] == ["a"]
