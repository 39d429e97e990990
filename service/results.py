"""What a mapping decides about one inbound message.

Both directions' mapping functions return exactly one of these, and the intake
(`service.intake`) turns them into outbox work and the answer's counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Accept:
    """Forward this: `payload` becomes one outbox item.

    `dedup_key` recognises the same input arriving again; `order_key` is the
    user, so that one user's work is delivered in the order it was accepted.
    """

    dedup_key: str
    order_key: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Skip:
    """Acknowledge without forwarding (integration turned off, a loop, an
    event type we do not forward). `reason` is a short code used as a metric label."""

    reason: str


@dataclass(frozen=True)
class Reject:
    """Invalid input that a retry could not fix. `error` names the field and is
    shown to the caller; `code` is a short, bounded label for metrics."""

    error: str
    code: str


Result = Accept | Skip | Reject
