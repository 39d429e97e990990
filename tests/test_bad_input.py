"""Hostile and broken input, generated: the mappings never raise, and every HTTP
entry point answers 200, 400, 401, 413 or 415 (never 500), storing exactly what
it acknowledged and nothing invalid, and never the shared secret.

The app runs with no senders, so stored work stays put; after each request the
test drains the outbox through the Store interface, which yields exactly the
items that request stored.
"""

from __future__ import annotations

import gzip
import io
import json
import time
import zlib
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.messages import TrackSchema
from service.outbox import DELIVERED, Settlement
from service.results import Accept, Reject, Skip
from service.runtime import get_runtime
from service.segment_to_vero.mapping import map_message
from service.vero_to_segment.mapping import (
    MAX_MESSAGE_BYTES,
    encode_message,
    event_names_with,
    map_webhook,
)
from tests.support import basic_auth, sign

SHARED_SECRET = "bad-input-shared-secret"
WEBHOOK_TOKEN = "bad-input-webhook-token"
MAX_BODY_BYTES = 64 * 1024
A, B = "segment_to_vero", "vero_to_segment"
ALLOWED = {200, 400, 401, 413, 415}
LIBRARY = {"name": "vero-bridge", "version": "0.0.0"}

# The generated oversized bodies make hypothesis warn about their long repr.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

SETTINGS = settings(
    deadline=None,
    max_examples=120,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

# ---------------------------------------------------------------------------
# Strategies

# Lone surrogates arrive as "\ud800" escapes in perfectly valid JSON text.
_odd_text = st.text(
    st.sampled_from(["\ud800", "\udfff", "\x00", "\u202e", "é", "💥", "@", " ", "a"]), max_size=6
)
_text = st.text(max_size=12) | _odd_text
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=16,
)
_emails = st.sampled_from(["a@example.org", "not-an-email", "x@y", "@example.org", "b@ex.com "])
_ids = (
    st.text(max_size=8)
    | st.integers()
    | st.floats(allow_nan=False)
    | st.sampled_from(["u1", "user@example.org", "", "x" * 255, "y" * 300])
    | json_values
)

segment_messages = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["identify", "track", "page", "screen", "group", "alias", "delete", "Track", "bogus"]
        )
        | json_values
    },
    optional={
        "userId": _ids,
        "anonymousId": _ids,
        "messageId": _ids,
        "previousId": _ids,
        "groupId": _ids,
        "event": st.sampled_from(
            ["Signed Up", "Unsubscribed", "re_subscribe", "Order Completed", ""]
        )
        | json_values,
        "properties": st.fixed_dictionaries(
            {}, optional={"products": json_values, "id": _ids, "seq": json_values}
        )
        | json_values,
        "traits": st.fixed_dictionaries({}, optional={"email": _emails | json_values})
        | json_values,
        "context": st.fixed_dictionaries(
            {},
            optional={
                "traits": st.fixed_dictionaries({}, optional={"email": _emails}) | json_values,
                "integration": st.fixed_dictionaries(
                    {"name": st.sampled_from(["vero", "VERO", "x"])}
                ),
                "device": json_values,
                "os": json_values,
                "userAgent": json_values,
                "page": json_values,
            },
        )
        | json_values,
        "integrations": st.fixed_dictionaries(
            {},
            optional={
                "Vero": st.booleans()
                | st.fixed_dictionaries({}, optional={"tags": json_values})
                | json_values,
                "All": st.booleans(),
                "vero": json_values,
            },
        )
        | json_values,
        "timestamp": st.sampled_from(["2014", "2023-11-14T22:13:20Z", "yesterday", "9999-99-99"])
        | json_values,
        "originalTimestamp": json_values,
        "name": json_values,
        "category": json_values,
    },
)

