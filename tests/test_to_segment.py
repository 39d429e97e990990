"""Direction B mapping: Vero webhook bodies to Segment track messages
(MAPPING.md part B), checked on whole messages."""

import hashlib
import json
from urllib.parse import quote, quote_plus, urlencode

import pytest

from blueprints.vero import parse_body
from service.jsonbody import Messages
from service.results import Accept, Reject, Skip
from service.vero_to_segment.mapping import (
    DEFAULT_EVENT_NAMES,
    MAX_MESSAGE_BYTES,
    encode_message,
    event_names_with,
    ignored_overrides,
    map_webhook,
)
from tests.direction_b_samples import (
    EVENT_NAMES,
    EXAMPLE,
    EXAMPLE_MESSAGE_ID,
    EXAMPLE_TRACK,
    LIBRARY,
)

RECEIVED_AT = 1700000500.0  # 2023-11-14T22:21:40Z
OPENED_AT = 1700000000  # 2023-11-14T22:13:20Z

CONTEXT = {
    "integration": {"name": "vero", "version": "0.1.0"},
    "library": {"name": "vero-bridge", "version": "0.1.0"},
}


def run(payload, names=None):
    return map_webhook(
        payload,
        event_names=DEFAULT_EVENT_NAMES if names is None else names,
        library=LIBRARY,
        received_at=RECEIVED_AT,
    )


def accepted(payload, names=None):
    result = run(payload, names)
    assert isinstance(result, Accept), result
    assert set(result.payload) == {"message"}
    return result.payload["message"]


def minimal(event_type, **extra):
    """A webhook with only what the mapping needs."""
    return {"type": event_type, "user": {"id": "u_1"}, **extra}


def id_of(payload):
    return accepted(payload)["messageId"]


def message_id_of(*identity):
    """The messageId docs/mapping-decisions.md gives for an identity
    [type, message_id, ["id", user.id] or ["email", user.email], <type>_at,
    campaign.id]: "vero-" and the hex SHA-256 of its compact JSON."""
    canonical = json.dumps(list(identity), separators=(",", ":"), ensure_ascii=False)
    return "vero-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# Whole messages


def test_the_documented_example_becomes_this_exact_message():
    assert run(EXAMPLE) == Accept(
        dedup_key="b:" + EXAMPLE_MESSAGE_ID, order_key="u_42", payload={"message": EXAMPLE_TRACK}
    )


def test_a_minimal_webhook_becomes_a_minimal_message():
    assert accepted(minimal("delivered")) == {
        "type": "track",
        "event": "Email Delivered",
        "userId": "u_1",
        "timestamp": "2023-11-14T22:21:40.000Z",
        "messageId": message_id_of("delivered", None, ["id", "u_1"], None, None),
        "properties": {},
        "context": CONTEXT,
    }


def test_an_unsubscribe_with_the_alternative_campaign_keys():
    payload = {
        "type": "unsubscribed",
        "unsubscribed_at": OPENED_AT,
        "user": {"id": 7, "email": "p@example.org"},
        "campaign": {
            "id": "c9",
            "campaign_title": "Digest",
            "email_subject": "News",
            "variation_name": "B",
        },
    }
    assert accepted(payload) == {
        "type": "track",
        "event": "Email Unsubscribed",
        "userId": "7",
        "timestamp": "2023-11-14T22:13:20.000Z",
        "messageId": message_id_of("unsubscribed", None, ["id", "7"], OPENED_AT, "c9"),
        "properties": {
            "campaign_id": "c9",
            "campaign_name": "Digest",
            "email_subject": "News",
            "campaign_variation": "B",
        },
        "context": {"traits": {"email": "p@example.org"}, **CONTEXT},
    }


def test_a_bounce_with_its_bounce_fields():
    payload = minimal(
        "bounced",
        bounced_at=OPENED_AT,
        message_id="m1",
        bounce_type="hard",
        bounce_code=550,
        bounce_message="5.1.1 No such user",
    )
    message = accepted(payload)
    assert message["event"] == "Email Bounced"
    assert message["properties"] == {
        "email_id": "m1",
        "bounce_type": "hard",
        "bounce_code": 550,
        "bounce_message": "5.1.1 No such user",
    }


