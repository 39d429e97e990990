"""The durable outbox: accepted work waits here until its upstream has it.

A store keeps items in one of three states (see `State`): pending (waiting, or
claimed by a worker under a lease), delivered (kept for de-duplication until
purged) and dead (gave up; an operator may replay it). The SQLite and
PostgreSQL stores implement the same small set of methods (see `Store`), so
nothing above this package knows which one it talks to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from service.results import Accept


class State(StrEnum):
    PENDING = "pending"  # waiting, or claimed by a worker under a lease
    DELIVERED = "delivered"
    DEAD = "dead"
    # Not a stored state: pending items whose lease has not run out.
    IN_FLIGHT = "in_flight"


# The names the rest of the service imports.
PENDING, DELIVERED, DEAD, IN_FLIGHT = State.PENDING, State.DELIVERED, State.DEAD, State.IN_FLIGHT


class StoreError(RuntimeError):
    """The store could not be read or written; the message is safe to show."""


@dataclass(frozen=True)
class Item:
    """One claimed piece of work, as a worker sees it."""

    id: int
    direction: str
    order_key: str
    payload: dict[str, Any]
    attempts: int  # including the one now under way
    progress: int  # how many of the item's calls are already delivered
    created_at: float
    lease: str  # proves the claim is still ours when settling


def claimed_items(rows, direction: str, lease: str) -> list[Item]:
    """A claim's rows (id, order_key, payload JSON, attempts, progress,
    created_at) as Items, oldest first: the order a user's work must go in."""
    items = [
        Item(
            id=row[0],
            direction=direction,
            order_key=row[1],
            payload=json.loads(row[2]),
            attempts=row[3],
            progress=row[4],
            created_at=row[5],
            lease=lease,
        )
        for row in rows
    ]
    items.sort(key=lambda item: item.id)
    return items


@dataclass(frozen=True)
class Settlement:
    """What becomes of a claimed item after a delivery attempt."""

    item: Item
    state: str  # a stored State: PENDING, DELIVERED or DEAD
    available_at: float
    error: str | None
    progress: int
    attempts: int


@dataclass(frozen=True)
class DeadItem:
    id: int
    direction: str
    order_key: str
    attempts: int
    error: str | None
    created_at: float
    updated_at: float
    payload: dict[str, Any]


def counted(rows: Sequence[Sequence[Any]]) -> dict[tuple[str, str], int]:
    """(direction, state) -> items, from rows of (direction, state, n) in which
    IN_FLIGHT counts pending items under an unexpired lease: those are taken
    out of PENDING, so each item is counted in one state."""
    counts: dict[tuple[str, str], int] = {}
    for direction, state, n in rows:
        counts[direction, state] = n
    for (direction, state), n in list(counts.items()):
        if state == IN_FLIGHT:
            counts[direction, PENDING] = counts.get((direction, PENDING), 0) - n
    return {key: n for key, n in counts.items() if n}


def dead_item(row: Sequence[Any]) -> DeadItem:
    """A row (id, direction, order_key, attempts, last_error, created_at,
    updated_at, payload JSON) as a DeadItem."""
    id_, direction, order_key, attempts, error, created_at, updated_at, payload = row
    return DeadItem(
        id_, direction, order_key, attempts, error, created_at, updated_at, json.loads(payload)
    )


class Store(Protocol):
    def enqueue(self, direction: str, items: Sequence[Accept], now: float) -> list[bool]:
        """Store new work in one transaction; True where new, False where a duplicate."""

    def claim(
        self, direction: str, limit: int, lease_seconds: float, now: float, whole_runs: bool = False
    ) -> list[Item]:
        """Lease up to `limit` due items, at most one per order key: the oldest
        unfinished one, so that one user's work goes out in order.

        With `whole_runs`, each user's due items are taken oldest first up to
        the first one that is not due, for a sender that delivers them in one
        request, in order (and stops at the first it must retry)."""

    def settle(self, settlements: Sequence[Settlement], now: float) -> None:
        """Record outcomes; a settlement whose lease was lost is ignored."""

    def counts(self, now: float) -> dict[tuple[str, str], int]:
        """(direction, state) -> number of items; state includes IN_FLIGHT."""

    def oldest_pending(self) -> dict[str, float]:
        """direction -> created_at of its oldest pending item."""

    def dead(self, direction: str | None, limit: int) -> list[DeadItem]: ...

    def replay(self, ids: Sequence[int] | None, direction: str | None, now: float) -> int: ...

    def purge(self, delivered_before: float) -> int: ...

    def check(self, now: float) -> None:
        """Raise StoreError unless the store can be written."""

    def close(self) -> None: ...


def open_store(url: str, pool_size: int | None = None) -> Store:
    if url.startswith("sqlite:///"):
        from service.outbox.sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///") :])
    if url.startswith("postgresql://"):
        from service.outbox.postgres import PostgresStore

        return PostgresStore(url, max_size=pool_size)
    raise ValueError("unsupported store URL")
