"""Valid, distinct request bodies for both directions.

Every message carries a token `bk_<phase>_<sender>_<n>` where the stand-ins
can find it after mapping (Vero event data, Segment properties.email_id), so
arrivals can be matched to acknowledgements. Users are spread over USERS ids:
the outbox delivers one user's work in order, so a benchmark with a handful of
users would measure that ordering rather than throughput.
"""

from __future__ import annotations

import json

USERS = 1000
TIMESTAMP = "2024-05-01T12:00:00.000Z"
WEBHOOK_TIME = 1714564800


def token(phase: str, sender: int, n: int) -> str:
    return f"bk_{phase}_{sender}_{n}"


def track(tok: str, n: int) -> dict:
    user = n % USERS
    return {
        "type": "track",
        "event": "Bench Event",
        "userId": f"user-{user}",
        "messageId": tok,
        "timestamp": TIMESTAMP,
        "properties": {"bench": tok, "plan": "pro", "amount": 12.5, "items": 3},
        "context": {"ip": "127.0.0.1", "library": {"name": "bench", "version": "1"}},
    }


def batch(tokens: list[tuple[str, int]]) -> dict:
    return {
        "batch": [track(tok, n) for tok, n in tokens],
        "context": {"library": {"name": "bench", "version": "1"}},
    }


def webhook(tok: str, n: int) -> dict:
    user = n % USERS
    return {
        "type": "delivered",
        "delivered_at": WEBHOOK_TIME + n,
        "message_id": tok,
        "user": {"id": f"user-{user}", "email": f"user-{user}@example.com"},
        "campaign": {
            "id": "c-1",
            "name": "Bench campaign",
            "subject": "Hello",
            "type": "newsletter",
        },
    }


def encode(body) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