_vero_types = st.sampled_from(
    [
        "sent",
        "delivered",
        "opened",
        "clicked",
        "bounced",
        "unsubscribed",
        "complained",
        "converted",
        "failed",
        "resubscribed",
        "user_created",
        "user_updated",
        "nope",
    ]
)
vero_webhooks = st.builds(
    lambda kind, extra, at: {
        "type": kind,
        **({f"{kind}_at": at} if isinstance(kind, str) else {}),
        **extra,
    },
    _vero_types | json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "user": st.fixed_dictionaries({}, optional={"id": _ids, "email": _emails | json_values})
            | json_values,
            "campaign": st.fixed_dictionaries(
                {},
                optional={
                    "id": _ids,
                    "name": json_values,
                    "subject": json_values,
                    "trigger-event": json_values,
                    "tags": json_values,
                },
            )
            | json_values,
            "message_id": _ids,
            "user_agent": json_values,
            "link_url": json_values,
            "bounce_type": json_values,
            "action": _vero_types | json_values,
        },
    ),
    st.integers(-(10**12), 10**12) | st.floats(allow_nan=False) | json_values,
)


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _raw(value) -> bytes:
    return json.dumps(value).encode()


# Bodies no JSON encoder would write: broken encodings, wrong syntax, nesting
# far past any parser's limit, numbers too long to convert, sizes past the limit.
_broken_bodies = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=32).map(lambda tail: b'{"type": "track", "userId": "\xff' + tail),
    st.just(b"\xef\xbb\xbf{}"),
    st.sampled_from(
        [
            b"",
            b"   ",
            b"null",
            b"[]",
            b'{"batch": []}',
            b'{"batch": {}}',
            b"NaN",
            b'{"type": "track", "userId": "u", "event": "e", "properties": {"x": NaN}}',
            b"[" + b"1" * 5000 + b"]",
            b'{"a": 1',
            b"%7B%7D",
            b"type=track",
        ]
    ),
    st.integers(1, 3000).map(_deep),
    st.integers(1, 3000).map(
        lambda depth: (
            b'{"type": "track", "userId": "u", "event": "e", "properties": ' + _deep(depth) + b"}"
        )
    ),
    st.integers(MAX_BODY_BYTES - 100, MAX_BODY_BYTES + 100).map(
        lambda size: (
            b'{"type": "track", "userId": "u", "event": "e", "properties": {"x": "'
            + b"x" * size
            + b'"}}'
        )
    ),
)


def _segment_bodies():
    batch = st.fixed_dictionaries(
        {"batch": st.lists(segment_messages | json_values, max_size=4)},
        optional={"context": json_values, "integrations": json_values},
    )
    return st.one_of(
        segment_messages.map(_raw),
        st.lists(segment_messages | json_values, max_size=4).map(_raw),
        batch.map(_raw),
        json_values.map(_raw),
        _broken_bodies,
    )


def _webhook_bodies():
    return st.one_of(
        vero_webhooks.map(_raw),
        st.lists(vero_webhooks | json_values, max_size=4).map(_raw),
        vero_webhooks.map(lambda webhook: quote(json.dumps(webhook)).encode()),
        json_values.map(_raw),
        _broken_bodies,
    )


# ---------------------------------------------------------------------------
# The mappings, on anything


@SETTINGS
@given(
    message=json_values | segment_messages,
    allow_anonymous=st.booleans(),
    received_at=st.floats(0, 4e9),
)
def test_map_message_decides_anything_without_raising(message, allow_anonymous, received_at):
    result = map_message(message, allow_anonymous=allow_anonymous, received_at=received_at)
    assert isinstance(result, (Accept, Skip, Reject))


@SETTINGS
@given(
    webhook=json_values | vero_webhooks,
    overrides=st.dictionaries(
        _vero_types, st.none() | st.sampled_from(["Renamed", "E"]), max_size=3
    ),
    received_at=st.floats(0, 4e9),
)
def test_map_webhook_decides_anything_without_raising(webhook, overrides, received_at):
    result = map_webhook(
        webhook, event_names=event_names_with(overrides), library=LIBRARY, received_at=received_at
    )
    assert isinstance(result, (Accept, Skip, Reject))


# ---------------------------------------------------------------------------
# The HTTP entry points


@pytest.fixture
def app(make_app):
    return make_app(
        {
            "VERO_AUTH_TOKEN": "bad-input-vero-token",
            "SEGMENT_SHARED_SECRET": SHARED_SECRET,
            "SEGMENT_WRITE_KEY": "bad-input-write-key",
            "VERO_WEBHOOK_TOKEN": WEBHOOK_TOKEN,
            "MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            "LOG_LEVEL": "WARNING",
        },
        senders=[],
    )


