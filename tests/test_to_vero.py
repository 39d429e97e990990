"""Direction A (MAPPING.md part A): Segment messages to Vero calls, and the
helpers the HTTP edge uses to split and authenticate request bodies."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blueprints.common import matching_secret
from blueprints.segment import signature_ok, split_body
from service.jsonbody import Messages
from service.results import Accept, Reject, Skip
from service.segment_to_vero.mapping import looks_like_email, map_message
from tests.support import sign

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "segment-vero"
RECEIVED_AT = 1700000000.75  # whole seconds: 1700000000
CREATED_2014 = 1388534400  # "2014" = 2014-01-01T00:00:00Z


def map_(message, allow_anonymous=False):
    return map_message(message, allow_anonymous=allow_anonymous, received_at=RECEIVED_AT)


def calls_of(message, allow_anonymous=False):
    result = map_(message, allow_anonymous)
    assert isinstance(result, Accept), result
    return result.payload["calls"]


def call(method, path, body):
    return {"method": method, "path": path, "body": body}


def event(name, data=None, identity=None, created_at=CREATED_2014):
    body = {"identity": identity or {"id": "u1"}, "event_name": name}
    if data is not None:
        body["data"] = data
    body["extras"] = {"created_at": created_at, "source": "segment"}
    return call("POST", "/events/track", body)


def track(event_name="Signed Up", **extra):
    return {"type": "track", "userId": "u1", "event": event_name, "timestamp": "2014", **extra}


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


# --------------------------------------------------------------------------
# The archived fixtures of Segment's own Vero destination


@pytest.mark.parametrize(
    "name, method, path",
    [
        ("identify-basic.json", "POST", "/users/track"),
        ("identify-ua.json", "POST", "/users/track"),
        ("track-basic.json", "POST", "/events/track"),
        ("track-with-email.json", "POST", "/events/track"),
        ("page-basic.json", "POST", "/events/track"),
        ("alias-basic.json", "PUT", "/users/reidentify"),
    ],
)
def test_fixtures_that_match_the_contract_as_they_stand(name, method, path):
    case = fixture(name)
    assert calls_of(case["input"]) == [call(method, path, case["output"])]


def test_fixture_track_unsubscribe_sends_only_the_id():
    case = fixture("track-unsubscribe.json")
    assert calls_of(case["input"]) == [call("POST", "/users/unsubscribe", {"id": "user-id"})]


def test_fixture_group_basic_goes_to_users_track_as_data_group():
    case = fixture("group-basic.json")
    assert calls_of(case["input"]) == [
        call(
            "POST",
            "/users/track",
            {"id": "user-id", "data": {"group": case["output"]["changes"]["group"]}},
        )
    ]


def test_fixture_group_without_user_id_is_rejected():
    case = fixture("group-no-userid.json")
    assert map_(case["input"]) == Reject("userId is required", "userId")


# --------------------------------------------------------------------------
# A.1: skips


@pytest.mark.parametrize(
    "integrations",
    [
        {"Vero": False},
        {"vero": False},
        {"VERO": False, "All": True},
        {"All": False},
        {"all": False},
        {"All": False, "Vero": None},
        {"All": False, "Vero": 0},
    ],
)
def test_integrations_turning_vero_off_skip_the_message(integrations):
    assert map_(track(integrations=integrations)) == Skip("integration_disabled")


@pytest.mark.parametrize(
    "integrations",
    [
        {"All": False, "Vero": True},
        {"All": False, "Vero": "yes"},
        {"All": False, "Vero": 1},
        {"All": False, "vero": {}},
        {"All": False, "Vero": {"tags": None}},
        {"All": True},
        {"Vero": None},
        {"Intercom": False},
        {},
    ],
)
def test_integrations_leaving_vero_on_map_the_message(integrations):
    assert calls_of(track(integrations=integrations)) == [event("Signed Up")]


def test_a_skip_wins_over_problems_found_later():
    message = {"type": "nonsense", "integrations": {"Vero": False}}
    assert map_(message) == Skip("integration_disabled")


@pytest.mark.parametrize("name", ["vero", "Vero", "VERO"])
def test_a_message_that_came_from_vero_is_skipped_as_a_loop(name):
    message = track(context={"integration": {"name": name, "version": "0.1.0"}})
    assert map_(message) == Skip("loop")


def test_other_integration_names_are_not_loops():
    message = track(context={"integration": {"name": "vero-bridge"}})
    assert calls_of(message) == [event("Signed Up")]


# --------------------------------------------------------------------------
# A.1: rejections, in order


@pytest.mark.parametrize("message", [None, [], [{"type": "track"}], "track", 7, True])
def test_a_message_that_is_not_an_object_is_rejected(message):
    assert map_(message) == Reject("message must be a JSON object", "not_object")


@pytest.mark.parametrize("kind", [None, "", "Track", "order", "batch", 3, ["track"]])
def test_a_missing_or_unknown_type_is_rejected(kind):
    message = {"userId": "u1", "event": "x"}
    if kind is not None:
        message["type"] = kind
    assert map_(message) == Reject("unsupported message type", "type")


@pytest.mark.parametrize(
    "kind", ["identify", "track", "page", "screen", "group", "alias", "delete"]
)
@pytest.mark.parametrize("user_id", [None, ""])
def test_every_type_needs_a_user_id(kind, user_id):
    message = {"type": kind, "event": "e", "previousId": "p", "anonymousId": "anon-1"}
    if user_id is not None:
        message["userId"] = user_id
    assert map_(message) == Reject("userId is required", "userId")


def test_with_anonymous_allowed_a_message_without_any_id_names_both():
    message = {"type": "track", "event": "e"}
    assert map_(message, allow_anonymous=True) == Reject(
        "userId or anonymousId is required", "userId"
    )


@pytest.mark.parametrize("user_id", [True, {"id": 1}, [1], float("nan")])
def test_a_user_id_that_is_not_a_string_or_number_is_rejected(user_id):
    assert map_(track(userId=user_id)) == Reject("userId must be a string or a number", "userId")


@pytest.mark.parametrize(
    "field, message",
    [
        ("userId", track(userId="x" * 255)),
        ("event", track("e" * 255)),
        (
            "traits.email",
            {"type": "identify", "userId": "u1", "traits": {"email": "a@" + "b" * 250 + ".com"}},
        ),
        ("context.traits.email", track(context={"traits": {"email": "a@" + "b" * 250 + ".com"}})),
        ("userId", track(userId="a@" + "b" * 250 + ".com")),
        ("previousId", {"type": "alias", "userId": "u1", "previousId": "p" * 255}),
        ("groupId", {"type": "group", "userId": "u1", "groupId": "g" * 300}),
        ("properties.id", track("Unsubscribe", properties={"id": "i" * 255})),
        (
            "integrations.Vero.tags.id",
            track(
                integrations={"Vero": {"tags": {"id": "t" * 255, "action": "add", "values": ["a"]}}}
            ),
        ),
    ],
)
def test_values_of_255_characters_or_more_are_rejected_naming_the_field(field, message):
    assert map_(message) == Reject(f"{field} must be shorter than 255 characters", "too_long")


def test_an_anonymous_stand_in_is_held_to_the_same_limit():
    message = {"type": "track", "event": "e", "anonymousId": "a" * 255}
    assert map_(message, allow_anonymous=True) == Reject(
        "anonymousId must be shorter than 255 characters", "too_long"
    )


def test_values_of_254_characters_are_sent():
    user_id = "x" * 254
    assert calls_of(track("e" * 254, userId=user_id)) == [
        event("e" * 254, identity={"id": user_id})
    ]


def test_the_length_rule_comes_before_the_tags_and_event_rules():
    message = {"type": "track", "userId": "x" * 300, "integrations": {"Vero": {"tags": "bad"}}}
    assert map_(message) == Reject("userId must be shorter than 255 characters", "too_long")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("jd@example.com", True),
        ("a@b.c", True),
        ("first.last+tag@sub.example.org", True),
        ("jd@localhost", False),
        ("@example.com", False),
        ("jd@", False),
        ("jd", False),
        ("a@b@example.com", False),
        ("", False),
        (None, False),
        (42, False),
    ],
)
def test_what_looks_like_an_email(value, expected):
    assert looks_like_email(value) is expected


@pytest.mark.parametrize(
    "message, field",
    [
        ({"type": "identify", "userId": "u1", "traits": {"email": "not-an-email"}}, "traits.email"),
        ({"type": "identify", "userId": "u1", "traits": {"email": 12}}, "traits.email"),
        (
            {"type": "identify", "userId": "u1", "context": {"traits": {"email": "jd@localhost"}}},
            "context.traits.email",
        ),
        ({"type": "identify", "traits": {"email": "nope"}}, "traits.email"),
        (track(context={"traits": {"email": "nope"}}), "context.traits.email"),
        (
            {"type": "page", "userId": "u1", "context": {"traits": {"email": "a@@b.com"}}},
            "context.traits.email",
        ),
    ],
)
def test_an_email_the_mapping_would_send_must_look_like_one(message, field):
    assert map_(message) == Reject(f"{field} does not look like an email", "email")


def test_an_email_the_mapping_would_not_send_is_not_checked():
    # identify prefers traits.email, so context.traits.email is never sent.
    message = {
        "type": "identify",
        "userId": "u1",
        "traits": {"email": "jd@example.com"},
        "context": {"traits": {"email": "nope"}},
    }
    assert calls_of(message) == [
        call(
            "POST",
            "/users/track",
            {
                "id": "u1",
                "email": "jd@example.com",
                "data": {"email": "jd@example.com", "id": "u1"},
            },
        )
    ]
    # An unsubscribe sends only an id.
    unsubscribe = track("Unsubscribe", context={"traits": {"email": "nope"}})
    assert calls_of(unsubscribe) == [call("POST", "/users/unsubscribe", {"id": "u1"})]


@pytest.mark.parametrize(
    "tags, error",
    [
        ("add", "integrations.Vero.tags must be an object"),
        (["a"], "integrations.Vero.tags must be an object"),
        ({"values": ["a"]}, 'integrations.Vero.tags.action must be "add" or "remove"'),
        (
            {"action": "Add", "values": ["a"]},
            'integrations.Vero.tags.action must be "add" or "remove"',
        ),
        (
            {"action": "delete", "values": ["a"]},
            'integrations.Vero.tags.action must be "add" or "remove"',
        ),
        (
            {"action": ["add"], "values": ["a"]},
            'integrations.Vero.tags.action must be "add" or "remove"',
        ),
        ({"action": "add"}, "integrations.Vero.tags.values must be a non-empty list of strings"),
        (
            {"action": "add", "values": []},
            "integrations.Vero.tags.values must be a non-empty list of strings",
        ),
        (
            {"action": "add", "values": "a"},
            "integrations.Vero.tags.values must be a non-empty list of strings",
        ),
        (
            {"action": "add", "values": ["a", 2]},
            "integrations.Vero.tags.values must be a non-empty list of strings",
        ),
        (
            {"action": "add", "values": ["a"], "id": {"x": 1}},
            "integrations.Vero.tags.id must be a string or a number",
        ),
    ],
)
def test_malformed_tags_are_rejected_with_the_reason(tags, error):
    assert map_(track(integrations={"Vero": {"tags": tags}})) == Reject(error, "tags")


def test_tags_without_any_id_to_tag_are_rejected():
    message = {
        "type": "identify",
        "traits": {"email": "jd@example.com"},
        "integrations": {"Vero": {"tags": {"action": "add", "values": ["vip"]}}},
    }
    assert map_(message) == Reject(
        "integrations.Vero.tags.id is required when the message has no userId", "tags"
    )


def test_tags_are_checked_before_the_event():
    message = {"type": "track", "userId": "u1", "integrations": {"Vero": {"tags": {"action": "x"}}}}
    assert map_(message) == Reject(
        'integrations.Vero.tags.action must be "add" or "remove"', "tags"
    )


@pytest.mark.parametrize("extra", [{}, {"event": ""}, {"event": None}])
def test_a_track_without_an_event_is_rejected(extra):
    message = {"type": "track", "userId": "u1", "properties": {"id": "x"}, **extra}
    assert map_(message) == Reject("event is required", "event")


def test_fields_the_mapping_does_not_read_are_not_checked():
    assert calls_of(track(sentAt="soon", receivedAt=5)) == calls_of(track())


def test_a_lower_case_z_is_utc():
    assert calls_of(track(timestamp="2014-01-01T00:00:00z")) == calls_of(track())


@pytest.mark.parametrize(
    "message, error, code",
    [
        (track(5), "event must be a string", "event"),
        (track(properties=[1]), "properties must be an object", "properties"),
        ({"type": "identify", "userId": "u1", "traits": "x"}, "traits must be an object", "traits"),
        (track(context="x"), "context must be an object", "context"),
        (track(integrations=[]), "integrations must be an object", "integrations"),
        ({"type": "page", "userId": "u1", "name": 5}, "name must be a string", "name"),
        (track(timestamp="last tuesday"), "timestamp is not an ISO-8601 date", "timestamp"),
        (track(timestamp=1388534400), "timestamp is not an ISO-8601 date", "timestamp"),
        (
            track(timestamp=None, originalTimestamp="2014-02-30"),
            "originalTimestamp is not an ISO-8601 date",
            "originalTimestamp",
        ),
        (track(messageId=["m"]), "messageId must be a string or a number", "messageId"),
        ({"type": "alias", "userId": "u1"}, "previousId is required", "previousId"),
        (
            {"type": "alias", "userId": "u1", "previousId": ""},
            "previousId is required",
            "previousId",
        ),
        (
            {"type": "alias", "userId": "u1", "previousId": True},
            "previousId must be a string or a number",
            "previousId",
        ),
        (
            {"type": "group", "userId": "u1", "groupId": [1]},
            "groupId must be a string or a number",
            "groupId",
        ),
        (
            track("Unsubscribe", properties={"id": {}}),
            "properties.id must be a string or a number",
            "properties.id",
        ),
    ],
)
def test_wrongly_shaped_fields_are_rejected_naming_them(message, error, code):
    assert map_(message) == Reject(error, code)


def test_a_reject_handed_in_by_split_body_comes_back_unchanged():
    rejection = Reject("type must be 'track' on /v1/track", "type")
    assert map_(rejection) is rejection


# --------------------------------------------------------------------------
# Ids, created_at, dedup and order keys


@pytest.mark.parametrize(
    "user_id, expected", [(42, "42"), (42.0, "42"), (4.5, "4.5"), (-7, "-7"), ("007", "007")]
)
def test_ids_given_as_numbers_become_strings(user_id, expected):
    result = map_({"type": "delete", "userId": user_id})
    assert result.payload == {"calls": [call("POST", "/users/delete", {"id": expected})]}
    assert result.order_key == expected


def test_every_id_given_as_a_number_becomes_a_string():
    alias = {
        "type": "alias",
        "userId": 2,
        "previousId": 1,
        "integrations": {"Vero": {"tags": {"id": 3, "action": "add", "values": ["a"]}}},
    }
    assert calls_of(alias) == [
        call("PUT", "/users/reidentify", {"id": "1", "new_id": "2"}),
        call("PUT", "/users/tags/edit", {"id": "3", "add": ["a"]}),
    ]
    assert calls_of(track("Unsubscribe", properties={"id": 99})) == [
        call("POST", "/users/unsubscribe", {"id": "99"})
    ]
    assert calls_of({"type": "group", "userId": "u1", "groupId": 5}) == [
        call("POST", "/users/track", {"id": "u1", "data": {"group": {"id": "5"}}})
    ]


@pytest.mark.parametrize(
    "times, created_at",
    [
        ({"timestamp": "2014"}, CREATED_2014),
        ({"timestamp": "2014-01-01"}, CREATED_2014),
        ({"timestamp": "2014-01-01T00:00:00Z"}, CREATED_2014),
        ({"timestamp": "2014-01-01T00:00:00.999Z"}, CREATED_2014),
        ({"timestamp": "2014-01-01T02:00:00+02:00"}, CREATED_2014),
        ({"timestamp": "2013-12-31T19:00:00-0500"}, CREATED_2014),
        ({"timestamp": "2014-01-01T00:00:00"}, CREATED_2014),
        ({"timestamp": "2014-01-01T00:00:05Z", "originalTimestamp": "2015"}, CREATED_2014 + 5),
        ({"originalTimestamp": "2014"}, CREATED_2014),
        ({"timestamp": None, "originalTimestamp": "2014"}, CREATED_2014),
        ({"timestamp": "", "originalTimestamp": "2014"}, CREATED_2014),
        ({}, 1700000000),
        ({"timestamp": None}, 1700000000),
    ],
)
def test_created_at_is_timestamp_else_original_else_received_in_whole_seconds(times, created_at):
    message = {"type": "track", "userId": "u1", "event": "e", **times}
    assert calls_of(message) == [event("e", created_at=created_at)]


def test_the_dedup_key_is_the_message_id():
    assert map_(track(messageId="m-1")).dedup_key == "a:m-1"
    assert map_(track(messageId=12)).dedup_key == "a:12"


def test_without_a_message_id_the_dedup_key_hashes_the_canonical_message():
    message = track(properties={"b": 1, "a": [1, "é"]}, messageId="")
    canonical = json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = "a:sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert map_(message).dedup_key == expected
    reordered = dict(reversed(list(message.items())))
    assert map_(reordered).dedup_key == expected
    changed = track(properties={"b": 2, "a": [1, "é"]}, messageId="")
    assert map_(changed).dedup_key != expected


def test_the_order_key_is_the_user():
    assert map_(track()).order_key == "u1"
    anonymous = {"type": "track", "event": "e", "anonymousId": "anon-1"}
    assert map_(anonymous, allow_anonymous=True).order_key == "anon-1"
    email_only = {"type": "identify", "traits": {"email": "jd@example.com"}}
    assert map_(email_only).order_key == "jd@example.com"
    alias = {"type": "alias", "userId": "new", "previousId": "old"}
    assert map_(alias).order_key == "new"


def test_mapping_does_not_change_the_message():
    message = track(
        "Order Completed",
        properties={"products": [{"sku": "a"}]},
        context={"userAgent": "UA"},
        integrations={"Vero": {"tags": {"action": "add", "values": ["buyer"]}}},
    )
    before = copy.deepcopy(message)
    map_(message)
    assert message == before


# --------------------------------------------------------------------------
# A.2: identify


def test_identify_sends_traits_with_the_id_the_user_agent_and_push_channel():
    message = {
        "type": "identify",
        "userId": "u1",
        "traits": {"email": "jd@example.com", "plan": "pro", "id": "ignored", "nothing": None},
        "context": {
            "userAgent": "UA/1",
            "device": {"token": "tok-123"},
            "os": {"name": "iOS"},
            "traits": {"email": "other@example.com"},
        },
    }
    assert calls_of(message) == [
        call(
            "POST",
            "/users/track",
            {
                "id": "u1",
                "email": "jd@example.com",
                "data": {
                    "email": "jd@example.com",
                    "plan": "pro",
                    "id": "u1",
                    "nothing": None,
                    "userAgent": "UA/1",
                },
                "channels": [{"type": "push", "address": "tok-123", "platform": "ios"}],
            },
        )
    ]


@pytest.mark.parametrize(
    "context",
    [
        {"device": {"token": "tok"}},
        {"os": {"name": "Android"}},
        {"device": {"token": ""}, "os": {"name": "Android"}},
        {"device": {"token": "tok"}, "os": {"name": 5}},
        {"device": "tok", "os": {"name": "Android"}},
    ],
)
def test_identify_adds_a_push_channel_only_with_both_token_and_os(context):
    message = {"type": "identify", "userId": "u1", "context": context}
    assert calls_of(message) == [call("POST", "/users/track", {"id": "u1", "data": {"id": "u1"}})]


def test_identify_uses_the_user_id_as_email_when_it_looks_like_one():
    message = {
        "type": "identify",
        "userId": "jd@example.com",
        "context": {"traits": {"email": "x@example.com"}},
    }
    assert calls_of(message) == [
        call(
            "POST",
            "/users/track",
            {"id": "jd@example.com", "email": "jd@example.com", "data": {"id": "jd@example.com"}},
        )
    ]


def test_identify_falls_back_to_the_context_email():
    message = {
        "type": "identify",
        "userId": "u1",
        "traits": {"email": None},
        "context": {"traits": {"email": "c@example.com"}},
    }
    assert calls_of(message) == [
        call(
            "POST",
            "/users/track",
            {"id": "u1", "email": "c@example.com", "data": {"email": None, "id": "u1"}},
        )
    ]


def test_identify_with_only_an_email_is_keyed_on_the_email():
    message = {"type": "identify", "traits": {"email": "jd@example.com", "name": "JD"}}
    result = map_(message)
    assert result.payload == {
        "calls": [
            call(
                "POST",
                "/users/track",
                {"email": "jd@example.com", "data": {"email": "jd@example.com", "name": "JD"}},
            )
        ]
    }
    assert result.order_key == "jd@example.com"


def test_identify_with_only_a_context_email():
    message = {"type": "identify", "context": {"traits": {"email": "jd@example.com"}}}
    assert calls_of(message) == [call("POST", "/users/track", {"email": "jd@example.com"})]


def test_identify_without_user_or_email_is_rejected():
    message = {"type": "identify", "traits": {"name": "JD"}}
    assert map_(message) == Reject("userId is required", "userId")


def test_anonymous_id_stands_in_for_user_id_when_allowed():
    message = {"type": "identify", "anonymousId": "anon-1", "traits": {"email": "jd@example.com"}}
    assert calls_of(message, allow_anonymous=True) == [
        call(
            "POST",
            "/users/track",
            {
                "id": "anon-1",
                "email": "jd@example.com",
                "data": {"email": "jd@example.com", "id": "anon-1"},
            },
        )
    ]
    # Not allowed: the email alone keys the user.
    assert calls_of(message) == [
        call(
            "POST", "/users/track", {"email": "jd@example.com", "data": {"email": "jd@example.com"}}
        )
    ]


def test_user_id_wins_over_the_anonymous_id():
    message = {"type": "delete", "userId": "u1", "anonymousId": "anon-1"}
    assert calls_of(message, allow_anonymous=True) == [call("POST", "/users/delete", {"id": "u1"})]


# --------------------------------------------------------------------------
# A.2: track


def test_track_sends_properties_with_the_user_agent_and_identity_email():
    message = track(
        properties={"plan": "pro", "nested": {"a": None}, "userAgent": "theirs"},
        context={"userAgent": "UA/1", "traits": {"email": "jd@example.com"}},
    )
    assert calls_of(message) == [
        event(
            "Signed Up",
            {"plan": "pro", "nested": {"a": None}, "userAgent": "UA/1"},
            identity={"id": "u1", "email": "jd@example.com"},
        )
    ]


def test_track_identity_uses_the_user_id_as_email_when_it_looks_like_one():
    message = track(userId="jd@example.com")
    assert calls_of(message) == [
        event("Signed Up", identity={"id": "jd@example.com", "email": "jd@example.com"})
    ]


def test_context_email_wins_over_an_email_shaped_user_id_in_track():
    message = track(userId="jd@example.com", context={"traits": {"email": "work@example.com"}})
    assert calls_of(message) == [
        event("Signed Up", identity={"id": "jd@example.com", "email": "work@example.com"})
    ]


def test_track_without_properties_sends_no_data_and_empty_properties_as_given():
    assert calls_of(track()) == [event("Signed Up")]
    assert calls_of(track(properties=None)) == [event("Signed Up")]
    # Segment's libraries send `"properties": {}` by default: that is the data given.
    assert calls_of(track(properties={})) == [event("Signed Up", {})]


def test_track_leaves_out_null_top_level_keys():
    message = track(
        anonymousId=None, context=None, integrations=None, properties=None, messageId=None
    )
    assert calls_of(message) == [event("Signed Up")]


@pytest.mark.parametrize(
    "name",
    [
        "Unsubscribe",
        "unsubscribed",
        "UNSUBSCRIBED",
        "Un Subscribe",
        "un_subscribed",
        " Unsubscribe ",
    ],
)
def test_unsubscribe_names_unsubscribe_the_user(name):
    assert calls_of(track(name, properties={"reason": "x"})) == [
        call("POST", "/users/unsubscribe", {"id": "u1"})
    ]


@pytest.mark.parametrize("name", ["Resubscribe", "resubscribed", "RE_SUBSCRIBED", "re subscribe"])
def test_resubscribe_names_resubscribe_the_user(name):
    assert calls_of(track(name)) == [call("POST", "/users/resubscribe", {"id": "u1"})]


@pytest.mark.parametrize(
    "name",
    [
        "Newsletter Unsubscribed",
        "Unsubscribe Clicked",
        "un-subscribe",
        "Unsubscriber",
        "Resubscribe Later",
    ],
)
def test_names_that_only_contain_unsubscribe_are_ordinary_events(name):
    assert calls_of(track(name)) == [event(name)]


def test_unsubscribe_prefers_the_id_in_properties():
    assert calls_of(track("Unsubscribed", properties={"id": "other"})) == [
        call("POST", "/users/unsubscribe", {"id": "other"})
    ]
    assert calls_of(track("Resubscribed", properties={"id": ""})) == [
        call("POST", "/users/resubscribe", {"id": "u1"})
    ]


def test_order_completed_fans_out_one_event_per_product_then_the_order():
    products = [{"sku": "a-1", "price": 5, "note": None}, {"sku": "b-2", "quantity": 2}]
    message = track(
        "Order Completed",
        properties={"order_id": "o-9", "total": 9, "products": products},
        context={"userAgent": "UA/1", "traits": {"email": "jd@example.com"}},
    )
    identity = {"id": "u1", "email": "jd@example.com"}
    assert calls_of(message) == [
        event("Ordered Product", {"sku": "a-1", "price": 5, "note": None}, identity=identity),
        event("Ordered Product", {"sku": "b-2", "quantity": 2}, identity=identity),
        event(
            "Order Completed",
            {"order_id": "o-9", "total": 9, "products": products, "userAgent": "UA/1"},
            identity=identity,
        ),
    ]


def test_order_completed_is_matched_like_unsubscribe():
    message = track("order_completed", properties={"products": [{"sku": "a"}]})
    assert calls_of(message) == [
        event("Ordered Product", {"sku": "a"}),
        event("order_completed", {"products": [{"sku": "a"}]}),
    ]


def test_order_completed_without_a_products_array_is_an_ordinary_event():
    assert calls_of(track("Order Completed", properties={"total": 3})) == [
        event("Order Completed", {"total": 3})
    ]
    assert calls_of(track("Order Completed", properties={"products": {"sku": "a"}})) == [
        event("Order Completed", {"products": {"sku": "a"}})
    ]
    assert calls_of(track("Order Completed", properties={"products": []})) == [
        event("Order Completed", {"products": []})
    ]
    assert calls_of(track("Order Completed Twice", properties={"products": [{"sku": "a"}]})) == [
        event("Order Completed Twice", {"products": [{"sku": "a"}]})
    ]


def test_an_empty_product_is_sent_as_given():
    assert calls_of(track("Order Completed", properties={"products": [{}]})) == [
        event("Ordered Product", {}),
        event("Order Completed", {"products": [{}]}),
    ]


def test_a_product_that_is_not_an_object_is_rejected():
    message = track("Order Completed", properties={"products": [{"sku": "a"}, "b"]})
    assert map_(message) == Reject("properties.products[1] must be an object", "products")


# --------------------------------------------------------------------------
# A.2: page and screen


def test_page_sends_properties_with_name_category_and_context_url():
    message = {
        "type": "page",
        "userId": "u1",
        "timestamp": "2014",
        "name": "Pricing",
        "category": "Docs",
        "properties": {"name": "overridden", "title": "Pricing | Example", "path": "/pricing"},
        "context": {"page": {"url": "https://example.org/pricing"}, "userAgent": "UA/1"},
    }
    assert calls_of(message) == [
        event(
            "viewed_page",
            {
                "name": "Pricing",
                "title": "Pricing | Example",
                "path": "/pricing",
                "url": "https://example.org/pricing",
                "category": "Docs",
            },
        )
    ]


def test_page_properties_url_wins_over_the_context_url():
    message = {
        "type": "page",
        "userId": "u1",
        "timestamp": "2014",
        "properties": {"url": "https://example.org/a"},
        "context": {"page": {"url": "https://example.org/b"}},
    }
    assert calls_of(message) == [event("viewed_page", {"url": "https://example.org/a"})]


def test_page_without_anything_sends_no_data_and_leaves_out_empty_names():
    message = {"type": "page", "userId": "u1", "timestamp": "2014", "name": None, "category": ""}
    assert calls_of(message) == [event("viewed_page")]


def test_page_identity_is_as_for_track():
    message = {"type": "page", "userId": "jd@example.com", "timestamp": "2014"}
    assert calls_of(message) == [
        event("viewed_page", identity={"id": "jd@example.com", "email": "jd@example.com"})
    ]


def test_screen_is_sent_as_viewed_screen():
    message = {
        "type": "screen",
        "userId": "u1",
        "timestamp": "2014",
        "name": "Home",
        "properties": {"variant": "b"},
        "context": {"traits": {"email": "jd@example.com"}},
    }
    assert calls_of(message) == [
        event(
            "viewed_screen",
            {"variant": "b", "name": "Home"},
            identity={"id": "u1", "email": "jd@example.com"},
        )
    ]


# --------------------------------------------------------------------------
# A.2: group, alias, delete


def test_group_sends_traits_without_email_under_data_group_with_the_group_id():
    message = {
        "type": "group",
        "userId": "u1",
        "groupId": "g-7",
        "traits": {"name": "Acme", "email": "billing@acme.example", "id": "old", "plan": None},
    }
    assert calls_of(message) == [
        call(
            "POST",
            "/users/track",
            {"id": "u1", "data": {"group": {"name": "Acme", "id": "g-7", "plan": None}}},
        )
    ]


def test_group_without_traits_or_group_id_still_records_the_group():
    assert calls_of({"type": "group", "userId": "u1"}) == [
        call("POST", "/users/track", {"id": "u1", "data": {"group": {}}})
    ]


def test_group_with_an_anonymous_stand_in():
    message = {"type": "group", "anonymousId": "anon-1", "groupId": "g"}
    assert calls_of(message, allow_anonymous=True) == [
        call("POST", "/users/track", {"id": "anon-1", "data": {"group": {"id": "g"}}})
    ]


def test_alias_reidentifies_the_previous_id_as_the_user_id():
    message = {"type": "alias", "userId": "new", "previousId": "old"}
    assert calls_of(message) == [call("PUT", "/users/reidentify", {"id": "old", "new_id": "new"})]


def test_alias_without_a_user_id_is_rejected():
    assert map_({"type": "alias", "previousId": "old"}) == Reject("userId is required", "userId")


def test_delete_deletes_the_user():
    message = {
        "type": "delete",
        "userId": "u1",
        "messageId": "d-1",
        "context": {"library": {"name": "x"}},
    }
    result = map_(message)
    assert result == Accept(
        dedup_key="a:d-1",
        order_key="u1",
        payload={"calls": [call("POST", "/users/delete", {"id": "u1"})]},
    )


# --------------------------------------------------------------------------
# Tags


def test_tags_follow_the_main_call():
    message = track(integrations={"Vero": {"tags": {"action": "add", "values": ["vip", "beta"]}}})
    assert calls_of(message) == [
        event("Signed Up"),
        call("PUT", "/users/tags/edit", {"id": "u1", "add": ["vip", "beta"]}),
    ]


def test_tags_can_remove_for_another_id():
    message = {
        "type": "identify",
        "userId": "u1",
        "integrations": {"vero": {"tags": {"id": "u2", "action": "remove", "values": ["trial"]}}},
    }
    assert calls_of(message) == [
        call("POST", "/users/track", {"id": "u1", "data": {"id": "u1"}}),
        call("PUT", "/users/tags/edit", {"id": "u2", "remove": ["trial"]}),
    ]


def test_tags_with_an_id_on_an_email_only_identify():
    message = {
        "type": "identify",
        "traits": {"email": "jd@example.com"},
        "integrations": {"Vero": {"tags": {"id": "jd-1", "action": "add", "values": ["lead"]}}},
    }
    assert calls_of(message) == [
        call(
            "POST", "/users/track", {"email": "jd@example.com", "data": {"email": "jd@example.com"}}
        ),
        call("PUT", "/users/tags/edit", {"id": "jd-1", "add": ["lead"]}),
    ]


def test_tags_on_an_alias_go_to_the_new_id():
    message = {
        "type": "alias",
        "userId": "new",
        "previousId": "old",
        "integrations": {"Vero": {"tags": {"action": "add", "values": ["merged"]}}},
    }
    assert calls_of(message) == [
        call("PUT", "/users/reidentify", {"id": "old", "new_id": "new"}),
        call("PUT", "/users/tags/edit", {"id": "new", "add": ["merged"]}),
    ]


def test_tags_follow_every_call_of_an_order():
    message = track(
        "Order Completed",
        properties={"products": [{"sku": "a"}]},
        integrations={"Vero": {"tags": {"action": "add", "values": ["buyer"]}}},
    )
    assert calls_of(message) == [
        event("Ordered Product", {"sku": "a"}),
        event("Order Completed", {"products": [{"sku": "a"}]}),
        call("PUT", "/users/tags/edit", {"id": "u1", "add": ["buyer"]}),
    ]


def test_tags_on_unsubscribe_use_the_user_id_when_tags_have_no_id():
    message = track(
        "Unsubscribe",
        properties={"id": "p"},
        integrations={"Vero": {"tags": {"action": "add", "values": ["gone"]}}},
    )
    assert calls_of(message) == [
        call("POST", "/users/unsubscribe", {"id": "p"}),
        call("PUT", "/users/tags/edit", {"id": "u1", "add": ["gone"]}),
    ]


def test_a_delete_with_tags_is_followed_by_its_tags_call():
    message = {
        "type": "delete",
        "userId": "u1",
        "integrations": {"Vero": {"tags": {"action": "add", "values": ["x"]}}},
    }
    assert calls_of(message) == [
        call("POST", "/users/delete", {"id": "u1"}),
        call("PUT", "/users/tags/edit", {"id": "u1", "add": ["x"]}),
    ]


def test_tags_are_read_only_from_an_options_object():
    message = track(integrations={"Vero": True, "tags": {"action": "add", "values": ["x"]}})
    assert calls_of(message) == [event("Signed Up")]


# --------------------------------------------------------------------------
# split_body


def test_split_body_takes_one_message():
    message = {"type": "track", "userId": "u1"}
    assert split_body(message, None) == Messages([message], single=True)


def test_split_body_takes_an_array_as_given():
    items = [{"type": "track"}, "junk", {"type": "page"}]
    assert split_body(items, None) == Messages(items, single=False)


def test_split_body_merges_batch_context_and_integrations_one_level_deep():
    body = {
        "batch": [
            {"type": "track", "context": {"ip": "own"}, "integrations": {"Vero": True}},
            {"type": "page", "context": None},
            {"type": "identify", "context": "odd"},
            7,
        ],
        "context": {"ip": "shared", "library": {"name": "analytics-python"}},
        "integrations": {"All": False},
        "sentAt": "2014",
    }
    before = copy.deepcopy(body)
    assert split_body(body, None).items == [
        {
            "type": "track",
            "context": {"ip": "own", "library": {"name": "analytics-python"}},
            "integrations": {"All": False, "Vero": True},
        },
        {
            "type": "page",
            "context": {"ip": "shared", "library": {"name": "analytics-python"}},
            "integrations": {"All": False},
        },
        {"type": "identify", "context": "odd", "integrations": {"All": False}},
        7,
    ]
    assert body == before


def test_split_body_merges_nothing_deeper_than_one_level():
    body = {
        "batch": [{"type": "track", "context": {"traits": {"a": 1}}}],
        "context": {"traits": {"b": 2}},
    }
    assert split_body(body, None) == Messages(
        [{"type": "track", "context": {"traits": {"a": 1}}}], single=False
    )


@pytest.mark.parametrize(
    "body, error",
    [
        ([], "the array of messages is empty"),
        ({"batch": []}, "batch must be a non-empty array"),
        ({"batch": None}, "batch must be a non-empty array"),
        ({"batch": {"type": "track"}}, "batch must be a non-empty array"),
    ],
)
def test_split_body_rejects_an_empty_batch(body, error):
    assert split_body(body, None) == Reject(error, "batch")


@pytest.mark.parametrize("body", [None, "track", 3, True])
def test_split_body_rejects_a_body_of_another_shape(body):
    assert split_body(body, "track") == Reject("body must be a JSON object or array", "body")


def test_split_body_fills_in_the_route_type_and_rejects_a_contradiction_per_item():
    body = {
        "batch": [
            {"userId": "u1"},
            {"type": "page"},
            {"type": "track", "event": "e"},
            {"type": None},
            [],
        ]
    }
    assert split_body(body, "track").items == [
        {"userId": "u1", "type": "track"},
        Reject("type must be 'track' on /v1/track", "type"),
        {"type": "track", "event": "e"},
        {"type": "track"},
        [],
    ]


def test_split_body_then_map_message_gives_per_item_outcomes():
    body = [{"userId": "u1", "event": "e", "timestamp": "2014"}, {"type": "page", "userId": "u1"}]
    results = [map_(item) for item in split_body(body, "track").items]
    assert results[0].payload == {"calls": [event("e")]}
    assert results[1] == Reject("type must be 'track' on /v1/track", "type")


# --------------------------------------------------------------------------
# signature_ok and basic_auth_ok

SECRET = "s3cret"


def test_a_single_message_body_is_signed_whole():
    body = b'{"type": "track", "userId": "u1", "event": "e"}'
    assert signature_ok(body, sign(body, SECRET), [SECRET]) is True
    assert signature_ok(body, sign(body, SECRET).upper(), [SECRET]) is True
    assert signature_ok(body, sign(body, "other"), [SECRET]) is False
    assert signature_ok(body + b" ", sign(body, SECRET), [SECRET]) is False


def test_an_array_body_is_signed_by_its_first_element_as_written():
    first = '{"type": "track", "userId": "u1", "properties": {"list": [1, 2], "s": "caf\\u00e9 ]"}, "n": "é"}'
    body = ("\n [ \t" + first + " ,\n" + '{"type": "page"}]').encode("utf-8")
    assert signature_ok(body, sign(first.encode("utf-8"), SECRET), [SECRET]) is True
    reserialised = json.dumps(json.loads(first)).encode()
    assert signature_ok(body, sign(reserialised, SECRET), [SECRET]) is False
    assert signature_ok(body, sign(b'{"type": "page"}', SECRET), [SECRET]) is False


def test_an_array_body_signed_whole_is_accepted_too():
    body = b'[{"type": "track"}]'
    assert signature_ok(body, sign(body, SECRET), [SECRET]) is True


@pytest.mark.parametrize(
    "body, header, secret",
    [
        (b"{}", None, SECRET),
        (b"{}", "", SECRET),
        (b"{}", sign(b"{}", ""), ""),
        (b"{}", sign(b"{}", SECRET), None),
        (b"{}", "zz\u00e9", SECRET),
        (b"[", sign(b"[", SECRET), "other"),
        (b"\xff[{}]", sign(b"{}", SECRET), SECRET),
    ],
)
def test_a_missing_or_wrong_signature_fails(body, header, secret):
    assert signature_ok(body, header, [secret] if secret else []) is False


def test_a_malformed_array_body_can_still_be_checked_whole():
    body = b'[{"type": '
    assert signature_ok(body, sign(body, SECRET), [SECRET]) is True


def test_a_credential_must_be_one_of_the_secrets_exactly():
    secrets = [SECRET, "previous-secret"]
    assert matching_secret(SECRET, secrets) == SECRET
    assert matching_secret("previous-secret", secrets) == "previous-secret"
    assert matching_secret(SECRET.encode(), secrets) == SECRET
    assert matching_secret("S3CRET", secrets) is None
    assert matching_secret(SECRET + "x", secrets) is None
    assert matching_secret(None, secrets) is None
    assert matching_secret("", []) is None
    assert matching_secret("x", []) is None
    assert matching_secret("clé", ["clé"]) == "clé"


def test_a_signature_with_the_previous_secret_is_accepted_while_it_is_set():
    body = b'{"type": "track"}'
    assert signature_ok(body, sign(body, "old"), [SECRET, "old"]) is True
    assert signature_ok(body, sign(body, "old"), [SECRET]) is False


# --------------------------------------------------------------------------
# Whatever arrives, the mapping answers with one of the three outcomes

_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
_field_values = {
    "type": st.sampled_from(
        ["identify", "track", "page", "screen", "group", "alias", "delete", "x"]
    ),
    "userId": st.none() | st.text(max_size=4) | st.integers(),
    "anonymousId": _scalars,
    "event": st.sampled_from(["Order Completed", "Unsubscribe", "Signed Up", ""]) | _scalars,
    "timestamp": st.sampled_from(["2014", "2014-01-01T00:00:00Z", "bad"]) | _scalars,
    "traits": _json,
    "properties": st.fixed_dictionaries(
        {}, optional={"products": _json, "id": _scalars, "url": _scalars}
    )
    | _json,
    "context": _json,
    "integrations": st.fixed_dictionaries(
        {},
        optional={
            "All": _scalars,
            "Vero": st.fixed_dictionaries({}, optional={"tags": _json}) | _scalars,
        },
    ),
    "previousId": _scalars,
    "groupId": _scalars,
    "messageId": _scalars,
}
_messages = st.fixed_dictionaries({}, optional=_field_values) | _json


@settings(max_examples=400, deadline=None)
@given(message=_messages, allow_anonymous=st.booleans())
def test_any_json_maps_to_an_outcome_without_raising(message, allow_anonymous):
    result = map_message(message, allow_anonymous=allow_anonymous, received_at=RECEIVED_AT)
    assert isinstance(result, (Accept, Skip, Reject))
    if isinstance(result, Accept):
        json.dumps(result.payload)
        for item in result.payload["calls"]:
            assert item["path"].startswith("/")
            assert None not in item["body"].values()


@settings(max_examples=200, deadline=None)
@given(
    body=_json
    | st.fixed_dictionaries({"batch": _json}, optional={"context": _json, "integrations": _json})
)
def test_any_body_splits_without_raising(body):
    for route_type in (None, "track"):
        assert isinstance(split_body(body, route_type), (Messages, Reject))