def test_a_click_with_its_link():
    payload = minimal(
        "clicked", clicked_at=OPENED_AT, user_agent="UA/1", link_url="https://example.org/a"
    )
    message = accepted(payload)
    assert message["event"] == "Email Link Clicked"
    assert message["properties"] == {"link_url": "https://example.org/a"}
    assert message["context"] == {"userAgent": "UA/1", **CONTEXT}


# ---------------------------------------------------------------------------
# B.1 event names


@pytest.mark.parametrize(("event_type", "event"), EVENT_NAMES.items())
def test_each_forwarded_type_has_its_default_name_and_time(event_type, event):
    message = accepted(minimal(event_type, **{f"{event_type}_at": OPENED_AT + 1}))
    assert message["event"] == event
    assert message["timestamp"] == "2023-11-14T22:13:21.000Z"


def test_the_default_table_is_exactly_mapping_b1():
    assert event_names_with({}) == DEFAULT_EVENT_NAMES == EVENT_NAMES


def test_type_is_matched_regardless_of_case():
    assert accepted(minimal("Opened"))["event"] == "Email Opened"


def test_an_override_renames_and_leaves_the_others():
    names = event_names_with({"unsubscribed": "Unsubscribed"})
    assert accepted(minimal("unsubscribed"), names)["event"] == "Unsubscribed"
    assert accepted(minimal("opened"), names)["event"] == "Email Opened"
    assert DEFAULT_EVENT_NAMES["unsubscribed"] == "Email Unsubscribed"  # not mutated


def test_override_keys_are_matched_regardless_of_case():
    assert event_names_with({"Opened": "Opened It"})["opened"] == "Opened It"


def test_a_type_overridden_to_null_is_acknowledged_not_forwarded():
    names = event_names_with({"delivered": None})
    assert run(minimal("delivered"), names) == Skip("not_forwarded")
    assert accepted(minimal("sent"), names)["event"] == "Email Sent"


def test_a_type_missing_from_a_partial_table_is_not_forwarded():
    assert run(minimal("opened"), {"sent": "Email Sent"}) == Skip("not_forwarded")


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"opened": ""}, "the name for 'opened' must be a non-empty string or null"),
        ({"opened": 5}, "the name for 'opened' must be a non-empty string or null"),
        (["opened"], "expected a JSON object"),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(overrides, error):
    with pytest.raises(ValueError, match=r"^VERO_EVENT_NAMES: ") as caught:
        event_names_with(overrides)
    assert error in str(caught.value)


def test_overrides_of_types_that_are_never_forwarded_are_ignored_and_reported():
    overrides = {"opend": "X", "user_created": "User Created", "Opened": "Opened It"}
    assert event_names_with(overrides) == {**DEFAULT_EVENT_NAMES, "opened": "Opened It"}
    assert ignored_overrides(overrides) == ["opend", "user_created"]


@pytest.mark.parametrize("event_type", ["user_created", "user_updated"])
def test_user_events_are_skipped(event_type):
    assert run(minimal(event_type)) == Skip("user_event")


def test_user_updated_named_by_action_is_skipped():
    assert run({"action": "user_updated", "user": {"id": 1}}) == Skip("user_event")


def test_user_events_are_skipped_without_checking_the_rest():
    assert run({"type": "user_updated", "user": "not an object"}) == Skip("user_event")


def test_unknown_types_are_skipped():
    assert run(minimal("teleported")) == Skip("unknown_type")


# ---------------------------------------------------------------------------
# B.2 identity: userId / anonymousId


@pytest.mark.parametrize(("given", "user_id"), [(42, "42"), ("42", "42"), (42.0, "42")])
def test_user_id_is_sent_as_a_string(given, user_id):
    result = run({"type": "sent", "user": {"id": given}})
    assert result.payload["message"]["userId"] == user_id
    assert result.order_key == user_id


def test_without_a_user_id_the_email_is_the_anonymous_id():
    payload = {"type": "opened", "user": {"email": "someone@example.org"}}
    result = run(payload)
    message = result.payload["message"]
    assert "userId" not in message
    assert message["anonymousId"] == "someone@example.org"
    assert message["context"]["traits"] == {"email": "someone@example.org"}
    assert result.order_key == "someone@example.org"


