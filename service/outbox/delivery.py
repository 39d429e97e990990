"""Delivery: claim due work, hand it to its upstream's sender, settle it.

Each process runs one `Lane` per direction:
- one claimer thread claims in bulk as much work as the upstream's window
  has room for (and half as much again, ready for the next free slot), and
  writes the settlements of finished work in bulk, at most every
  CYCLE_SECONDS: two store transactions a round, however many calls;
- sender threads, up to the window's ceiling, each take one unit of work
  (a Vero item; a Segment batch of several users' items) and make its calls
  one after another. Before each call the sender asks its `Gate`, which
  waits for the window (a free slot, no pause, the rate cap) and refuses a
  call that could outlive the unit's lease or starts while stopping. Idle
  senders wait on the lane, never on the store.

Per-user order is the store's: a claim hands out a user's next work only
once the earlier is settled, and a unit holds one user's work whole.

What an outcome turns into is the plain function `settle`. `run_once` runs
one claim through the same senders and gates on the calling thread, for tests
and `outbox deliver --once`; time comes from an injected `Clock`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from service.outbox import DEAD, DELIVERED, PENDING, Item, Settlement, Store, StoreError
from service.outbox.outage import Line, Outage
from service.retry import (
    BACKOFF_CAP_SECONDS,
    HEALTHY_BACKOFF_CAP_SECONDS,
    RETRY_AFTER_CAP_SECONDS,
    backoff,
)
from service.upstream import Window

log = logging.getLogger(__name__)


class Kind(StrEnum):
    """What a sender reports for one item."""

    SUCCEEDED = "succeeded"
    RETRY = "retry"
    # Gave up: retrying cannot help, the item is dead-lettered with the reason.
    PERMANENT = "permanent"
    # Not attempted (stopping, or the lease could not cover the call).
    RELEASED = "released"


SUCCEEDED, RETRY, PERMANENT, RELEASED = Kind.SUCCEEDED, Kind.RETRY, Kind.PERMANENT, Kind.RELEASED

# How soon a stop asked for by a signal is noticed.
STOP_POLL_SECONDS = 0.1
# The claimer's shortest round: settlements and claims reach the store in bulk
# at most this often, which keeps SQLite's one writer free for ingest.
CYCLE_SECONDS = 0.05
# Work claimed beyond the window, ready for the next slot that frees, so a slot
# does not idle until the claimer's next round.
PREFETCH = 0.5


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt at one item.

    `progress` is how many of the item's calls are now delivered (None: as
    before); `status` is the status class for metrics ("2xx", "4xx", "5xx",
    "network"); `retry_after` is the upstream's own wish, in seconds.
    """

    kind: Kind
    error: str | None = None
    status: str = "2xx"
    progress: int | None = None
    retry_after: float | None = None


RELEASE = Outcome(RELEASED, status="none")


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch, as the store's times are."""

    def wait(self, waitable: threading.Condition | threading.Event, seconds: float) -> None:
        """Wait on a held condition or an event until notified or `seconds` pass."""


class SystemClock:
    def time(self) -> float:
        return time.time()

    def wait(self, waitable: threading.Condition | threading.Event, seconds: float) -> None:
        waitable.wait(max(seconds, 0.0))


class Gate(Protocol):
    """A sender's permission to make one call, from the delivery loop."""

    def begin(self) -> int | None:
        """Wait until the window lets a call start; its ticket, or None when the
        call must not start (stopping, or it could outlive the lease): the
        sender then hands the rest of its work back unsent."""

    def end(self, ticket: int, status: int | None, retry_after: float | None = None) -> None:
        """The call's answer (`status` None: no answer), for the window."""


class Sender(Protocol):
    direction: str
    upstream: str
    # True: claim each user's run of due items (see Store.claim); the sender
    # must then never deliver an item after one of the same user it retries.
    whole_runs: bool
    max_in_flight: int  # the window's ceiling
    items_per_call: int  # how many items one call can carry, to size claims
    calls_per_second: float | None  # a cap on call starts, if any

    @property
    def call_seconds(self) -> float:
        """The longest one call can take (its timeouts)."""

    def units(self, items: Sequence[Item]) -> list[list[Item]]:
        """Claimed items grouped into units sent side by side; one user's
        items are never split between two units."""

    def send(self, items: Sequence[Item], gate: Gate) -> list[Outcome]:
        """One outcome per item, in order; each call only after `gate.begin()`."""


