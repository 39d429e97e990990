"""The embedded outbox: one SQLite file in WAL mode, shared by every process on
the machine (gunicorn workers and `outbox deliver` alike)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # not on Windows: SQLite's own locking still holds
    fcntl = None  # type: ignore[assignment]

from service.outbox import (
    DEAD,
    DELIVERED,
    IN_FLIGHT,
    PENDING,
    DeadItem,
    Item,
    Settlement,
    StoreError,
    claimed_items,
    dead_item,
)
from service.results import Accept

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    direction     TEXT    NOT NULL,
    dedup_key    TEXT    NOT NULL,
    order_key    TEXT    NOT NULL,
    payload      TEXT    NOT NULL,
    state        TEXT    NOT NULL DEFAULT 'pending',
    attempts     INTEGER NOT NULL DEFAULT 0,
    progress     INTEGER NOT NULL DEFAULT 0,
    available_at REAL    NOT NULL,
    lease        TEXT,
    last_error   TEXT,
    created_at   REAL    NOT NULL,
    updated_at   REAL    NOT NULL,
    UNIQUE (direction, dedup_key)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (direction, available_at, id)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_user ON outbox (direction, order_key, id)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_finished ON outbox (state, updated_at)
    WHERE state != 'pending';
CREATE TABLE IF NOT EXISTS outbox_probe (id INTEGER PRIMARY KEY, checked_at REAL NOT NULL);
"""


def _claim(whole_runs: bool) -> str:
    """A pending item is claimable when it is due (a lease is an `available_at`
    in the future) and no older pending item of the same user is ahead of it.
    With whole_runs, only an older item that is not due stops it: each user's
    run of due items is taken, in id order, so that whatever the limit cuts,
    each user keeps a prefix of the run."""
    ahead = "AND p.available_at > :now" if whole_runs else ""
    order = "o.id" if whole_runs else "o.available_at, o.id"
    return f"""
UPDATE outbox SET available_at = :lease_until, lease = :lease, attempts = attempts + 1
WHERE id IN (
    SELECT o.id FROM outbox AS o
    WHERE o.direction = :direction AND o.state = 'pending' AND o.available_at <= :now
      AND NOT EXISTS (
          SELECT 1 FROM outbox AS p
          WHERE p.direction = o.direction AND p.order_key = o.order_key
            AND p.state = 'pending' AND p.id < o.id {ahead})
    ORDER BY {order}
    LIMIT :limit)
RETURNING id, order_key, payload, attempts, progress, created_at
"""


CLAIM, CLAIM_RUNS = _claim(False), _claim(True)


INSERT = (
    "INSERT INTO outbox (direction, dedup_key, order_key, payload,"
    " available_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (direction, dedup_key) DO NOTHING"
)


class _Enqueue:
    """One caller's rows waiting for a group commit, and what became of them."""

    def __init__(self, rows: list[tuple]):
        self.rows = rows
        self.inserted: list[bool] = []
        self.error: StoreError | None = None
        self.done = False


