"""The retry policy both directions share (SERVICE.md, "Delivery"): which
answers are worth retrying, reading `Retry-After`, which answers mean the
upstream is overloaded (the adaptive window shrinks and may pause), and how
long an item waits before its next attempt."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from datetime import UTC
from email.utils import parsedate_to_datetime

# Not Implemented and HTTP Version Not Supported will not change by retrying.
PERMANENT_5XX = frozenset({501, 505})
# Answers whose Retry-After speaks for the whole account, not for one call:
# every call to that upstream from the process waits (SERVICE.md).
PAUSING = frozenset({429, 503})

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 3600.0
# While the upstream answers other calls well, an item failing on its own is
# retried at least this often, so that it holds its user's later work back
# for seconds, not hours (docs/service-decisions.md, "Delivery").
HEALTHY_BACKOFF_CAP_SECONDS = 30.0
RETRY_AFTER_CAP_SECONDS = 3600.0


def retryable(status: int) -> bool:
    return status in (408, 429) or (500 <= status < 600 and status not in PERMANENT_5XX)


def congested(status: int | None) -> bool:
    """True when an answer says the upstream is struggling, whoever's call it
    was: no answer (network error, timeout), 408, 429 or any 5xx. The window
    shrinks on these and grows on the rest."""
    return status is None or status in (408, 429) or status >= 500


def pause_seconds(status: int | None, retry_after: float | None) -> float:
    """How long every call to the upstream waits after this answer: a 429 or
    503 with Retry-After (capped); otherwise not at all."""
    if status not in PAUSING or retry_after is None:
        return 0.0
    return min(max(retry_after, 0.0), RETRY_AFTER_CAP_SECONDS)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def backoff(
    attempt: int,
    rand: Callable[[], float] = random.random,
    cap: float = BACKOFF_CAP_SECONDS,
) -> float:
    """Seconds to wait after the `attempt`-th failure: doubling from one second up
    to `cap`, with jitter so that items failing together do not retry together."""
    ceiling = min(cap, BACKOFF_BASE_SECONDS * 2 ** min(attempt - 1, 32))
    return ceiling * (0.5 + rand() / 2)


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
