"""Direction B's edge: Vero posts email-event webhooks here; each becomes a
Segment track call, queued for batched delivery."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qsl, unquote_plus

from flask import Blueprint, current_app, request

from blueprints.common import Refusal, accepted_secrets, answer, matching_secret, read_body, refuse
from service import jsonbody, version
from service.directions import VERO_TO_SEGMENT
from service.jsonbody import Messages
from service.results import Reject
from service.runtime import get_runtime
from service.vero_to_segment.mapping import event_names_with, map_webhook

bp = Blueprint("vero", __name__)

# The event-name table (MAPPING.md B.1 with VERO_EVENT_NAMES applied), built
# once when the blueprint is registered rather than for every webhook.
_EVENT_NAMES = "vero_bridge.event_names"


@bp.record_once
def _build_event_names(state) -> None:
    state.app.extensions[_EVENT_NAMES] = event_names_with(
        get_runtime(state.app).config.vero_event_names
    )


LIBRARY = {"name": version.NAME, "version": version.VERSION}

_JSON_STARTS = ("{", "[")

# Vero payloads are three levels deep. A cap far above that keeps a hostile
# body from reaching Python's recursion limit later, when the message is
# encoded or stored, where it would be an error instead of a 400.
MAX_NESTING = 32


# A trailing slash is served too, without a redirect (it would echo the token
# in its Location, and clients do not follow one on POST).
@bp.post("/vero/webhooks/<token>")
@bp.post("/vero/webhooks/<token>/")
def webhook(token: str):
    config = get_runtime().config
    if not config.segment_enabled:
        return refuse(
            VERO_TO_SEGMENT, 503, "not_configured", "not configured: set SEGMENT_WRITE_KEY"
        )
    tokens = accepted_secrets(config.vero_webhook_token, config.vero_webhook_token_previous)
    if not tokens:
        return refuse(
            VERO_TO_SEGMENT,
            401,
            "unauthorized",
            "VERO_WEBHOOK_TOKEN is not set, so no webhook can be authenticated",
        )
    if matching_secret(token, tokens) is None:
        return refuse(
            VERO_TO_SEGMENT, 401, "unauthorized", "unauthorized: the token in the URL is not valid"
        )
    raw = read_body(config.max_body_bytes)
    if isinstance(raw, Refusal):
        return refuse(VERO_TO_SEGMENT, raw.status, raw.reason, raw.message)
    body = parse_body(raw, request.content_type)
    if isinstance(body, Reject):
        return refuse(VERO_TO_SEGMENT, 400, body.code, body.error)
    names = current_app.extensions[_EVENT_NAMES]
    now = time.time()
    results = [
        map_webhook(item, event_names=names, library=LIBRARY, received_at=now)
        for item in body.items
    ]
    # A lone webhook that is invalid is a 400; in an array, a per-item rejection.
    return answer(VERO_TO_SEGMENT, results, body.single)


# ---------------------------------------------------------------------------
# The request body


def parse_body(raw: bytes, content_type: str | None) -> Messages | Reject:
    """The webhooks in a request body: one JSON object (`single`), or a JSON
    array of them, decided here from the JSON itself (after a byte-order mark,
    URL-encoding or a form field), and nowhere else.

    Some senders and proxies URL-encode the body. The body's shape decides,
    not the Content-Type header (a proxy that re-encodes a body rarely fixes
    the header):
    - text starting with `{` or `[` is JSON as it stands;
    - otherwise, if percent-decoding the whole body (form rules: `+` is a
      space) gives text starting with `{` or `[`, that is the JSON;
    - otherwise the body is read as form fields, and the one field whose
      value is JSON is used (any field name; several such fields are refused
      as ambiguous).
    Elements of an array are returned as they are; `map_webhook` rejects the
    ones that are not objects, so that one bad element does not cost the rest.
    A number too large for a float refuses the webhook holding it, naming it.
    """
    text = jsonbody.decode(raw)
    if isinstance(text, Reject):
        return text
    text = text.strip()
    if not text.startswith(_JSON_STARTS):
        decoded = _url_decoded_json(text, content_type)
        if isinstance(decoded, Reject):
            return decoded
        text = decoded
    return _parse_json(text)


def _url_decoded_json(text: str, content_type: str | None) -> str | Reject:
    try:
        whole = _decoded_text(unquote_plus(text, errors="strict"))
        if whole.startswith(_JSON_STARTS):
            return whole
        form = parse_qsl(text, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return Reject("URL-encoded body is not valid UTF-8", "bad_encoding")
    except ValueError as error:
        return Reject(f"body is not JSON and not a valid form: {error}", "bad_json")
    values = [_decoded_text(value) for _, value in form]
    holding_json = [value for value in values if value.startswith(_JSON_STARTS)]
    if len(holding_json) == 1:
        return holding_json[0]
    if len(holding_json) > 1:
        return Reject("form body has several fields holding JSON; expected one", "bad_json")
    if _is_json(text):
        return text  # a JSON scalar: let the JSON reader say it is not an object
    return Reject(_not_json_error(content_type), "bad_json")


def _decoded_text(text: str) -> str:
    """URL-decoded text as the JSON reader takes a body: without a byte-order
    mark or surrounding whitespace."""
    return jsonbody.without_bom(text.strip()).strip()


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _not_json_error(content_type: str | None) -> str:
    if content_type and content_type.split(";")[0].strip().lower() == "multipart/form-data":
        return "multipart bodies are not supported; send the webhook as JSON"
    return "body is not JSON: expected a JSON object or array (plain or URL-encoded)"


def _parse_json(text: str) -> Messages | Reject:
    document = jsonbody.loads(text, max_nesting=MAX_NESTING)
    if isinstance(document, Reject):
        return document
    value = document.value
    if isinstance(value, dict):
        body = Messages([value], single=True)
    elif isinstance(value, list):
        if not value:
            return Reject("body is an empty array", "empty_body")
        body = Messages(value, single=False)
    else:
        return Reject("body must be a JSON object or an array of objects", "not_object")
    if document.has_too_large:
        items = [jsonbody.too_large_field(item, "webhook") or item for item in body.items]
        body = Messages(items, body.single)
    return body