class SQLiteStore:
    def __init__(self, path: str):
        self.path = path
        self._local = threading.local()
        self._lock = threading.Lock()
        # Serialises this process's write transactions. Without it, threads
        # that find the database locked wait in SQLite's busy handler, which
        # sleeps in steps of up to 100 ms instead of waking when the lock is
        # free: under load that idle waiting, not the commit, bounded ingest.
        # Reentrant: opening a connection may write the schema inside a write.
        self._write_lock = threading.RLock()
        # Requests waiting for the next group commit (see enqueue).
        self._queue_lock = threading.Lock()
        self._queue: list[_Enqueue] = []
        self._connections: list[sqlite3.Connection] = []
        self._ready = False
        # The lock file processes take turns on (see _between_processes);
        # guarded by _write_lock.
        self._write_depth = 0
        self._lock_fd = -1
        self._lock_pid: int | None = None

    # -- connections -------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        if not self._ready:
            self._create_schema(conn)
        return conn

    def _open(self) -> sqlite3.Connection:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            # Autocommit mode: transactions are opened explicitly below.
            conn = sqlite3.connect(
                self.path, timeout=10, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL makes each commit durable across power loss, not only a
            # process crash: an acknowledged message must survive both.
            conn.execute("PRAGMA synchronous = FULL")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the SQLite outbox: {exc}") from exc
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        with self._write(conn):
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version < SCHEMA_VERSION:
                # Not executescript: it would commit our open transaction first.
                for statement in filter(str.strip, SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._ready = True

    @contextmanager
    def _write(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front, so two
        processes never both read and then fail to upgrade to writing."""
        conn = conn or self._connection()
        with self._write_lock, self._between_processes():
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"the SQLite outbox cannot be written: {exc}") from exc

    @contextmanager
    def _between_processes(self) -> Iterator[None]:
        """Processes sharing the file (gunicorn's workers, `outbox deliver`) take
        turns on a lock file beside it: flock wakes the next writer the moment
        the lock is free, where SQLite's busy handler sleeps in steps of up to
        100 ms, which made a second worker process slow ingest down rather
        than speed it up. Taken only by the outermost write of this process."""
        self._write_depth += 1
        try:
            if self._write_depth > 1 or fcntl is None:
                yield
                return
            descriptor = self._lock_descriptor()
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(descriptor, fcntl.LOCK_UN)
        finally:
            self._write_depth -= 1

    def _lock_descriptor(self) -> int:
        # One per process: a descriptor inherited across fork would share its
        # lock with the parent's.
        if self._lock_pid != os.getpid():
            try:
                self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise StoreError(f"cannot open the SQLite outbox's lock file: {exc}") from exc
            self._lock_pid = os.getpid()
        return self._lock_fd

    def _read(self, sql: str, params: dict | tuple = ()) -> list[tuple]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"the SQLite outbox cannot be read: {exc}") from exc

    # -- the Store interface -----------------------------------------------

    def enqueue(self, direction: str, items: Sequence[Accept], now: float) -> list[bool]:
        """Group commit: each commit waits for its fsync (synchronous = FULL),
        and one transaction per request made that wait the bound on ingest.
        Requests that arrive while a commit is under way queue here, and the
        next of them to get the write lock commits them all at once. Each
        caller still returns only after its own rows are committed, and gets
        its own answer: rows go in arrival order, as one by one."""
        rows = [
            (
                direction,
                item.dedup_key,
                item.order_key,
                json.dumps(item.payload, separators=(",", ":")),
                now,
                now,
                now,
            )
            for item in items
        ]
        mine = _Enqueue(rows)
        with self._queue_lock:
            self._queue.append(mine)
        with self._write_lock:
            if not mine.done:
                self._commit_queued()
        if mine.error is not None:
            raise mine.error
        return mine.inserted

    def _commit_queued(self) -> None:
        with self._queue_lock:
            group, self._queue = self._queue, []
        # Whatever stops the commit, no caller of the group may go on as if
        # its rows were stored.
        error: StoreError | None = StoreError(
            "the SQLite outbox cannot be written: the commit did not finish"
        )
        try:
            with self._write() as conn:
                for request in group:
                    request.inserted = [
                        conn.execute(INSERT, row).rowcount == 1 for row in request.rows
                    ]
            error = None
        except StoreError as exc:
            error = exc
        finally:
            for request in group:
                request.error = error
                request.done = True

    def claim(
        self, direction: str, limit: int, lease_seconds: float, now: float, whole_runs: bool = False
    ) -> list[Item]:
        lease = uuid.uuid4().hex
        params = {
            "direction": direction,
            "now": now,
            "limit": limit,
            "lease": lease,
            "lease_until": now + lease_seconds,
        }
        # Claims are serialised by the write transaction, so no other claimer
        # can take a user's later item while this one takes the earlier.
        with self._write() as conn:
            rows = conn.execute(CLAIM_RUNS if whole_runs else CLAIM, params).fetchall()
        return claimed_items(rows, direction, lease)

    def settle(self, settlements: Sequence[Settlement], now: float) -> None:
        if not settlements:
            return
        with self._write() as conn:
            conn.executemany(
                "UPDATE outbox SET state = ?, available_at = ?, last_error = ?, progress = ?,"
                " attempts = ?, lease = NULL, updated_at = ? WHERE id = ? AND lease = ?",
                [
                    (
                        s.state,
                        s.available_at,
                        s.error,
                        s.progress,
                        s.attempts,
                        now,
                        s.item.id,
                        s.item.lease,
                    )
                    for s in settlements
                ],
            )

    def counts(self, now: float) -> dict[tuple[str, str], int]:
        rows = self._read(
            "SELECT direction, CASE WHEN state = 'pending' AND lease IS NOT NULL"
            " AND available_at > ? THEN ? ELSE state END AS shown, count(*)"
            " FROM outbox GROUP BY direction, shown",
            (now, IN_FLIGHT),
        )
        return {(direction, state): count for direction, state, count in rows}

    def oldest_pending(self) -> dict[str, float]:
        rows = self._read(
            "SELECT direction, min(created_at) FROM outbox WHERE state = 'pending' GROUP BY direction"
        )
        return dict(rows)

    def dead(self, direction: str | None, limit: int) -> list[DeadItem]:
        rows = self._read(
            "SELECT id, direction, order_key, attempts, last_error, created_at, updated_at, payload"
            " FROM outbox WHERE state = 'dead' AND (:direction IS NULL OR direction = :direction)"
            " ORDER BY id LIMIT :limit",
            {"direction": direction, "limit": limit},
        )
        return [dead_item(row) for row in rows]

    def replay(self, ids: Sequence[int] | None, direction: str | None, now: float) -> int:
        sql = (
            "UPDATE outbox SET state = 'pending', attempts = 0, available_at = ?,"
            " lease = NULL, updated_at = ? WHERE state = 'dead'"
        )
        params: list = [now, now]
        if direction is not None:
            sql += " AND direction = ?"
            params.append(direction)
        with self._write() as conn:
            if ids is None:
                return conn.execute(sql, params).rowcount
            return sum(conn.execute(sql + " AND id = ?", [*params, i]).rowcount for i in ids)

    def purge(self, delivered_before: float) -> int:
        with self._write() as conn:
            return conn.execute(
                "DELETE FROM outbox WHERE state = ? AND updated_at < ?",
                (DELIVERED, delivered_before),
            ).rowcount

    def check(self, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO outbox_probe (id, checked_at) VALUES (1, ?)", (now,)
            )

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
        if self._lock_pid == os.getpid():
            os.close(self._lock_fd)
            self._lock_pid = None


__all__ = ["DEAD", "DELIVERED", "PENDING", "SQLiteStore"]
