"""Direction A: one Segment message becomes the ordered Vero calls that carry it.

Implements MAPPING.md part A. Everything here is pure (no I/O, no Flask): the
HTTP edge parses and authenticates with the helpers at the bottom, then calls
`map_message` per message and stores what it accepts.

Call bodies never contain the Vero credential; the HTTP client adds
`auth_token` or `tracking_api_key` when it sends, so stored work holds no secret.
Decisions where MAPPING.md is silent are listed in docs/mapping-decisions.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from service.messages import (
    SCHEMAS,
    error_sentence,
    has_value,
    parse_timestamp,
    validate_message,
)
from service.results import Accept, Reject, Result, Skip

# Vero refuses ids, emails and event names of 255 characters or more.
MAX_LENGTH = 255

TAGS_FIELD = "integrations.Vero.tags"


class _Rejected(Exception):
    """Raised by the helpers below so that each rule can stop the mapping
    where it is found, without threading results through every function."""

    def __init__(self, error: str, code: str):
        super().__init__(error)
        self.reject = Reject(error=error, code=code)


# --------------------------------------------------------------------------
# The entry point


def map_message(message: Any, *, allow_anonymous: bool, received_at: float) -> Result:
    """Map one parsed Segment message to Accept, Skip or Reject.

    `received_at` (Unix seconds) is the fallback for `created_at` when the
    message has no timestamp. A `Reject` given as `message` (as `split_body`
    leaves in place of an item that contradicts its route) is returned as it
    is, so the intake can map every item of a body the same way.
    """
    if isinstance(message, Reject):
        return message
    if not isinstance(message, dict):
        return Reject("message must be a JSON object", "not_object")
    skip_reason = _skip_reason(message)
    if skip_reason:
        return Skip(skip_reason)
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        return Reject("unsupported message type", "type")
    try:
        return _accept(message, kind, allow_anonymous, received_at)
    except _Rejected as rejected:
        return rejected.reject


def _accept(message: dict, kind: str, allow_anonymous: bool, received_at: float) -> Accept:
    # The checks run in the order of MAPPING.md A.1, so that a message with
    # several problems is always reported with the same one.
    user_id, user_field = _user(message, allow_anonymous)
    email = _email(message, kind, user_id, user_field)
    if user_id is None and not (kind == "identify" and email is not None):
        raise _Rejected(
            "userId or anonymousId is required" if allow_anonymous else "userId is required",
            "userId",
        )
    _check_sent_values(message, kind, user_id, user_field, email)
    tags = _tags(message, user_id)
    if kind == "track" and not has_value(message.get("event")):
        raise _Rejected("event is required", "event")
    _check_schema(message)

    calls = _BUILDERS[kind](message, user_id, email, received_at)
    if tags is not None:
        calls.append(tags)
    # Without a userId only an identify with an email gets this far (checked above).
    order_key = user_id if user_id is not None else email[0]  # type: ignore[index]
    return Accept(dedup_key=_dedup_key(message), order_key=order_key, payload={"calls": calls})


# --------------------------------------------------------------------------
# A.1: rules applied before mapping


def _skip_reason(message: dict) -> str | None:
    integrations = message.get("integrations")
    if isinstance(integrations, dict):
        vero = _lookup(integrations, "Vero")
        everything = _lookup(integrations, "All")
        if vero is False or (everything is False and not _vero_on(vero)):
            return "integration_disabled"
    name = _nested(message, "context", "integration", "name")
    # Messages this service built from Vero's webhooks carry this name; sending
    # them back to Vero would loop forever.
    if isinstance(name, str) and name.lower() == "vero":
        return "loop"
    return None


def _vero_options(message: dict) -> dict | None:
    """The object under integrations.Vero (any case), which carries options such as tags."""
    integrations = message.get("integrations")
    vero = _lookup(integrations, "Vero") if isinstance(integrations, dict) else None
    return vero if isinstance(vero, dict) else None


def _vero_on(value: Any) -> bool:
    # Any truthy value turns Vero back on (A.1). An object counts even when
    # empty: in Segment it carries the destination's options and means "on".
    return isinstance(value, dict) or bool(value)


def _lookup(mapping: dict, key: str) -> Any:
    """The value under `key`, matching the key case-insensitively (the exact
    spelling wins when both are present)."""
    if key in mapping:
        return mapping[key]
    wanted = key.lower()
    for name, value in mapping.items():
        if isinstance(name, str) and name.lower() == wanted:
            return value
    return None


def _user(message: dict, allow_anonymous: bool) -> tuple[str | None, str | None]:
    """The id the user is known by in Vero, and the field it came from."""
    user_id = _as_id(message.get("userId"), "userId", "userId")
    if user_id is not None:
        return user_id, "userId"
    if allow_anonymous:
        anonymous_id = _as_id(message.get("anonymousId"), "anonymousId", "anonymousId")
        if anonymous_id is not None:
            return anonymous_id, "anonymousId"
    return None, None


def _email(
    message: dict, kind: str, user_id: str | None, user_field: str | None
) -> tuple[Any, str] | None:
    """The email the mapping would send for this message, with its field.

    Identify sends `email` (traits.email, else the user id when it looks like
    an email, else context.traits.email); events send `identity.email`
    (context.traits.email, else the user id when it looks like an email).
    """
    traits_email = _nested(message, "traits", "email")
    context_email = _nested(message, "context", "traits", "email")
    id_as_email: tuple[Any, str] | None = None
    if user_id is not None and user_field is not None and looks_like_email(user_id):
        id_as_email = (user_id, user_field)
    if kind == "identify":
        candidates = [
            (traits_email, "traits.email"),
            id_as_email,
            (context_email, "context.traits.email"),
        ]
    elif kind in ("page", "screen") or (
        kind == "track" and _event_kind(message) in ("event", "order")
    ):
        candidates = [(context_email, "context.traits.email"), id_as_email]
    else:
        return None
    for candidate in candidates:
        if candidate is not None and has_value(candidate[0]):
            return candidate
    return None


def looks_like_email(value: Any) -> bool:
    """MAPPING.md's test: one "@" with text on both sides and a dot in the domain."""
    if not isinstance(value, str) or value.count("@") != 1:
        return False
    local, domain = value.split("@")
    return bool(local) and bool(domain) and "." in domain


