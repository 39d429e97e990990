"""Direction A from the door to Vero: the Flask app with its real Vero sender,
a real stand-in Vero on a loopback port, and delivery driven one round at a
time, so every request that reaches "Vero" can be asserted exactly."""

from __future__ import annotations

import gzip
import io
import json
import os
import sqlite3
import time
import zlib
from datetime import UTC, datetime, timedelta

import pytest

from service.directions import SEGMENT_TO_VERO
from service.outbox import DEAD, DELIVERED, PENDING
from service.runtime import get_runtime
from tests.conftest import wait_for
from tests.direction_a_samples import CREATED_AT, EXTRAS, TIMESTAMP, every_type, with_credential
from tests.support import basic_auth, sign

SECRET = "segment-shared-secret"
TOKEN = "vero-auth-token-Zm9vOmJhcg=="


@pytest.fixture
def env(vero, sqlite_url):
    return {
        "VERO_AUTH_TOKEN": TOKEN,
        "VERO_API_URL": vero.url,
        "SEGMENT_SHARED_SECRET": SECRET,
        "DATABASE_URL": sqlite_url,
    }


@pytest.fixture
def app(make_app, env):
    return make_app(env)  # senders=None: the real Vero sender


@pytest.fixture
def client(app):
    return app.test_client()