@pytest.mark.parametrize("blank", [None, "", "  "])
def test_a_blank_user_id_counts_as_none(blank):
    message = accepted({"type": "opened", "user": {"id": blank, "email": "a@example.org"}})
    assert message["anonymousId"] == "a@example.org" and "userId" not in message


def test_with_both_the_id_is_the_user_and_the_email_a_trait():
    message = accepted({"type": "sent", "user": {"id": "u", "email": "e@example.org"}})
    assert message["userId"] == "u" and "anonymousId" not in message
    assert message["context"]["traits"] == {"email": "e@example.org"}


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "opened"},
        {"type": "opened", "user": None},
        {"type": "opened", "user": {}},
        {"type": "opened", "user": {"id": "", "email": ""}},
        {"type": "opened", "user": {"name": "no id"}},
    ],
)
def test_a_webhook_without_a_user_is_rejected(payload):
    assert run(payload) == Reject("user.id or user.email is required", "missing_user")


# ---------------------------------------------------------------------------
# B.2 timestamp


@pytest.mark.parametrize(
    ("when", "timestamp"),
    [
        (OPENED_AT, "2023-11-14T22:13:20.000Z"),
        (OPENED_AT + 0.25, "2023-11-14T22:13:20.250Z"),
        (0, "1970-01-01T00:00:00.000Z"),
        (None, "2023-11-14T22:21:40.000Z"),
    ],
)
def test_timestamp_is_the_event_time_in_iso_utc_else_the_time_received(when, timestamp):
    assert accepted(minimal("opened", opened_at=when))["timestamp"] == timestamp


def test_another_types_time_field_is_not_used():
    assert accepted(minimal("opened", sent_at=OPENED_AT))["timestamp"] == "2023-11-14T22:21:40.000Z"


def test_the_time_received_keeps_milliseconds():
    result = map_webhook(
        minimal("sent"),
        event_names=DEFAULT_EVENT_NAMES,
        library=LIBRARY,
        received_at=1700000000.123,
    )
    assert result.payload["message"]["timestamp"] == "2023-11-14T22:13:20.123Z"


# ---------------------------------------------------------------------------
# B.2 messageId and de-duplication


def test_message_id_is_pinned_for_the_example():
    assert id_of(EXAMPLE) == EXAMPLE_MESSAGE_ID
    identity = ("opened", "abc123@mail.example", ["id", "u_42"], 1700000000, "101")
    assert message_id_of(*identity) == EXAMPLE_MESSAGE_ID  # the recipe, as documented


def test_the_same_webhook_twice_gives_the_same_id_and_keys():
    assert run(EXAMPLE) == run(json.loads(json.dumps(EXAMPLE)))


def test_message_id_does_not_depend_on_the_time_received_or_key_order():
    other = map_webhook(
        dict(reversed(list(EXAMPLE.items()))),
        event_names=DEFAULT_EVENT_NAMES,
        library=LIBRARY,
        received_at=1,
    )
    assert other.payload["message"]["messageId"] == EXAMPLE_MESSAGE_ID


def test_message_id_does_not_depend_on_the_event_name():
    assert id_of(EXAMPLE) == accepted(EXAMPLE, event_names_with({"opened": "Opened"}))["messageId"]


@pytest.mark.parametrize(
    "variant",
    [
        {"user": {"id": "u_42"}},  # email is not part of the identity when there is an id
        {"user_agent": "Other/1.0"},
        {"campaign": {"id": 101, "name": "Renamed"}},
        {"opened_at": float(OPENED_AT)},
        {"campaign": {**EXAMPLE["campaign"], "id": "101"}},
        {"extra": "ignored"},
    ],
)
def test_message_id_is_the_same_for_the_same_identity(variant):
    assert id_of({**EXAMPLE, **variant}) == EXAMPLE_MESSAGE_ID


def test_numeric_and_string_user_ids_are_the_same_identity():
    assert id_of({**EXAMPLE, "user": {"id": 42}}) == id_of({**EXAMPLE, "user": {"id": "42"}})


@pytest.mark.parametrize(
    "variant",
    [
        {"type": "clicked", "clicked_at": OPENED_AT},
        {"message_id": "other@mail.example"},
        {"user": {"id": "u_43", "email": "someone@example.org"}},
        {"opened_at": OPENED_AT + 1},
        {"opened_at": None},
        {"campaign": {**EXAMPLE["campaign"], "id": 102}},
        {"campaign": None},
        {"message_id": None},
    ],
)
def test_a_different_identity_gives_a_different_id(variant):
    assert id_of({**EXAMPLE, **variant}) != EXAMPLE_MESSAGE_ID


