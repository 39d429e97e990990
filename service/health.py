"""Readiness: whether this process can take work now.

A probe write alone can pass while real writes fail (on a full disk, a
one-row update fits where a new message does not), so a write that failed
recently, with none succeeding since, makes the service unready too.
"""

from __future__ import annotations

import os

from service.outbox import Store, StoreError

# How long one failed write keeps the service unready, unless a write
# succeeds first: about two intervals of a health checker.
FAILURE_SECONDS = 30.0


def sqlite_path(database_url: str | None) -> str | None:
    if database_url and database_url.startswith("sqlite:///"):
        return database_url[len("sqlite:///") :]
    return None


def missing_folder(database_url: str | None) -> str | None:
    """The folder a configured SQLite outbox should be in, when it is not there."""
    path = sqlite_path(database_url)
    if path is None:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    return None if os.path.isdir(folder) else folder


class Writes:
    """The outcome of this process's latest writes to the outbox. Plain
    assignments only: request threads record, /readyz reads."""

    def __init__(self) -> None:
        self._failed_at: float | None = None
        self._reason = ""

    def failed(self, now: float, reason: str) -> None:
        self._failed_at, self._reason = now, reason

    def succeeded(self) -> None:
        self._failed_at = None

    def failing(self, now: float) -> str | None:
        failed_at = self._failed_at
        if failed_at is not None and now - failed_at < FAILURE_SECONDS:
            return self._reason
        return None


def problem(database_url: str | None, store: Store, writes: Writes, now: float) -> str | None:
    """Why the service is not ready (for the log: it may name hosts and
    libpq's words), or None."""
    folder = missing_folder(database_url)
    if folder:
        return f"the SQLite outbox's folder {folder} is missing"
    failing = writes.failing(now)
    if failing:
        return f"recent writes failed: {failing}"
    try:
        store.check(now)
    except StoreError as exc:
        return str(exc)
    return None