def _check_sent_values(message: dict, kind: str, user_id, user_field, email) -> None:
    """Vero's length limit, and email validity, for every value the mapping sends."""
    sent: list[tuple[str, str]] = []
    if user_id is not None:
        sent.append((user_field, user_id))
    if kind == "track" and isinstance(message.get("event"), str):
        sent.append(("event", message["event"]))
    if kind == "track" and _event_kind(message) in ("unsubscribe", "resubscribe"):
        _append_id(sent, message, "properties.id", ("properties", "id"))
    if kind == "group":
        _append_id(sent, message, "groupId", ("groupId",))
    if kind == "alias":
        _append_id(sent, message, "previousId", ("previousId",))
    tag_id = _nested(_vero_options(message), "tags", "id")
    if isinstance(tag_id, str):
        sent.append((f"{TAGS_FIELD}.id", tag_id))
    for field, value in sent:
        _check_length(field, value)
    if email is not None:
        value, field = email
        if isinstance(value, str):
            _check_length(field, value)
        if not looks_like_email(value):
            raise _Rejected(f"{field} does not look like an email", "email")


def _append_id(sent: list, message: dict, field: str, path: tuple[str, ...]) -> None:
    value = _as_id(_nested(message, *path), field, field)
    if value is not None:
        sent.append((field, value))


def _check_length(field: str, value: str) -> None:
    if len(value) >= MAX_LENGTH:
        raise _Rejected(f"{field} must be shorter than {MAX_LENGTH} characters", "too_long")


