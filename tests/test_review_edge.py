"""Found by a review of the edge against SERVICE.md, probing as an unseen
client or attacker would: the Flask app with its real sender and store, a
stand-in Vero on a loopback port, and the outbox read back to see what was
stored."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import quote_plus, urlencode

import pytest

from service.directions import SEGMENT_TO_VERO, VERO_TO_SEGMENT
from service.runtime import get_runtime
from tests.direction_b_samples import EXAMPLE
from tests.support import basic_auth, sign

SECRET = "review-shared-secret"
HOOK_TOKEN = "review-hook-token"


@pytest.fixture
def env(vero, segment, sqlite_url):
    return {
        "VERO_AUTH_TOKEN": "review-vero-token",
        "VERO_API_URL": vero.url,
        "SEGMENT_SHARED_SECRET": SECRET,
        "SEGMENT_WRITE_KEY": "review-write-key",
        "SEGMENT_API_URL": segment.url,
        "VERO_WEBHOOK_TOKEN": HOOK_TOKEN,
        "DATABASE_URL": sqlite_url,
    }


@pytest.fixture
def app(make_app, env):
    return make_app(env)


@pytest.fixture
def client(app):
    return app.test_client()


def stored(app, direction: str = SEGMENT_TO_VERO) -> int:
    counts = get_runtime(app).store.counts(time.time())
    return sum(n for (where, _), n in counts.items() if where == direction)


def recent(seconds_ago: float = 60) -> str:
    moment = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def track(event: str = "Signed Up", user: str = "u1", **extra) -> dict:
    return {"type": "track", "userId": user, "event": event, "timestamp": recent(), **extra}


# -- Authorization: Bearer ------------------------------------------------------


@pytest.mark.parametrize("secret", ["abc=def", "k=v=w", "a=b==", "p4ss=word;x"])
@pytest.mark.parametrize("path", ["/segment", "/v1/track"])
def test_a_bearer_token_is_the_secret_whatever_characters_it_holds(make_app, env, secret, path):
    """werkzeug reads a Bearer value with an `=` before its end as auth
    parameters (`k=v`) rather than a token, and so offered no secret: a
    shared secret with an `=` inside could never authenticate by Bearer."""
    app = make_app({**env, "SEGMENT_SHARED_SECRET": secret})

    response = app.test_client().post(
        path, json=track(), headers={"Authorization": f"Bearer {secret}"}
    )

    assert response.status_code == 200, response.json
    assert stored(app) == 1


# -- writeKey beside X-Signature -----------------------------------------------


def test_a_write_key_equal_to_the_secret_is_not_held_to_the_limits_of_a_signature(app, client):
    """X-Signature's limits (one message, a recent timestamp) are for bodies
    it authenticates alone; a body that also carries the secret itself as
    writeKey is authenticated by the secret, signed or not."""
    batch = json.dumps({"batch": [track("One"), track("Two")], "writeKey": SECRET}).encode()
    old = json.dumps({**track("Backfill", timestamp="2020-01-01T00:00:00Z"), "writeKey": SECRET})

    answers = [
        client.post("/v1/batch", data=batch, headers={"X-Signature": sign(batch, SECRET)}),
        client.post("/v1/track", data=old, headers={"X-Signature": sign(old.encode(), SECRET)}),
    ]

    assert [answer.status_code for answer in answers] == [200, 200]
    assert [answer.json["accepted"] for answer in answers] == [2, 1]


def test_a_wrong_write_key_beside_a_signature_still_leaves_the_signature_its_limits(app, client):
    raw = json.dumps({"batch": [track("One"), track("Two")], "writeKey": "not-it"}).encode()

    response = client.post("/v1/batch", data=raw, headers={"X-Signature": sign(raw, SECRET)})

    assert response.status_code == 401
    assert "Authorization header" in response.json["error"]
    assert stored(app) == 0


# -- writeKey: null beside an Authorization header ------------------------------


@pytest.mark.parametrize(
    "header", [basic_auth(SECRET), f"Bearer {SECRET}"], ids=["basic", "bearer"]
)
def test_a_null_write_key_beside_the_header_is_no_second_credential(app, client, header):
    """Serializers that write every field (Newtonsoft, Gson with nulls, Ruby's
    to_json of nil) send `"writeKey": null` for one they have no value for;
    Segment's API goes by the header then."""
    body = {"batch": [track()], "writeKey": None}

    response = client.post("/v1/import", json=body, headers={"Authorization": header})

    assert response.status_code == 200, response.json
    assert stored(app) == 1


def test_a_null_write_key_alone_is_still_no_credential(app, client):
    response = client.post("/v1/batch", json={"batch": [track()], "writeKey": None})

    assert response.status_code == 401
    assert stored(app) == 0


# -- direction B: the webhook URL --------------------------------------------------


def test_a_trailing_slash_on_the_webhook_url_is_served_without_a_redirect(app, client):
    """docs/service-decisions.md: a trailing slash is served on every route."""
    good = client.post(f"/vero/webhooks/{HOOK_TOKEN}/", json=EXAMPLE)
    wrong = client.post("/vero/webhooks/not-the-token/", json=EXAMPLE)

    assert good.status_code == 200, good.json
    assert good.json["accepted"] == 1
    assert wrong.status_code == 401
    assert stored(app, VERO_TO_SEGMENT) == 1


# -- direction B: URL-encoded bodies -----------------------------------------------


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: quote_plus(text),
        lambda text: urlencode({"payload": text}),
    ],
    ids=["whole body", "form field"],
)
@pytest.mark.parametrize("shape", ["single", "array"])
def test_a_url_encoded_webhook_with_a_byte_order_mark_is_read(app, client, encode, shape):
    """A body that starts with a byte-order mark is read as JSON; the same
    body URL-encoded by a proxy carries the mark percent-encoded (%EF%BB%BF)."""
    webhook = EXAMPLE if shape == "single" else [EXAMPLE]

    response = client.post(
        f"/vero/webhooks/{HOOK_TOKEN}",
        data=encode("\ufeff" + json.dumps(webhook)),
        content_type="application/x-www-form-urlencoded",
    )

    assert response.status_code == 200, response.json
    assert (response.json["accepted"], response.json["rejected"]) == (1, [])


# -- X-Signature on an array behind a byte-order mark ------------------------------


def test_a_one_element_array_behind_a_byte_order_mark_is_signed_on_its_element(app, client):
    """The body is read as JSON after a byte-order mark, so its one element's
    exact text is the same with or without one."""
    element = json.dumps(track("Marked")).encode()
    body = b"\xef\xbb\xbf[" + element + b"]"

    response = client.post("/segment", data=body, headers={"X-Signature": sign(element, SECRET)})

    assert response.status_code == 200, response.json
    assert response.json["accepted"] == 1


def test_a_longer_array_behind_a_byte_order_mark_is_still_refused(app, client):
    element = json.dumps(track("Genuine")).encode()
    forged = json.dumps({"type": "delete", "userId": "vip"}).encode()
    body = b"\xef\xbb\xbf[" + element + b"," + forged + b"]"

    response = client.post("/v1/batch", data=body, headers={"X-Signature": sign(element, SECRET)})

    assert response.status_code == 401
    assert "Authorization header" in response.json["error"]
    assert stored(app) == 0
