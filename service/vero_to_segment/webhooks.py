"""Schemas for the webhook bodies Vero posts to direction B.

Tolerant where real payloads are known to vary (ids as numbers or strings,
`action` standing in for `type`, the alternative campaign key names of
unsubscribe payloads, extra keys Vero may add at any time), and strict only
about what the mapping relies on: `user` and `campaign` must be objects, the
event time must be Unix seconds, the type must be a string. Errors name the
field, so the 400 answer tells the sender exactly what was wrong.

Loading normalises the values the mapping compares or hashes: ids become
strings, the type is lower-cased, and a whole-number time becomes an int.
Values the mapping only copies into Segment properties are kept as given.
"""

from __future__ import annotations

import math
from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, pre_load

from service.messages import instance_of

# Vero's event types (API-FACTS.md). The first ten describe an email and can
# be forwarded; the two user events only describe a profile change.
EMAIL_EVENT_TYPES = (
    "sent",
    "delivered",
    "opened",
    "clicked",
    "failed",
    "bounced",
    "converted",
    "unsubscribed",
    "resubscribed",
    "complained",
)
USER_EVENT_TYPES = ("user_created", "user_updated")

# The last second datetime can represent (9999-12-31T23:59:59Z). A larger
# "Unix seconds" value is almost always milliseconds sent by mistake, and
# would otherwise fail later, far from the field that caused it.
MAX_UNIX_SECONDS = 253_402_300_799


class Identifier(fields.Field):
    """An id Vero may send as a number or a string; loaded as a string.

    Booleans and fractional numbers are refused: they are never ids, and
    turning them into "True" or "1.5" would invent a user."""

    default_error_messages = {"invalid": "must be a string or an integer"}

    def _deserialize(self, value: Any, attr, data, **kwargs) -> str:
        text = id_text(value)
        if text is None:
            raise self.make_error("invalid")
        return text


class CopiedId(Identifier):
    """Checked like any id, but kept as given: MAPPING.md copies `campaign.id`
    and `message_id` into properties unchanged (only `userId` is made a string)."""

    def _deserialize(self, value: Any, attr, data, **kwargs) -> Any:
        super()._deserialize(value, attr, data, **kwargs)
        return value