def _tags(message: dict, user_id: str | None) -> dict | None:
    """The `PUT /users/tags/edit` call the message asks for, or None."""
    tags = _nested(_vero_options(message), "tags")
    if tags is None:
        return None
    if not isinstance(tags, dict):
        raise _Rejected(f"{TAGS_FIELD} must be an object", "tags")
    action = tags.get("action")
    if not isinstance(action, str) or action not in ("add", "remove"):
        raise _Rejected(f'{TAGS_FIELD}.action must be "add" or "remove"', "tags")
    values = tags.get("values")
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise _Rejected(f"{TAGS_FIELD}.values must be a non-empty list of strings", "tags")
    tag_id = _as_id(tags.get("id"), f"{TAGS_FIELD}.id", "tags")
    if tag_id is None:
        tag_id = user_id
    if tag_id is None:
        raise _Rejected(f"{TAGS_FIELD}.id is required when the message has no userId", "tags")
    return _call("PUT", "/users/tags/edit", {"id": tag_id, action: values})


def _check_schema(message: dict) -> None:
    """Shapes the mapping relies on (objects, strings, ISO-8601 timestamps)."""
    errors = validate_message(message)
    if errors:
        field, messages = next(iter(errors.items()))
        raise _Rejected(error_sentence(field, messages[0]), field.split(".")[0])


# --------------------------------------------------------------------------
# A.2: one builder per message type; each returns the main call(s)


def _identify(message: dict, user_id, email, received_at) -> list[dict]:
    additions = {"id": user_id, "userAgent": _user_agent(message)}
    body = _compact(
        id=user_id,
        email=email[0] if email else None,
        data=_data(message.get("traits"), additions),
        channels=_push_channels(message),
    )
    return [_call("POST", "/users/track", body)]


def _push_channels(message: dict) -> list[dict] | None:
    token = _nested(message, "context", "device", "token")
    os_name = _nested(message, "context", "os", "name")
    if not (isinstance(token, str) and token and isinstance(os_name, str) and os_name):
        return None
    return [{"type": "push", "address": token, "platform": os_name.lower()}]


def _track(message: dict, user_id, email, received_at) -> list[dict]:
    kind = _event_kind(message)
    properties = _object(message.get("properties"))
    if kind in ("unsubscribe", "resubscribe"):
        target = _as_id(properties.get("id"), "properties.id", "properties.id") or user_id
        return [_call("POST", f"/users/{kind}", {"id": target})]
    identity = _identity(user_id, email)
    created_at = _created_at(message, received_at)
    calls = []
    if kind == "order":
        for index, product in enumerate(properties["products"]):
            if not isinstance(product, dict):
                raise _Rejected(f"properties.products[{index}] must be an object", "products")
            calls.append(_event(identity, "Ordered Product", product, created_at))
    data = _data(message.get("properties"), {"userAgent": _user_agent(message)})
    calls.append(_event(identity, message["event"], data, created_at))
    return calls


def _event_kind(message: dict) -> str:
    """Which track rule applies: matched on the whole name, ignoring case,
    spaces and underscores, so "Newsletter Unsubscribed" stays an event."""
    event = message.get("event")
    if not isinstance(event, str):
        return "event"
    name = "".join(event.split()).replace("_", "").lower()
    if name in ("unsubscribe", "unsubscribed"):
        return "unsubscribe"
    if name in ("resubscribe", "resubscribed"):
        return "resubscribe"
    if name == "ordercompleted" and isinstance(_nested(message, "properties", "products"), list):
        return "order"
    return "event"


def _viewed(event_name: str):
    def build(message: dict, user_id, email, received_at) -> list[dict]:
        properties = message.get("properties")
        additions = {
            key: message[key] for key in ("name", "category") if has_value(message.get(key))
        }
        page_url = _nested(message, "context", "page", "url")
        if not has_value(_object(properties).get("url")) and isinstance(page_url, str) and page_url:
            additions["url"] = page_url
        data = _data(properties, additions)
        created_at = _created_at(message, received_at)
        return [_event(_identity(user_id, email), event_name, data, created_at)]

    return build