def drain(store, direction: str) -> list[dict]:
    """Every pending item's payload, marking each delivered so it is not seen
    again. A claim yields one item per user, so claim until none is left."""
    payloads = []
    for _ in range(10_000):  # far more rounds than one request can store
        now = time.time() + 1
        items = store.claim(direction, 1000, 60, now)
        if not items:
            return payloads
        payloads.extend(item.payload for item in items)
        store.settle(
            [
                Settlement(item, DELIVERED, now, None, item.progress, item.attempts)
                for item in items
            ],
            now,
        )
    raise AssertionError("the outbox never ran dry")


def assert_valid_vero_work(payload: dict) -> None:
    calls = payload["calls"]
    assert isinstance(calls, list) and calls
    for call in calls:
        assert call["method"] in ("POST", "PUT")
        assert isinstance(call["path"], str) and call["path"].startswith("/")
        assert isinstance(call["body"], dict)
    # What the Vero client will send: UTF-8 JSON.
    json.dumps(calls, ensure_ascii=False, allow_nan=False).encode("utf-8")


def assert_valid_segment_work(payload: dict) -> None:
    message = payload["message"]
    assert TrackSchema().validate(message) == {}
    assert len(encode_message(message)) <= MAX_MESSAGE_BYTES


def check_answer(app, direction: str, answer, check_payload) -> None:
    store = get_runtime(app).store
    assert answer.status_code in ALLOWED, (answer.status_code, answer.get_data()[:300])
    assert answer.is_json
    stored = drain(store, direction)
    if answer.status_code == 200:
        assert len(stored) == answer.json["accepted"]
        for payload in stored:
            check_payload(payload)
            # A writeKey in the body authenticates; it is never stored.
            assert SHARED_SECRET not in json.dumps(payload)
    else:
        assert stored == [], "a refused request stored work"
        assert answer.json["error"]


_segment_routes = st.sampled_from(
    [
        "/segment",
        "/v1/identify",
        "/v1/track",
        "/v1/page",
        "/v1/screen",
        "/v1/group",
        "/v1/alias",
        "/v1/batch",
    ]
)
_authorizations = st.sampled_from(
    ["basic", "signature", "signature", "none", "wrong basic", "wrong signature", "garbage"]
)


def _segment_headers(how: str, body: bytes, noise: str) -> dict[str, str]:
    if how == "basic":
        return {"Authorization": basic_auth(SHARED_SECRET)}
    if how == "signature":
        return {"X-Signature": sign(body, SHARED_SECRET)}
    if how == "wrong basic":
        return {"Authorization": basic_auth(SHARED_SECRET[:-1], SHARED_SECRET)}
    if how == "wrong signature":
        return {"X-Signature": sign(body, SHARED_SECRET + "x")}
    if how == "garbage":
        return {"Authorization": noise, "X-Signature": noise}
    return {}


_header_noise = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@SETTINGS
@given(
    route=_segment_routes,
    body=_segment_bodies(),
    how=_authorizations,
    noise=_header_noise,
    content_type=st.sampled_from(["application/json", "text/plain", ""]),
)
def test_direction_a_answers_every_body_without_error_and_stores_only_valid_work(
    app, route, body, how, noise, content_type
):
    client = app.test_client()
    headers = _segment_headers(how, body, noise)
    answer = client.post(route, data=body, headers=headers, content_type=content_type or None)
    if how not in ("basic", "signature"):
        # Unauthenticated is 401. A wrong Authorization header is refused
        # unread; without one, the credential may be in the body (writeKey,
        # X-Signature), so a body past the limit is refused as too large first.
        header_sent = bool(headers.get("Authorization", "").strip())
        assert answer.status_code == (
            413 if not header_sent and len(body) > MAX_BODY_BYTES else 401
        )
    check_answer(app, A, answer, assert_valid_vero_work)


_tokens = (
    st.just(WEBHOOK_TOKEN)
    | st.just(WEBHOOK_TOKEN.upper())
    | st.text(st.characters(codec="utf-8", exclude_characters="/%.?#"), min_size=1, max_size=20)
)