def test_without_a_user_id_the_email_is_part_of_the_identity():
    first = id_of({"type": "sent", "user": {"email": "a@example.org"}})
    second = id_of({"type": "sent", "user": {"email": "b@example.org"}})
    assert first != second


def test_an_id_and_an_email_with_the_same_text_are_different_identities():
    as_id = id_of({"type": "sent", "user": {"id": "a@example.org"}})
    as_email = id_of({"type": "sent", "user": {"email": "a@example.org"}})
    assert as_id != as_email


def test_message_id_fits_segments_limit_and_is_the_dedup_key():
    result = run(EXAMPLE)
    assert len(result.payload["message"]["messageId"]) <= 100
    assert result.dedup_key == "b:" + result.payload["message"]["messageId"]


# ---------------------------------------------------------------------------
# B.2 properties


def test_properties_are_left_out_when_not_present():
    payload = {**EXAMPLE, "campaign": {"id": None, "name": "", "subject": None}, "message_id": None}
    assert accepted(payload)["properties"] == {}


def test_subject_name_and_variation_prefer_the_documented_keys():
    campaign = {
        "subject": "S",
        "email_subject": "ES",
        "name": "N",
        "campaign_title": "CT",
        "variation": "V",
        "variation_name": "VN",
    }
    properties = accepted(minimal("sent", campaign=campaign))["properties"]
    assert properties == {"email_subject": "S", "campaign_name": "N", "campaign_variation": "V"}


def test_a_blank_documented_key_falls_back_to_the_alternative():
    campaign = {"subject": "", "email_subject": "ES", "name": None, "campaign_title": "CT"}
    properties = accepted(minimal("sent", campaign=campaign))["properties"]
    assert properties == {"email_subject": "ES", "campaign_name": "CT"}


def test_campaign_tags_and_channel_are_passed_as_given():
    campaign = {"tags": ["welcome", "onboarding"], "channel": "email"}
    properties = accepted(minimal("sent", campaign=campaign))["properties"]
    assert properties == {"campaign_tags": ["welcome", "onboarding"], "channel": "email"}


@pytest.mark.parametrize(
    ("links", "link_url"),
    [
        ({"link_url": "https://a", "url": "https://b", "link": "https://c"}, "https://a"),
        ({"url": "https://b", "link": "https://c"}, "https://b"),
        ({"link": "https://c"}, "https://c"),
        ({"link_url": "", "link": "https://c"}, "https://c"),
    ],
)
def test_link_url_takes_the_first_link_key_present(links, link_url):
    assert accepted(minimal("clicked", **links))["properties"] == {"link_url": link_url}


def test_clicked_without_a_link_has_no_link_url():
    assert accepted(minimal("clicked"))["properties"] == {}


def test_a_url_on_an_event_that_is_not_a_click_is_not_a_link():
    assert accepted(minimal("opened", url="https://example.org"))["properties"] == {}


def test_bounce_fields_are_read_on_bounced_events_only():
    # MAPPING.md B.2 lists them for bounced.
    properties = accepted(minimal("failed", bounce_message="mailbox full"))["properties"]
    assert properties == {}


def test_a_numeric_message_id_is_copied_as_given_and_is_the_same_identity_as_its_text():
    as_number = accepted(minimal("sent", message_id=77))
    assert as_number["properties"]["email_id"] == 77
    assert as_number["messageId"] == accepted(minimal("sent", message_id="77"))["messageId"]


# ---------------------------------------------------------------------------
# B.2 context


def test_user_agent_becomes_context_user_agent():
    assert accepted(minimal("opened", user_agent="UA/2"))["context"] == {
        "userAgent": "UA/2",
        **CONTEXT,
    }


def test_integration_and_library_carry_the_given_version():
    result = map_webhook(
        minimal("sent"),
        event_names=DEFAULT_EVENT_NAMES,
        library={"name": "vero-bridge", "version": "9.9.9"},
        received_at=RECEIVED_AT,
    )
    assert result.payload["message"]["context"] == {
        "integration": {"name": "vero", "version": "9.9.9"},
        "library": {"name": "vero-bridge", "version": "9.9.9"},
    }


