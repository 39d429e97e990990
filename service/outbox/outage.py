"""What a delivery lane says while its store fails: the first failure at
once, then one line a minute at most, and one when the store answers again.

The lane polls the store every second or so while it fails; a line each time
would bury everything else in the log for the length of an outage, and say
nothing the first line did not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

# While the store keeps failing, at most one line this often.
REPEAT_SECONDS = 60.0


@dataclass(frozen=True)
class Line:
    level: int
    message: str
    fields: dict[str, float]


class Outage:
    """One lane's view of its store: answering, or failing since when."""

    def __init__(self, repeat_seconds: float = REPEAT_SECONDS):
        self.repeat_seconds = repeat_seconds
        self.since: float | None = None  # None: the store answers
        self.total = 0  # failures in this outage
        self.unreported = 0  # failures since the last line
        self.last_line = 0.0

    def failed(self, now: float, detail: str) -> Line | None:
        """The store failed at `now`; the line to log, if one is due. `detail`
        is the store's message, logged as it is (the log formatter redacts)."""
        self.total += 1
        if self.since is None:
            self.since = self.last_line = now
            return Line(logging.WARNING, f"outbox unavailable: {detail}", {})
        self.unreported += 1
        if now - self.last_line < self.repeat_seconds:
            return None
        fields = {"failures": self.unreported, "failing_seconds": round(now - self.since, 1)}
        self.last_line, self.unreported = now, 0
        return Line(logging.WARNING, f"outbox still unavailable: {detail}", fields)

    def answered(self, now: float) -> Line | None:
        """The store answered at `now`; a line if that ends an outage."""
        if self.since is None:
            return None
        fields = {"failures": self.total, "failing_seconds": round(now - self.since, 1)}
        self.since, self.total, self.unreported = None, 0, 0
        return Line(logging.INFO, "outbox available again", fields)
