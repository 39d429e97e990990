"""Delivery workers: claim due work, hand it to its upstream's sender, settle it.

The policy (what a failure turns into) is plain functions; `Deliverer` only
runs them on threads, so tests can drive one round at a time with `run_once`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.outbox import DEAD, DELIVERED, PENDING, Item, Settlement, Store, StoreError

log = logging.getLogger(__name__)

# What a sender reports for one item.
SUCCEEDED, RETRY, FAILED, RELEASED = "succeeded", "retry", "failed", "released"

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 3600.0
RETRY_AFTER_CAP_SECONDS = 3600.0
# How soon a stop asked for by a signal is noticed.
STOP_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt at one item.

    `progress` is how many of the item's calls are now delivered (None: as
    before); `status` is the status class for metrics ("2xx", "4xx", "5xx",
    "network"); `retry_after` is the upstream's own wish, in seconds.
    """

    kind: str
    error: str | None = None
    status: str = "2xx"
    progress: int | None = None
    retry_after: float | None = None


RELEASE = Outcome(RELEASED, status="none")


class Sender(Protocol):
    direction: str
    upstream: str
    claim_size: int
    concurrency: int
    # True: claim each user's run of due items (see Store.claim); the sender
    # must then never deliver an item after one of the same user it retries.
    whole_runs: bool

    def send(self, items: Sequence[Item], stopping: threading.Event) -> list[Outcome]:
        """One outcome per item, in order. Items not attempted because
        `stopping` was set come back as RELEASE."""


@dataclass(frozen=True)
class Limits:
    lease_seconds: float = 30.0
    max_attempts: int = 25
    max_age_seconds: float = 72 * 3600.0


def backoff(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the `attempt`-th failure: doubling from one second up
    to an hour, with jitter so that items failing together do not retry together."""
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** min(attempt - 1, 32))
    return ceiling * (0.5 + rand() / 2)


def settle(
    item: Item,
    outcome: Outcome,
    now: float,
    limits: Limits,
    rand: Callable[[], float] = random.random,
) -> Settlement:
    progress = item.progress if outcome.progress is None else outcome.progress

    def to(state: str, available_at: float, error: str | None, attempts: int = item.attempts):
        return Settlement(item, state, available_at, error, progress, attempts)

    if outcome.kind == SUCCEEDED:
        return to(DELIVERED, now, None)
    if outcome.kind == RELEASED:
        # Never attempted: give the attempt back.
        return to(PENDING, now, None, max(item.attempts - 1, 0))
    if outcome.kind == FAILED:
        return to(DEAD, now, outcome.error)
    if item.attempts >= limits.max_attempts:
        return to(DEAD, now, f"{outcome.error} (gave up after {item.attempts} attempts)")
    if now - item.created_at >= limits.max_age_seconds:
        hours = limits.max_age_seconds / 3600
        return to(DEAD, now, f"{outcome.error} (gave up after {hours:g} hours)")
    if outcome.retry_after is not None:
        delay = min(max(outcome.retry_after, 0.0), RETRY_AFTER_CAP_SECONDS)
    else:
        delay = backoff(item.attempts, rand)
    return to(PENDING, now + delay, outcome.error)


class Deliverer:
    """Runs each sender's delivery loop on its own threads in this process."""

    def __init__(
        self,
        store: Store,
        senders: Sequence[Sender],
        limits: Limits,
        poll_seconds: float = 0.25,
        on_outcome: Callable[[Sender, Outcome], None] | None = None,
    ):
        self.store = store
        self.senders = {sender.direction: sender for sender in senders}
        self.limits = limits
        self.poll_seconds = poll_seconds
        self.on_outcome = on_outcome
        self.stopping = threading.Event()
        # Set by request_stop, from a signal handler; see _watch_for_stop.
        self._stop_requested = False
        self._wakeups = {direction: threading.Event() for direction in self.senders}
        self._threads: list[threading.Thread] = []

    def run_once(self, direction: str) -> int:
        """Claim, send and settle one round; returns how many items it handled."""
        sender = self.senders[direction]
        items = self.store.claim(
            direction,
            sender.claim_size,
            self.limits.lease_seconds,
            time.time(),
            whole_runs=getattr(sender, "whole_runs", False),
        )
        if not items:
            return 0
        try:
            outcomes = sender.send(items, self.stopping)
        except Exception as exc:  # a bug must not lose the items: retry them later
            log.exception("sender failed", extra={"direction": direction})
            outcomes = [Outcome(RETRY, f"internal error: {type(exc).__name__}", "none")] * len(
                items
            )
        now = time.time()
        self.store.settle(
            [
                settle(item, outcome, now, self.limits)
                for item, outcome in zip(items, outcomes, strict=True)
            ],
            now,
        )
        if self.on_outcome:
            for outcome in outcomes:
                self.on_outcome(sender, outcome)
        return len(items)

    def wake(self, direction: str) -> None:
        event = self._wakeups.get(direction)
        if event is not None:
            event.set()

    def request_stop(self) -> None:
        """Ask delivery to stop. Safe in a signal handler: it only assigns a
        flag. Event.set() takes a lock, and a second signal arriving while the
        first handler holds it would wait on that lock forever."""
        self._stop_requested = True

    def _watch_for_stop(self) -> None:
        while not self.stopping.is_set():
            if self._stop_requested:
                self.stopping.set()
                for event in self._wakeups.values():
                    event.set()
                return
            self.stopping.wait(STOP_POLL_SECONDS)

    def start(self) -> None:
        watcher = threading.Thread(target=self._watch_for_stop, name="deliver-stop", daemon=True)
        watcher.start()
        for direction, sender in self.senders.items():
            for n in range(sender.concurrency):
                thread = threading.Thread(
                    target=self._loop,
                    args=(direction,),
                    name=f"deliver-{direction}-{n}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)
        log.info("delivery started", extra={"directions": sorted(self.senders)})

    def stop(self, timeout: float = 25.0) -> None:
        """Stop claiming; wait for work in flight to be settled or released."""
        self.stopping.set()
        for event in self._wakeups.values():
            event.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        if self._threads:
            log.warning("delivery threads still busy at shutdown; their leases will expire")

    def _loop(self, direction: str) -> None:
        wakeup = self._wakeups[direction]
        while not self.stopping.is_set():
            try:
                handled = self.run_once(direction)
            except StoreError as exc:
                log.warning("outbox unavailable: %s", exc, extra={"direction": direction})
                handled = 0
                self.stopping.wait(self.poll_seconds * 4)
            except Exception:
                log.exception("delivery round failed", extra={"direction": direction})
                handled = 0
                self.stopping.wait(self.poll_seconds * 4)
            if handled == 0:
                wakeup.wait(self.poll_seconds)
                wakeup.clear()
