"""What the Vero and Segment clients share: SERVICE.md's rule for which
answers are worth retrying, and reading `Retry-After`."""

from __future__ import annotations

import math
import time
from datetime import UTC
from email.utils import parsedate_to_datetime

# Not Implemented and HTTP Version Not Supported will not change by retrying.
PERMANENT_5XX = frozenset({501, 505})


def retryable(status: int) -> bool:
    return status in (408, 429) or (500 <= status < 600 and status not in PERMANENT_5XX)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def retry_after_seconds(header: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now: a number of seconds or an HTTP date
    (a date in the past, or a negative number, means now). None when absent or
    unreadable, and the outbox's own backoff applies."""
    if header is None or not header.strip():
        return None
    value = header.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:  # HTTP dates are GMT
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)
