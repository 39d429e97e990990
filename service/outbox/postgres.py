"""The shared outbox: one PostgreSQL database for every instance of the service.

Semantics are those of `SQLiteStore`, item for item, and so is the layout
(schema version 2) but for the de-duplication keys: `outbox` holds unfinished
work, each user's oldest item there marked as its head; claims read
`outbox_heads`, an index over heads alone; delivered and dead work lives in
`outbox_history`; `outbox_counts` and `outbox_leases` keep the numbers `counts`
shows. Keys are checked in the unique indexes of `outbox` and `outbox_history`
(SQLite keeps them in a table of their own; docs/service-decisions.md,
"Outbox", says why here they need not be). What differs too is that SQLite
serialises every writer, while here web processes, delivery threads and
`outbox deliver` processes on several machines write at once. The comments on `CLAIM`,
`CLAIM_RUNS` and `_lock_users` explain why one user's work still goes out one
item at a time, in order.

Settings beyond the URL:
- `max_size` (the `OUTBOX_POOL_SIZE` setting): the most connections one
  process keeps, default 16 — gunicorn's request threads (8 by default) plus
  the delivery threads, with room to spare. Multiply by the number of
  processes when sizing the server's `max_connections`.
- `timeout` keyword: seconds a caller waits for a free connection while the
  server answers (default 10). While the server does not answer, callers fail
  at once with its reason, so requests get their 503 without waiting.
- Each connection asks for `CONNECTION_DEFAULTS` (libpq: connect timeout, TCP
  keepalives) and `SESSION_DEFAULTS` (server: statement and idle-transaction
  timeouts) unless the URL sets them itself, e.g.
  `?options=-c%20statement_timeout%3D60s` or `&keepalives_idle=30`.

psycopg is imported here only: the SQLite default runs without the `postgres`
extra, and `open_store` imports this module only for a PostgreSQL URL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from service.outbox import (
    DEAD,
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
from service.redaction import redact_secrets
from service.results import Accept

log = logging.getLogger(__name__)

try:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError:  # the `postgres` extra is not installed
    psycopg = None  # type: ignore[assignment]

SCHEMA_VERSION = 2

# Any constant of our own: it only has to differ from other users' advisory
# locks in the same database. The one-bigint form used for order keys below is
# a separate lock space from this two-integer form, so they never collide.
SCHEMA_LOCK = (0x7665726F, 1)

DEFAULT_POOL_SIZE = 16
DEFAULT_TIMEOUT = 10.0
# How long one wait for a connection lasts before we look whether the server
# has refused us in the meantime (see `_getconn`).
WAIT_SLICE = 0.2
# A shorter give-up than psycopg_pool's five minutes: once the pool stops
# retrying in the background, the next caller starts a fresh attempt, so the
# service notices a server that came back within about this long.
RECONNECT_TIMEOUT = 30.0

# libpq settings for each connection, where the URL does not set them. Without
# a connect timeout libpq waits on a silent host as long as the operating
# system does, minutes; without keepalives a connection whose network went
# silent waits for an answer for as long (the kernel's default is two hours
# before the first probe). Here a silent peer is given up on after about 25 s:
# 10 s of silence, then three probes 5 s apart; tcp_user_timeout does the same
# for data sent and never acknowledged.
CONNECTION_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 25_000,  # milliseconds
    "application_name": "vero-bridge",
}
# Server settings for each session, where the URL's `options` (or PGOPTIONS)
# do not set them. Every statement of ours takes milliseconds; 15 s is far
# beyond any of them and within a lease, so a runaway or stuck one is cut off
# (and the server stops working on it) instead of holding a connection and its
# locks for minutes. Replay and purge work in batches to stay far below it, and
# the migration lifts it for itself. A transaction of ours never waits for
# anything but the database, so one idle for 30 s belongs to a process that
# froze or lost its network: the server ends it and releases its locks.
SESSION_DEFAULTS = {
    "statement_timeout": "15s",
    "idle_in_transaction_session_timeout": "30s",
    # No statement of ours wants a sequential or bitmap scan, a sort, or a
    # hash or merge join: each reads a few index entries, in index order, and
    # reaches rows by index or by ctid. Turned off (made the last resort),
    # the planner has one plan left for each, whatever the statistics say:
    # stale ones had a claim scan the whole primary key per call, missing ones
    # a claim read every due head into a bitmap and sort it. The migration
    # turns them back on for itself.
    "enable_seqscan": "off",
    "enable_bitmapscan": "off",
    "enable_sort": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
    # A turned-off node still counts, at a cost far above jit_above_cost: a
    # count over a table of ten rows spent 110 ms compiling itself.
    "jit": "off",
}

# Migrations by the version they lead to; each runs in the transaction that
# records its version, under SCHEMA_LOCK.
MIGRATIONS = {
    1: """
