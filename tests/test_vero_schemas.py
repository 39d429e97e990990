"""The Vero webhook schemas: tolerant of known variants, strict where the
mapping depends on a value."""

import pytest
from marshmallow import ValidationError

from service.messages import instance_of
from service.vero_to_segment.webhooks import (
    MAX_UNIX_SECONDS,
    SCHEMAS,
    describe_errors,
    load_event_type,
    time_field,
)
from tests.direction_b_samples import EVENT_NAMES, EXAMPLE


def load_webhook(payload):
    """Load a webhook with its type's schema, as map_webhook does."""
    return instance_of(SCHEMAS[load_event_type(payload)]).load(payload)


# MAPPING.md B.1: the email events forwarded, and the user events acknowledged.
DOCUMENTED_TYPES = [*EVENT_NAMES, "user_created", "user_updated"]
SAMPLE_USER = EXAMPLE["user"]
SAMPLE_CAMPAIGN = EXAMPLE["campaign"]


def webhook(event_type, **extra):
    body = {
        "type": event_type,
        time_field(event_type): 1700000000,
        "user": dict(SAMPLE_USER),
        "campaign": dict(SAMPLE_CAMPAIGN),
        "message_id": "abc123@mail.example",
    }
    body.update(extra)
    return body


def errors_of(payload):
    with pytest.raises(ValidationError) as caught:
        load_webhook(payload)
    return describe_errors(caught.value.messages)


@pytest.mark.parametrize("event_type", DOCUMENTED_TYPES)
def test_each_type_loads_its_sample_with_its_own_time_field(event_type):
    loaded = load_webhook(webhook(event_type))
    assert loaded["type"] == event_type
    assert loaded[f"{event_type}_at"] == 1700000000
    assert loaded["user"] == {"id": "u_42", "email": "someone@example.org"}
    assert loaded["message_id"] == "abc123@mail.example"
    # The data key "trigger-event" is loaded under a Python name.
    assert loaded["campaign"]["trigger_event"] == "signed up"
    assert loaded["campaign"]["id"] == 101  # copied into properties as given


@pytest.mark.parametrize("event_type", DOCUMENTED_TYPES)
def test_each_type_rejects_a_time_that_is_not_unix_seconds(event_type):
    payload = webhook(event_type, **{f"{event_type}_at": "2023-11-14"})
    assert errors_of(payload) == f"{event_type}_at: must be a Unix time in seconds"


def test_the_documented_example_loads_unchanged_apart_from_normalised_ids():
    loaded = load_webhook(EXAMPLE)
    expected_campaign = {k: v for k, v in SAMPLE_CAMPAIGN.items() if k != "trigger-event"}
    expected_campaign.update({"trigger_event": "signed up"})
    assert loaded == {**EXAMPLE, "campaign": expected_campaign}


@pytest.mark.parametrize(
    ("given", "loaded"),
    [("u_42", "u_42"), (42, "42"), (42.0, "42"), (0, "0"), (None, None)],
)
def test_user_id_may_be_a_number_or_a_string(given, loaded):
    assert load_webhook(webhook("sent", user={"id": given}))["user"]["id"] == loaded


@pytest.mark.parametrize("given", [True, 1.5, [1], {"id": 1}])
def test_user_id_that_is_no_id_is_rejected(given):
    assert (
        errors_of(webhook("sent", user={"id": given})) == "user.id: must be a string or an integer"
    )


@pytest.mark.parametrize(("given", "loaded"), [(101, 101), ("cmp-101", "cmp-101"), (None, None)])
def test_campaign_id_may_be_a_number_or_a_string(given, loaded):
    payload = webhook("sent", campaign={"id": given})
    assert load_webhook(payload)["campaign"]["id"] == loaded


def test_message_id_as_a_number_is_kept_as_given():
    assert load_webhook(webhook("sent", message_id=77))["message_id"] == 77


@pytest.mark.parametrize("user", ["u_42", 42, ["u_42"], True])
def test_user_that_is_not_an_object_is_rejected(user):
    assert errors_of(webhook("opened", user=user)) == "user: must be an object"


def test_campaign_that_is_not_an_object_is_rejected():
    assert errors_of(webhook("opened", campaign="Welcome")) == "campaign: must be an object"


def test_user_and_campaign_may_be_absent_or_null():
    payload = webhook("sent", user=None, campaign=None)
    loaded = load_webhook(payload)
    assert loaded["user"] is None and loaded["campaign"] is None
    del payload["user"], payload["campaign"]
    assert "user" not in load_webhook(payload)