@SETTINGS
@given(
    token=_tokens,
    body=_webhook_bodies(),
    content_type=st.sampled_from(
        ["application/json", "application/x-www-form-urlencoded", "multipart/form-data", ""]
    ),
)
def test_direction_b_answers_every_body_without_error_and_stores_only_valid_work(
    app, token, body, content_type
):
    client = app.test_client()
    answer = client.post(
        "/vero/webhooks/" + quote(token, safe=""), data=body, content_type=content_type or None
    )
    if token != WEBHOOK_TOKEN:
        assert answer.status_code == 401
    check_answer(app, B, answer, assert_valid_segment_work)


@pytest.mark.parametrize("route", ["/segment", "/v1/track"])
def test_direction_a_refuses_every_depth_of_nesting_cleanly(app, route):
    """Around the interpreter's recursion limit, a body that parses must not
    fail later (when its dedup key or stored form is encoded)."""
    client = app.test_client()
    for depth in range(900, 1100, 3):
        body = _raw({"type": "track", "userId": "u", "event": "e", "messageId": f"deep-{depth}"})
        body = body[:-1] + b', "properties": {"x": ' + _deep(depth) + b"}}"
        answer = client.post(route, data=body, headers={"X-Signature": sign(body, SHARED_SECRET)})
        check_answer(app, A, answer, assert_valid_vero_work)


def test_a_lone_surrogate_that_would_be_sent_to_vero_is_refused_at_the_door(app):
    """JSON may escape a lone surrogate; Vero's client cannot send it as UTF-8,
    so storing it would only retry a message that can never leave."""
    client = app.test_client()
    body = b'{"type": "track", "userId": "u\\ud800", "event": "e"}'
    answer = client.post("/segment", data=body, headers={"X-Signature": sign(body, SHARED_SECRET)})
    assert answer.status_code == 400
    check_answer(app, A, answer, assert_valid_vero_work)


# ---------------------------------------------------------------------------
# The shapes SERVICE.md's new rules bring: compressed and unframed bodies,
# writeKey and Bearer, arrays behind a signature, numbers no float can hold.

_TOO_LARGE = ["1e400", "-1e400", "9" * 400, "-" + "9" * 5000, "1.8e308", "1e308", "4.2"]


def _with_number(value, number: str) -> bytes:
    """`value` as JSON with `number` written as it stands into its first object."""
    marker = "__number__"
    if isinstance(value, dict):
        value = {**value, "properties": {"n": marker}}
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        value = [{**value[0], "properties": {"n": marker}}, *value[1:]]
    return json.dumps(value).replace(f'"{marker}"', number).encode()


def _encode(body: bytes, encoding: str) -> tuple[bytes, dict[str, str]]:
    if encoding == "gzip":
        return gzip.compress(body), {"Content-Encoding": "gzip"}
    if encoding == "deflate":
        return zlib.compress(body), {"Content-Encoding": "deflate"}
    if encoding == "raw deflate":
        stream = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return stream.compress(body) + stream.flush(), {"Content-Encoding": "deflate"}
    if encoding == "corrupt gzip":
        return gzip.compress(body)[:-4], {"Content-Encoding": "gzip"}
    if encoding == "br":
        return body, {"Content-Encoding": "br"}
    return body, {}


_encodings = st.sampled_from(
    ["none", "none", "gzip", "deflate", "raw deflate", "corrupt gzip", "br"]
)
_credentials = st.sampled_from(
    [
        "bearer",
        "writeKey",
        "writeKey and basic",
        "signed first element",
        "signed whole body",
        "wrong bearer",
        "wrong writeKey",
        "writeKey disagreeing with basic",
    ]
)
_WITH_SECRET = {"bearer", "writeKey", "writeKey and basic"}
_SIGNED = {"signed first element", "signed whole body"}


def _message_bodies():
    recent = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    messages = segment_messages.map(lambda m: {**m, "timestamp": recent}) | segment_messages
    return st.one_of(
        messages,
        st.lists(messages | json_values, min_size=1, max_size=4),
        st.fixed_dictionaries({"batch": st.lists(messages, max_size=3)}),
    )