CREATE TABLE IF NOT EXISTS outbox (
    id           bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    direction    text             NOT NULL,
    dedup_key    text             NOT NULL,
    order_key    text             NOT NULL,
    -- text, not jsonb: jsonb refuses the \\u0000 escape that valid JSON may
    -- hold (the message would then fail with 503 forever), and reorders keys.
    payload      text             NOT NULL,
    state        text             NOT NULL DEFAULT 'pending',
    attempts     integer          NOT NULL DEFAULT 0,
    progress     integer          NOT NULL DEFAULT 0,
    available_at double precision NOT NULL,
    lease        text,
    last_error   text,
    created_at   double precision NOT NULL,
    updated_at   double precision NOT NULL,
    UNIQUE (direction, dedup_key)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (direction, available_at, id)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_user ON outbox (direction, order_key, id)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_finished ON outbox (state, updated_at)
    WHERE state != 'pending';
CREATE TABLE IF NOT EXISTS outbox_probe (
    id         integer PRIMARY KEY,
    checked_at double precision NOT NULL
);
""",
    # The old table, with everything ever stored, becomes the history, and the
    # unfinished work moves to a new `outbox`: so the upgrade copies only the
    # backlog, not a week of delivered work, and the table claims read starts
    # without the dead row versions a million deleted rows would leave in it
    # until a vacuum. Ids go on from the old sequence, so new work never
    # takes a history id; leases are kept, so work in flight at the upgrade
    # is settled as usual.
    2: """
ALTER TABLE outbox RENAME TO outbox_history;
-- Nothing looks history up by id but replay, which the partial index of dead
-- work below serves; without this key, that index is the only one in id order,
-- so listing dead work cannot be planned as a walk through all of history.
ALTER TABLE outbox_history DROP CONSTRAINT outbox_pkey;
ALTER TABLE outbox_history RENAME CONSTRAINT outbox_direction_dedup_key_key
    TO outbox_history_direction_dedup_key_key;
ALTER SEQUENCE outbox_id_seq RENAME TO outbox_history_id_seq;
CREATE TABLE outbox (
    id           bigint GENERATED BY DEFAULT AS IDENTITY,
    direction    text             NOT NULL,
    dedup_key    text             NOT NULL,
    order_key    text             NOT NULL,
    payload      text             NOT NULL,
    attempts     integer          NOT NULL DEFAULT 0,
    progress     integer          NOT NULL DEFAULT 0,
    available_at double precision NOT NULL,
    lease        text,
    last_error   text,
    created_at   double precision NOT NULL,
    updated_at   double precision NOT NULL,
    head         boolean          NOT NULL DEFAULT false,
    -- A user's items in order. Every lookup of a row goes through this index
    -- (settlements carry the user), and no other index can serve one: none
    -- is on id alone, the others are partial over what a lookup does not ask
    -- for, and de-duplication's is on an expression. With statistics that say
    -- the table is empty, every index able to serve a lookup looks as cheap as
    -- this one, and the planner took one that meant walking it whole.
    PRIMARY KEY (direction, order_key, id)
);
-- One item per direction and key. (A direction's name holds no ':', so the
-- expression tells every pair apart.)
CREATE UNIQUE INDEX outbox_dedup ON outbox ((direction || ':' || dedup_key));
SELECT setval(pg_get_serial_sequence('outbox', 'id'), last_value, is_called)
    FROM outbox_history_id_seq;
ALTER TABLE outbox_history ALTER COLUMN id DROP IDENTITY;
INSERT INTO outbox (id, direction, dedup_key, order_key, payload, attempts, progress,
                    available_at, lease, last_error, created_at, updated_at)
    SELECT id, direction, dedup_key, order_key, payload, attempts, progress, available_at,
           lease, last_error, created_at, updated_at
    FROM outbox_history WHERE state = 'pending';
DELETE FROM outbox_history WHERE state = 'pending';
DROP INDEX outbox_due, outbox_user, outbox_finished;
ALTER TABLE outbox_history
    DROP COLUMN available_at,
    DROP COLUMN lease,
    ALTER COLUMN state DROP DEFAULT,
    ALTER COLUMN attempts DROP DEFAULT,
    ALTER COLUMN progress DROP DEFAULT;
UPDATE outbox SET head = true
    WHERE (direction, order_key, id) IN
          (SELECT direction, order_key, min(id) FROM outbox GROUP BY direction, order_key);
CREATE INDEX outbox_heads ON outbox (direction, available_at, id) WHERE head;
-- The oldest unfinished item of a direction is some user's head.
CREATE INDEX outbox_age ON outbox (direction, created_at) WHERE head;
CREATE INDEX outbox_history_delivered ON outbox_history (updated_at)
    WHERE state = 'delivered';
CREATE INDEX outbox_history_dead ON outbox_history (id) WHERE state = 'dead';
-- Counts are spread over slots (one per connection, by its process id) so
-- that connections committing at once do not wait for each other's row.
CREATE TABLE outbox_counts (
    direction text    NOT NULL,
    state     text    NOT NULL,
    slot      integer NOT NULL,
    n         bigint  NOT NULL,
    PRIMARY KEY (direction, state, slot)
);
INSERT INTO outbox_counts (direction, state, slot, n)
    SELECT direction, 'pending', 0, count(*) FROM outbox GROUP BY direction
    UNION ALL
    SELECT direction, state, 0, count(*) FROM outbox_history GROUP BY direction, state;
-- One row per claim: how many of its items are still out, and until when. In
-- flight is the sum over unexpired leases, read without touching outbox.
CREATE TABLE outbox_leases (
    lease     text             PRIMARY KEY,
    direction text             NOT NULL,
    until     double precision NOT NULL,
    n         integer          NOT NULL
);
INSERT INTO outbox_leases (lease, direction, until, n)
    SELECT lease, direction, max(available_at), count(*) FROM outbox
    WHERE lease IS NOT NULL GROUP BY lease, direction;
""",
}

# The end of both claims: lease the chosen rows (by ctid), record the lease
# (`outbox_leases`, for counts) and forget leases that ran out.
LEASED = """,
leased AS (
    UPDATE outbox SET available_at = %(lease_until)s, lease = %(lease)s,
                      attempts = attempts + 1
    WHERE ctid = ANY(ARRAY(SELECT ctid FROM {rows}))
    RETURNING id, order_key, payload, attempts, progress, created_at),
expired AS (
    -- SKIP LOCKED: a late settler may be counting one of these down; the
    -- claim does not wait for it (nor it for the claim, which may hold its row).
    DELETE FROM outbox_leases WHERE lease IN (
        SELECT lease FROM outbox_leases WHERE until <= %(now)s OR n <= 0
        FOR UPDATE SKIP LOCKED)),
recorded AS (
    INSERT INTO outbox_leases (lease, direction, until, n)
    SELECT %(lease)s, %(direction)s, %(lease_until)s, count(*) FROM leased
    HAVING count(*) > 0)
SELECT * FROM leased"""

# Why one user's items never overlap, with claimers, settlers and enqueuers in
# several processes at READ COMMITTED:
# - Only heads are claimed, and each user has exactly one head, its oldest
#   unfinished item: heads change only under the user's advisory lock (see
#   `_lock_users`), taken by enqueue, settle and replay alike.
# - A claimed head stays the head until its settlement commits, and a lease is
#   an `available_at` in the future: so no claim sees that user's work as due
#   until then, whether its snapshot is older or newer than the claim's.
# - Two claimers wanting the same head: SKIP LOCKED makes the second pass over
#   it instead of waiting. If the first has already committed when the second
#   reaches the row, PostgreSQL re-checks the row's new version, whose
#   `available_at` is now the lease's end: skipped.
# - A head settled between the claimer's snapshot and its lock is re-checked the
#   same way: finished (deleted), backing off, or replaced by a replayed older
#   item (no longer `head`), it no longer qualifies.
# What it costs: one range scan of `outbox_heads` in due order, reading `limit`
# live entries (plus, on a table no vacuum has visited yet, entries of rows
# already gone, which the scan marks dead and then skips), and the locked rows
# updated by their ctid: no join for the planner to choose (see
# SESSION_DEFAULTS), nothing behind the heads read, whatever the statistics.
# (A row whose locked version is newer than the statement's snapshot, which
# only a concurrent release can make due, is not updated, so not claimed: it
# waits for the next claim.)
CLAIM = f"""
WITH chosen AS (
    SELECT ctid FROM outbox
    WHERE direction = %(direction)s AND head AND available_at <= %(now)s
    ORDER BY available_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED)
{LEASED.format(rows="chosen")}"""

# Run claims (whole_runs, as in sqlite.py: each due head's run of due items,
# oldest first, up to the first one that is not due) start from heads in the
# same way, so the argument above holds for them too: a user's run is reached
# only through its head, which one claim at a time can lock and lease. Two run
# claims may therefore run at once (they no longer take turns on a lock): the
# second skips or re-checks every head the first took.
# - The items behind a head are locked with NOWAIT: the head's lock keeps every
#   other claimer away from them, so only a settler whose lease ran out can
#   hold one, and then the claim gives up for this round (lock_not_available)
#   rather than wait in an order that could deadlock or cut a run short.
#   Locking also gives the run's rows as they are now, not as in the snapshot.
# - Each head's lateral reads at most `limit` of its user's items through the
#   primary key, and the outer LIMIT stops pulling heads once `limit` items are
#   taken (no ORDER BY above the join, which would make it evaluate every
#   lateral first). Without that ORDER BY the rows arrive per head, each run
#   oldest first, so however the limit cuts the stream, each user keeps a
#   prefix of its run.
CLAIM_RUNS = f"""
WITH heads AS (
    SELECT id, order_key FROM outbox
    WHERE direction = %(direction)s AND head AND available_at <= %(now)s
    ORDER BY available_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED),
runs AS (
    SELECT run.ctid FROM heads CROSS JOIN LATERAL (
        SELECT ctid FROM (
            SELECT ctid, bool_and(available_at <= %(now)s) OVER (ORDER BY id) AS unbroken
            FROM (SELECT x.ctid, x.id, x.available_at FROM outbox AS x
                  WHERE x.direction = %(direction)s AND x.order_key = heads.order_key
                    AND x.id >= heads.id
                  ORDER BY x.id
                  LIMIT %(limit)s
                  FOR UPDATE NOWAIT) AS items) AS flagged
        WHERE unbroken) AS run
    LIMIT %(limit)s)
{LEASED.format(rows="runs")}"""

# The statements below never join a table to the arrays they are given: a
# join's sides can be swapped by the planner, and with statistics that say
# `outbox` is empty (analyzed while it was) it scanned the whole table once per
# settlement instead of looking each row up. Instead, a lookup per given row
# (a correlated scalar subquery, which the planner never turns into a join it
# could turn inside out, as it does a LATERAL) finds each row through the
# primary key, and rows are changed by their ctid (a TID scan: with sequential scans
# turned off and no index on ctid, nothing else can be chosen).
#
# New rows are inserted as heads of nothing; ENQUEUED then makes each user's
# oldest item its head where it has none. Duplicates of delivered or dead work
# are recognised in history.
INSERT = """
INSERT INTO outbox (direction, dedup_key, order_key, payload, available_at, created_at, updated_at)
SELECT %(direction)s, new.dedup_key, new.order_key, new.payload, %(now)s, %(now)s, %(now)s
FROM unnest(%(dedup_keys)s::text[], %(order_keys)s::text[], %(payloads)s::text[])
     WITH ORDINALITY AS new (dedup_key, order_key, payload, position)
WHERE (SELECT 1 FROM outbox_history AS h
       WHERE h.direction = %(direction)s AND h.dedup_key = new.dedup_key) IS NULL
ORDER BY new.position
ON CONFLICT ((direction || ':' || dedup_key)) DO NOTHING
RETURNING id, ctid, dedup_key
"""

# A user's oldest item, as a ctid to update it by: one entry of the primary key.
FIRST_OF_USER = """
(SELECT x.ctid FROM outbox AS x
 WHERE x.direction = u.direction AND x.order_key = u.order_key {also}
 ORDER BY x.id
 LIMIT 1)"""

# Items move to history at settlement, so a duplicate may find its original
# in neither table: the INSERT's snapshot predates the move, and its unique
# check waits for the moving transaction and then finds the row gone. A later
# statement's snapshot includes the move, so this one takes such rows back out
# (`duplicate`) before anything else sees them; then each user's oldest item
# becomes its head if it is not yet (a no-op for a user whose head is older
# than the new rows), and the count of pending work grows.
ENQUEUED = f"""
WITH duplicate AS (
    DELETE FROM outbox AS o
    WHERE o.ctid = ANY(%(ctids)s::tid[])
      AND (SELECT 1 FROM outbox_history AS h
           WHERE h.direction = o.direction AND h.dedup_key = o.dedup_key) IS NOT NULL
    RETURNING o.id),
first AS (
    SELECT {FIRST_OF_USER.format(also="AND x.id NOT IN (SELECT id FROM duplicate)")} AS ctid
    FROM unnest(%(head_directions)s::text[], %(head_order_keys)s::text[])
        AS u (direction, order_key)),
headed AS (
    UPDATE outbox SET head = true
    WHERE ctid = ANY(ARRAY(SELECT ctid FROM first)) AND NOT head),
counted AS (
    INSERT INTO outbox_counts (direction, state, slot, n)
    SELECT %(direction)s, 'pending', mod(pg_backend_pid(), 64), %(inserted)s - count(*)
    FROM duplicate
    ON CONFLICT (direction, state, slot) DO UPDATE SET n = outbox_counts.n + EXCLUDED.n)
SELECT id FROM duplicate
"""

# A settlement applies only while its lease holds: the row is looked up with
# it, and a row changed since (claimed again) has a new version, whose ctid no
# longer matches. Finished items move to history; the lease's count of items
# out goes down. Returns the finished rows, for their users' new heads and
# the counts.
SETTLE = """
WITH s AS (
    SELECT * FROM unnest(%(directions)s::text[], %(order_keys)s::text[], %(ids)s::bigint[],
                         %(leases)s::text[], %(states)s::text[], %(available_at)s::float8[],
                         %(errors)s::text[], %(progress)s::int[], %(attempts)s::int[])
        AS s (direction, order_key, id, lease, state, available_at, error, progress, attempts)),
held AS (
    SELECT s.*, (SELECT x.ctid FROM outbox AS x
                 WHERE x.direction = s.direction AND x.order_key = s.order_key AND x.id = s.id
                   AND x.lease = s.lease) AS row
    FROM s),
finished AS (
    DELETE FROM outbox USING held
    WHERE outbox.ctid = held.row AND held.state <> 'pending'
    RETURNING outbox.id, outbox.direction, outbox.dedup_key, outbox.order_key, outbox.payload,
              outbox.created_at, outbox.head, outbox.lease, held.state, held.attempts,
              held.progress, held.error),
kept AS (
    INSERT INTO outbox_history (id, direction, dedup_key, order_key, payload, state, attempts,
                                progress, last_error, created_at, updated_at)
    SELECT id, direction, dedup_key, order_key, payload, state, attempts, progress, error,
           created_at, %(now)s
    FROM finished),
retried AS (
    UPDATE outbox
    SET available_at = held.available_at, last_error = held.error, progress = held.progress,
        attempts = held.attempts, lease = NULL, updated_at = %(now)s
    FROM held
    WHERE outbox.ctid = held.row AND held.state = 'pending'
    RETURNING held.lease),
returned AS (
    UPDATE outbox_leases SET n = outbox_leases.n - back.n
    FROM (SELECT lease, count(*) AS n
          FROM (SELECT lease FROM finished UNION ALL SELECT lease FROM retried) AS settled
          GROUP BY lease) AS back
    WHERE outbox_leases.lease = back.lease)
SELECT direction, order_key, head, state, id FROM finished
"""

COUNT = """
INSERT INTO outbox_counts (direction, state, slot, n)
SELECT direction, state, mod(pg_backend_pid(), 64), n
FROM unnest(%(count_directions)s::text[], %(count_states)s::text[], %(counts)s::bigint[])
    AS c (direction, state, n)
ON CONFLICT (direction, state, slot) DO UPDATE SET n = outbox_counts.n + EXCLUDED.n
"""

# The users whose head finished get their next item as head, and the counts
# move. The next item is looked for after the finished head: on a table no
# vacuum has visited, the user's delivered items are still index entries before
# it, and a heavy user's thousands would be walked once per settlement.
SETTLED = f"""
WITH first AS (
    SELECT {FIRST_OF_USER.format(also="AND x.id > u.after")} AS ctid
    FROM unnest(%(head_directions)s::text[], %(head_order_keys)s::text[], %(after)s::bigint[])
        AS u (direction, order_key, after)),
headed AS (
    UPDATE outbox SET head = true
    WHERE ctid = ANY(ARRAY(SELECT ctid FROM first)) AND NOT head)
{COUNT}"""

COUNTS = """
SELECT direction, state, sum(n)::bigint FROM outbox_counts GROUP BY direction, state
UNION ALL
SELECT direction, %(in_flight)s, sum(n)::bigint FROM outbox_leases
WHERE until > %(now)s AND n > 0
GROUP BY direction
"""

OLDEST = """
SELECT c.direction,
       (SELECT x.created_at FROM outbox AS x WHERE x.direction = c.direction AND x.head
        ORDER BY x.created_at LIMIT 1)
FROM (SELECT DISTINCT direction FROM outbox_counts) AS c
"""

DEAD_ITEMS = """
SELECT id, direction, order_key, attempts, last_error, created_at, updated_at, payload
FROM outbox_history
WHERE state = 'dead' AND (%(direction)s::text IS NULL OR direction = %(direction)s)
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
ORDER BY id
LIMIT %(limit)s
"""

# Replayed work keeps its id, so it goes back in its place in its user's order.
REPLAY = """
WITH moved AS (
    DELETE FROM outbox_history WHERE id = ANY(%(ids)s) AND state = 'dead'
    RETURNING id, direction, dedup_key, order_key, payload, progress, last_error, created_at)
INSERT INTO outbox (id, direction, dedup_key, order_key, payload, attempts, progress,
                    available_at, lease, last_error, created_at, updated_at, head)
SELECT id, direction, dedup_key, order_key, payload, 0, progress, %(now)s, NULL, last_error,
       created_at, %(now)s, false
FROM moved
RETURNING direction, order_key
"""

# A replayed item older than its user's head becomes the head in its place (the
# old head is found after the replayed items, the only ones that can sort
# before it). An item of that user already out finishes as usual: the operator
# asked for the dead work to go again now.
REPLAYED = f"""
WITH seats AS (
    SELECT {FIRST_OF_USER.format(also="AND x.head")} AS old, {FIRST_OF_USER.format(also="")} AS new
    FROM unnest(%(head_directions)s::text[], %(head_order_keys)s::text[])
        AS u (direction, order_key)),
unseated AS (
    UPDATE outbox SET head = false
    WHERE ctid = ANY(ARRAY(SELECT old FROM seats WHERE old IS DISTINCT FROM new))),
seated AS (
    UPDATE outbox SET head = true
    WHERE ctid = ANY(ARRAY(SELECT new FROM seats WHERE old IS DISTINCT FROM new)))
{COUNT}"""

PURGE = """
WITH gone AS (
    DELETE FROM outbox_history WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM outbox_history
        WHERE state = 'delivered' AND updated_at < %(before)s
        LIMIT %(batch)s))
    RETURNING direction),
