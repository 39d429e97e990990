"""Direction A's edge: Segment (a Webhooks destination, or any Segment library
using this service as its host) posts here; messages are mapped to Vero calls
and queued."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from enum import Enum
from typing import Any

from flask import Blueprint, request
from werkzeug.datastructures import Authorization

from blueprints.common import (
    Refusal,
    accepted_secrets,
    answer,
    matching_secret,
    read_body,
    refuse,
)
from service import jsonbody
from service.directions import SEGMENT_TO_VERO
from service.jsonbody import Document, Messages
from service.messages import has_value, parse_timestamp
from service.results import Reject
from service.runtime import get_runtime
from service.segment_to_vero.mapping import map_message

bp = Blueprint("segment", __name__)

# `import` is the batch route analytics-ruby, analytics-java and Analytics.NET
# post to; Segment's API treats it as `batch`.
TYPES = "identify,track,page,screen,group,alias,batch,import"
BATCH_ROUTES = ("batch", "import")

# The body key some Segment libraries carry the write key in (SERVICE.md).
WRITE_KEY = "writeKey"


class Credential(Enum):
    """How a request proved it knows the shared secret."""

    SECRET = "secret"  # Basic, Bearer or writeKey: the secret itself
    SIGNATURE = "signature"  # X-Signature alone: one message, recent


# A trailing slash is accepted on every route, without a redirect: clients do
# not follow a redirect on POST (several count a 3xx as delivered).
@bp.post("/segment")
@bp.post("/segment/")
def segment():
    return _ingest(route_type=None)


@bp.post(f"/v1/<any({TYPES}):kind>")
@bp.post(f"/v1/<any({TYPES}):kind>/")
def segment_api(kind: str):
    return _ingest(route_type=None if kind in BATCH_ROUTES else kind)


def _ingest(route_type: str | None):
    config = get_runtime().config
    if not config.vero_enabled:
        return refuse(
            SEGMENT_TO_VERO,
            503,
            "not_configured",
            "not configured: set VERO_AUTH_TOKEN or VERO_TRACKING_API_KEY",
        )
    secrets = accepted_secrets(config.segment_shared_secret, config.segment_shared_secret_previous)
    if not secrets:
        return _unauthorized("SEGMENT_SHARED_SECRET is not set, so no request can be authenticated")
    # An Authorization header needs no body, so a wrong one is refused before
    # the body is read (SERVICE.md: authentication, then 400/413).
    header_secret = authorization_secret(request.headers.get("Authorization"))
    if header_secret is not None and matching_secret(header_secret, secrets) is None:
        return _unauthorized(_why("the Authorization header does not carry the shared secret"))
    raw = read_body(config.max_body_bytes)
    if isinstance(raw, Refusal):
        return refuse(SEGMENT_TO_VERO, raw.status, raw.reason, raw.message)
    document = jsonbody.parse(raw)
    credential = authenticate(
        header_secret, request.headers.get("X-Signature"), raw, document, secrets
    )
    if isinstance(credential, str):
        return _unauthorized(credential)
    if isinstance(document, Reject):
        return refuse(SEGMENT_TO_VERO, 400, document.code, document.error)
    messages = split_body(document.value, route_type)
    if isinstance(messages, Reject):
        return refuse(SEGMENT_TO_VERO, 400, messages.code, messages.error)
    now = time.time()
    if credential is Credential.SIGNATURE:
        problem = signature_limits(messages, now, config.outbox_retention_hours)
        if problem:
            return _unauthorized(problem)
    items = _ready(messages.items, document)
    allow_anonymous = config.vero_allow_anonymous
    results = [
        map_message(item, allow_anonymous=allow_anonymous, received_at=now) for item in items
    ]
    return answer(SEGMENT_TO_VERO, results, messages.single)


def _unauthorized(message: str):
    return refuse(SEGMENT_TO_VERO, 401, "unauthorized", message)


def _ready(items: list[Any], document: Document) -> list[Any]:
    """The items as the mapping takes them: without the write key (never
    stored, never logged), and refused where a number is too large for a float."""
    ready = []
    for item in items:
        if isinstance(item, dict) and WRITE_KEY in item:
            item = {key: value for key, value in item.items() if key != WRITE_KEY}
        if document.has_too_large:
            item = jsonbody.too_large_field(item, "message") or item
        ready.append(item)
    return ready


# ---------------------------------------------------------------------------
# Authentication: pure, so tests call it directly.

_HOW = (
    "send the shared secret as the HTTP Basic user name, as Authorization: Bearer"
    " <secret> or as writeKey in the body, or sign one message with X-Signature"
    " (the hex HMAC-SHA1 of the body with the shared secret)"
)


def _why(problem: str) -> str:
    return f"unauthorized: {problem}; {_HOW}"


def authorization_secret(header: str | None) -> str | None:
    """The secret an Authorization header offers: the user name of HTTP Basic
    auth (Segment's libraries send the write key with an empty password), or a
    Bearer token. None when no header is sent; "" when the header offers
    nothing readable (it is then a wrong credential, not a missing one).

    >>> authorization_secret("Bearer s3cret")
    's3cret'
    >>> authorization_secret("Basic czNjcmV0Og==")
    's3cret'
    """
    if header is None or not header.strip():
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        # The whole value is the token: werkzeug would read one with an "="
        # before its end as auth parameters ("k=v") and offer no token.
        return value.strip()
    parsed = Authorization.from_header(header.strip())
    if parsed is not None and parsed.type == "basic":
        return parsed.username or ""
    return ""


def authenticate(
    header_secret: str | None,
    signature: str | None,
    raw: bytes,
    document: Document | Reject,
    secrets: Sequence[str],
) -> Credential | str:
    """How the request is authenticated, or why it is not (the 401's message).

    `header_secret` is what the Authorization header offered, already known to
    be an accepted secret (a wrong one is refused before the body is read).
    A top-level `writeKey` must agree with it when both are sent; without the
    header, a `writeKey` equal to a secret authenticates on its own, with or
    without a signature beside it. X-Signature is checked over the body as
    decompressed (the JSON text Segment signs), so a proxy compressing or
    decompressing on the way does not break it.
    """
    body = document.value if isinstance(document, Document) else None
    has_write_key = isinstance(body, dict) and WRITE_KEY in body
    write_key = body.get(WRITE_KEY) if isinstance(body, dict) else None
    given_key = write_key if isinstance(write_key, str) else None
    if header_secret is not None:
        # A null writeKey is how serializers that write every field (Newtonsoft,
        # Gson with nulls, Ruby's to_json) send one they have no value for: not
        # a second credential. Alone it is still no credential (below).
        if write_key is not None and matching_secret(given_key, [header_secret]) is None:
            return _why("writeKey in the body and the Authorization header differ")
        return Credential.SECRET
    # The secret itself before a signature: a body that carries it is not
    # authenticated by X-Signature alone, so the signature's limits (one
    # message, a recent timestamp) are not its own.
    if has_write_key and matching_secret(given_key, secrets) is not None:
        return Credential.SECRET
    if signature and signature_ok(raw, signature, secrets):
        return Credential.SIGNATURE
    if has_write_key:
        return _why("writeKey in the body is not the shared secret")
    if signature:
        return _why("X-Signature is not the HMAC-SHA1 of the body with the shared secret")
    return _why("the request carries no credential")


def signature_limits(messages: Messages, now: float, retention_hours: float) -> str | None:
    """Why a body authenticated by X-Signature alone is refused, or None.

    A signature proves one message: Segment signs only the first element of a
    batch, so any messages put after a captured signed one would ride on its
    signature. And it has no time: once the message's id has left the
    de-duplication window (OUTBOX_RETENTION_HOURS), a captured body could be
    replayed, so the message must carry a `timestamp` inside that window.
    """
    fix = "add an Authorization header (Bearer <shared secret>) to the destination"
    if len(messages.items) != 1:
        return (
            f"unauthorized: X-Signature authenticates one message, and this body holds"
            f" {len(messages.items)}: Segment signs only the first message of a batch;"
            f" to send batches, {fix}"
        )
    [message] = messages.items
    if not isinstance(message, dict):
        return None  # not a message: the mapping refuses it
    sent: float | None = None
    if has_value(message.get("timestamp")):
        try:
            sent = parse_timestamp(message["timestamp"]).timestamp()
        except (ValueError, TypeError, OverflowError):
            sent = None
    if sent is None:
        return (
            "unauthorized: a message authenticated by X-Signature alone must carry a"
            f" readable timestamp, so that a captured one cannot be replayed; or {fix}"
        )
    if now - sent > retention_hours * 3600:
        return (
            f"unauthorized: the message's timestamp is more than {retention_hours:g} hours"
            " old (OUTBOX_RETENTION_HOURS), past the window in which a replayed signed"
            f" message would be recognised; to send older messages (a replay, a backfill), {fix}"
        )
    return None


def signature_ok(raw_body: bytes, header: str | None, secrets: Sequence[str]) -> bool:
    """Whether X-Signature is the hex HMAC-SHA1 of the body with a secret.

    For a JSON array body Segment signs only its first element, as the exact
    text it has in the body; a signature of the whole body is accepted too.
    Whether that may authenticate the whole body is `signature_limits`' call.
    """
    if not header or not secrets:
        return False
    given = header.strip().lower().encode("utf-8", "replace")
    candidates = [raw_body]
    first = _first_element_text(raw_body)
    if first is not None:
        candidates.append(first)
    matched = False
    for secret in secrets:
        key = secret.encode("utf-8")
        for signed in candidates:
            expected = hmac.new(key, signed, hashlib.sha1).hexdigest().encode("ascii")
            # No early exit: every candidate costs the same work.
            matched |= hmac.compare_digest(expected, given)
    return matched


def _first_element_text(raw_body: bytes) -> bytes | None:
    """The bytes of element 0 of a JSON array body, exactly as sent."""
    try:
        text = jsonbody.without_bom(raw_body.decode("utf-8"))
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


# ---------------------------------------------------------------------------
# The body's messages: pure, so tests call it directly.


def split_body(body: Any, route_type: str | None) -> Messages | Reject:
    """The messages in one parsed request body, or a Reject for the whole body.

    The body is one message object (`single`), a JSON array of messages, or
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
    single = False
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
        items, single = [body], True
    else:
        return Reject("body must be a JSON object or array", "body")
    if route_type is not None:
        items = [_apply_route_type(item, route_type) for item in items]
    return Messages(items, single)


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
