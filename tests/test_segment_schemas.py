"""The Segment message schemas: what loads, what is refused, and what dumps."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from marshmallow import ValidationError

from service.messages import (
    TrackSchema,
    error_sentence,
    format_timestamp,
    parse_timestamp,
    validate_message,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "segment-vero"


def fixture_input(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())["input"]


@pytest.mark.parametrize(
    "name",
    [
        "alias-basic.json",
        "group-basic.json",
        "identify-basic.json",
        "identify-ua.json",
        "page-basic.json",
        "track-basic.json",
        "track-unsubscribe.json",
        "track-with-email.json",
    ],
)
def test_every_fixture_message_is_valid(name):
    assert validate_message(fixture_input(name)) == {}


def test_loading_keeps_unknown_fields_and_values_as_given():
    message = {
        "type": "track",
        "userId": 42,
        "event": "Signed Up",
        "timestamp": "2014",
        "properties": {"plan": None},
        "context": {"ip": "203.0.113.9"},
        "version": 2,
        "channel": "server",
    }
    assert TrackSchema().load(message) == message


def test_loading_fills_in_the_type_the_schema_is_for():
    assert TrackSchema().load({"userId": "u", "event": "e"}) == {
        "userId": "u",
        "event": "e",
        "type": "track",
    }


def test_null_optional_fields_are_allowed():
    message = {
        "type": "page",
        "userId": "u",
        "anonymousId": None,
        "messageId": None,
        "timestamp": None,
        "name": None,
        "category": None,
        "properties": None,
        "context": None,
        "integrations": None,
    }
    assert validate_message(message) == {}


def test_which_fields_a_message_must_have_is_left_to_the_mapping():
    # MAPPING.md A.1's rules (a user, a track's event, an alias's previousId)
    # are checked once, in segment_to_vero.mapping, in the contract's order;
    # the schemas only check the shapes of the fields that are there.
    for message in (
        {"type": "track"},
        {"type": "track", "event": ""},
        {"type": "identify", "traits": {"name": "x"}},
        {"type": "alias", "userId": "new"},
        {"type": "delete"},
    ):
        assert validate_message(message) == {}, message
    assert validate_message({"type": "alias", "userId": "new", "previousId": []}) == {
        "previousId": ["must be a string or a number"]
    }


@pytest.mark.parametrize(
    "message, errors",
    [
        ({"type": "identify", "userId": True}, {"userId": ["must be a string or a number"]}),
        (
            {"type": "identify", "userId": "u", "anonymousId": ["a"]},
            {"anonymousId": ["must be a string or a number"]},
        ),
        (
            {"type": "identify", "userId": "u", "messageId": {}},
            {"messageId": ["must be a string or a number"]},
        ),
        ({"type": "identify", "userId": "u", "traits": []}, {"traits": ["must be an object"]}),
        ({"type": "identify", "userId": "u", "context": "x"}, {"context": ["must be an object"]}),
        (
            {"type": "identify", "userId": "u", "integrations": 1},
            {"integrations": ["must be an object"]},
        ),
        ({"type": "track", "userId": "u", "event": 5}, {"event": ["must be a string"]}),
        (
            {"type": "track", "userId": "u", "event": "e", "properties": "x"},
            {"properties": ["must be an object"]},
        ),
        ({"type": "page", "userId": "u", "name": 3}, {"name": ["must be a string"]}),
        ({"type": "screen", "userId": "u", "category": []}, {"category": ["must be a string"]}),
        (
            {"type": "group", "userId": "u", "groupId": False},
            {"groupId": ["must be a string or a number"]},
        ),
        ({"type": "group", "userId": "u", "traits": 1}, {"traits": ["must be an object"]}),
        (
            {"type": "track", "userId": "u", "event": "e", "timestamp": "yesterday"},
            {"timestamp": ["is not an ISO-8601 date"]},
        ),
        (
            {"type": "track", "userId": "u", "event": "e", "originalTimestamp": 1388534400},
            {"originalTimestamp": ["is not an ISO-8601 date"]},
        ),
        (
            {"type": "track", "userId": "u", "event": "e", "originalTimestamp": "14"},
            {"originalTimestamp": ["is not an ISO-8601 date"]},
        ),
    ],
)
def test_wrongly_shaped_fields_are_named(message, errors):
    assert validate_message(message) == errors


@pytest.mark.parametrize("message", [None, [], "track", 3])
def test_a_message_that_is_not_an_object_is_reported_under_type(message):
    assert validate_message(message) == {"type": ["message must be a JSON object"]}


@pytest.mark.parametrize("kind", [None, "Track", "order", 3, ["track"], {"t": 1}])
def test_an_unknown_type_is_reported(kind):
    assert validate_message({"type": kind, "userId": "u"}) == {"type": ["unsupported message type"]}


def test_a_schema_refuses_a_message_of_another_type():
    assert TrackSchema().validate({"type": "page", "userId": "u", "event": "e"}) == {
        "type": ["must be 'track'"]
    }


def test_load_raises_with_the_fields_named():
    with pytest.raises(ValidationError) as caught:
        TrackSchema().load({"type": "track", "event": 5, "properties": []})
    assert caught.value.messages == {
        "event": ["must be a string"],
        "properties": ["must be an object"],
    }


def test_dumping_a_built_track_renders_its_timestamp_and_type():
    built = {
        "userId": "u_42",
        "event": "Email Opened",
        "messageId": "m1",
        "timestamp": datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC),
        "properties": {"email_id": "abc"},
        "context": {"integration": {"name": "vero", "version": "0.1.0"}},
    }
    assert TrackSchema().dump(built) == {
        "type": "track",
        "messageId": "m1",
        "timestamp": "2023-11-14T22:13:20.123Z",
        "userId": "u_42",
        "context": {"integration": {"name": "vero", "version": "0.1.0"}},
        "event": "Email Opened",
        "properties": {"email_id": "abc"},
    }


def test_dumping_keeps_a_timestamp_given_as_text():
    assert TrackSchema().dump({"userId": "u", "event": "e", "timestamp": "2014"}) == {
        "type": "track",
        "timestamp": "2014",
        "userId": "u",
        "event": "e",
    }


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2014", datetime(2014, 1, 1, tzinfo=UTC)),
        ("2014-05", datetime(2014, 5, 1, tzinfo=UTC)),
        ("2014-05-06", datetime(2014, 5, 6, tzinfo=UTC)),
        ("2014-05-06T07:08:09Z", datetime(2014, 5, 6, 7, 8, 9, tzinfo=UTC)),
        ("2014-05-06T07:08:09.123Z", datetime(2014, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)),
        ("2014-05-06T07:08:09", datetime(2014, 5, 6, 7, 8, 9, tzinfo=UTC)),
        ("2014-05-06 07:08:09+02:00", datetime(2014, 5, 6, 5, 8, 9, tzinfo=UTC)),
        (
            "2014-05-06T07:08:09.5-0130",
            datetime(2014, 5, 6, 7, 8, 9, 500000, tzinfo=timezone(-timedelta(hours=1, minutes=30))),
        ),
    ],
)
def test_timestamps_in_iso_8601_forms(text, expected):
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "2014-13", "2014/01/01", "14", "1388534400"])
def test_text_that_is_not_an_iso_8601_date_raises(text):
    with pytest.raises(ValueError):
        parse_timestamp(text)


def test_format_timestamp_writes_utc_milliseconds():
    moment = datetime(2014, 1, 1, 2, 0, 0, 999999, tzinfo=timezone(timedelta(hours=2)))
    assert format_timestamp(moment) == "2014-01-01T00:00:00.999Z"
    assert format_timestamp(datetime(2014, 1, 1)) == "2014-01-01T00:00:00.000Z"


def test_error_sentence_names_the_field_once():
    assert error_sentence("event", "is required") == "event is required"
    assert error_sentence("traits", "traits must be an object") == "traits must be an object"
