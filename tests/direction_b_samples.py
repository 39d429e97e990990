"""The example webhook of API-FACTS.md, the Segment message MAPPING.md part B
says it becomes, and B.1's table of event names, for every test of direction B."""

from __future__ import annotations

# This service's package name and version, as Segment's `context.library` reports them.
LIBRARY = {"name": "vero-bridge", "version": "0.1.0"}

EXAMPLE = {
    "type": "opened",
    "opened_at": 1700000000,
    "user_agent": "Mozilla/5.0",
    "user": {"id": "u_42", "email": "someone@example.org"},
    "campaign": {
        "id": 101,
        "type": "behavioural",
        "name": "Welcome",
        "subject": "Hi",
        "trigger-event": "signed up",
        "permalink": "https://example.org/view/1",
        "variation": "A",
        "channel": "email",
    },
    "message_id": "abc123@mail.example",
}

# Pinned: the outbox and Segment de-duplicate on this id, so a change to the
# identity recipe would let a webhook retried across an upgrade through twice.
EXAMPLE_MESSAGE_ID = "vero-56a7fc0d28b634493790662f32401ed7578c16c7703b8edda8e0288aac70531f"

EXAMPLE_TRACK = {
    "type": "track",
    "event": "Email Opened",
    "userId": "u_42",
    "timestamp": "2023-11-14T22:13:20.000Z",
    "messageId": EXAMPLE_MESSAGE_ID,
    "properties": {
        "email_id": "abc123@mail.example",
        "email_subject": "Hi",
        "campaign_id": 101,
        "campaign_name": "Welcome",
        "campaign_type": "behavioural",
        "campaign_variation": "A",
        "campaign_permalink": "https://example.org/view/1",
        "campaign_trigger_event": "signed up",
        "channel": "email",
    },
    "context": {
        "traits": {"email": "someone@example.org"},
        "userAgent": "Mozilla/5.0",
        "integration": {"name": "vero", "version": LIBRARY["version"]},
        "library": LIBRARY,
    },
}

EVENT_NAMES = {
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
