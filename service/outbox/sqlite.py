"""The embedded outbox: one SQLite file in WAL mode, shared by every process on
the machine (gunicorn workers and `outbox deliver` alike).

The layout (schema version 3; PostgreSQL's, version 2, differs only in where
de-duplication looks; docs/service-decisions.md, "Outbox", says why):
- `outbox_keys` holds every de-duplication key the store knows, (direction,
  dedup_key), written once at enqueue and deleted only when purge removes its
  item's history. It is the only index on the keys: messageIds are random, so
  each write to such an index lands anywhere in it, and moving an item from
  `outbox` to `outbox_history` then wrote two of them (out of one, into the
  other), which slowed a million-item drain to a third of its rate.
- `outbox` holds unfinished work only. Each user's oldest item in it is that
  user's head (`head = 1`), and claims start from heads only, through
  `outbox_heads`, an index over heads alone in the order they fall due. A
  claim so reads the rows it hands out, whatever the backlog's size or shape:
  a user with 10,000 items waiting is one row in that index, not 10,000.
- `outbox_history` holds delivered and dead work: what `outbox dead`,
  `replay` and `purge` need. Claims never read it, and purging it never
  touches `outbox`.
- `outbox_counts` keeps the number of items per direction and state, changed
  in the transaction that moves them, and `outbox_leases` one row per claim
  (items still out, until when), so `counts` reads a few rows.

Every query that has an index to use names it (INDEXED BY), so its plan cannot
depend on whether, or when, ANALYZE ran.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
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
    counted,
    dead_item,
)
from service.results import Accept

SCHEMA_VERSION = 3

# Migrations by the version they lead to; each runs in the write transaction
# that records its version (see _create_schema).
MIGRATIONS = {
    1: """
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
""",
    # Finished work moves out of `outbox`, which keeps its ids (AUTOINCREMENT
    # never hands one out again, so history and new work cannot collide) and
    # its leases: an item in flight at the upgrade is settled as usual.
    2: """
CREATE TABLE outbox_history (
    id           INTEGER PRIMARY KEY,
    direction    TEXT    NOT NULL,
    dedup_key    TEXT    NOT NULL,
    order_key    TEXT    NOT NULL,
    payload      TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL,
    progress     INTEGER NOT NULL,
    last_error   TEXT,
    created_at   REAL    NOT NULL,
    updated_at   REAL    NOT NULL,
    UNIQUE (direction, dedup_key)
);
INSERT INTO outbox_history (id, direction, dedup_key, order_key, payload, state, attempts,
                            progress, last_error, created_at, updated_at)
    SELECT id, direction, dedup_key, order_key, payload, state, attempts, progress, last_error,
           created_at, updated_at
    FROM outbox WHERE state != 'pending';
DELETE FROM outbox WHERE state != 'pending';
DROP INDEX outbox_due;
DROP INDEX outbox_user;
DROP INDEX outbox_finished;
ALTER TABLE outbox DROP COLUMN state;
ALTER TABLE outbox ADD COLUMN head INTEGER NOT NULL DEFAULT 0;
UPDATE outbox SET head = 1 WHERE id IN (SELECT min(id) FROM outbox GROUP BY direction, order_key);
CREATE INDEX outbox_user ON outbox (direction, order_key, id);
CREATE INDEX outbox_heads ON outbox (direction, available_at, id) WHERE head = 1;
-- The oldest unfinished item of a direction is some user's head.
CREATE INDEX outbox_age ON outbox (direction, created_at) WHERE head = 1;
CREATE INDEX outbox_history_delivered ON outbox_history (updated_at) WHERE state = 'delivered';
CREATE INDEX outbox_history_dead ON outbox_history (id) WHERE state = 'dead';
CREATE TABLE outbox_counts (
    direction TEXT    NOT NULL,
    state     TEXT    NOT NULL,
    n         INTEGER NOT NULL,
    PRIMARY KEY (direction, state)
) WITHOUT ROWID;
INSERT INTO outbox_counts (direction, state, n)
    SELECT direction, 'pending', count(*) FROM outbox GROUP BY direction
    UNION ALL
    SELECT direction, state, count(*) FROM outbox_history GROUP BY direction, state;
