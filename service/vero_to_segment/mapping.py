"""Direction B: one Vero webhook becomes one Segment track message.

Pure functions (no I/O, no Flask): the web layer hands in the raw body and the
configuration, and gets back an `Accept`, `Skip` or `Reject` per webhook. The
contract is MAPPING.md part B; choices it leaves open are recorded under
"Direction B" in docs/mapping-decisions.md.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from marshmallow import ValidationError

from service.messages import TrackSchema, instance_of
from service.results import Accept, Reject, Result, Skip
from service.vero_to_segment.webhooks import (
    EMAIL_EVENT_TYPES,
    SCHEMAS,
    USER_EVENT_TYPES,
    describe_errors,
    id_text,
    load_event_type,
    time_field,
)

# MAPPING.md B.1. The first seven are the names Vero's own Segment
# integration uses, so existing Segment destinations keep working.
DEFAULT_EVENT_NAMES: dict[str, str | None] = {
    "sent": "Email Sent",
    "delivered": "Email Delivered",
    "opened": "Email Opened",
    "clicked": "Email Link Clicked",
    "bounced": "Email Bounced",
    "unsubscribed": "Email Unsubscribed",
    "complained": "Email Marked as Spam",
    "converted": "Email Converted",
    "failed": "Email Failed",
    "resubscribed": "Email Resubscribed",
}

# Segment's per-message limit (API-FACTS.md), measured by `encode_message`.
MAX_MESSAGE_BYTES = 32 * 1024

# ---------------------------------------------------------------------------
# Configuration


def event_names_with(overrides: dict[str, Any]) -> dict[str, str | None]:
    """The default event names with `VERO_EVENT_NAMES` applied (keys matched
    case-insensitively).

    Keys that are not one of the ten forwardable Vero types are left out (see
    `ignored_overrides`, which the app warns about at start): the user events
    are never forwarded (MAPPING.md B.1), and a deployment should not stop over
    a name it would never use. Raises ValueError naming the key when a name is
    neither a non-empty string nor null."""
    if not isinstance(overrides, dict):
        raise ValueError("VERO_EVENT_NAMES: expected a JSON object")
    names = dict(DEFAULT_EVENT_NAMES)
    for key, name in overrides.items():
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(
                f"VERO_EVENT_NAMES: the name for {key!r} must be a non-empty string or null"
            )
        vero_type = str(key).strip().lower()
        if vero_type in DEFAULT_EVENT_NAMES:
            names[vero_type] = name
    return names


def ignored_overrides(overrides: dict[str, Any]) -> list[str]:
    """The keys of `VERO_EVENT_NAMES` that name no forwardable Vero type."""
    return [key for key in overrides if str(key).strip().lower() not in DEFAULT_EVENT_NAMES]


# ---------------------------------------------------------------------------
# One webhook


def map_webhook(
    payload: Any,
    *,
    event_names: dict[str, str | None],
    library: dict[str, str],
    received_at: float,
) -> Result:
    """Map one Vero webhook to a Segment track message (MAPPING.md B).

    `event_names` is the full table (see `event_names_with`); `library` is
    this service's `{"name", "version"}`; `received_at` (Unix seconds) is the
    timestamp used when the webhook carries no time of its own. A `Reject`
    given as `payload` (the edge's verdict on one element of a body) is
    returned as it is."""
    if isinstance(payload, Reject):
        return payload
    if not isinstance(payload, dict):
        return Reject("webhook must be a JSON object", "not_object")
    try:
        event_type = load_event_type(payload)
    except ValidationError as error:
        return Reject(describe_errors(error.messages), "invalid_type")

    # Decided before the rest is validated: a payload we do not forward
    # cannot be wrong for us, and Vero would only log our refusal.
    if event_type in USER_EVENT_TYPES:
        return Skip("user_event")
    if event_type not in EMAIL_EVENT_TYPES:
        return Skip("unknown_type")
    event_name = event_names.get(event_type)
    if event_name is None:
        return Skip("not_forwarded")

    try:
        webhook = instance_of(SCHEMAS[event_type]).load(payload)
    except ValidationError as error:
        return Reject(describe_errors(error.messages), "invalid_field")

    user_id, email = _user(webhook)
    if user_id is None and email is None:
        return Reject("user.id or user.email is required", "missing_user")

    message = build_message(
        webhook,
        event_type=event_type,
        event_name=event_name,
        library=library,
        received_at=received_at,
    )
    size = _encoded_size(message)
    if size is None:
        return Reject("a text value is not valid Unicode (unpaired surrogate)", "bad_encoding")
    if size > MAX_MESSAGE_BYTES:
        return Reject(
            f"the Segment message would be {size} bytes, over Segment's limit of {MAX_MESSAGE_BYTES}",
            "too_large",
        )
    return Accept(
        dedup_key="b:" + message["messageId"],
        order_key=user_id if user_id is not None else email,  # type: ignore[arg-type]
        payload={"message": message},
    )


def build_message(
    webhook: dict[str, Any],
    *,
    event_type: str,
    event_name: str,
    library: dict[str, str],
    received_at: float,
) -> dict[str, Any]:
    """The Segment track message for a webhook already loaded by its schema
    and known to name a user.

    Built through Segment's own TrackSchema, as direction A reads messages:
    dumping fills in `type` and writes the timestamp as Segment does
    (ISO-8601 UTC with milliseconds, e.g. 2023-11-14T22:13:20.000Z)."""
    user_id, email = _user(webhook)
    occurred_at = webhook.get(time_field(event_type))
    draft: dict[str, Any] = {"event": event_name}
    if user_id is not None:
        draft["userId"] = user_id
    else:
        # Vero knows this user only by email; Segment's anonymousId is the
        # field for an identity that is not the customer's own user id.
        draft["anonymousId"] = email
    draft["timestamp"] = _utc(occurred_at if occurred_at is not None else received_at)
    draft["messageId"] = message_id(webhook, event_type)
    draft["properties"] = _properties(webhook, event_type)
    draft["context"] = _context(webhook, email, library)
    return instance_of(TrackSchema).dump(draft)


def message_id(webhook: dict[str, Any], event_type: str) -> str:
    """A stable id for the event, so that a webhook delivered twice yields
    the same messageId and Segment drops the copy as well.

    The identity is (type, message_id, user, `<type>_at`, campaign id) as
    loaded by the schema: ids are strings and whole-number times ints, so
    42 and "42" or 1700000000 and 1700000000.0 are the same event. The user
    is tagged as id or email because Segment treats a userId and an
    anonymousId as different people, even when the text is the same."""
    user_id, email = _user(webhook)
    user = ["id", user_id] if user_id is not None else ["email", email]
    campaign = webhook.get("campaign") or {}
    identity = [
        event_type,
        _present(id_text(webhook.get("message_id"))),
        user,
        webhook.get(time_field(event_type)),
        _present(id_text(campaign.get("id"))),
    ]
    canonical = json.dumps(identity, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
    # "vero-" and 64 hex digits: 69 characters, within Segment's 100.
    return f"vero-{digest}"


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def encode_message(message: dict[str, Any]) -> bytes:
    """The message as compact JSON (no spaces), UTF-8, non-ASCII left as is.

    This is the measure the 32 KB limit is checked against; a client that
    builds its batch body from these bytes sends exactly what was measured."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _encoded_size(message: dict[str, Any]) -> int | None:
    try:
        return len(encode_message(message))
    except UnicodeEncodeError:
        # JSON may carry "\ud800" escapes that decode to lone surrogates;
        # they cannot be sent as UTF-8, so refuse now rather than at delivery.
        return None


def _user(webhook: dict[str, Any]) -> tuple[str | None, str | None]:
    user = webhook.get("user") or {}
    return _present(user.get("id")), _present(user.get("email"))


def _properties(webhook: dict[str, Any], event_type: str) -> dict[str, Any]:
    campaign = webhook.get("campaign") or {}
    candidates = {
        "email_id": webhook.get("message_id"),
        "email_subject": _first(campaign, "subject", "email_subject"),
        "campaign_id": campaign.get("id"),
        "campaign_name": _first(campaign, "name", "campaign_title"),
        "campaign_type": campaign.get("type"),
        "campaign_variation": _first(campaign, "variation", "variation_name"),
        "campaign_permalink": campaign.get("permalink"),
        "campaign_trigger_event": campaign.get("trigger_event"),
        "campaign_tags": campaign.get("tags"),
        "channel": campaign.get("channel"),
        # `url` and `link` are generic names, so they are read only where a
        # link is what the event is about.
        "link_url": _first(webhook, "link_url", "url", "link") if event_type == "clicked" else None,
    }
    if event_type == "bounced":
        for key in ("bounce_type", "bounce_code", "bounce_message"):
            candidates[key] = webhook.get(key)
    return {key: value for key, value in candidates.items() if _present(value) is not None}


def _context(webhook: dict[str, Any], email: str | None, library: dict[str, str]) -> dict[str, Any]:
    context: dict[str, Any] = {}
    if email is not None:
        context["traits"] = {"email": email}
    user_agent = _present(webhook.get("user_agent"))
    if user_agent is not None:
        context["userAgent"] = user_agent
    # Marks the message as coming from Vero: direction A skips such messages,
    # so a Segment source wired back to this service cannot loop.
    context["integration"] = {"name": "vero", "version": library["version"]}
    context["library"] = {"name": library["name"], "version": library["version"]}
    return context


def _first(source: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value = _present(source.get(key))
        if value is not None:
            return value
    return None


def _present(value: Any) -> Any:
    """The value, or None when it carries nothing: null or blank text."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value