@dataclass(frozen=True)
class Limits:
    lease_seconds: float = 30.0
    max_attempts: int = 25
    max_age_seconds: float = 72 * 3600.0


def settle(
    item: Item,
    outcome: Outcome,
    now: float,
    limits: Limits,
    rand: Callable[[], float] = random.random,
    backoff_cap: float = BACKOFF_CAP_SECONDS,
) -> Settlement:
    progress = item.progress if outcome.progress is None else outcome.progress

    def to(state: str, available_at: float, error: str | None, attempts: int = item.attempts):
        return Settlement(item, state, available_at, error, progress, attempts)

    if outcome.kind == SUCCEEDED:
        return to(DELIVERED, now, None)
    if outcome.kind == RELEASED:
        # Never attempted: give the attempt back.
        return to(PENDING, now, None, max(item.attempts - 1, 0))
    if outcome.kind == PERMANENT:
        return to(DEAD, now, outcome.error)
    if item.attempts >= limits.max_attempts:
        return to(DEAD, now, f"{outcome.error} (gave up after {item.attempts} attempts)")
    if now - item.created_at >= limits.max_age_seconds:
        hours = limits.max_age_seconds / 3600
        return to(DEAD, now, f"{outcome.error} (gave up after {hours:g} hours)")
    if outcome.retry_after is not None:
        delay = min(max(outcome.retry_after, 0.0), RETRY_AFTER_CAP_SECONDS)
    else:
        delay = backoff(item.attempts, rand, backoff_cap)
    return to(PENDING, now + delay, outcome.error)


@dataclass(frozen=True)
class Unit:
    """Claimed items that one sender thread delivers, under one lease."""

    items: list[Item]
    claimed_at: float
    lease_until: float

    def latest_start(self, first: bool, call_seconds: float) -> float:
        """The last moment a call may start and still end inside the lease.
        When the lease is shorter than a call can take, the unit's first call
        may still start in the first half of the lease, so work moves whatever
        OUTBOX_LEASE_SECONDS is."""
        if first:
            half = (self.lease_until - self.claimed_at) / 2
            return self.lease_until - min(call_seconds, half)
        return self.lease_until - call_seconds


WindowHook = Callable[[str, Window], None]
OutcomeHook = Callable[["Sender", Outcome], None]


class Deliverer:
    """Runs each sender's lane in this process."""

    def __init__(
        self,
        store: Store,
        senders: Sequence[Sender],
        limits: Limits,
        poll_seconds: float = 0.25,
        on_outcome: OutcomeHook | None = None,
        on_window: WindowHook | None = None,
        clock: Clock | None = None,
    ):
        self.store = store
        self.senders = {sender.direction: sender for sender in senders}
        self.limits = limits
        self.poll_seconds = poll_seconds
        self.on_outcome = on_outcome
        self.on_window = on_window
        self.clock: Clock = clock or SystemClock()
        self.stopping = threading.Event()
        # Set by request_stop, from a signal handler; see _watch_for_stop.
        self._stop_requested = False
        self.lanes = {direction: Lane(self, sender) for direction, sender in self.senders.items()}

    def run_once(self, direction: str) -> int:
        """Claim once, send on this thread, settle; returns how many items it
        handled (none while the upstream is paused)."""
        return self.lanes[direction].run_once()

    def wake(self, direction: str) -> None:
        lane = self.lanes.get(direction)
        if lane is not None:
            lane.wake()

    def request_stop(self) -> None:
        """Ask delivery to stop. Safe in a signal handler: it only assigns a
        flag. Event.set() takes a lock, and a second signal arriving while the
        first handler holds it would wait on that lock forever."""
        self._stop_requested = True

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested or self.stopping.is_set()

    def _watch_for_stop(self) -> None:
        while not self.stopping.is_set():
            if self._stop_requested:
                self._stop_now()
                return
            self.stopping.wait(STOP_POLL_SECONDS)

    def _stop_now(self) -> None:
        self.stopping.set()
        for lane in self.lanes.values():
            lane.wake_all()

    def start(self) -> None:
        watcher = threading.Thread(target=self._watch_for_stop, name="deliver-stop", daemon=True)
        watcher.start()
        for lane in self.lanes.values():
            lane.start()
        log.info("delivery started", extra={"directions": sorted(self.lanes)})

    def drain(self) -> int:
        """Deliver what is due now on the lanes' threads, then stop: `outbox
        deliver --once`. Returns how many items were settled; raises what
        ended it early (a StoreError, or a bug), if anything did."""
        for lane in self.lanes.values():
            lane.start(until_idle=True)
        for lane in self.lanes.values():
            if lane.claimer is not None:
                lane.claimer.join()
        self.stop()
        for lane in self.lanes.values():
            if lane.error is not None:
                raise lane.error
        return sum(lane.settled for lane in self.lanes.values())

    def stop(self, timeout: float = 25.0) -> None:
        """Stop claiming; wait for work in flight to be settled or released."""
        self._stop_now()
        deadline = time.monotonic() + timeout
        busy = [lane for lane in self.lanes.values() if not lane.join(deadline)]
        if busy:
            log.warning("delivery threads still busy at shutdown; their leases will expire")