# ---------------------------------------------------------------------------
# Invalid webhooks


@pytest.mark.parametrize(
    ("payload", "rejection"),
    [
        ("opened", Reject("webhook must be a JSON object", "not_object")),
        ([EXAMPLE], Reject("webhook must be a JSON object", "not_object")),
        ({"user": {"id": 1}}, Reject("type: is required", "invalid_type")),
        ({"type": 1, "user": {"id": 1}}, Reject("type: must be a string", "invalid_type")),
        ({**EXAMPLE, "user": "u_42"}, Reject("user: must be an object", "invalid_field")),
        ({**EXAMPLE, "campaign": [1]}, Reject("campaign: must be an object", "invalid_field")),
        (
            {**EXAMPLE, "opened_at": "1700000000"},
            Reject("opened_at: must be a Unix time in seconds", "invalid_field"),
        ),
        (
            {**EXAMPLE, "opened_at": OPENED_AT * 1000},
            Reject("opened_at: must be a Unix time in seconds", "invalid_field"),
        ),
        (
            {**EXAMPLE, "user": {"id": True}},
            Reject("user.id: must be a string or an integer", "invalid_field"),
        ),
    ],
)
def test_invalid_webhooks_are_rejected_naming_the_field(payload, rejection):
    assert run(payload) == rejection


def test_an_unpaired_surrogate_in_a_forwarded_value_is_rejected():
    payload = json.loads('{"type": "opened", "user": {"id": "u"}, "user_agent": "bad \\ud800"}')
    assert run(payload) == Reject(
        "a text value is not valid Unicode (unpaired surrogate)", "bad_encoding"
    )


# ---------------------------------------------------------------------------
# Segment's 32 KB per-message limit


def bounce_with(text):
    return minimal("bounced", bounce_message=text)


def text_for(total_bytes, char="x"):
    """A bounce message, mostly `char`, that makes the built message exactly
    total_bytes long (ASCII fills a remainder of odd bytes)."""
    base = len(encode_message(accepted(bounce_with(char))))
    count, rest = divmod(total_bytes - base, len(char.encode("utf-8")))
    return char * (count + 1) + "x" * rest


def test_a_message_of_exactly_32_kib_is_accepted():
    message = accepted(bounce_with(text_for(MAX_MESSAGE_BYTES)))
    assert len(encode_message(message)) == MAX_MESSAGE_BYTES == 32768


def test_a_message_one_byte_over_32_kib_is_rejected():
    payload = bounce_with(text_for(MAX_MESSAGE_BYTES) + "x")
    assert run(payload) == Reject(
        "the Segment message would be 32769 bytes, over Segment's limit of 32768", "too_large"
    )


def test_the_limit_counts_utf8_bytes_not_characters():
    at_limit = text_for(MAX_MESSAGE_BYTES, "é")
    assert len(at_limit) < len(at_limit.encode("utf-8"))  # fewer characters than bytes
    assert len(encode_message(accepted(bounce_with(at_limit)))) == MAX_MESSAGE_BYTES
    assert run(bounce_with(at_limit + "é")).code == "too_large"


