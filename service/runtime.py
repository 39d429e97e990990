"""One process's runtime: its configuration, the outbox store, and (when this
process delivers) the delivery workers. `init_app` attaches it to the app;
`get_runtime` is the one way to reach it."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

from flask import Flask, current_app

from service import delivery_seat, health, intake, metrics
from service.config import Config
from service.outbox import Store, StoreError
from service.outbox.delivery import RELEASED, SUCCEEDED, Deliverer, Limits, Outcome, Sender
from service.results import Result
from service.upstream import Window

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 600.0


EXTENSION = "vero_bridge"


class Runtime:
    def __init__(self, config: Config, store: Store, senders: Sequence[Sender]):
        self.config = config
        self.store = store
        self.deliverer = Deliverer(
            store,
            senders,
            Limits(
                lease_seconds=config.outbox_lease_seconds,
                max_attempts=config.outbox_max_attempts,
                max_age_seconds=config.outbox_max_age_hours * 3600,
            ),
            poll_seconds=config.delivery_poll_seconds,
            on_outcome=count_outcome,
            on_window=show_window,
        )
        self._housekeeping: threading.Thread | None = None
        self.writes = health.Writes()
        # Told of each direction that has new work: this process's own lanes,
        # or the server's delivering process (service/delivery_seat.py).
        self.ring: Callable[[str], None] = self.deliverer.wake

    def init_app(self, app: Flask) -> None:
        app.extensions[EXTENSION] = self

    def accept(self, direction: str, results: Sequence[Result]) -> intake.Summary:
        try:
            summary = intake.record(self.store, direction, results, time.time())
        except StoreError as exc:
            self.writes.failed(time.time(), str(exc))  # /readyz reports it
            raise
        if summary.accepted or summary.duplicate:
            self.writes.succeeded()
        if summary.accepted:
            # Wake delivery now rather than at its next poll.
            self.ring(direction)
        return summary

    def purge(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return self.store.purge(now - self.config.outbox_retention_hours * 3600)

    def start_delivery(self, seat: socket.socket | None = None) -> None:
        """Deliver in this process; with the server's `seat`, also answer
        the doorbell the serving processes ring."""
        self.deliverer.start()
        if seat is not None:
            delivery_seat.answer(seat, self.deliverer.wake, self.deliverer.stopping)
        self._housekeeping = threading.Thread(
            target=self._housekeep, name="housekeeping", daemon=True
        )
        self._housekeeping.start()

    def stop_delivery(self, timeout: float = 25.0) -> None:
        self.deliverer.stop(timeout)

    def _housekeep(self) -> None:
        stopping = self.deliverer.stopping
        while not stopping.is_set():
            try:
                purged = self.purge()
                if purged:
                    log.info("purged delivered work past retention", extra={"purged": purged})
            except Exception as exc:
                log.warning("purge failed: %s", exc)
            stopping.wait(HOUSEKEEPING_SECONDS)


def get_runtime(app: Flask | None = None) -> Runtime:
    """The runtime of `app`, or of the current app."""
    return (app or current_app).extensions[EXTENSION]


def default_senders(config: Config) -> list[Sender]:
    """The senders for the directions this deployment has configured."""
    senders: list[Sender] = []
    if config.vero_enabled:
        from service.segment_to_vero.sender import VeroSender

        senders.append(VeroSender(config))
    if config.segment_enabled:
        from service.vero_to_segment.sender import SegmentSender

        senders.append(SegmentSender(config))
    return senders


def count_outcome(sender: Sender, outcome: Outcome) -> None:
    # A retry and a permanent failure alike are a delivery that failed; the
    # label values are what dashboards read (SERVICE.md, "Observability").
    if outcome.kind == SUCCEEDED:
        metrics.DELIVERIES.labels(sender.upstream, "succeeded", outcome.status).inc()
    elif outcome.kind != RELEASED:
        metrics.DELIVERIES.labels(sender.upstream, "failed", outcome.status).inc()


def show_window(upstream: str, window: Window) -> None:
    metrics.WINDOW.labels(upstream).set(window.limit)
    metrics.CALLS_IN_FLIGHT.labels(upstream).set(window.in_flight)
    metrics.PAUSED_UNTIL.labels(upstream).set(window.paused_until)