class Lane:
    """One direction's delivery in this process: the claimer, the window and
    the sender threads. One lock guards the queue, the counts and the window;
    each kind of waiter has its own condition on it, so that a finished call
    wakes one waiting call, not every thread."""

    def __init__(self, deliverer: Deliverer, sender: Sender):
        self.deliverer = deliverer
        self.sender = sender
        self.direction = sender.direction
        self.window = Window.for_rate(sender.max_in_flight, sender.calls_per_second)
        self.lock = threading.Lock()
        self.work_ready = threading.Condition(self.lock)  # sender threads wait here
        self.slot_free = threading.Condition(self.lock)  # calls wait here for the window
        self.changed = threading.Condition(self.lock)  # the claimer waits here
        self.queue: deque[Unit] = deque()
        self.busy = 0  # units claimed and not yet finished
        self.finished: list[tuple[Item, Outcome]] = []  # waiting to be settled
        self.woken = False
        self.idle = 0
        self.threads: list[threading.Thread] = []
        self.claimer: threading.Thread | None = None
        self.settled = 0  # items settled, for `drain`
        self.error: Exception | None = None  # what ended a drain
        self.outage = Outage()  # the claiming thread's: the claimer, or run_once's caller

    # -- claiming and settling -------------------------------------------------

    def room(self, now: float) -> int:
        """Units worth claiming now (lock held): none while paused."""
        window = self.window
        if window.paused(now):
            return 0
        hold = window.limit + int(window.limit * PREFETCH)
        cap = window.hold_limit()
        if cap is not None:
            hold = min(hold, cap)
        return max(0, hold - self.busy)

    def claim(self, room: int, now: float) -> tuple[list[Unit], bool]:
        """Claim for `room` units; the units, and whether the claim took all it
        asked for (more may be due)."""
        limit = room * self.sender.items_per_call
        lease = self.deliverer.limits.lease_seconds
        items = self.deliverer.store.claim(
            self.direction, limit, lease, now, whole_runs=self.sender.whole_runs
        )
        self._say(self.outage.answered(now))
        if not items:
            return [], False
        units = [Unit(group, now, now + lease) for group in self.sender.units(items) if group]
        return units, len(items) >= limit

    def settle(self, done: Sequence[tuple[Item, Outcome]]) -> None:
        if not done:
            return
        deliverer = self.deliverer
        now = deliverer.clock.time()
        # While the upstream answers others well, an item failing alone is
        # retried within seconds rather than hours (service/retry.py).
        cap = HEALTHY_BACKOFF_CAP_SECONDS if self.window.healthy else BACKOFF_CAP_SECONDS
        deliverer.store.settle(
            [
                settle(item, outcome, now, deliverer.limits, backoff_cap=cap)
                for item, outcome in done
            ],
            now,
        )
        self._say(self.outage.answered(now))
        self.settled += len(done)
        # Counted once the store has them, so the metrics never show a
        # delivery that the outbox still holds as pending.
        hook = deliverer.on_outcome
        if hook:
            for _, outcome in done:
                hook(self.sender, outcome)

    def flush(self) -> None:
        """Settle what finished since the last round, in one transaction; on a
        store error keep it for the next round."""
        with self.lock:
            done, self.finished = self.finished, []
        try:
            self.settle(done)
        except StoreError:
            with self.lock:
                self.finished[:0] = done
            raise

    def run_once(self) -> int:
        now = self.deliverer.clock.time()
        with self.lock:
            room = self.room(now)
        if not room:
            return 0
        units, _ = self.claim(room, now)
        done: list[tuple[Item, Outcome]] = []
        for unit in units:
            done.extend(zip(unit.items, self.send(unit), strict=True))
        self.settle(done)
        with self.lock:
            self._show()
        return len(done)

    # -- the threads -------------------------------------------------------------

    def start(self, until_idle: bool = False) -> None:
        self.claimer = threading.Thread(
            target=self._claim_loop,
            args=(until_idle,),
            name=f"claim-{self.direction}",
            daemon=True,
        )
        self.claimer.start()

    def wake(self) -> None:
        with self.lock:
            self.woken = True
            self.changed.notify()

    def wake_all(self) -> None:
        with self.lock:
            self.work_ready.notify_all()
            self.slot_free.notify_all()
            self.changed.notify_all()

    def join(self, deadline: float) -> bool:
        """Wait for the threads until `deadline` (monotonic); True when all ended."""
        threads = ([self.claimer] if self.claimer else []) + list(self.threads)
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        return not any(thread.is_alive() for thread in threads)

    def _claim_loop(self, until_idle: bool = False) -> None:
        deliverer = self.deliverer
        stopping = deliverer.stopping
        while not stopping.is_set():
            started = time.monotonic()
            try:
                more = self._round()
            except StoreError as exc:
                # The first failure at once, then a line a minute at most.
                self._say(self.outage.failed(deliverer.clock.time(), str(exc)))
                if until_idle:
                    self.error = exc
                    break
                stopping.wait(deliverer.poll_seconds * 4)
                continue
            except Exception as exc:
                log.exception("delivery round failed", extra={"direction": self.direction})
                if until_idle:
                    self.error = exc
                    break
                stopping.wait(deliverer.poll_seconds * 4)
                continue
            if until_idle and self._idle(more):
                break
            self._wait_for_reason(more)
            # One round per CYCLE_SECONDS at most, so that settlements and
            # claims go to the store in bulk.
            stopping.wait(started + CYCLE_SECONDS - time.monotonic())
        self._finish_at_stop()

    def _round(self) -> bool:
        self.flush()
        if self.deliverer.stopping.is_set():
            return False
        now = self.deliverer.clock.time()
        with self.lock:
            self._show()
            room = self.room(now)
        if not room:
            return False
        units, more = self.claim(room, now)
        if units:
            with self.lock:
                self.queue.extend(units)
                self.busy += len(units)
                self.work_ready.notify(len(units))
                self._spawn()
        return more

    def _say(self, line: Line | None) -> None:
        if line is not None:
            log.log(line.level, line.message, extra={"direction": self.direction, **line.fields})

    def _idle(self, more: bool) -> bool:
        """Nothing in hand and nothing due (or the upstream paused)."""
        with self.lock:
            return not (more or self.busy or self.finished or self.queue)

    def _wait_for_reason(self, more: bool) -> None:
        """Until there is something to do: work finished (to settle, and room to
        fill), new work accepted, room after a full claim, a pause over, or the
        poll for other processes' work."""
        clock = self.deliverer.clock
        stopping = self.deliverer.stopping
        with self.lock:
            deadline = clock.time() + self.deliverer.poll_seconds
            while not (stopping.is_set() or self.woken or self.finished):
                now = clock.time()
                if more and self.room(now):
                    break
                wait = deadline - now
                if self.window.paused(now):
                    wait = self.window.paused_until - now
                if wait <= 0:
                    break
                clock.wait(self.changed, wait)
            self.woken = False

    def _finish_at_stop(self) -> None:
        """Let the units in hand end (calls under way finish, the rest are
        released), then settle them. A lease bounds the wait: past it another
        worker may have the items anyway."""
        clock = self.deliverer.clock
        deadline = clock.time() + self.deliverer.limits.lease_seconds
        with self.lock:
            self.work_ready.notify_all()
            self.slot_free.notify_all()
            while self.busy and clock.time() < deadline:
                clock.wait(self.changed, deadline - clock.time())
        try:
            self.flush()
        except StoreError as exc:
            log.warning(
                "could not settle at shutdown: %s", exc, extra={"direction": self.direction}
            )
        with self.lock:
            self._show()

    def _spawn(self) -> None:
        """Start sender threads for queued units no idle thread will take (lock held)."""
        wanted = min(len(self.queue) - self.idle, self.sender.max_in_flight - len(self.threads))
        for _ in range(max(wanted, 0)):
            thread = threading.Thread(
                target=self._serve,
                name=f"deliver-{self.direction}-{len(self.threads)}",
                daemon=True,
            )
            self.threads.append(thread)
            thread.start()

    def _serve(self) -> None:
        stopping = self.deliverer.stopping
        while True:
            with self.lock:
                while not self.queue:
                    if stopping.is_set():
                        self.threads.remove(threading.current_thread())
                        return
                    self.idle += 1
                    self.work_ready.wait()
                    self.idle -= 1
                unit = self.queue.popleft()
            outcomes = self.send(unit)
            with self.lock:
                self.finished.extend(zip(unit.items, outcomes, strict=True))
                self.busy -= 1
                self.changed.notify()

    # -- one unit ----------------------------------------------------------------

    def gate(self, unit: Unit) -> _Gate:
        return _Gate(self, unit)

    def send(self, unit: Unit) -> list[Outcome]:
        gate = self.gate(unit)
        try:
            outcomes = self.sender.send(unit.items, gate)
            if len(outcomes) != len(unit.items):
                raise RuntimeError("a sender returned the wrong number of outcomes")
        except Exception as exc:  # a bug must not lose the items: retry them later
            log.exception("sender failed", extra={"direction": self.direction})
            outcomes = [Outcome(RETRY, f"internal error: {type(exc).__name__}", "none")] * len(
                unit.items
            )
        finally:
            gate.close()
        return outcomes

    def begin_call(self, unit: Unit, first: bool) -> int | None:
        latest = unit.latest_start(first, self.sender.call_seconds)
        clock = self.deliverer.clock
        stopping = self.deliverer.stopping
        window = self.window
        with self.lock:
            while True:
                now = clock.time()
                if stopping.is_set() or now > latest:
                    return None
                if window.in_flight < window.limit and not window.paused(now):
                    at = max(now, window.next_start)  # the rate cap's turn
                    if at > latest:
                        return None
                    ticket = window.start(at)
                    break
                paused = window.paused(now)
                if (paused and window.paused_until > latest) or now >= latest:
                    # The pause outlasts what the lease allows, or no time is
                    # left to wait for a slot: hand the work back now.
                    return None
                clock.wait(self.slot_free, (window.paused_until if paused else latest) - now)
        if at > now:
            clock.wait(stopping, at - now)
            if stopping.is_set():
                self.abandon_call()
                return None
        return ticket

    def end_call(self, ticket: int, status: int | None, retry_after: float | None) -> None:
        with self.lock:
            paused_until = self.window.paused_until
            self.window.finish(ticket, status, retry_after, self.deliverer.clock.time())
            if self.window.paused_until != paused_until:
                self._show()  # a pause is news at once; the rest waits for the round
            free = self.window.limit - self.window.in_flight
            if free > 0:
                self.slot_free.notify(free)

    def abandon_call(self) -> None:
        with self.lock:
            self.window.abandon()
            self.slot_free.notify()

    def _show(self) -> None:
        """Publish the window (lock held): once a round, and when a pause begins."""
        hook = self.deliverer.on_window
        if hook:
            hook(self.sender.upstream, self.window)


class _Gate:
    """The Gate of one unit: knows whether its first call has started, and
    closes calls a failing sender left open."""

    def __init__(self, lane: Lane, unit: Unit):
        self.lane = lane
        self.unit = unit
        self.started = 0
        self.open = 0

    def begin(self) -> int | None:
        ticket = self.lane.begin_call(self.unit, first=self.started == 0)
        if ticket is not None:
            self.started += 1
            self.open += 1
        return ticket

    def end(self, ticket: int, status: int | None, retry_after: float | None = None) -> None:
        self.open -= 1
        self.lane.end_call(ticket, status, retry_after)

    def close(self) -> None:
        while self.open > 0:
            self.open -= 1
            self.lane.abandon_call()
