"""Direction A's edge: Segment (Webhooks destination or any Segment library)
posts here; messages are mapped to Vero calls and queued."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

from flask import Blueprint, request

from blueprints.common import answer, refuse
from service import jsonbody
from service.directions import SEGMENT_TO_VERO
from service.results import Reject
from service.runtime import get_runtime
from service.segment_to_vero.mapping import map_message

bp = Blueprint("segment", __name__)

TYPES = "identify,track,page,screen,group,alias,batch"


@bp.post("/segment")
def segment():
    return _ingest(route_type=None)


@bp.post(f"/v1/<any({TYPES}):kind>")
def segment_api(kind: str):
    return _ingest(route_type=None if kind == "batch" else kind)


def _ingest(route_type: str | None):
    config = get_runtime().config
    if not config.vero_enabled:
        return refuse(
            SEGMENT_TO_VERO,
            503,
            "not_configured",
            "not configured: set VERO_AUTH_TOKEN or VERO_TRACKING_API_KEY",
        )
    secret = config.segment_shared_secret
    if not secret:
        return refuse(
            SEGMENT_TO_VERO,
            401,
            "unauthorized",
            "SEGMENT_SHARED_SECRET is not set, so no request can be authenticated",
        )
    # Basic auth needs no body, so an unauthenticated request is refused
    # before its body is read (SERVICE.md: authentication, then 400/413).
    username = request.authorization.username if request.authorization else None
    basic_ok = basic_auth_ok(username, secret)
    signature = request.headers.get("X-Signature")
    if not basic_ok and not signature:
        return _unauthorized()
    raw = request.get_data(cache=False)
    if not basic_ok and not signature_ok(raw, signature, secret):
        return _unauthorized()
    body = jsonbody.parse(raw)
    items = body if isinstance(body, Reject) else split_body(body, route_type)
    if isinstance(items, Reject):
        return refuse(SEGMENT_TO_VERO, 400, items.code, items.error)
    single = isinstance(body, dict) and "batch" not in body
    allow_anonymous = config.vero_allow_anonymous
    now = time.time()
    results = [
        item
        if isinstance(item, Reject)
        else map_message(item, allow_anonymous=allow_anonymous, received_at=now)
        for item in items
    ]
    return answer(SEGMENT_TO_VERO, results, single)


def _unauthorized():
    return refuse(
        SEGMENT_TO_VERO,
        401,
        "unauthorized",
        "unauthorized: send X-Signature (HMAC-SHA1 of the body with the shared"
        " secret) or HTTP Basic auth with the shared secret as the user name",
    )


# The edge's own helpers: pure, so tests call them directly.


def split_body(body: Any, route_type: str | None) -> list | Reject:
    """The messages in one parsed request body, or a Reject for the whole body.

    The body is one message object, a JSON array of messages, or
    `{"batch": [...]}`, whose top-level `context` and `integrations` are merged
    into each item one level deep (the item's own keys win). An empty batch or
    array, or a body of any other shape, is rejected as a whole.

    `route_type` is the type a `/v1/<type>` route names (None for `/segment`
    and `/v1/batch`). Items are returned in order and as given, except that an
    object item without `type` gets `route_type`, and an object item whose
    `type` differs is replaced, in its place, by a `Reject` (code "type"):
    that problem belongs to the item, not to the request. `map_message`
    returns such a Reject unchanged, so the intake can simply map every item;
    items that are not objects are left for `map_message` to reject.
    """
    if isinstance(body, dict) and "batch" in body:
        items = body["batch"]
        if not isinstance(items, list) or not items:
            return Reject("batch must be a non-empty array", "batch")
        items = [_merge_batch_defaults(item, body) for item in items]
    elif isinstance(body, list):
        if not body:
            return Reject("the array of messages is empty", "batch")
        items = list(body)
    elif isinstance(body, dict):
        items = [body]
    else:
        return Reject("body must be a JSON object or array", "body")
    if route_type is None:
        return items
    return [_apply_route_type(item, route_type) for item in items]


def _merge_batch_defaults(item: Any, envelope: dict) -> Any:
    if not isinstance(item, dict):
        return item
    merged = dict(item)
    for key in ("context", "integrations"):
        shared = envelope.get(key)
        own = item.get(key)
        if not isinstance(shared, dict):
            continue
        if own is None:
            merged[key] = dict(shared)
        elif isinstance(own, dict):
            merged[key] = {**shared, **own}
    return merged


def _apply_route_type(item: Any, route_type: str) -> Any:
    if not isinstance(item, dict):
        return item
    if item.get("type") is None:
        return {**item, "type": route_type}
    if item["type"] != route_type:
        return Reject(f"type must be {route_type!r} on /v1/{route_type}", "type")
    return item


def signature_ok(raw_body: bytes, header: str | None, secret: str | None) -> bool:
    """Whether X-Signature is the hex HMAC-SHA1 of the body with the secret.

    For a JSON array body Segment signs only its first element, as the exact
    text it has in the body; a signature of the whole body is accepted too.
    """
    if not header or not secret:
        return False
    given = header.strip().lower().encode("utf-8", "replace")
    key = secret.encode("utf-8")
    candidates = [raw_body]
    first = _first_element_text(raw_body)
    if first is not None:
        candidates.append(first)
    matched = False
    for signed in candidates:
        expected = hmac.new(key, signed, hashlib.sha1).hexdigest().encode("ascii")
        # No early exit: every candidate costs the same work.
        matched |= hmac.compare_digest(expected, given)
    return matched


def _first_element_text(raw_body: bytes) -> bytes | None:
    """The bytes of element 0 of a JSON array body, exactly as sent."""
    try:
        text = raw_body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    start = _skip_json_whitespace(text, 0)
    if not text.startswith("[", start):
        return None
    start = _skip_json_whitespace(text, start + 1)
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        # Deep nesting is not a message; the body parser refuses it with a 400.
        return None
    return text[start:end].encode("utf-8")


def _skip_json_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def basic_auth_ok(username: str | None, secret: str | None) -> bool:
    """HTTP Basic: the user name is the shared secret (the password is ignored,
    as Segment's libraries send the write key with an empty password)."""
    if not username or not secret:
        return False
    return hmac.compare_digest(username.encode("utf-8"), secret.encode("utf-8"))