def post(client, body, path="/segment", headers=None, secret=SECRET, signed=False):
    """Post `body` (JSON-encoded unless already bytes) with `secret`: as the
    Basic user name, as Segment's libraries send it, or with `signed` as the
    body's X-Signature. `secret=None`: no credential beyond `headers`."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    credential = {}
    if secret:
        credential = {"X-Signature": sign(raw, secret)} if signed else basic(secret)
    headers = {"Content-Type": "application/json", **credential, **(headers or {})}
    return client.post(path, data=raw, headers=headers)


def recent(seconds_ago: float = 60) -> str:
    """An ISO-8601 timestamp `seconds_ago` seconds before now, as Segment writes it."""
    moment = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def created_at(timestamp: str) -> int:
    return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())


def basic(user, password=""):
    return {"Authorization": basic_auth(user, password)}


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def deliver_all(app, rounds=50):
    """Delivery rounds until nothing due is left."""
    deliverer = get_runtime(app).deliverer
    for _ in range(rounds):
        if deliverer.run_once(SEGMENT_TO_VERO) == 0:
            return
    pytest.fail("delivery did not settle")


def states(app):
    counts = get_runtime(app).store.counts(time.time())
    return {state: n for (direction, state), n in counts.items() if direction == SEGMENT_TO_VERO}


def track(user="u1", event="Signed Up", message_id=None, **extra):
    message = {"type": "track", "userId": user, "event": event, "timestamp": TIMESTAMP, **extra}
    if message_id:
        message["messageId"] = message_id
    return message


def event_call(user="u1", event="Signed Up", data=None, email=None):
    identity = {"id": user, **({"email": email} if email else {})}
    body = {"identity": identity, "event_name": event, "extras": EXTRAS}
    if data:
        body["data"] = data
    return ("POST", "/events/track", {**body, "auth_token": TOKEN})


def accepted(**counts):
    return {"success": True, "accepted": 0, "duplicate": 0, "skipped": 0, "rejected": [], **counts}


# -- authentication -----------------------------------------------------------


def test_a_signed_single_message_is_accepted_and_delivered(app, client, vero):
    when = recent()
    response = post(client, track(timestamp=when), signed=True)

    assert (response.status_code, response.json) == (200, accepted(accepted=1))
    assert vero.received() == []  # delivery happens after the answer
    deliver_all(app)
    method, path, body = event_call()
    body["extras"] = {**EXTRAS, "created_at": created_at(when)}
    assert vero.received() == [(method, path, body)]
    assert states(app) == {DELIVERED: 1}


def test_a_one_element_array_is_accepted_when_its_element_is_signed(app, client, vero):
    # Segment signs the exact text of element 0 as it stands in the body.
    when = recent()
    first = '{ "type": "track", "userId": "u1", "event": "First", "timestamp": "%s" }' % when
    raw = f"[ {first} ]".encode()

    response = client.post(
        "/segment", data=raw, headers={"X-Signature": sign(first.encode(), SECRET)}
    )

    assert (response.status_code, response.json) == (200, accepted(accepted=1))
    deliver_all(app)
    assert [call[2]["event_name"] for call in vero.received()] == ["First"]


def test_an_array_signature_over_element_0_reformatted_is_refused(client):
    first = '{ "type": "track", "userId": "u1", "event": "First" }'
    raw = f"[{first}]".encode()
    reformatted = json.dumps(json.loads(first)).encode()  # same JSON, other text

    response = client.post("/segment", data=raw, headers={"X-Signature": sign(reformatted, SECRET)})

    assert response.status_code == 401


def test_basic_auth_with_the_secret_as_user_name_is_accepted_on_the_v1_routes(app, client, vero):
    response = post(client, track(), path="/v1/track", secret=None, headers=basic(SECRET))

    assert (response.status_code, response.json) == (200, accepted(accepted=1))
    deliver_all(app)
    assert vero.received() == [event_call()]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Signature": "0" * 40},
        {"X-Signature": sign(json.dumps(track()).encode(), "another-secret")},
        basic("another-secret"),
        basic("", SECRET),  # the secret as password is not the contract
    ],
    ids=[
        "missing",
        "wrong-signature",
        "signed-with-another-secret",
        "wrong-user",
        "secret-as-password",
    ],
)
def test_a_request_without_valid_credentials_is_401_and_nothing_is_stored(
    app, client, vero, headers
):
    response = post(client, track(), secret=None, headers=headers)

    assert response.status_code == 401
    assert "X-Signature" in response.json["error"] and "Basic" in response.json["error"]
    assert SECRET not in response.get_data(as_text=True)
    deliver_all(app)
    assert states(app) == {}
    assert vero.received() == []


def test_without_a_shared_secret_every_request_is_401_saying_why(make_app, env, vero):
    app = make_app({**env, "SEGMENT_SHARED_SECRET": ""})

    response = post(app.test_client(), track(), secret="anything", headers=basic("anything"))

    assert response.status_code == 401
    assert response.json == {
        "error": "SEGMENT_SHARED_SECRET is not set, so no request can be authenticated"
    }
    assert states(app) == {}


def test_without_vero_credentials_direction_a_is_503_before_anything_else(make_app, env):
    app = make_app({**env, "VERO_AUTH_TOKEN": ""})

    response = post(app.test_client(), b"not even json", secret=None)

    assert response.status_code == 503
    assert response.json == {
        "error": "not configured: set VERO_AUTH_TOKEN or VERO_TRACKING_API_KEY"
    }


def test_authentication_comes_before_reading_the_body(client):
    response = post(client, b"{not json", secret=None)

    assert response.status_code == 401


def test_the_tracking_api_key_reaches_vero_under_its_own_name(make_app, env, vero):
    app = make_app({**env, "VERO_AUTH_TOKEN": "", "VERO_TRACKING_API_KEY": "tracking-key"})

    assert post(app.test_client(), track()).status_code == 200
    deliver_all(app)

    method, path, body = event_call()
    del body["auth_token"]
    assert vero.received() == [(method, path, {**body, "tracking_api_key": "tracking-key"})]


# -- more ways in: Bearer, writeKey, the previous secret ----------------------


def stored_bytes(sqlite_url) -> bytes:
    """Every byte the SQLite outbox holds on disk (its WAL included)."""
    path = sqlite_url[len("sqlite:///") :]
    return b"".join(
        open(path + suffix, "rb").read() for suffix in ("", "-wal") if os.path.exists(path + suffix)
    )


@pytest.mark.parametrize("path", ["/segment", "/v1/track", "/v1/batch", "/v1/import"])
def test_a_bearer_token_is_accepted_on_every_route(app, client, vero, path):
    response = post(client, track(), path=path, secret=None, headers=bearer(SECRET))

    assert (response.status_code, response.json) == (200, accepted(accepted=1))
    deliver_all(app)
    assert vero.received() == [event_call()]


def test_a_wrong_bearer_token_is_401_and_nothing_is_stored(app, client, vero):
    for headers in (bearer("wrong"), bearer(""), {"Authorization": f"Token {SECRET}"}):
        response = post(client, track(), path="/v1/track", secret=None, headers=headers)
        assert response.status_code == 401, headers
        assert SECRET not in response.get_data(as_text=True)
    assert states(app) == {}


@pytest.mark.parametrize(
    "body",
    [
        {**track(), "writeKey": SECRET},
        {"batch": [track(event="One"), track(event="Two")], "writeKey": SECRET},
    ],
    ids=["message", "batch"],
)
def test_a_write_key_in_the_body_authenticates_and_is_never_stored(
    app, client, vero, sqlite_url, body
):
    """segment-analytics-python 2.3.x, @segment/analytics-node 2.x-3.0 and
    analytics-java 3.4-3.5 send the write key only in the body."""
    response = post(client, body, path="/v1/batch", secret=None)

    assert response.status_code == 200
    assert response.json["accepted"] == len(body.get("batch", [body]))
    assert SECRET.encode() not in stored_bytes(sqlite_url)
    deliver_all(app)
    assert all(SECRET not in json.dumps(call) for call in vero.received())
    assert SECRET.encode() not in stored_bytes(sqlite_url)


def test_the_write_key_is_not_part_of_a_messages_identity(app, client):
    message = track()  # no messageId: its content is its identity
    assert post(client, message).json == accepted(accepted=1)

    again = post(client, {**message, "writeKey": SECRET}, secret=None)

    assert again.json == accepted(duplicate=1)


@pytest.mark.parametrize(
    "write_key",
    ["wrong", "", 42, None, SECRET.upper()],
    ids=["wrong", "empty", "number", "null", "case"],
)
def test_a_wrong_write_key_is_401_and_nothing_is_stored(app, client, write_key):
    response = post(client, {**track(), "writeKey": write_key}, path="/v1/track", secret=None)

    assert response.status_code == 401
    assert "writeKey" in response.json["error"]
    assert states(app) == {}


def test_a_write_key_and_an_authorization_header_must_agree(app, client):
    body = {**track(), "writeKey": SECRET}
    agree = post(client, body, path="/v1/track")
    differ = post(client, {**body, "writeKey": "other"}, path="/v1/track")
    differ_bearer = post(
        client, {**body, "writeKey": "other"}, path="/v1/track", secret=None, headers=bearer(SECRET)
    )

    assert agree.status_code == 200
    assert differ.status_code == differ_bearer.status_code == 401
    assert "differ" in differ.json["error"]
    assert states(app) == {PENDING: 1}


def test_while_a_previous_secret_is_set_it_is_accepted_every_way(make_app, env, vero):
    app = make_app({**env, "SEGMENT_SHARED_SECRET_PREVIOUS": "old-secret"})
    client = app.test_client()
    signed = track(event="Signed", timestamp=recent())

    answers = [
        post(client, track(event="Basic"), secret="old-secret"),
        post(client, track(event="Bearer"), secret=None, headers=bearer("old-secret")),
        post(client, {**track(event="Body"), "writeKey": "old-secret"}, secret=None),
        post(client, signed, secret="old-secret", signed=True),
        post(client, track(event="Current"), secret=SECRET),
    ]

    assert [answer.status_code for answer in answers] == [200] * 5
    deliver_all(app)
    assert [call[2]["event_name"] for call in vero.received()] == [
        "Basic",
        "Bearer",
        "Body",
        "Signed",
        "Current",
    ]


def test_without_a_previous_secret_an_old_one_is_refused(app, client):
    assert post(client, track(), secret="old-secret").status_code == 401
    assert post(client, track(), secret=None, headers=bearer("old-secret")).status_code == 401


# -- X-Signature authenticates one recent message -------------------------------


def signed_array(messages: list[dict]) -> tuple[bytes, str]:
    """An array body as Segment's Webhooks destination sends it, and the
    signature of its first element."""
    texts = [json.dumps(message) for message in messages]
    return ("[" + ",".join(texts) + "]").encode(), sign(texts[0].encode(), SECRET)


def test_a_signature_cannot_authenticate_a_longer_array(app, client, vero):
    """A captured signed message put first in a forged array (issue 12)."""
    raw, signature = signed_array(
        [track(event="Genuine", timestamp=recent()), {"type": "delete", "userId": "vip"}]
    )

    response = client.post("/segment", data=raw, headers={"X-Signature": signature})

    assert response.status_code == 401
    assert "holds 2" in response.json["error"]
    assert "Authorization header" in response.json["error"]
    assert states(app) == {}
    deliver_all(app)
    assert vero.received() == []


@pytest.mark.parametrize("path", ["/segment", "/v1/batch", "/v1/track"])
def test_no_signed_body_of_several_messages_is_accepted_however_it_is_signed(app, client, path):
    messages = [track(event="One", timestamp=recent()), track(event="Two", timestamp=recent())]
    whole = json.dumps(messages).encode()
    envelope = json.dumps({"batch": messages}).encode()

    for raw, signature in (
        signed_array(messages),
        (whole, sign(whole, SECRET)),
        (envelope, sign(envelope, SECRET)),
    ):
        response = client.post(path, data=raw, headers={"X-Signature": signature})
        assert response.status_code == 401, raw
    assert states(app) == {}


def test_an_authorization_header_lifts_the_one_message_limit(app, client, vero):
    raw, signature = signed_array([track(event="One"), track(event="Two")])

    response = client.post(
        "/segment", data=raw, headers={"X-Signature": signature, **bearer(SECRET)}
    )

    assert (response.status_code, response.json) == (200, accepted(accepted=2))


def test_a_signed_message_older_than_the_retention_window_is_refused(make_app, env, vero):
    app = make_app({**env, "OUTBOX_RETENTION_HOURS": "24"})
    client = app.test_client()
    old = track(event="Replayed", timestamp=recent(seconds_ago=25 * 3600))
    fresh = track(event="Fresh", timestamp=recent(seconds_ago=23 * 3600))

    refused = post(client, old, signed=True)
    refused_in_array = client.post(
        "/segment", data=signed_array([old])[0], headers={"X-Signature": signed_array([old])[1]}
    )
    fresh_answer = post(client, fresh, signed=True)
    with_header = post(client, old, signed=True, headers=bearer(SECRET))

    for response in (refused, refused_in_array):
        assert response.status_code == 401
        assert "24 hours" in response.json["error"]
        assert "OUTBOX_RETENTION_HOURS" in response.json["error"]
    assert fresh_answer.status_code == with_header.status_code == 200
    deliver_all(app)
    assert [call[2]["event_name"] for call in vero.received()] == ["Fresh", "Replayed"]


@pytest.mark.parametrize("timestamp", [None, "", "yesterday", 1700000000], ids=repr)
def test_a_signed_message_without_a_readable_timestamp_is_refused(app, client, timestamp):
    message = track()
    if timestamp is None:
        del message["timestamp"]
    else:
        message["timestamp"] = timestamp

    response = post(client, message, signed=True)

    assert response.status_code == 401
    assert "timestamp" in response.json["error"]
    assert states(app) == {}


# -- routes, content types and Segment-shaped errors ----------------------------


@pytest.mark.parametrize(
    "path",
    ["/v1/import", "/v1/import/", "/v1/batch/", "/segment/"]
    + [f"/v1/{kind}/" for kind in ("identify", "track", "page", "screen", "group", "alias")],
)
def test_import_and_trailing_slashes_are_served_without_a_redirect(app, client, path):
    kind = path.strip("/").split("/")[-1]
    message = (
        track()
        if kind in ("import", "batch", "segment", "track")
        else {"type": kind, "userId": "u1", "previousId": "u0", "groupId": "g1"}
    )

    response = post(
        client, {"batch": [message]} if kind in ("import", "batch") else message, path=path
    )

    assert (response.status_code, response.json) == (200, accepted(accepted=1))


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/json; charset=utf-8", "application/x-www-form-urlencoded"],
)
def test_the_body_is_json_whatever_the_content_type(app, client, content_type):
    raw = json.dumps(track()).encode()
    headers = basic(SECRET) | ({"Content-Type": content_type} if content_type else {})

    response = client.post("/v1/track", data=raw, headers=headers)

    assert (response.status_code, response.json) == (200, accepted(accepted=1))


def test_v1_errors_carry_code_and_message_and_segment_errors_do_not(make_app, env):
    app = make_app({**env, "MAX_BODY_BYTES": "2048"})
    client = app.test_client()
    big = {**track(), "padding": "x" * 3000}

    for response, status in (
        (post(client, track(), path="/v1/track", secret="wrong"), 401),
        (post(client, b"{", path="/v1/batch"), 400),
        (post(client, track(event=""), path="/v1/track"), 400),
        (post(client, big, path="/v1/track"), 413),
        (post(client, track(), path="/v1/track", headers={"Content-Encoding": "br"}), 415),
        (post(client, track(), path="/v1/nope"), 404),
        (client.get("/v1/track"), 405),
    ):
        assert response.status_code == status
        body = response.json
        assert set(body) == {"error", "code", "message"}, body
        assert body["message"] == body["error"] and body["code"]
    assert set(post(client, b"{").json) == {"error"}
    ok = post(client, track(), path="/v1/track")
    assert (ok.status_code, ok.json) == (200, accepted(accepted=1))


# -- compressed and unframed bodies ---------------------------------------------


def test_gzip_and_deflate_bodies_are_decompressed(app, client, vero):
    raw = json.dumps([track(event="Gzip")]).encode()
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    bodies = {
        "gzip": gzip.compress(raw),
        "x-gzip": gzip.compress(raw.replace(b"Gzip", b"XGzip")),
        "deflate": zlib.compress(raw.replace(b"Gzip", b"Zlib")),
        "Deflate": raw_deflate.compress(raw.replace(b"Gzip", b"Raw")) + raw_deflate.flush(),
        "gzip, identity": gzip.compress(raw.replace(b"Gzip", b"Listed")),
        "deflate, gzip": gzip.compress(zlib.compress(raw.replace(b"Gzip", b"Twice"))),
    }
    for encoding, body in bodies.items():
        response = post(client, body, path="/v1/batch", headers={"Content-Encoding": encoding})
        assert (response.status_code, response.json) == (200, accepted(accepted=1)), encoding

    deliver_all(app)
    assert [call[2]["event_name"] for call in vero.received()] == [
        "Gzip",
        "XGzip",
        "Zlib",
        "Raw",
        "Listed",
        "Twice",
    ]


def test_a_gzip_bomb_is_413_and_nothing_is_stored(app):
    """About a megabyte that inflates to a gigabyte: within the 4 MiB limit as
    sent, stopped at the limit as it inflates."""
    head = b'{"type": "track", "userId": "u1", "event": "Bomb", "properties": {"x": "'
    stream = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = stream.compress(head)
    chunk = b"x" * (1 << 20)
    for _ in range(1024):
        bomb += stream.compress(chunk)
    bomb += stream.compress(b'"}}') + stream.flush()
    assert len(bomb) < get_runtime(app).config.max_body_bytes

    response = post(app.test_client(), bomb, path="/v1/track", headers={"Content-Encoding": "gzip"})

    assert response.status_code == 413
    assert "once decompressed" in response.json["error"]
    assert states(app) == {}


def test_a_compressed_body_just_under_the_limit_is_accepted(make_app, env):
    app = make_app({**env, "MAX_BODY_BYTES": "4096"})
    message = track(properties={"padding": ""})
    message["properties"]["padding"] = "x" * (4096 - len(json.dumps(message)))
    raw = json.dumps(message).encode()
    assert len(raw) == 4096

    at_limit = post(app.test_client(), gzip.compress(raw), headers={"Content-Encoding": "gzip"})
    over = post(app.test_client(), gzip.compress(raw + b" "), headers={"Content-Encoding": "gzip"})

    assert at_limit.status_code == 200
    assert over.status_code == 413


@pytest.mark.parametrize(
    "encoding, body",
    [
        ("gzip", b"not gzip at all"),
        ("gzip", gzip.compress(b'{"type": "track"}')[:-6]),
        ("gzip", gzip.compress(b"{}") + b"trailing"),
        ("deflate", b"\x78\x9c garbage"),
        ("gzip", b""),
    ],
    ids=["not-gzip", "truncated", "trailing-garbage", "bad-deflate", "empty"],
)
def test_a_corrupt_compressed_body_is_400_naming_the_encoding(app, client, encoding, body):
    response = post(client, body, path="/v1/track", headers={"Content-Encoding": encoding})

    assert response.status_code == 400
    assert f"not valid {encoding} data" in response.json["error"]
    assert states(app) == {}


@pytest.mark.parametrize("encoding", ["br", "compress", "zstd", "gzip, br", "gzip, gzip, gzip"])
def test_another_content_encoding_is_415(app, client, encoding):
    response = post(
        client, gzip.compress(json.dumps(track()).encode()), headers={"Content-Encoding": encoding}
    )

    assert response.status_code == 415
    assert states(app) == {}


def test_a_signature_covers_the_decompressed_body(app, client):
    """What Segment signs is the JSON text; a proxy may compress it on the way."""
    message = track(timestamp=recent())
    raw = json.dumps(message).encode()
    compressed = gzip.compress(raw)
    headers = {"Content-Encoding": "gzip"}

    of_text = post(
        client, compressed, secret=None, headers={**headers, "X-Signature": sign(raw, SECRET)}
    )
    of_bytes = post(
        client,
        compressed,
        secret=None,
        headers={**headers, "X-Signature": sign(compressed, SECRET)},
    )

    assert of_text.status_code == 200
    assert of_bytes.status_code == 401


def test_a_body_without_a_length_is_held_to_the_limit_not_cut_short(make_app, env):
    """What a server that frames chunked bodies (gunicorn) hands over."""
    app = make_app({**env, "MAX_BODY_BYTES": "2048"})
    client = app.test_client()

    def unframed(raw: bytes):
        return client.post(
            "/v1/track",
            input_stream=io.BytesIO(raw),
            headers=basic(SECRET),
            environ_overrides={"wsgi.input_terminated": True},
        )

    small = json.dumps(track()).encode()
    big = json.dumps(track(properties={"padding": "x" * 3000})).encode()
    assert unframed(small).status_code == 200
    assert unframed(big).status_code == 413
    assert states(app) == {PENDING: 1}


@pytest.mark.parametrize(
    "number, field",
    [
        ("1e400", "properties.price"),
        ("-1e400", "properties.price"),
        ("9" * 400, "properties.price"),
    ],
    ids=["1e400", "-1e400", "400-digits"],
)
def test_a_number_too_large_for_a_float_is_refused_naming_the_field(
    app, client, vero, number, field
):
    bad = b'{"type": "track", "userId": "u1", "event": "Bad", "properties": {"price": %s}}' % (
        number.encode()
    )
    good = json.dumps(track(event="Good")).encode()

    single = post(client, bad, path="/v1/track")
    batch = post(client, b"[" + good + b"," + bad + b"]", path="/v1/batch")

    assert single.status_code == 400
    assert single.json["error"].startswith(f"{field} is a number too large for a float")
    assert batch.status_code == 200
    assert batch.json["accepted"] == 1
    assert batch.json["rejected"][0]["index"] == 1
    assert batch.json["rejected"][0]["error"].startswith(field)
    deliver_all(app)
    assert [call[2]["event_name"] for call in vero.received()] == ["Good"]


# -- the body -----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, error",
    [
        (
            b'{"type": "track",',
            "body is not valid JSON: Expecting property name enclosed in double"
            " quotes at line 1 column 18",
        ),
        (b"", "body is empty"),
        (b'"a string"', "body must be a JSON object or array"),
        (b"42", "body must be a JSON object or array"),
        (b"[]", "the array of messages is empty"),
        (b'{"batch": []}', "batch must be a non-empty array"),
        (b'{"batch": {"type": "track"}}', "batch must be a non-empty array"),
        (b"\xff\xfe{}", "body is not valid UTF-8 (byte 0)"),
    ],
)
def test_an_unreadable_body_is_400_naming_the_problem_and_nothing_is_stored(
    app, client, vero, raw, error
):
    response = post(client, raw)

    assert (response.status_code, response.json) == (400, {"error": error})
    assert states(app) == {}


def test_a_body_over_the_size_limit_is_413(make_app, env, vero):
    app = make_app({**env, "MAX_BODY_BYTES": "2048"})
    big = track(properties={"padding": "x" * 3000})

    response = post(app.test_client(), big)

    assert response.status_code == 413
    assert response.json == {"error": "request body is larger than the limit of 2048 bytes"}
    assert states(app) == {}


def test_authentication_is_checked_before_the_body_size(make_app, env, vero):
    """SERVICE.md's order: a wrong Authorization header is 401 whatever the
    body; a request that may carry its credential in the body (writeKey,
    X-Signature) has its body read first, within the limit, so learns of 413."""
    app = make_app({**env, "MAX_BODY_BYTES": "2048"})
    client = app.test_client()
    big = json.dumps(track(properties={"padding": "x" * 3000})).encode()

    # Before writeKey authenticated (SERVICE.md), this was 401 unread.
    assert post(client, big, secret=None).status_code == 413
    assert (
        post(client, big, path="/v1/track", secret=None, headers=basic("wrong")).status_code == 401
    )
    assert (
        post(client, big, path="/v1/track", secret=None, headers=bearer("wrong")).status_code == 401
    )
    assert (
        post(client, big, path="/v1/track", secret=None, headers=basic(SECRET)).status_code == 413
    )
    assert post(client, big, signed=True).status_code == 413
    assert states(app) == {}


def test_a_body_at_the_size_limit_is_accepted(make_app, env, vero):
    app = make_app({**env, "MAX_BODY_BYTES": "2048"})
    body = track(properties={"padding": ""})
    body["properties"]["padding"] = "x" * (2048 - len(json.dumps(body)))
    assert len(json.dumps(body)) == 2048

    assert post(app.test_client(), body).status_code == 200


@pytest.mark.parametrize(
    "message, error",
    [
        (track(event=""), "event is required"),
        ({"type": "identify", "traits": {"plan": "pro"}}, "userId is required"),
        ({"type": "Track", "userId": "u1", "event": "x"}, "unsupported message type"),
        (
            track(context={"traits": {"email": "not-an-email"}}),
            "context.traits.email does not look like an email",
        ),
        (track(user="u" * 255), "userId must be shorter than 255 characters"),
        ({"type": "alias", "userId": "u1"}, "previousId is required"),
        (
            track(integrations={"Vero": {"tags": {"action": "toggle", "values": ["a"]}}}),
            'integrations.Vero.tags.action must be "add" or "remove"',
        ),
    ],
)
def test_a_single_invalid_message_is_400_naming_the_field(app, client, vero, message, error):
    response = post(client, message)

    assert (response.status_code, response.json) == (400, {"error": error})
    assert states(app) == {}


def test_an_invalid_message_is_rejected_even_when_its_id_was_seen_before(app, client):
    assert post(client, track(message_id="m1")).status_code == 200

    response = post(client, track(event="", message_id="m1"))

    assert (response.status_code, response.json) == (400, {"error": "event is required"})


def test_a_batch_accepts_the_valid_items_and_lists_each_rejected_one(app, client, vero):
    body = [
        track(event="One"),
        track(event=""),
        "not an object",
        {"type": "identify", "traits": {}},
        track(event="Two"),
    ]

    response = post(client, body)

    assert response.status_code == 200
    assert response.json == accepted(
        accepted=2,
        rejected=[
            {"index": 1, "error": "event is required"},
            {"index": 2, "error": "message must be a JSON object"},
            {"index": 3, "error": "userId is required"},
        ],
    )
    deliver_all(app)
    assert vero.received() == [event_call(event="One"), event_call(event="Two")]


def test_a_batch_envelope_merges_its_context_and_integrations_into_each_item(app, client, vero):
    body = {
        "batch": [
            track(event="Shared"),
            track(event="Own", context={"userAgent": "Own/2"}, integrations={"Vero": True}),
            track(event="Loop", context={"integration": {"name": "vero"}}),
        ],
        "context": {"userAgent": "Shared/1", "traits": {"email": "u1@example.org"}},
        "integrations": {"All": False, "Vero": True},
        "sentAt": TIMESTAMP,
    }

    response = post(client, body, path="/v1/batch", secret=None, headers=basic(SECRET))

    assert (response.status_code, response.json) == (200, accepted(accepted=2, skipped=1))
    deliver_all(app)
    # One level deep: the item's own `context` replaces the shared one's keys
    # it names and keeps the others (`traits`); the loop item is skipped.
    assert vero.received() == [
        event_call(event="Shared", data={"userAgent": "Shared/1"}, email="u1@example.org"),
        event_call(event="Own", data={"userAgent": "Own/2"}, email="u1@example.org"),
    ]


def test_a_batch_envelope_can_turn_vero_off_for_its_items(app, client, vero):
    body = {
        "batch": [track(event="Off"), track(event="On", integrations={"Vero": True})],
        "integrations": {"Vero": False},
    }

    response = post(client, body)

    assert (response.status_code, response.json) == (200, accepted(accepted=1, skipped=1))
    deliver_all(app)
    assert vero.received() == [event_call(event="On")]


def test_a_message_sent_twice_is_counted_as_duplicate_and_delivered_once(app, client, vero):
    message = track(message_id="m-1")

    assert post(client, message).json == accepted(accepted=1)
    assert post(client, [message, message]).json == accepted(duplicate=2)
    deliver_all(app)
    assert post(client, message).json == accepted(duplicate=1)  # also after delivery
    deliver_all(app)

    assert vero.received() == [event_call()]


def test_a_v1_route_fills_in_the_type_and_refuses_a_different_one(app, client, vero):
    untyped = {"userId": "u1", "event": "Signed Up", "timestamp": TIMESTAMP}

    filled = post(client, untyped, path="/v1/track", secret=None, headers=basic(SECRET))
    refused = post(
        client, {**untyped, "type": "page"}, path="/v1/track", secret=None, headers=basic(SECRET)
    )
    mixed = post(
        client,
        [untyped, {**untyped, "type": "identify"}],
        path="/v1/track",
        secret=None,
        headers=basic(SECRET),
    )

    assert (filled.status_code, filled.json) == (200, accepted(accepted=1))
    # On /v1, errors also carry Segment's `code` and `message` (issue 11).
    assert (refused.status_code, refused.json) == (
        400,
        {
            "error": "type must be 'track' on /v1/track",
            "code": "type",
            "message": "type must be 'track' on /v1/track",
        },
    )
    assert (mixed.status_code, mixed.json) == (
        200,
        accepted(
            duplicate=1, rejected=[{"index": 1, "error": "type must be 'track' on /v1/track"}]
        ),
    )
    deliver_all(app)
    assert vero.received() == [event_call()]


def test_an_unwritable_outbox_is_503_and_acknowledges_nothing(make_app, env, sqlite_url, vero):
    app = make_app(env)
    client = app.test_client()
    path = sqlite_url[len("sqlite:///") :]
    get_runtime(app).store.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    os.makedirs(path)  # the store's file is now a folder: nothing can write it

    single = post(client, track())
    batch = post(client, [track(event="One"), track(event="")])

    for response in (single, batch):
        assert (response.status_code, response.json) == (
            503,
            {"error": "the outbox cannot be written; retry later"},
        )
    assert vero.received() == []


# -- delivery -----------------------------------------------------------------


def test_every_message_type_reaches_vero_as_the_exact_calls_in_order(app, client, vero):
    samples = every_type("u1")
    for message, _ in samples:
        assert post(client, message).json == accepted(accepted=1), message["type"]

    deliver_all(app)

    expected = [
        call for _, calls in samples for call in with_credential(calls, "auth_token", TOKEN)
    ]
    assert vero.received() == expected
    assert states(app) == {DELIVERED: len(samples)}


def test_a_vero_5xx_is_retried_until_delivered_once_and_nothing_is_lost(app, client, vero):
    vero.answer(500, "/events/track", body="upstream trouble")
    post(client, track())

    assert get_runtime(app).deliverer.run_once(SEGMENT_TO_VERO) == 1
    assert states(app) == {PENDING: 1}
    # The first retry waits a backoff of half a second to a second.
    wait_for(lambda: get_runtime(app).deliverer.run_once(SEGMENT_TO_VERO), timeout=5)
    deliver_all(app)

    assert vero.received() == [event_call(), event_call()]
    assert vero.statuses() == [500, 200]
    assert states(app) == {DELIVERED: 1}


def test_a_retry_resumes_at_the_call_that_failed(app, client, vero):
    vero.answer(503, "/users/tags/edit")
    message = {
        "type": "identify",
        "userId": "u1",
        "timestamp": TIMESTAMP,
        "integrations": {"Vero": {"tags": {"action": "add", "values": ["vip"]}}},
    }
    post(client, message)

    deliver_all(app)
    wait_for(lambda: get_runtime(app).deliverer.run_once(SEGMENT_TO_VERO), timeout=5)

    identify = ("POST", "/users/track", {"id": "u1", "data": {"id": "u1"}, "auth_token": TOKEN})
    tags = ("PUT", "/users/tags/edit", {"id": "u1", "add": ["vip"], "auth_token": TOKEN})
    assert vero.received() == [identify, tags, tags]  # the identify is not sent again
    assert states(app) == {DELIVERED: 1}


def test_a_vero_4xx_dead_letters_the_message_and_its_later_calls_and_spares_other_users(
    app, client, vero
):
    vero.answer(400, "/events/track", user="bad", body={"status": 400, "message": "Invalid event"})
    order = track(
        user="bad",
        event="Order Completed",
        message_id="bad-order",
        properties={"products": [{"sku": "a"}, {"sku": "b"}]},
    )
    post(client, [order, track(user="good", message_id="good-1")])

    deliver_all(app)

    assert vero.received() == [
        event_call(user="bad", event="Ordered Product", data={"sku": "a"}),
        event_call(user="good"),
    ]
    assert states(app) == {DEAD: 1, DELIVERED: 1}
    [dead] = get_runtime(app).store.dead(SEGMENT_TO_VERO, 10)
    assert dead.order_key == "bad"
    assert dead.error == (
        'POST /events/track: Vero answered 400: {"status": 400, "message":'
        ' "Invalid event"} (2 later calls of this message not sent)'
    )
    assert TOKEN not in dead.error and TOKEN not in json.dumps(dead.payload)


def test_a_dead_message_does_not_block_the_users_later_messages(app, client, vero):
    vero.answer(422, "/events/track", user="u1")
    post(client, [track(event="Rejected"), track(event="Later")])

    deliver_all(app)

    assert vero.received() == [event_call(event="Rejected"), event_call(event="Later")]
    assert vero.statuses() == [422, 200]
    assert states(app) == {DEAD: 1, DELIVERED: 1}


def test_a_429_waits_as_long_as_retry_after_asks(app, client, vero, sqlite_url):
    vero.answer(429, "/events/track", body="rate limited", headers={"Retry-After": "120"})
    post(client, track())

    before = time.time()
    assert get_runtime(app).deliverer.run_once(SEGMENT_TO_VERO) == 1

    assert get_runtime(app).deliverer.run_once(SEGMENT_TO_VERO) == 0
    assert vero.received() == [event_call()]
    with sqlite3.connect(sqlite_url[len("sqlite:///") :]) as db:
        # The outbox table holds unfinished work only.
        [(available_at, error)] = db.execute(
            "SELECT available_at, last_error FROM outbox"
        ).fetchall()
    assert get_runtime(app).store.counts(time.time()) == {(SEGMENT_TO_VERO, PENDING): 1}
    # The outbox's own first backoff would be one second at most.
    assert before + 119 <= available_at <= time.time() + 121
    assert error == "POST /events/track: Vero answered 429: rate limited"


def test_one_users_messages_go_out_in_order_while_others_proceed(app, client, vero):
    vero.answer(500, "/events/track", user="u1")
    post(client, [track(event="A1"), track(event="A2"), track(user="u2", event="B1")])
    deliverer = get_runtime(app).deliverer

    assert deliverer.run_once(SEGMENT_TO_VERO) == 2  # one item per user: A1 and B1
    # A2 waits behind A1 (backing off), though it is due.
    assert deliverer.run_once(SEGMENT_TO_VERO) == 0
    assert vero.received() == [event_call(event="A1"), event_call(user="u2", event="B1")]
    wait_for(lambda: deliverer.run_once(SEGMENT_TO_VERO), timeout=5)
    deliver_all(app)

    assert vero.received() == [
        event_call(event="A1"),
        event_call(user="u2", event="B1"),
        event_call(event="A1"),
        event_call(event="A2"),
    ]
    assert vero.statuses() == [500, 200, 200, 200]
    assert states(app) == {DELIVERED: 3}


def test_created_at_falls_back_to_the_time_received(app, client, vero):
    message = track()
    del message["timestamp"]
    before = int(time.time())
    post(client, message)
    after = int(time.time())

    deliver_all(app)

    [(_, _, body)] = vero.received()
    assert before <= body["extras"]["created_at"] <= after
    assert body["extras"]["created_at"] != CREATED_AT