counted AS (
    INSERT INTO outbox_counts (direction, state, slot, n)
    SELECT direction, 'delivered', mod(pg_backend_pid(), 64), -count(*) FROM gone
    GROUP BY direction
    ON CONFLICT (direction, state, slot) DO UPDATE SET n = outbox_counts.n + EXCLUDED.n)
SELECT count(*) FROM gone
"""

# The tables claims and settlements churn through are vacuumed by the store
# itself, in the background, after every VACUUM_EVERY settlements in a process.
# A claim scans `outbox_heads` from its oldest entry, and every delivered item
# leaves index entries there (and in its user's part of the primary key) that
# only a vacuum removes: without one, a drain of a million slowed from 13,000
# to 1,500 items/s as it went. Autovacuum's default threshold (50 rows plus a
# fifth of the table) lets a million-row backlog leave 200,000 dead rows before
# it starts, and some servers run without it. One such VACUUM took 0.15-0.9 s
# on a million-row table; SKIP_LOCKED leaves it to whichever process is at it.
VACUUM_EVERY = 25_000
VACUUMED = "outbox, outbox_leases, outbox_counts"

# Replay and purge work in batches, each its own transaction, so that each
# statement stays short (see SESSION_DEFAULTS) and holds few locks.
BATCH = 1000


class _ServerHealth:
    """What the pool's last attempt to connect said: None after a success, else
    the reason (already stripped of the password)."""

    def __init__(self) -> None:
        self.down_reason: str | None = None


class PostgresStore:
    def __init__(
        self,
        url: str,
        *,
        max_size: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        vacuum_every: int = VACUUM_EVERY,
    ):
        if psycopg is None:
            raise StoreError(
                "DATABASE_URL names PostgreSQL, but its driver is not installed:"
                " install vero-bridge[postgres]"
            )
        self._password, self.where, settings = _parse(url)
        pool_log = logging.getLogger("psycopg.pool")
        if pool_log.level == logging.NOTSET:
            # The pool logs every connection lent and returned at INFO, the
            # service's level: lines per request. Its warnings (a failed
            # connect, with libpq's reason) still show.
            pool_log.setLevel(logging.WARNING)
        self.timeout = timeout
        self._health = _ServerHealth()
        kwargs = _connection_kwargs(settings, os.environ.get("PGOPTIONS", ""))
        self._url, self._kwargs = url, kwargs
        self._pool = ConnectionPool(
            url,
            kwargs=kwargs,
            connection_class=_reporting_connection(self._health, self._redact),
            min_size=1,
            max_size=max_size or DEFAULT_POOL_SIZE,
            open=False,
            # A connection from before a server restart fails this check and is
            # replaced, instead of failing the caller's statement.
            check=ConnectionPool.check_connection,
            reconnect_timeout=RECONNECT_TIMEOUT,
            name="vero-bridge-outbox",
        )
        self._open_lock = threading.Lock()
        self._opened = False
        self._ready = False
        # See VACUUM_EVERY; guarded by _vacuum_lock.
        self._vacuum_lock = threading.Lock()
        self.vacuum_every = vacuum_every
        self._settled_since_vacuum = 0
        self._vacuuming = False
        self._may_vacuum = True

    # -- connections -------------------------------------------------------

    def _redact(self, text: str) -> str:
        return redact_secrets(" ".join(text.split()), (self._password,))

    def _failure(self, doing: str, exc: BaseException) -> StoreError:
        return StoreError(
            f"the PostgreSQL outbox at {self.where} cannot be {doing}: {self._redact(str(exc))}"
        )

    def _open_pool(self) -> None:
        # Opened on first use, not in __init__: the app is built before
        # gunicorn's workers exist in some setups, and the pool's threads must
        # belong to the process that uses them. wait=False: a server that is
        # down must not hold up the start.
        with self._open_lock:
            if not self._opened:
                self._pool.open(wait=False)
                self._opened = True

    def _getconn(self):
        """A connection from the pool. Waits while every connection is busy,
        but fails at once, with the server's reason, while it does not answer:
        a request then gets its 503 without tying up a thread for the timeout."""
        try:
            self._open_pool()
        except psycopg.Error as exc:  # closed for good
            raise self._failure("reached", exc) from None
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                return self._pool.getconn(timeout=max(min(WAIT_SLICE, remaining), 0.001))
            except PoolTimeout:
                reason = self._health.down_reason
                if reason is not None:
                    raise StoreError(f"no PostgreSQL answers at {self.where}: {reason}") from None
                if remaining <= WAIT_SLICE:
                    raise StoreError(
                        f"no connection to the PostgreSQL outbox at {self.where}"
                        f" came free within {self.timeout:g}s"
                    ) from None
            except psycopg.Error as exc:  # closed meanwhile
                raise self._failure("reached", exc) from None

    @contextmanager
    def _transaction(self, doing: str) -> Iterator[Any]:
        """One transaction on a pooled connection; `doing` names it in errors."""
        conn = self._getconn()
        try:
            if not self._ready:
                self._ensure_schema(conn)
            with conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise self._failure(doing, exc) from exc
        finally:
            self._pool.putconn(conn)

    def _ensure_schema(self, conn) -> None:
        # The common case, a current schema, needs no lock and no write, so a
        # read-only server still serves reads (and check() says it is read-only).
        if _schema_version(conn) < SCHEMA_VERSION:
            with conn.transaction():
                # A migration takes as long as the data it moves (and others
                # wait for it): no statement timeout for this transaction, and
                # the planner's whole choice for its bulk statements.
                conn.execute("SET LOCAL statement_timeout = 0")
                for name in SESSION_DEFAULTS:
                    if name.startswith("enable_"):
                        conn.execute(f"SET LOCAL {name} = on")
                # Several processes start at once: CREATE ... IF NOT EXISTS
                # alone is not safe against a concurrent CREATE of the same
                # table, so they take turns; the lock ends with the transaction.
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", SCHEMA_LOCK)
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS outbox_schema ("
                    " one boolean PRIMARY KEY DEFAULT true CHECK (one),"
                    " version integer NOT NULL)"
                )
                version = _schema_version(conn)  # another process may have gone first
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    conn.execute(MIGRATIONS[target])
                if version < SCHEMA_VERSION:
                    conn.execute(
                        "INSERT INTO outbox_schema (version) VALUES (%s)"
                        " ON CONFLICT (one) DO UPDATE SET version = EXCLUDED.version",
                        (SCHEMA_VERSION,),
                    )
        self._ready = True

    def _read(self, sql: str, params: dict | tuple = ()) -> list[tuple]:
        with self._transaction("read") as conn:
            return conn.execute(sql, params).fetchall()

    # -- the Store interface -----------------------------------------------

    def enqueue(self, direction: str, items: Sequence[Accept], now: float) -> list[bool]:
        if not items:
            return []
        with self._transaction("written") as conn:
            _lock_users(conn, [(direction, item.order_key) for item in items])
            rows = conn.execute(
                INSERT,
                {
                    "direction": direction,
                    "now": now,
                    "dedup_keys": [item.dedup_key for item in items],
                    "order_keys": [item.order_key for item in items],
                    "payloads": [json.dumps(item.payload, separators=(",", ":")) for item in items],
                },
            ).fetchall()
            duplicates: set[int] = set()
            if rows:
                users = sorted({(direction, item.order_key) for item in items})
                duplicates = {
                    id_
                    for (id_,) in conn.execute(
                        ENQUEUED,
                        {
                            "direction": direction,
                            "ctids": [str(ctid) for _, ctid, _ in rows],
                            "inserted": len(rows),
                            **_users(users),
                        },
                    )
                }
        # Rows go in in the order given, so where a key comes twice the first
        # is the one stored.
        stored = {key for id_, _, key in rows if id_ not in duplicates}
        inserted, seen = [], set()
        for item in items:
            inserted.append(item.dedup_key in stored and item.dedup_key not in seen)
            seen.add(item.dedup_key)
        return inserted

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
        try:
            with self._transaction("written") as conn:
                rows = conn.execute(CLAIM_RUNS if whole_runs else CLAIM, params).fetchall()
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.errors.LockNotAvailable):
                return []  # a late settler holds part of a run (see CLAIM_RUNS): next round
            raise
        return claimed_items(rows, direction, lease)

    def settle(self, settlements: Sequence[Settlement], now: float) -> None:
        if not settlements:
            return
        by_id = {s.item.id: s for s in settlements}
        chosen = list(by_id.values())
        with self._transaction("written") as conn:
            _lock_users(conn, [(s.item.direction, s.item.order_key) for s in chosen])
            finished = conn.execute(
                SETTLE,
                {
                    "now": now,
                    "directions": [s.item.direction for s in chosen],
                    "order_keys": [s.item.order_key for s in chosen],
                    "ids": [s.item.id for s in chosen],
                    "leases": [s.item.lease for s in chosen],
                    "states": [str(s.state) for s in chosen],
                    "available_at": [s.available_at for s in chosen],
                    "errors": [s.error for s in chosen],
                    "progress": [s.progress for s in chosen],
                    "attempts": [s.attempts for s in chosen],
                },
            ).fetchall()
            if finished:
                moved: Counter[tuple[str, str]] = Counter()
                for direction, _, _, state, _ in finished:
                    moved[direction, PENDING] -= 1
                    moved[direction, state] += 1
                # (Run items finished with their head are after it anyway.)
                heads = sorted((d, key, id_) for d, key, was_head, _, id_ in finished if was_head)
                conn.execute(
                    SETTLED,
                    {
                        **_users([(d, key) for d, key, _ in heads]),
                        "after": [id_ for *_, id_ in heads],
                        **_deltas(moved),
                    },
                )
        self._count_towards_vacuum(len(chosen))

    def _count_towards_vacuum(self, settled: int) -> None:
        with self._vacuum_lock:
            self._settled_since_vacuum += settled
            if (
                self._settled_since_vacuum < self.vacuum_every
                or self._vacuuming
                or not self._may_vacuum
            ):
                return
            self._settled_since_vacuum = 0
            self._vacuuming = True
        threading.Thread(target=self._vacuum, name="outbox-vacuum", daemon=True).start()

    def _vacuum(self) -> None:
        """VACUUM the churned tables on a connection of its own (not one of the
        pool's, which serve requests), without the statement timeout."""
        try:
            with psycopg.connect(self._url, **self._kwargs) as conn:
                conn.execute("SET statement_timeout = 0")
                conn.execute(f"VACUUM (SKIP_LOCKED) {VACUUMED}")
        except psycopg.errors.InsufficientPrivilege as exc:
            # Not the tables' owner: autovacuum (or the operator) has to do it.
            self._may_vacuum = False
            log.warning("cannot vacuum the outbox's tables: %s", self._redact(str(exc)))
        except psycopg.Error as exc:
            log.warning("vacuuming the outbox's tables failed: %s", self._redact(str(exc)))
        finally:
            with self._vacuum_lock:
                self._vacuuming = False

    def counts(self, now: float) -> dict[tuple[str, str], int]:
        """From outbox_counts and outbox_leases: one statement, so one
        snapshot, a few rows read, none of them items."""
        return counted(self._read(COUNTS, {"in_flight": IN_FLIGHT, "now": now}))

    def oldest_pending(self) -> dict[str, float]:
        """One index lookup per direction (outbox_age)."""
        return {direction: oldest for direction, oldest in self._read(OLDEST) if oldest is not None}

    def dead(self, direction: str | None, limit: int) -> list[DeadItem]:
        rows = self._read(DEAD_ITEMS, {"direction": direction, "ids": None, "limit": limit})
        return [dead_item(row) for row in rows]

    def replay(self, ids: Sequence[int] | None, direction: str | None, now: float) -> int:
        replayed = 0
        if ids is not None:
            wanted = [int(i) for i in ids]
            for start in range(0, len(wanted), BATCH):
                replayed += self._replay(wanted[start : start + BATCH], direction, now)
            return replayed
        while batch := self._replay(None, direction, now):
            replayed += batch
        return replayed

    def _replay(self, ids: list[int] | None, direction: str | None, now: float) -> int:
        """Replay up to BATCH dead items (of `ids`, if given) in one transaction."""
        with self._transaction("written") as conn:
            chosen = conn.execute(
                DEAD_ITEMS, {"direction": direction, "ids": ids, "limit": BATCH}
            ).fetchall()
            if not chosen:
                return 0
            _lock_users(conn, [(row[1], row[2]) for row in chosen])
            # Moved only if still dead once the locks are ours.
            moved = conn.execute(REPLAY, {"ids": [row[0] for row in chosen], "now": now}).fetchall()
            if moved:
                deltas: Counter[tuple[str, str]] = Counter()
                for d, _ in moved:
                    deltas[d, DEAD] -= 1
                    deltas[d, PENDING] += 1
                conn.execute(
                    REPLAYED, {**_users(sorted(set(map(tuple, moved)))), **_deltas(deltas)}
                )
        return len(moved)

    def purge(self, delivered_before: float) -> int:
        purged = 0
        while True:
            with self._transaction("written") as conn:
                ((gone,),) = conn.execute(
                    PURGE, {"before": delivered_before, "batch": BATCH}
                ).fetchall()
            purged += gone
            if gone < BATCH:
                return purged

    def check(self, now: float) -> None:
        with self._transaction("written") as conn:
            conn.execute(
                "INSERT INTO outbox_probe (id, checked_at) VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET checked_at = EXCLUDED.checked_at",
                (now,),
            )

    def close(self) -> None:
        with self._open_lock:
            if self._opened:
                self._pool.close()
                self._opened = False


def _lock_users(conn, users: Iterable[tuple[str, str]]) -> None:
    """Hold each user's lock, (direction, order key), until commit.

    Enqueue, settle and replay take it; claims do not. It does two things:
    - Ids come from a sequence when a row is inserted, but rows become visible
      when their transaction commits, in whatever order. Without the lock, two
      requests for one user could commit ids 11 then 10: a claimer would hand
      out 11 (no older row visible yet, so 11 was made the head) and then 10
      while 11 is still out. Under the lock, a user's ids are allocated in
      commit order.
    - A user's head changes only under it. Otherwise an enqueue could see the
      old head and not make its new row the head, while a settlement that does
      not yet see the new row finishes the old head and leaves the user with
      work and no head: stuck. Under the lock, whichever goes second sees what
      the first committed (each statement after the lock takes a new snapshot).
    Taken in one statement, before any other, in sorted order (unnest keeps the
    array's order), so two transactions cannot deadlock on them; a hash
    collision only makes two users wait for each other briefly.
    """
    keys = sorted({_lock_key(direction, order_key) for direction, order_key in users})
    if keys:
        conn.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k", (keys,))


def _lock_key(direction: str, order_key: str) -> int:
    # A stable hash (Python's own differs between processes), as a signed bigint.
    digest = hashlib.blake2b(f"{direction}\0{order_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _users(users: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    return {
        "head_directions": [direction for direction, _ in users],
        "head_order_keys": [order_key for _, order_key in users],
    }


def _deltas(deltas: Counter[tuple[str, str]]) -> dict[str, list]:
    changed = [(key, n) for key, n in sorted(deltas.items()) if n]
    return {
        "count_directions": [direction for (direction, _), _ in changed],
        "count_states": [str(state) for (_, state), _ in changed],
        "counts": [n for _, n in changed],
    }


def _connection_kwargs(settings: dict[str, Any], pgoptions: str) -> dict[str, Any]:
    """What each connection asks for beyond the URL: CONNECTION_DEFAULTS the URL
    does not set, and SESSION_DEFAULTS its `options` do not set. (Given here,
    `options` replaces PGOPTIONS, so that is kept as the base when the URL has
    none.)"""
    kwargs: dict[str, Any] = {"autocommit": True}
    kwargs.update({k: v for k, v in CONNECTION_DEFAULTS.items() if k not in settings})
    given = str(settings.get("options") or pgoptions)
    named = {name.lower() for name in re.findall(r"(?:-c\s*|--)([\w.]+)\s*=", given)}
    extra = [f"-c {name}={value}" for name, value in SESSION_DEFAULTS.items() if name not in named]
    if extra:
        kwargs["options"] = " ".join([given, *extra]).strip()
    return kwargs


def _schema_version(conn) -> int:
    (exists,) = conn.execute("SELECT to_regclass('outbox_schema') IS NOT NULL").fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT version FROM outbox_schema").fetchone()
    return row[0] if row else 0


def _parse(url: str) -> tuple[str | None, str, dict[str, Any]]:
    """(password, "host:port/dbname" for messages, the URL's settings)."""
    try:
        settings = conninfo_to_dict(url)
    except psycopg.Error:
        # The parser's message may quote the URL, password and all.
        raise StoreError("DATABASE_URL is not a valid PostgreSQL URL") from None
    where = (
        f"{settings.get('host') or 'localhost'}:{settings.get('port') or 5432}"
        f"/{settings.get('dbname') or settings.get('user') or ''}"
    )
    password = settings.get("password")
    return str(password) if password else None, where, settings


def _reporting_connection(health: _ServerHealth, redact):
    """A connection class that tells `health` how each attempt to connect went:
    psycopg_pool retries in the background and keeps the reason to itself."""

    class ReportingConnection(psycopg.Connection):
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any):
            try:
                conn = super().connect(conninfo, **kwargs)
            except psycopg.Error as exc:
                health.down_reason = redact(str(exc)) or type(exc).__name__
                raise
            health.down_reason = None
            return conn

    return ReportingConnection


__all__ = ["PostgresStore"]
