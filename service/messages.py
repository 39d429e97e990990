"""Schemas for Segment spec messages (identify, track, page, screen, group,
alias, delete), used in both directions.

Loading validates what arrives and keeps every value as the sender gave it:
unknown fields are kept (Segment messages carry extras), ids stay numbers or
strings, timestamps stay strings. That keeps a loaded message JSON-ready and
lets the mapping decide how to convert. Dumping fills in `type` and renders a
`datetime` timestamp as ISO-8601, for code that builds messages (direction B).

The schemas check the *shapes* of fields (objects, strings, ids, ISO-8601
timestamps). Which fields a message must have (a user, a track's event, an
alias's previousId) are rules of MAPPING.md A.1 with their own order and
wording, so they live once, in the mapping (`segment_to_vero.mapping`); a
built message (direction B) has them by construction.

Error messages are predicates ("must be an object") keyed by field, so
`validate_message` callers can write "<field> <message>".
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Any

from marshmallow import INCLUDE, Schema, fields, validate

_YEAR = re.compile(r"^\d{4}$")
_YEAR_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


def parse_timestamp(value: str) -> datetime:
    """Parse an ISO-8601 date or date-time into an aware UTC-comparable datetime.

    Besides what `datetime.fromisoformat` reads (dates, offsets, "Z",
    fractions), accepts the reduced forms "YYYY" and "YYYY-MM", which
    JavaScript's Date (and so Segment's fixtures, "2014") read as the start of
    that year or month. A value without an offset is taken as UTC, as Segment
    does. Raises ValueError when the text is not such a date.
    """
    if not isinstance(value, str):
        raise ValueError("not a string")
    text = value.strip()
    if _YEAR.match(text):
        return datetime(int(text), 1, 1, tzinfo=UTC)
    year_month = _YEAR_MONTH.match(text)
    if year_month:
        return datetime(int(year_month[1]), int(year_month[2]), 1, tzinfo=UTC)
    if text.endswith("z"):
        # RFC 3339 allows a lower-case "z"; fromisoformat does not.
        text = text[:-1] + "Z"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def format_timestamp(moment: datetime) -> str:
    """ISO-8601 in UTC with millisecond precision and a "Z", as Segment writes it."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def has_value(value: Any) -> bool:
    """Null and the empty string both mean "not given" for the fields we read."""
    return value is not None and value != ""


class IdField(fields.Field):
    """A user, group or message id: Segment allows a string or a number.

    Booleans are refused even though Python counts them as numbers.
    """

    default_error_messages = {"invalid": "must be a string or a number"}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.make_error("invalid")
        return value

    def _serialize(self, value, attr, obj, **kwargs):
        return value


class TimestampField(fields.Field):
    """An ISO-8601 string (see `parse_timestamp`); loads as the given string."""

    default_error_messages = {"invalid": "is not an ISO-8601 date"}

    def _deserialize(self, value, attr, data, **kwargs):
        if value == "":
            return value
        try:
            parse_timestamp(value)
        except (ValueError, TypeError):
            raise self.make_error("invalid") from None
        return value

    def _serialize(self, value, attr, obj, **kwargs):
        if isinstance(value, datetime):
            return format_timestamp(value)
        return value


_OPTIONAL: dict[str, Any] = {"allow_none": True}
_MESSAGES: dict[str, Any] = {"required": "is required", "null": "must not be null"}


def _object(**kwargs) -> fields.Dict:
    return fields.Dict(
        error_messages={**_MESSAGES, "invalid": "must be an object"}, **{**_OPTIONAL, **kwargs}
    )


def _string(**kwargs) -> fields.String:
    return fields.String(
        error_messages={**_MESSAGES, "invalid": "must be a string"}, **{**_OPTIONAL, **kwargs}
    )


def _id(**kwargs) -> IdField:
    return IdField(error_messages=_MESSAGES, **{**_OPTIONAL, **kwargs})


def _timestamp() -> TimestampField:
    return TimestampField(error_messages=_MESSAGES, **_OPTIONAL)


def _type(name: str) -> fields.String:
    # The route or the schema already names the type, so a message that leaves
    # it out still loads; one that names another type is refused.
    return fields.String(
        load_default=name,
        dump_default=name,
        validate=validate.Equal(name, error=f"must be {name!r}"),
        error_messages={**_MESSAGES, "invalid": "must be a string"},
    )


class MessageSchema(Schema):
    """Fields every Segment message may carry."""

    class Meta:
        unknown = INCLUDE
        ordered = True

    messageId = _id()
    timestamp = _timestamp()
    originalTimestamp = _timestamp()
    # Kept as given, not checked: the mapping never reads them, and a message
    # must not be refused over a field it does not use.
    sentAt = fields.Raw(allow_none=True)
    receivedAt = fields.Raw(allow_none=True)
    userId = _id()
    anonymousId = _id()
    context = _object()
    integrations = _object()


class IdentifySchema(MessageSchema):
    type = _type("identify")
    traits = _object()


class TrackSchema(MessageSchema):
    type = _type("track")
    event = _string()
    properties = _object()


class PageSchema(MessageSchema):
    type = _type("page")
    name = _string()
    category = _string()
    properties = _object()


class ScreenSchema(PageSchema):
    type = _type("screen")


class GroupSchema(MessageSchema):
    type = _type("group")
    groupId = _id()
    traits = _object()


class AliasSchema(MessageSchema):
    type = _type("alias")
    previousId = _id()


class DeleteSchema(MessageSchema):
    type = _type("delete")


SCHEMAS: dict[str, type[MessageSchema]] = {
    "identify": IdentifySchema,
    "track": TrackSchema,
    "page": PageSchema,
    "screen": ScreenSchema,
    "group": GroupSchema,
    "alias": AliasSchema,
    "delete": DeleteSchema,
}


def validate_message(data: Any) -> dict[str, list[str]]:
    """Errors of one Segment message keyed by field ({} when it is valid).

    The schema is chosen by the message's `type`; a message that is not an
    object, or whose type is missing or unknown, is reported under "type".
    """
    if not isinstance(data, dict):
        return {"type": ["message must be a JSON object"]}
    kind = data.get("type")
    schema_class = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema_class is None:
        return {"type": ["unsupported message type"]}
    return _flatten(instance_of(schema_class).validate(data))


@functools.cache
def instance_of(schema_class: type[Schema]) -> Schema:
    """One shared instance per schema class. Making an instance deep-copies
    its declared fields, which cost more than validating the message did
    (about half of direction A's CPU in a profile); load, dump and validate
    keep no state on the instance, so request threads can share it."""
    return schema_class()


def error_sentence(field: str, message: str) -> str:
    """'<field> <message>', unless the message already names its field."""
    if message.startswith(field):
        return message
    return f"{field} {message}"


def _flatten(errors: dict, prefix: str = "") -> dict[str, list[str]]:
    flat: dict[str, list[str]] = {}
    for key, value in errors.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = [str(item) for item in value]
    return flat