def test_encode_message_is_compact_utf8_json():
    assert encode_message({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()


# ---------------------------------------------------------------------------
# The request body


def one(webhook):
    return Messages([webhook], single=True)


def several(*webhooks):
    return Messages(list(webhooks), single=False)


def test_a_json_object_is_one_webhook():
    assert parse_body(json.dumps(EXAMPLE).encode(), "application/json") == one(EXAMPLE)


def test_a_json_array_is_several_webhooks_kept_in_order():
    body = json.dumps([EXAMPLE, minimal("sent")]).encode()
    assert parse_body(body, "application/json") == several(EXAMPLE, minimal("sent"))


def test_array_elements_that_are_not_objects_are_left_for_map_webhook():
    items = parse_body(b'[{"type": "sent", "user": {"id": 1}}, 5]', "application/json").items
    assert items == [{"type": "sent", "user": {"id": 1}}, 5]
    assert run(items[1]) == Reject("webhook must be a JSON object", "not_object")


def test_surrounding_whitespace_and_a_byte_order_mark_are_ignored():
    body = b"\xef\xbb\xbf \n" + json.dumps(EXAMPLE).encode() + b"\n"
    assert parse_body(body, "application/json") == one(EXAMPLE)


def test_the_content_type_does_not_decide():
    assert parse_body(json.dumps(EXAMPLE).encode(), "text/plain") == one(EXAMPLE)
    assert parse_body(json.dumps(EXAMPLE).encode(), None) == one(EXAMPLE)


def test_non_ascii_text_is_read_as_utf8():
    body = json.dumps({"type": "sent", "user": {"id": "Zoë"}}, ensure_ascii=False).encode("utf-8")
    assert parse_body(body, "application/json") == one({"type": "sent", "user": {"id": "Zoë"}})


@pytest.mark.parametrize("encode", [quote, quote_plus], ids=["percent", "form-plus"])
def test_a_wholly_url_encoded_body_is_decoded(encode):
    body = encode(json.dumps(EXAMPLE, ensure_ascii=False)).encode("ascii")
    assert parse_body(body, "application/x-www-form-urlencoded") == one(EXAMPLE)


def test_a_wholly_url_encoded_array_is_decoded():
    body = quote(json.dumps([EXAMPLE, EXAMPLE])).encode("ascii")
    assert parse_body(body, "application/json") == several(EXAMPLE, EXAMPLE)


@pytest.mark.parametrize("field", ["payload", "data", "anything"])
def test_a_form_field_holding_the_json_is_used(field):
    body = urlencode({field: json.dumps(EXAMPLE)}).encode("ascii")
    assert parse_body(body, "application/x-www-form-urlencoded") == one(EXAMPLE)


def test_other_form_fields_beside_the_json_are_ignored():
    body = urlencode({"source": "vero", "payload": json.dumps(EXAMPLE), "n": "1"}).encode("ascii")
    assert parse_body(body, "application/x-www-form-urlencoded") == one(EXAMPLE)


def test_a_form_with_two_json_fields_is_ambiguous():
    body = urlencode({"a": json.dumps(EXAMPLE), "b": json.dumps(EXAMPLE)}).encode("ascii")
    assert parse_body(body, "application/x-www-form-urlencoded") == Reject(
        "form body has several fields holding JSON; expected one", "bad_json"
    )


def test_a_url_encoded_body_with_bad_json_inside_names_the_json_problem():
    result = parse_body(quote('{"type": "sent",}').encode("ascii"), None)
    assert result.code == "bad_json"
    assert result.error.startswith("body is not valid JSON: ")


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe{}", b'{"type": "opened", "user": {"id": "\xc3"}}', b"\x80"],
)
def test_invalid_utf8_is_rejected_not_raised(body):
    result = parse_body(body, "application/json")
    assert isinstance(result, Reject) and result.code == "bad_encoding"
    assert result.error.startswith("body is not valid UTF-8 (byte ")


def test_percent_encoded_invalid_utf8_is_rejected_not_raised():
    assert parse_body(b"%7B%22a%22%3A%22%FF%22%7D", None) == Reject(
        "URL-encoded body is not valid UTF-8", "bad_encoding"
    )
    assert parse_body(b"payload=%7B%22a%22%3A%22%FF%22%7D", None) == Reject(
        "URL-encoded body is not valid UTF-8", "bad_encoding"
    )


def json_error(body: bytes) -> str:
    try:
        json.loads(body)
    except json.JSONDecodeError as exc:
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    raise AssertionError("valid JSON")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        # CPython words this one differently from release to release (3.13:
        # "Illegal trailing comma"): the parser's own words, with the position.
        (b'{"type": "sent",}', "body is not valid JSON: " + json_error(b'{"type": "sent",}')),
        (b'{"type": "sent"', "body is not valid JSON: Expecting ',' delimiter at line 1 column 16"),
        (b'{"a": NaN}', "body is not valid JSON: NaN is not a JSON value"),
        (b'[{"a": Infinity}]', "body is not valid JSON: Infinity is not a JSON value"),
        (b"[" * 100000 + b"]" * 100000, "body is not valid JSON: nested too deeply"),
    ],
)
def test_bad_json_is_rejected_naming_the_problem(body, error):
    assert parse_body(body, "application/json") == Reject(error, "bad_json")


