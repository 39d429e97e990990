"""Prometheus metrics.

Counters live in each process; under gunicorn they are shared through
prometheus_client's multiprocess mode (gunicorn.conf.py sets its directory
before this module is imported). The upstream gauges (each process's window,
calls in flight and pause) go through it too: summed over the live processes,
or for the pause the latest, so a dead worker's values drop out. Outbox gauges
are not counted at all: they are read from the store at scrape time, so they
are right whichever worker answers and whichever process delivered.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from service.directions import DIRECTIONS
from service.outbox import DEAD, IN_FLIGHT, PENDING, Store, StoreError

# The *_created series double the output and nobody graphs them.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

RECEIVED = Counter("vero_bridge_messages_received", "Messages received", ["direction"])
ACCEPTED = Counter("vero_bridge_messages_accepted", "Messages written to the outbox", ["direction"])
DUPLICATE = Counter("vero_bridge_messages_duplicate", "Messages seen before", ["direction"])
SKIPPED = Counter(
    "vero_bridge_messages_skipped", "Messages acknowledged, not forwarded", ["direction", "reason"]
)
REJECTED = Counter(
    "vero_bridge_messages_rejected", "Messages or requests rejected", ["direction", "reason"]
)
DELIVERIES = Counter(
    "vero_bridge_deliveries", "Delivery attempts by outcome", ["upstream", "result", "status_class"]
)
WINDOW = Gauge(
    "vero_bridge_upstream_window",
    "Calls the processes may keep in flight to the upstream now (the adaptive windows, summed)",
    ["upstream"],
    multiprocess_mode="livesum",
)
CALLS_IN_FLIGHT = Gauge(
    "vero_bridge_upstream_calls_in_flight",
    "Calls to the upstream started and not yet answered",
    ["upstream"],
    multiprocess_mode="livesum",
)
PAUSED_UNTIL = Gauge(
    "vero_bridge_upstream_paused_until_timestamp_seconds",
    "Until when calls to the upstream wait, as its Retry-After asked (in the past: not paused)",
    ["upstream"],
    multiprocess_mode="livemax",
)


class OutboxCollector:
    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        depth = GaugeMetricFamily(
            "vero_bridge_outbox_items", "Outbox items by state", labels=["direction", "state"]
        )
        age = GaugeMetricFamily(
            "vero_bridge_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending item",
            labels=["direction"],
        )
        up = GaugeMetricFamily("vero_bridge_outbox_up", "1 when the outbox store answers")
        now = time.time()
        try:
            counts = self.store.counts(now)
            oldest = self.store.oldest_pending()
        except StoreError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for direction in DIRECTIONS:
            # Disjoint states, so that their sum is the depth.
            depth.add_metric([direction, PENDING], counts.get((direction, PENDING), 0))
            depth.add_metric([direction, IN_FLIGHT], counts.get((direction, IN_FLIGHT), 0))
            depth.add_metric([direction, DEAD], counts.get((direction, DEAD), 0))
            created = oldest.get(direction)
            age.add_metric([direction], max(now - created, 0.0) if created else 0.0)
        yield depth
        yield age


class _ThisProcess:
    """The counters of this process alone, when not under gunicorn."""

    def collect(self):
        return REGISTRY.collect()


def exposition(store: Store) -> bytes:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    registry.register(OutboxCollector(store))
    return generate_latest(registry)
