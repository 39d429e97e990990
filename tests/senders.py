"""What the delivery loop's tests plug in: a sender scripted per key, a clock
that moves only when told, and a gate for driving a real sender by hand."""

from __future__ import annotations

import threading

from service.outbox.delivery import (
    RELEASE,
    SUCCEEDED,
    Deliverer,
    Limits,
    Outcome,
    Unit,
)

A = "segment_to_vero"
T0 = 1_700_000_000.0


class FakeClock:
    """Time stands still until advanced; a wait advances it by the time waited
    (in a test driven from one thread nobody else could have woken it)."""

    def __init__(self, now: float = T0):
        self.now = now
        self.waits: list[float] = []

    def time(self) -> float:
        return self.now

    def wait(self, waitable, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += max(seconds, 0.0)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def answer_status(outcome: Outcome) -> int | None:
    """The HTTP status a scripted outcome stands for, as the window sees it."""
    if outcome.status == "network":
        return None
    if outcome.status == "4xx":
        return 429 if outcome.retry_after is not None else 400
    if outcome.status == "5xx":
        return 503
    return 200


class ScriptedSender:
    """A sender whose upstream answers are scripted per key: the plug-in point
    the outbox offers, used to test the loop itself. Each item is one call;
    an Exception in the script is raised instead of answering. The last entry
    of a key's script answers every later attempt."""

    upstream = "vero"
    whole_runs = False
    items_per_call = 1
    call_seconds = 1.0
    calls_per_second: float | None = None

    def __init__(self, script=None, direction: str = A, max_in_flight: int = 4, hold=None):
        self.script = script or {}
        self.direction = direction
        self.max_in_flight = max_in_flight
        # An Event: every call waits for it, so that a test can see calls in flight.
        self.hold = hold
        self.sent: list[str] = []
        self.lock = threading.Lock()

    def units(self, items):
        return [[item] for item in items]

    def send(self, items, gate):
        outcomes = []
        for item in items:
            key = item.payload["key"]
            answer = self.script.get(key, [Outcome(SUCCEEDED)])
            entry = answer.pop(0) if len(answer) > 1 else answer[0]
            if isinstance(entry, Exception):
                raise entry
            # An entry is an Outcome, or (HTTP status, Outcome) to choose the status.
            status, outcome = entry if isinstance(entry, tuple) else (answer_status(entry), entry)
            ticket = gate.begin()
            if ticket is None:
                outcomes.append(RELEASE)
                continue
            with self.lock:
                self.sent.append(key)
            if self.hold is not None:
                self.hold.wait(10)
            gate.end(ticket, status, outcome.retry_after)
            outcomes.append(outcome)
        return outcomes


def gate(sender, stopping=None, lease_seconds: float = 30.0, clock=None, items=()):
    """The gate a claim's unit would get, for calling `sender.send` by hand:
    a real lane of a deliverer that has no store (it is never asked)."""
    deliverer = Deliverer(None, [sender], Limits(lease_seconds=lease_seconds), clock=clock)  # type: ignore[arg-type]
    if stopping is not None:
        deliverer.stopping = stopping
    now = deliverer.clock.time()
    lane = deliverer.lanes[sender.direction]
    return lane.gate(Unit(list(items), now, now + lease_seconds))