def test_user_email_must_be_text():
    assert errors_of(webhook("sent", user={"email": 5})) == "user.email: Not a valid string."


@pytest.mark.parametrize("when", ["1700000000", True, -1, MAX_UNIX_SECONDS + 1, 1700000000000, [1]])
def test_event_time_must_be_plausible_unix_seconds(when):
    assert (
        errors_of(webhook("opened", opened_at=when)) == "opened_at: must be a Unix time in seconds"
    )


@pytest.mark.parametrize(
    ("when", "loaded"), [(1700000000.0, 1700000000), (1700000000.25, 1700000000.25), (0, 0)]
)
def test_event_time_whole_numbers_are_loaded_as_int(when, loaded):
    result = load_webhook(webhook("opened", opened_at=when))["opened_at"]
    assert result == loaded and type(result) is type(loaded)


def test_event_time_may_be_absent_or_null():
    payload = webhook("opened", opened_at=None)
    assert load_webhook(payload)["opened_at"] is None
    del payload["opened_at"]
    assert "opened_at" not in load_webhook(payload)


def test_action_stands_in_for_type():
    payload = {"action": "user_updated", "user": {"id": 7}, "user_updated_at": 1700000000}
    loaded = load_webhook(payload)
    assert loaded["type"] == "user_updated"
    assert loaded["action"] == "user_updated"
    assert loaded["user"] == {"id": "7"}


def test_type_wins_over_action():
    assert load_event_type({"type": "opened", "action": "user_updated"}) == "opened"


def test_type_is_normalised_to_lower_case():
    assert load_event_type({"type": " Opened "}) == "opened"


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({}, "type: is required"),
        ({"type": None}, "type: is required"),
        ({"type": 3}, "type: must be a string"),
        ({"type": ["opened"]}, "type: must be a string"),
        ({"action": 3}, "action: must be a string"),
        ("opened", "webhook must be a JSON object"),
        ([{"type": "opened"}], "webhook must be a JSON object"),
    ],
)
def test_type_errors_name_the_field(payload, error):
    assert errors_of(payload) == error


def test_alternative_campaign_keys_of_unsubscribe_payloads_are_kept():
    payload = webhook(
        "unsubscribed",
        campaign={
            "id": "9",
            "campaign_title": "Digest",
            "email_subject": "News",
            "variation_name": "B",
        },
    )
    assert load_webhook(payload)["campaign"] == {
        "id": "9",
        "campaign_title": "Digest",
        "email_subject": "News",
        "variation_name": "B",
    }


def test_unknown_fields_are_kept_at_every_level():
    payload = webhook("sent", extra={"a": 1})
    payload["user"]["plan"] = "pro"
    payload["campaign"]["group"] = "Order confirmation - Email 6"
    loaded = load_webhook(payload)
    assert loaded["extra"] == {"a": 1}
    assert loaded["user"]["plan"] == "pro"
    assert loaded["campaign"]["group"] == "Order confirmation - Email 6"


def test_campaign_values_that_are_only_copied_are_accepted_as_given():
    campaign = {"id": 1, "name": 12345, "variation": 2, "tags": ["a", "b"], "channel": None}
    loaded = load_webhook(webhook("sent", campaign=campaign))["campaign"]
    assert loaded == campaign


def test_bounce_fields_are_accepted_as_numbers_or_text():
    payload = webhook("bounced", bounce_type="hard", bounce_code=550, bounce_message="No such user")
    loaded = load_webhook(payload)
    assert (loaded["bounce_type"], loaded["bounce_code"], loaded["bounce_message"]) == (
        "hard",
        550,
        "No such user",
    )


def test_clicked_link_fields_must_be_text():
    assert (
        load_webhook(webhook("clicked", link_url="https://example.org/a"))["link_url"]
        == "https://example.org/a"
    )
    assert errors_of(webhook("clicked", url=5)) == "url: Not a valid string."


def test_user_agent_must_be_text():
    assert errors_of(webhook("opened", user_agent={"ua": 1})) == "user_agent: Not a valid string."


def test_several_errors_are_reported_together():
    payload = webhook("opened", user=[], opened_at="soon", campaign={"id": True})
    assert errors_of(payload) == (
        "user: must be an object; campaign.id: must be a string or an integer; "
        "opened_at: must be a Unix time in seconds"
    )


def test_describe_errors_flattens_nested_messages():
    assert describe_errors({"a": {"b": ["x", "y"]}, "_schema": ["z"]}) == "a.b: x; a.b: y; z"