def _credential_headers(how: str, value, text: bytes) -> tuple[bytes, dict[str, str]]:
    """The body (possibly with a writeKey added) and headers for `how`."""
    headers: dict[str, str] = {}
    if how in (
        "writeKey",
        "writeKey and basic",
        "wrong writeKey",
        "writeKey disagreeing with basic",
    ):
        if isinstance(value, dict):
            key = "wrong" if how == "wrong writeKey" else SHARED_SECRET
            if how == "writeKey disagreeing with basic":
                key = "other"
            text = json.dumps({**value, "writeKey": key}).encode()
        if how in ("writeKey and basic", "writeKey disagreeing with basic"):
            headers["Authorization"] = basic_auth(SHARED_SECRET)
    elif how == "bearer":
        headers["Authorization"] = f"Bearer {SHARED_SECRET}"
    elif how == "wrong bearer":
        headers["Authorization"] = f"Bearer {SHARED_SECRET}x"
    elif how == "signed first element":
        first = json.dumps(value[0]).encode() if isinstance(value, list) and value else text
        if isinstance(value, list) and value:
            text = b"[" + b",".join(json.dumps(item).encode() for item in value) + b"]"
        headers["X-Signature"] = sign(first, SHARED_SECRET)
    elif how == "signed whole body":
        headers["X-Signature"] = sign(text, SHARED_SECRET)
    return text, headers


def _message_count(value) -> int:
    if isinstance(value, dict) and "batch" in value:
        return len(value["batch"]) if isinstance(value["batch"], list) else 0
    return len(value) if isinstance(value, list) else 1


@SETTINGS
@given(
    route=_segment_routes | st.sampled_from(["/v1/import", "/v1/import/", "/v1/track/"]),
    value=_message_bodies(),
    number=st.none() | st.sampled_from(_TOO_LARGE),
    how=_credentials,
    encoding=_encodings,
    unframed=st.booleans(),
)
def test_direction_a_holds_its_rules_for_every_way_a_body_can_arrive(
    app, route, value, number, how, encoding, unframed
):
    text = json.dumps(value).encode() if number is None else _with_number(value, number)
    text, headers = _credential_headers(how, value, text)
    body, coding = _encode(text, encoding)
    headers.update(coding)
    client = app.test_client()
    if unframed:
        # As gunicorn hands over a chunked body: no length, the stream ended.
        answer = client.post(
            route,
            input_stream=io.BytesIO(body),
            headers=headers,
            environ_overrides={"wsgi.input_terminated": True},
        )
    else:
        answer = client.post(route, data=body, headers=headers)

    # A writeKey is only put in an object body: an array carries none to disagree.
    disagreeing = how == "writeKey disagreeing with basic" and isinstance(value, dict)
    if how == "wrong bearer" or disagreeing:
        assert answer.status_code in (401, 413, 415, 400) and answer.status_code != 200
    if how == "wrong writeKey" and isinstance(value, dict):
        assert answer.status_code != 200
    if how in _SIGNED and answer.status_code == 200:
        # One signature, one message: never a batch riding on it.
        assert _message_count(value) == 1
    if encoding == "br":
        assert answer.status_code in (401, 415)
    if encoding == "corrupt gzip" and how in _WITH_SECRET:
        assert answer.status_code == 400
    if route.startswith("/v1") and answer.status_code != 200:
        assert set(answer.json) == {"error", "code", "message"}
    check_answer(app, A, answer, assert_valid_vero_work)


@SETTINGS
@given(
    value=st.one_of(vero_webhooks, st.lists(vero_webhooks | json_values, min_size=1, max_size=4)),
    number=st.none() | st.sampled_from(_TOO_LARGE),
    encoding=_encodings,
    unframed=st.booleans(),
    bom=st.booleans(),
)
def test_direction_b_holds_its_rules_for_every_way_a_body_can_arrive(
    app, value, number, encoding, unframed, bom
):
    text = json.dumps(value).encode() if number is None else _with_number(value, number)
    if bom:
        text = b"\xef\xbb\xbf" + text
    body, headers = _encode(text, encoding)
    client = app.test_client()
    path = "/vero/webhooks/" + WEBHOOK_TOKEN
    if unframed:
        answer = client.post(
            path,
            input_stream=io.BytesIO(body),
            headers=headers,
            environ_overrides={"wsgi.input_terminated": True},
        )
    else:
        answer = client.post(path, data=body, headers=headers)

    if isinstance(value, list) and answer.status_code == 400:
        # An array is judged element by element, however it was written: only
        # a problem of the body as a whole refuses it all.
        assert answer.json["error"].startswith(("body", "the body")), answer.json
    check_answer(app, B, answer, assert_valid_segment_work)