def id_text(value: Any) -> str | None:
    """An id as text (42, 42.0 and "42" are the same id), or None when the
    value cannot be an id (booleans, fractions, objects)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


class UnixSeconds(fields.Field):
    """A point in time as Unix seconds (int or float, not a string).

    A whole number is loaded as an int so that 1700000000 and 1700000000.0
    describe the same event when its identity is hashed."""

    default_error_messages = {"invalid": "must be a Unix time in seconds"}

    def _deserialize(self, value: Any, attr, data, **kwargs) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        if not math.isfinite(value) or not 0 <= value <= MAX_UNIX_SECONDS:
            raise self.make_error("invalid")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class _Tolerant(Schema):
    """Keeps keys it does not know: Vero adds fields without notice, and a
    payload must not be refused for carrying more than we use."""

    class Meta:
        unknown = INCLUDE

    # Used when the value of a nested object is not an object at all.
    error_messages = {"type": "must be an object"}


class UserSchema(_Tolerant):
    id = Identifier(allow_none=True)
    email = fields.String(allow_none=True)


class CampaignSchema(_Tolerant):
    id = CopiedId(allow_none=True)
    # Copied into Segment properties as given, so any JSON value is accepted:
    # refusing an event because a campaign name is a number would lose it.
    name = fields.Raw(allow_none=True)
    campaign_title = fields.Raw(allow_none=True)
    subject = fields.Raw(allow_none=True)
    email_subject = fields.Raw(allow_none=True)
    type = fields.Raw(allow_none=True)
    variation = fields.Raw(allow_none=True)
    variation_name = fields.Raw(allow_none=True)
    permalink = fields.Raw(allow_none=True)
    trigger_event = fields.Raw(allow_none=True, data_key="trigger-event")
    tags = fields.Raw(allow_none=True)
    channel = fields.Raw(allow_none=True)


class EventTypeSchema(_Tolerant):
    """Just enough to learn which event a payload is.

    `type` is the documented key; some `user_updated` payloads carry it as
    `action` instead, so `action` is used only when `type` is absent."""

    error_messages = {"type": "webhook must be a JSON object"}

    type = fields.String(
        required=True,
        error_messages={
            "required": "is required",
            "null": "is required",
            "invalid": "must be a string",
        },
    )
    action = fields.Raw(allow_none=True)

    @pre_load
    def _resolve_type(self, data: Any, **kwargs) -> Any:
        if not isinstance(data, dict):
            return data  # the schema itself reports "must be a JSON object"
        event_type = data.get("type")
        if event_type is None and data.get("action") is not None:
            event_type = data["action"]
            if not isinstance(event_type, str):
                raise ValidationError({"action": ["must be a string"]})
        if isinstance(event_type, str):
            # Vero sends lower case; a proxy or a hand-written test may not.
            event_type = event_type.strip().lower()
        return {**data, "type": event_type}


class VeroWebhookSchema(EventTypeSchema):
    """Fields every Vero event may carry. Each event type adds its time."""

    user = fields.Nested(UserSchema, allow_none=True)
    campaign = fields.Nested(CampaignSchema, allow_none=True)
    message_id = CopiedId(allow_none=True)
    user_agent = fields.String(allow_none=True)


class SentSchema(VeroWebhookSchema):
    sent_at = UnixSeconds(allow_none=True)


class DeliveredSchema(VeroWebhookSchema):
    delivered_at = UnixSeconds(allow_none=True)


class OpenedSchema(VeroWebhookSchema):
    opened_at = UnixSeconds(allow_none=True)


class ClickedSchema(VeroWebhookSchema):
    clicked_at = UnixSeconds(allow_none=True)
    # No known sample carries the link, but these are the names a sender
    # would use; the mapping takes the first one present.
    link_url = fields.String(allow_none=True)
    url = fields.String(allow_none=True)
    link = fields.String(allow_none=True)


class FailedSchema(VeroWebhookSchema):
    failed_at = UnixSeconds(allow_none=True)


class BouncedSchema(VeroWebhookSchema):
    bounced_at = UnixSeconds(allow_none=True)
    # SMTP codes arrive as numbers or strings; passed through as given.
    bounce_type = fields.Raw(allow_none=True)
    bounce_code = fields.Raw(allow_none=True)
    bounce_message = fields.Raw(allow_none=True)


class ConvertedSchema(VeroWebhookSchema):
    converted_at = UnixSeconds(allow_none=True)


class UnsubscribedSchema(VeroWebhookSchema):
    unsubscribed_at = UnixSeconds(allow_none=True)


class ResubscribedSchema(VeroWebhookSchema):
    resubscribed_at = UnixSeconds(allow_none=True)


class ComplainedSchema(VeroWebhookSchema):
    complained_at = UnixSeconds(allow_none=True)


class UserCreatedSchema(VeroWebhookSchema):
    user_created_at = UnixSeconds(allow_none=True)


class UserUpdatedSchema(VeroWebhookSchema):
    user_updated_at = UnixSeconds(allow_none=True)


SCHEMAS: dict[str, type[VeroWebhookSchema]] = {
    "sent": SentSchema,
    "delivered": DeliveredSchema,
    "opened": OpenedSchema,
    "clicked": ClickedSchema,
    "failed": FailedSchema,
    "bounced": BouncedSchema,
    "converted": ConvertedSchema,
    "unsubscribed": UnsubscribedSchema,
    "resubscribed": ResubscribedSchema,
    "complained": ComplainedSchema,
    "user_created": UserCreatedSchema,
    "user_updated": UserUpdatedSchema,
}


def time_field(event_type: str) -> str:
    """The key holding the event's time, e.g. `opened_at`."""
    return f"{event_type}_at"


def load_event_type(payload: Any) -> str:
    """The payload's event type, lower-cased. Raises ValidationError."""
    return instance_of(EventTypeSchema).load(payload)["type"]


def describe_errors(messages: Any) -> str:
    """One line naming each failing field by its path, e.g.
    `user: must be an object; opened_at: must be a Unix time in seconds`."""
    return "; ".join(f"{path}: {text}" if path else text for path, text in _flatten(messages, ""))


def _flatten(messages: Any, prefix: str):
    if isinstance(messages, dict):
        for key, value in messages.items():
            # "_schema" marks an error about the object itself, not a key in it.
            path = prefix if key == "_schema" else _join(prefix, str(key))
            yield from _flatten(value, path)
    elif isinstance(messages, list):
        for item in messages:
            yield from _flatten(item, prefix)
    else:
        yield prefix, str(messages)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key