def _group(message: dict, user_id, email, received_at) -> list[dict]:
    # The group's own email is not the user's: it stays out of the user's data.
    group = {key: value for key, value in _object(message.get("traits")).items() if key != "email"}
    group_id = _as_id(message.get("groupId"), "groupId", "groupId")
    if group_id is not None:
        group["id"] = group_id
    return [_call("POST", "/users/track", {"id": user_id, "data": {"group": group}})]


def _alias(message: dict, user_id, email, received_at) -> list[dict]:
    previous_id = _as_id(message.get("previousId"), "previousId", "previousId")
    if previous_id is None:
        raise _Rejected("previousId is required", "previousId")
    return [_call("PUT", "/users/reidentify", {"id": previous_id, "new_id": user_id})]


def _delete(message: dict, user_id, email, received_at) -> list[dict]:
    return [_call("POST", "/users/delete", {"id": user_id})]


_BUILDERS = {
    "identify": _identify,
    "track": _track,
    "page": _viewed("viewed_page"),
    "screen": _viewed("viewed_screen"),
    "group": _group,
    "alias": _alias,
    "delete": _delete,
}


def _identity(user_id: str | None, email) -> dict:
    return _compact(id=user_id, email=email[0] if email else None)


def _data(given: Any, additions: dict) -> dict | None:
    """The sender's object (traits or properties) as given, even when empty,
    with the mapping's own values added over it; None (the key left out) when
    the sender gave no object and the mapping adds nothing."""
    added = {key: value for key, value in additions.items() if value is not None}
    if not isinstance(given, dict) and not added:
        return None
    return {**_object(given), **added}


def _event(identity: dict, name: str, data: dict | None, created_at: int) -> dict:
    body = _compact(
        identity=identity,
        event_name=name,
        data=data,
        extras={"created_at": created_at, "source": "segment"},
    )
    return _call("POST", "/events/track", body)


def _call(method: str, path: str, body: dict) -> dict:
    return {"method": method, "path": path, "body": body}


def _compact(**pairs: Any) -> dict:
    """The keys that have a value; the mapping never sends a key as null."""
    return {key: value for key, value in pairs.items() if value is not None}


def _user_agent(message: dict) -> str | None:
    user_agent = _nested(message, "context", "userAgent")
    return user_agent if isinstance(user_agent, str) and user_agent else None


def _created_at(message: dict, received_at: float) -> int:
    for field in ("timestamp", "originalTimestamp"):
        value = message.get(field)
        if has_value(value):
            try:
                return math.floor(parse_timestamp(value).timestamp())  # type: ignore[arg-type]
            except (ValueError, TypeError, OverflowError):
                raise _Rejected(f"{field} is not an ISO-8601 date", field) from None
    return math.floor(received_at)


# --------------------------------------------------------------------------
# Small value helpers


def _as_id(value: Any, field: str, code: str) -> str | None:
    """An id as Vero wants it: a string. Numbers become strings (42 and 42.0
    both become "42", since JSON senders do not distinguish them)."""
    if not has_value(value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    raise _Rejected(f"{field} must be a string or a number", code)


def _object(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _nested(value: Any, *path: str) -> Any:
    """value[path[0]][path[1]]..., or None where something is missing or not an object."""
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _dedup_key(message: dict) -> str:
    # The schema has already refused a messageId that is not text or a number.
    message_id = _as_id(message.get("messageId"), "messageId", "messageId")
    if message_id is not None:
        return "a:" + message_id
    # Without an id, an exact re-send is still the same message. surrogatepass:
    # a lone surrogate must not make the mapping raise (the edge refuses it).
    canonical = json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "a:sha256:" + hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