@pytest.mark.parametrize(
    ("body", "rejection"),
    [
        (b"", Reject("body is empty", "empty_body")),
        (b"  \n", Reject("body is empty", "empty_body")),
        (b"[]", Reject("body is an empty array", "empty_body")),
        (b'"opened"', Reject("body must be a JSON object or an array of objects", "not_object")),
        (b"42", Reject("body must be a JSON object or an array of objects", "not_object")),
        (b"null", Reject("body must be a JSON object or an array of objects", "not_object")),
        (
            b"hello",
            Reject(
                "body is not JSON: expected a JSON object or array (plain or URL-encoded)",
                "bad_json",
            ),
        ),
    ],
)
def test_bodies_that_are_not_webhooks_are_rejected(body, rejection):
    assert parse_body(body, "application/json") == rejection


def test_nesting_is_capped_well_above_what_vero_sends():
    def body(levels):
        # The webhook object itself is level 1, `campaign` level 2, `tags` level 3.
        tags = "[" * (levels - 2) + "]" * (levels - 2)
        return ('{"type": "sent", "user": {"id": 1}, "campaign": {"tags": %s}}' % tags).encode()

    assert isinstance(parse_body(body(32), None), Messages)
    assert parse_body(body(33), None) == Reject(
        "body is not valid JSON: nested more than 32 levels deep", "bad_json"
    )
    assert parse_body(b"[" + body(32) + b"]", None) == Reject(
        "body is not valid JSON: nested more than 32 levels deep", "bad_json"
    )


def test_multipart_bodies_are_refused_with_a_hint():
    body = b'--xyz\r\nContent-Disposition: form-data; name="payload"\r\n\r\n{}\r\n--xyz--'
    assert parse_body(body, "multipart/form-data; boundary=xyz") == Reject(
        "multipart bodies are not supported; send the webhook as JSON", "bad_json"
    )


# Every way a body can be written: plain, after a byte-order mark and
# whitespace, wholly percent-encoded (both flavours), and inside a form field.
BODY_ENCODINGS = {
    "plain": lambda text: text.encode(),
    "bom-and-whitespace": lambda text: b"\xef\xbb\xbf \r\n" + text.encode() + b"\n",
    "percent": lambda text: quote(text).encode(),
    "form-plus": lambda text: quote_plus(text).encode(),
    "form-field": lambda text: urlencode({"payload": text}).encode(),
    "bom-form-field": lambda text: b"\xef\xbb\xbf" + urlencode({"data": text}).encode(),
}


@pytest.mark.parametrize("encode", BODY_ENCODINGS.values(), ids=BODY_ENCODINGS.keys())
def test_the_shape_is_the_jsons_whatever_the_encoding(encode):
    """A one-element array is an array (its elements judged one by one), and an
    object a single webhook, however the body was written (issue 9's defect:
    a BOM or a form field made a one-element array count as single)."""
    assert parse_body(encode(json.dumps([EXAMPLE])), None) == several(EXAMPLE)
    assert parse_body(encode(json.dumps(EXAMPLE)), None) == one(EXAMPLE)
    assert parse_body(encode(json.dumps([EXAMPLE, 5])), None) == several(EXAMPLE, 5)


@pytest.mark.parametrize(
    "number", ["1e400", "-1e400", "1" * 400, "-" + "9" * 309, "1.8e308"], ids=str.__len__
)
def test_a_number_too_large_for_a_float_refuses_only_its_webhook(number):
    bad = '{"type": "sent", "sent_at": %s, "user": {"id": "u1"}}' % number
    good = json.dumps(minimal("sent"))
    body = parse_body(f"[{good}, {bad}]".encode(), None)
    assert body.items[0] == minimal("sent")
    shown = number if len(number) <= 24 else number[:20] + "..."
    assert body.items[1] == Reject(f"sent_at is a number too large for a float ({shown})", "number")
    assert run(body.items[1]) == body.items[1]  # the mapping passes the verdict on
    single = parse_body(bad.encode(), None)
    assert single.single and isinstance(single.items[0], Reject)


def test_numbers_a_float_can_hold_are_kept():
    body = parse_body(b'{"type": "sent", "n": 1.7e308, "big": ' + b"9" * 300 + b"}", None)
    assert body.items[0]["n"] == 1.7e308 and body.items[0]["big"] == int("9" * 300)