-- One row per claim: how many of its items are still out, and until when. In
-- flight is the sum over unexpired leases, read without touching outbox.
CREATE TABLE outbox_leases (
    lease     TEXT    PRIMARY KEY,
    direction TEXT    NOT NULL,
    until     REAL    NOT NULL,
    n         INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO outbox_leases (lease, direction, until, n)
    SELECT lease, direction, max(available_at), count(*) FROM outbox
    WHERE lease IS NOT NULL GROUP BY lease, direction;
""",
    # The keys move to a table of their own, and both item tables lose their
    # UNIQUE (direction, dedup_key). SQLite cannot drop a constraint, so each is
    # rebuilt under a new name, copied, and renamed back. `outbox`'s
    # AUTOINCREMENT sequence goes with it: the new table's entry is written
    # before any row is copied, at the highest id ever handed out, so no id of
    # the old table (or of history, which took its ids from it) comes again.
    # (Renaming a table renames its sqlite_sequence entry; dropping one
    # deletes it.) Leases, heads and attempts are copied as they are.
    3: """
CREATE TABLE outbox_keys (
    direction TEXT NOT NULL,
    dedup_key TEXT NOT NULL,
    PRIMARY KEY (direction, dedup_key)
) WITHOUT ROWID;
INSERT OR IGNORE INTO outbox_keys (direction, dedup_key)
    SELECT direction, dedup_key FROM outbox
    UNION ALL
    SELECT direction, dedup_key FROM outbox_history
    ORDER BY direction, dedup_key;
CREATE TABLE outbox_v3 (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    direction    TEXT    NOT NULL,
    dedup_key    TEXT    NOT NULL,
    order_key    TEXT    NOT NULL,
    payload      TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    progress     INTEGER NOT NULL DEFAULT 0,
    available_at REAL    NOT NULL,
    lease        TEXT,
    last_error   TEXT,
    created_at   REAL    NOT NULL,
    updated_at   REAL    NOT NULL,
    head         INTEGER NOT NULL DEFAULT 0
);
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'outbox_v3',
           max(coalesce((SELECT max(seq) FROM sqlite_sequence WHERE name = 'outbox'), 0),
               coalesce((SELECT max(id) FROM outbox), 0),
               coalesce((SELECT max(id) FROM outbox_history), 0));
INSERT INTO outbox_v3 (id, direction, dedup_key, order_key, payload, attempts, progress,
                       available_at, lease, last_error, created_at, updated_at, head)
    SELECT id, direction, dedup_key, order_key, payload, attempts, progress, available_at, lease,
           last_error, created_at, updated_at, head
    FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_v3 RENAME TO outbox;
CREATE INDEX outbox_user ON outbox (direction, order_key, id);
CREATE INDEX outbox_heads ON outbox (direction, available_at, id) WHERE head = 1;
CREATE INDEX outbox_age ON outbox (direction, created_at) WHERE head = 1;
CREATE TABLE outbox_history_v3 (
    id           INTEGER PRIMARY KEY,
    direction    TEXT    NOT NULL,
    dedup_key    TEXT    NOT NULL,
    order_key    TEXT    NOT NULL,
    payload      TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL,
    progress     INTEGER NOT NULL,
    last_error   TEXT,
    created_at   REAL    NOT NULL,
    updated_at   REAL    NOT NULL
);
INSERT INTO outbox_history_v3 (id, direction, dedup_key, order_key, payload, state, attempts,
                               progress, last_error, created_at, updated_at)
    SELECT id, direction, dedup_key, order_key, payload, state, attempts, progress, last_error,
           created_at, updated_at
    FROM outbox_history;
DROP TABLE outbox_history;
ALTER TABLE outbox_history_v3 RENAME TO outbox_history;
CREATE INDEX outbox_history_delivered ON outbox_history (updated_at) WHERE state = 'delivered';
CREATE INDEX outbox_history_dead ON outbox_history (id) WHERE state = 'dead';
""",
}

# An item is new when its key is: the key stays until its item's history is
# purged, whether the item waits, is out, was delivered, is dead or replayed.
KEY = """
INSERT INTO outbox_keys (direction, dedup_key) VALUES (:direction, :dedup_key)
ON CONFLICT (direction, dedup_key) DO NOTHING
"""

# A new item is its user's head when the user has nothing else unfinished.
# Rows are inserted one by one in one write transaction, so each sees the ones
# before it.
INSERT = """
INSERT INTO outbox (direction, dedup_key, order_key, payload, available_at, created_at,
                    updated_at, head)
SELECT :direction, :dedup_key, :order_key, :payload, :now, :now, :now,
       NOT EXISTS (SELECT 1 FROM outbox INDEXED BY outbox_user
                   WHERE direction = :direction AND order_key = :order_key)
"""

# Only heads are claimed, and a claimed head is not due again until its lease
# runs out or it is settled: so at most one item per user is out at a time.
# The claim reads `limit` entries of `outbox_heads`, in due order.
CLAIM = """
UPDATE outbox SET available_at = :lease_until, lease = :lease, attempts = attempts + 1
WHERE id IN (
    SELECT id FROM outbox INDEXED BY outbox_heads
    WHERE direction = :direction AND head = 1 AND available_at <= :now
    ORDER BY available_at, id
    LIMIT :limit)
RETURNING id, order_key, payload, attempts, progress, created_at
"""

DUE_HEADS = """
SELECT id, order_key FROM outbox INDEXED BY outbox_heads
WHERE direction = ? AND head = 1 AND available_at <= ?
ORDER BY available_at, id
LIMIT ?
"""

# One user's items from its head on, oldest first.
USER_ITEMS = """
SELECT id, available_at FROM outbox INDEXED BY outbox_user
WHERE direction = ? AND order_key = ? AND id >= ?
ORDER BY id
LIMIT ?
"""

LEASE = """
UPDATE outbox SET available_at = ?, lease = ?, attempts = attempts + 1
WHERE id IN (SELECT value FROM json_each(?))
RETURNING id, order_key, payload, attempts, progress, created_at
"""

RETRY = """
UPDATE outbox SET available_at = ?, last_error = ?, progress = ?, attempts = ?, lease = NULL,
                  updated_at = ?
WHERE id = ?
"""

FINISH = """
INSERT INTO outbox_history (id, direction, dedup_key, order_key, payload, state, attempts,
                            progress, last_error, created_at, updated_at)
SELECT id, direction, dedup_key, order_key, payload, ?, ?, ?, ?, created_at, ?
FROM outbox WHERE id = ?
"""

FIRST_OF_USER = """
SELECT id FROM outbox INDEXED BY outbox_user
WHERE direction = ? AND order_key = ?
ORDER BY id
LIMIT 1
"""

# The head the user had before a replay: only replayed items can sort before
# it, so the scan stops after those.
HEAD_OF_USER = """
SELECT id FROM outbox INDEXED BY outbox_user
WHERE direction = ? AND order_key = ? AND head = 1
ORDER BY id
LIMIT 1
"""

COUNT = """
INSERT INTO outbox_counts (direction, state, n) VALUES (?, ?, ?)
ON CONFLICT (direction, state) DO UPDATE SET n = n + excluded.n
"""

COUNTS = """
SELECT direction, state, n FROM outbox_counts WHERE n != 0
UNION ALL
SELECT direction, :in_flight, sum(n) FROM outbox_leases
WHERE until > :now AND n > 0
GROUP BY direction
"""

OLDEST = """
SELECT c.direction,
       (SELECT min(created_at) FROM outbox INDEXED BY outbox_age
        WHERE outbox.direction = c.direction AND head = 1)
FROM (SELECT DISTINCT direction FROM outbox_counts) AS c
"""

DEAD_ITEMS = """
SELECT id, direction, order_key, attempts, last_error, created_at, updated_at, payload
FROM outbox_history INDEXED BY outbox_history_dead
WHERE state = 'dead' AND (:direction IS NULL OR direction = :direction)
ORDER BY id
LIMIT :limit
"""

# Replayed work keeps its id, so it goes back in its place in its user's order.
REPLAY = """
INSERT INTO outbox (id, direction, dedup_key, order_key, payload, attempts, progress,
                    available_at, lease, last_error, created_at, updated_at, head)
SELECT id, direction, dedup_key, order_key, payload, 0, progress, :now, NULL, last_error,
       created_at, :now, 0
FROM outbox_history WHERE id IN (SELECT value FROM json_each(:ids))
"""

PURGE = """
DELETE FROM outbox_history WHERE id IN (
    SELECT id FROM outbox_history INDEXED BY outbox_history_delivered
    WHERE state = 'delivered' AND updated_at < ?
    LIMIT ?)
RETURNING direction, dedup_key
"""

# A purged item's key is forgotten with it: the same message would be new work.
FORGET = "DELETE FROM outbox_keys WHERE direction = ? AND dedup_key = ?"

# Replay and purge work in batches, each its own transaction, so a large one
# does not hold the write lock (and ingest) for long.
BATCH = 1000


class _Enqueue:
    """One caller's rows waiting for a group commit, and what became of them."""

    def __init__(self, direction: str, rows: list[dict]):
        self.direction = direction
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
        # A missing folder is a mistake in DATABASE_URL or a volume that is
        # not mounted: creating it would hide that, and the outbox would live
        # where no one looks (and be lost with the container).
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise StoreError(
                f"cannot open the SQLite outbox: the folder {directory} does not exist"
            )
        try:
            # Autocommit mode: transactions are opened explicitly below.
            conn = sqlite3.connect(
                self.path, timeout=10, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout = 10000")
            # Turning a file to WAL needs it to itself; a process doing so
            # while another (holding the write lock) waits for it to finish
            # reading is a deadlock SQLite breaks by failing one of them. So
            # it takes its turn like a write. (A no-op once the file is WAL.)
            with self._write_lock, self._between_processes():
                conn.execute("PRAGMA journal_mode = WAL")
            # FULL makes each commit durable across power loss, not only a
            # process crash: an acknowledged message must survive both.
            conn.execute("PRAGMA synchronous = FULL")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the SQLite outbox: {exc}") from exc
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        # Under the write lock (between processes too): several processes
        # starting at once migrate one after the other, and each reads the
        # version only once it holds the lock, so a migration runs once.
        with self._write(conn):
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            for target in range(version + 1, SCHEMA_VERSION + 1):
                # Not executescript: it would commit our open transaction first.
                for statement in filter(str.strip, MIGRATIONS[target].split(";")):
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if version < SCHEMA_VERSION:
            # A migration's transaction went through the write-ahead log whole
            # (schema 3's copies every row), and the log keeps its size until
            # the last connection closes: this gives the disk back now. In
            # turn with writes, so no writer waits in SQLite's busy handler.
            with self._write_lock, self._between_processes():
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
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
            {
                "direction": direction,
                "dedup_key": item.dedup_key,
                "order_key": item.order_key,
                "payload": json.dumps(item.payload, separators=(",", ":")),
                "now": now,
            }
            for item in items
        ]
        mine = _Enqueue(direction, rows)
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
                added: Counter[tuple[str, str]] = Counter()
                for request in group:
                    request.inserted = [_insert(conn, row) for row in request.rows]
                    added[request.direction, PENDING] += sum(request.inserted)
                _count(conn, added)
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
        # Claims are serialised by the write transaction: no other claimer can
        # take a user's head (or, with whole_runs, any item of its run) while
        # this one does.
        with self._write() as conn:
            if whole_runs:
                ids = _runs(conn, direction, limit, now)
                rows = conn.execute(LEASE, (now + lease_seconds, lease, json.dumps(ids))).fetchall()
            else:
                rows = conn.execute(
                    CLAIM,
                    {
                        "direction": direction,
                        "now": now,
                        "limit": limit,
                        "lease": lease,
                        "lease_until": now + lease_seconds,
                    },
                ).fetchall()
            # The claim's lease, for counts; and leases that ran out, forgotten.
            conn.execute("DELETE FROM outbox_leases WHERE until <= ? OR n <= 0", (now,))
            if rows:
                conn.execute(
                    "INSERT INTO outbox_leases (lease, direction, until, n) VALUES (?, ?, ?, ?)",
                    (lease, direction, now + lease_seconds, len(rows)),
                )
        return claimed_items(rows, direction, lease)

    def settle(self, settlements: Sequence[Settlement], now: float) -> None:
        if not settlements:
            return
        wanted = {s.item.id: s for s in settlements}
        with self._write() as conn:
            current = conn.execute(
                "SELECT id, lease, direction, order_key, head FROM outbox"
                " WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(wanted)),),
            ).fetchall()
            # A settlement whose lease was lost (the item was claimed again)
            # is ignored.
            held = [(row, wanted[row[0]]) for row in current if row[1] == wanted[row[0]].item.lease]
            conn.executemany(
                RETRY,
                [
                    (s.available_at, s.error, s.progress, s.attempts, now, s.item.id)
                    for _, s in held
                    if s.state == PENDING
                ],
            )
            finished = [(row, s) for row, s in held if s.state != PENDING]
            conn.executemany(
                FINISH,
                [(s.state, s.attempts, s.progress, s.error, now, s.item.id) for _, s in finished],
            )
            conn.executemany("DELETE FROM outbox WHERE id = ?", [(s.item.id,) for _, s in finished])
            # A user whose head finished has a new one: its next item, if any.
            _place_heads(conn, {(row[2], row[3]) for row, _ in finished if row[4]})
            moved: Counter[tuple[str, str]] = Counter()
            for row, s in finished:
                moved[row[2], PENDING] -= 1
                moved[row[2], s.state] += 1
            _count(conn, moved)
            conn.executemany(
                "UPDATE outbox_leases SET n = n - ? WHERE lease = ?",
                [(n, lease) for lease, n in Counter(s.item.lease for _, s in held).items()],
            )

    def counts(self, now: float) -> dict[tuple[str, str], int]:
        """From outbox_counts and outbox_leases: one statement, so one
        snapshot, a few rows read, none of them items."""
        return counted(self._read(COUNTS, {"in_flight": IN_FLIGHT, "now": now}))

    def oldest_pending(self) -> dict[str, float]:
        """One index lookup per direction (outbox_age)."""
        return {direction: oldest for direction, oldest in self._read(OLDEST) if oldest is not None}

    def dead(self, direction: str | None, limit: int) -> list[DeadItem]:
        rows = self._read(DEAD_ITEMS, {"direction": direction, "limit": limit})
        return [dead_item(row) for row in rows]

    def replay(self, ids: Sequence[int] | None, direction: str | None, now: float) -> int:
        replayed = 0
        if ids is not None:
            for start in range(0, len(ids), BATCH):
                replayed += self._replay(
                    [int(i) for i in ids[start : start + BATCH]], direction, now
                )
            return replayed
        while True:
            with self._write() as conn:
                batch = [
                    row[0]
                    for row in conn.execute(DEAD_ITEMS, {"direction": direction, "limit": BATCH})
                ]
            if not batch:
                return replayed
            replayed += self._replay(batch, direction, now)

    def _replay(self, ids: list[int], direction: str | None, now: float) -> int:
        with self._write() as conn:
            dead = conn.execute(
                "SELECT id, direction, order_key FROM outbox_history"
                " WHERE state = 'dead' AND (:direction IS NULL OR direction = :direction)"
                " AND id IN (SELECT value FROM json_each(:ids))",
                {"direction": direction, "ids": json.dumps(ids)},
            ).fetchall()
            chosen = json.dumps([row[0] for row in dead])
            conn.execute(REPLAY, {"now": now, "ids": chosen})
            conn.execute(
                "DELETE FROM outbox_history WHERE id IN (SELECT value FROM json_each(?))", (chosen,)
            )
            _reseat_heads(conn, {(row[1], row[2]) for row in dead})
            moved: Counter[tuple[str, str]] = Counter()
            for row in dead:
                moved[row[1], DEAD] -= 1
                moved[row[1], PENDING] += 1
            _count(conn, moved)
        return len(dead)

    def purge(self, delivered_before: float) -> int:
        purged = 0
        while True:
            with self._write() as conn:
                gone = conn.execute(PURGE, (delivered_before, BATCH)).fetchall()
                conn.executemany(FORGET, gone)
                deltas = Counter(direction for direction, _ in gone)
                _count(conn, Counter({(d, DELIVERED): -n for d, n in deltas.items()}))
            purged += len(gone)
            if len(gone) < BATCH:
                return purged

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


def _insert(conn: sqlite3.Connection, row: dict) -> bool:
    """Store one row unless its key is known: whether it was stored."""
    if conn.execute(KEY, row).rowcount != 1:
        return False
    conn.execute(INSERT, row)
    return True


def _runs(conn: sqlite3.Connection, direction: str, limit: int, now: float) -> list[int]:
    """Each due head's run: its user's items oldest first, up to the first one
    that is not due, taken whole until `limit` is reached, so that whatever
    the limit cuts, each user keeps a prefix of its run. Reads at most `limit`
    heads and `limit` items per user visited, and stops once it has `limit`."""
    chosen: list[int] = []
    for head, order_key in conn.execute(DUE_HEADS, (direction, now, limit)).fetchall():
        if len(chosen) >= limit:
            break
        for item, available_at in conn.execute(
            USER_ITEMS, (direction, order_key, head, limit - len(chosen))
        ):
            if available_at > now:
                break
            chosen.append(item)
    return chosen


def _place_heads(conn: sqlite3.Connection, users: Iterable[tuple[str, str]]) -> None:
    """Make each user's oldest unfinished item its head (if it has one left)."""
    for direction, order_key in users:
        conn.execute(
            f"UPDATE outbox SET head = 1 WHERE id = ({FIRST_OF_USER}) AND head = 0",
            (direction, order_key),
        )


def _reseat_heads(conn: sqlite3.Connection, users: Iterable[tuple[str, str]]) -> None:
    """After a replay: a replayed item older than its user's head becomes the
    head in its place. (An item of that user already out finishes as usual:
    the operator asked for the dead work to go again now.)"""
    for direction, order_key in users:
        (first,) = conn.execute(FIRST_OF_USER, (direction, order_key)).fetchone()
        old = conn.execute(HEAD_OF_USER, (direction, order_key)).fetchone()
        if old is not None and old[0] != first:
            conn.execute("UPDATE outbox SET head = 0 WHERE id = ?", old)
        conn.execute("UPDATE outbox SET head = 1 WHERE id = ?", (first,))


def _count(conn: sqlite3.Connection, deltas: Counter[tuple[str, str]]) -> None:
    conn.executemany(COUNT, [(d, state, n) for (d, state), n in deltas.items() if n])


__all__ = ["SQLiteStore"]
