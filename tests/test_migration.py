"""An outbox written by an earlier version is migrated when a store first opens
it, with nothing lost: pending, in-flight, backing-off, dead and delivered work,
every key still recognised, and no id handed out again; also when several
processes start on it at once.

The earlier versions: schema 1 (one `outbox` table with a `state` column), on
both stores; on SQLite also schema 2 (finished work in `outbox_history`, each
table with its own UNIQUE (direction, dedup_key)), which version 3 replaces by
`outbox_keys`."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pytest

from service.outbox import DEAD, DELIVERED, IN_FLIGHT, PENDING, Item, Settlement, open_store
from service.outbox import postgres as pg_store
from service.outbox import sqlite as sqlite_store
from service.results import Accept

A = "segment_to_vero"
B = "vero_to_segment"
T0 = 1_700_000_000.0
LEASE = "lease-of-a-worker-from-before-the-upgrade"

# (id, direction, dedup_key, order_key, state, attempts, progress, available_at,
#  lease, last_error, created_at, updated_at), as version 1 left them.
V1_ROWS = [
    (1, A, "a1", "alice", "delivered", 1, 1, T0, None, None, T0, T0 + 1),
    (2, A, "b1", "bob", "dead", 3, 0, T0, None, "400 bad data", T0, T0 + 2),
    (3, A, "a2", "alice", "pending", 1, 1, T0 + 30, LEASE, None, T0 + 1, T0 + 3),
    (4, A, "a3", "alice", "pending", 0, 0, T0 + 2, None, None, T0 + 2, T0 + 2),
    (5, A, "b2", "bob", "pending", 0, 0, T0 + 3, None, None, T0 + 3, T0 + 3),
    (6, A, "c1", "carol", "pending", 2, 0, T0 + 100, None, "503", T0 + 4, T0 + 5),
    (7, B, "w1", "dave", "delivered", 1, 0, T0, None, None, T0 + 5, T0 + 6),
    (8, B, "w2", "dave", "pending", 0, 0, T0 + 6, None, None, T0 + 6, T0 + 6),
    # The newest id was delivered: new work must still get a higher one.
    (9, A, "e1", "erin", "delivered", 1, 1, T0, None, None, T0 + 7, T0 + 7),
]
V1_INSERT = (
    "INSERT INTO outbox (id, direction, dedup_key, order_key, payload, state, attempts, progress,"
    " available_at, lease, last_error, created_at, updated_at)"
    " VALUES ({0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}, {0})"
)


def v1_values():
    for id_, direction, key, user, *rest in V1_ROWS:
        yield (id_, direction, key, user, f'{{"key": "{key}"}}', *rest)


def make_v1_sqlite(url: str) -> None:
    # Not in WAL mode yet, as a file no process of ours has opened: switching it
    # is part of the start, and so harder for processes starting at once.
    with sqlite3.connect(url[len("sqlite:///") :]) as conn:
        conn.executescript(sqlite_store.MIGRATIONS[1])
        conn.execute("PRAGMA user_version = 1")
        conn.executemany(V1_INSERT.format("?"), list(v1_values()))
        # As AUTOINCREMENT left it: every id handed out, the last one delivered.
        conn.execute("UPDATE sqlite_sequence SET seq = 9 WHERE name = 'outbox'")


def make_v1_postgres(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(pg_store.MIGRATIONS[1])
        conn.execute(
            "CREATE TABLE outbox_schema (one boolean PRIMARY KEY DEFAULT true CHECK (one),"
            " version integer NOT NULL)"
        )
        conn.execute("INSERT INTO outbox_schema (version) VALUES (1)")
        conn.cursor().executemany(V1_INSERT.format("%s"), list(v1_values()))
        conn.execute("SELECT setval(pg_get_serial_sequence('outbox', 'id'), 9)")


# Since the upgrade to version 2, ids up to this one were handed out,
# delivered and purged: new work must still get higher ones.
V2_LAST_ID = 12


def make_v2_sqlite(url: str) -> None:
    # The previous version made every file, new or upgraded, by migrations 1
    # and 2 in turn, and wrote it through their layout.
    make_v1_sqlite(url)
    with sqlite3.connect(url[len("sqlite:///") :]) as conn:
        for statement in filter(str.strip, sqlite_store.MIGRATIONS[2].split(";")):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 2")
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'outbox'", (V2_LAST_ID,))


@pytest.fixture(
    params=[
        ("sqlite", 1),
        ("sqlite", 2),
        pytest.param(("postgres", 1), marks=pytest.mark.postgres),
    ],
    ids=["sqlite-v1", "sqlite-v2", "postgres-v1"],
)
def old_store(request, tmp_path):
    """(URL, the highest id ever handed out) of a database that holds the
    V1_ROWS, as an earlier schema version left them."""
    kind, version = request.param
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path}/outbox.db"
        (make_v1_sqlite if version == 1 else make_v2_sqlite)(url)
        return url, 9 if version == 1 else V2_LAST_ID
    url = request.getfixturevalue("postgres_url")
    make_v1_postgres(url)
    return url, 9


def current_version(url: str) -> int:
    return (sqlite_store if url.startswith("sqlite") else pg_store).SCHEMA_VERSION


def schema_version(url: str) -> int:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///") :]) as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT version FROM outbox_schema").fetchone()[0]


def keys(items) -> list[str]:
    return [item.payload["key"] for item in items]


def delivered(items, now) -> list[Settlement]:
    return [Settlement(item, DELIVERED, now, None, item.progress, item.attempts) for item in items]


def test_everything_stored_before_the_upgrade_is_there_after_it(old_store):
    url, last_id = old_store
    store = open_store(url)
    try:
        now = T0 + 10
        assert store.counts(now) == {
            (A, DELIVERED): 2,
            (A, DEAD): 1,
            (A, IN_FLIGHT): 1,
            (A, PENDING): 3,
            (B, DELIVERED): 1,
            (B, PENDING): 1,
        }
        assert store.oldest_pending() == {A: T0 + 1, B: T0 + 6}
        assert schema_version(url) == current_version(url)

        # Every key is still known, whatever became of its item: delivered,
        # dead, in flight, waiting, backing off.
        known = ("a1", "b1", "a2", "a3", "b2", "c1", "e1")
        assert store.enqueue(A, [Accept(k, "x", {}) for k in known], now) == [False] * 7
        assert store.enqueue(B, [Accept(k, "x", {}) for k in ("w1", "w2")], now) == [False] * 2
        # A key of one direction is still new work in the other.
        assert store.enqueue(B, [Accept("a1", "x", {"key": "a1"})], now) == [True]

        # Alice's a2 is still out with the old worker, so a3 waits behind it;
        # bob's b2 goes; carol's c1 is still backing off.
        assert keys(store.claim(A, 10, 300, now)) == ["b2"]
        # The old worker settles a2 under the lease it holds: alice's a3 is next.
        a2 = Item(3, A, "alice", {"key": "a2"}, 1, 1, T0 + 1, LEASE)
        store.settle(delivered([a2], now), now)
        a3 = store.claim(A, 10, 300, now)
        assert keys(a3) == ["a3"]
        store.settle(delivered(a3, now), now)
        assert keys(store.claim(A, 10, 300, T0 + 100)) == ["c1"]
        w2, first_new = store.claim(B, 10, 30, now, whole_runs=True)
        assert keys([w2, first_new]) == ["w2", "a1"]

        # Dead work is listed as it was, and replays.
        (dead,) = store.dead(None, 10)
        assert (dead.id, dead.order_key, dead.attempts, dead.error) == (2, "bob", 3, "400 bad data")
        assert dead.payload == {"key": "b1"}
        assert store.replay(None, A, T0 + 200) == 1
        (b1,) = store.claim(A, 10, 30, T0 + 200)
        assert (b1.payload["key"], b1.attempts) == ("b1", 1)
        # Settled since the upgrade or replayed, a key is still known.
        again = [Accept(k, "x", {}) for k in ("a2", "a3", "b1")]
        assert store.enqueue(A, again, now) == [False] * 3

        # Purged, delivered work from before the upgrade is forgotten, key and
        # all, as purged work always was.
        assert store.purge(T0 + 1.5) == 1  # a1, delivered at T0 + 1
        assert store.enqueue(A, [Accept("a1", "alice", {"key": "a1"})], T0 + 200) == [True]
        assert store.enqueue(A, [Accept("e1", "erin", {})], T0 + 200) == [False]

        # New work gets ids after every id ever handed out.
        store.enqueue(A, [Accept("f1", "frank", {"key": "f1"})], T0 + 200)
        new = store.claim(A, 10, 30, T0 + 200)
        assert sorted(keys(new)) == ["a1", "f1"]
        assert min(item.id for item in [first_new, *new]) > last_id
    finally:
        store.close()


STARTER = """
import sys, time
from service.outbox import open_store
url, start_at = sys.argv[1], float(sys.argv[2])
store = open_store(url)
time.sleep(max(start_at - time.time(), 0))  # all processes begin together
store.check(time.time())
print(sorted(store.counts(%r).items()))
store.close()
"""


def test_processes_starting_at_once_migrate_once(old_store):
    url, _ = old_store
    start_at = str(time.time() + 2)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER % (T0 + 10), url, start_at],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * 5, outputs
    # Each saw the migrated store whole, whichever of them migrated it.
    seen = {out.strip() for out, _ in outputs}
    assert len(seen) == 1, seen
    store = open_store(url)
    try:
        assert str(sorted(store.counts(T0 + 10).items())) == seen.pop()
        assert sum(store.counts(T0 + 10).values()) == len(V1_ROWS)
        assert len(store.dead(None, 10)) == 1
    finally:
        store.close()
    assert schema_version(url) == current_version(url)


def sqlite_layout(url: str) -> list[tuple]:
    with sqlite3.connect(url[len("sqlite:///") :]) as conn:
        return conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()


@pytest.mark.parametrize("make", [make_v1_sqlite, make_v2_sqlite], ids=["v1", "v2"])
def test_a_migrated_sqlite_file_has_the_layout_of_a_new_one(tmp_path, make):
    for name in ("old", "new"):
        if name == "old":
            make(f"sqlite:///{tmp_path}/old.db")
        store = open_store(f"sqlite:///{tmp_path}/{name}.db")
        store.check(T0)
        store.close()
    assert sqlite_layout(f"sqlite:///{tmp_path}/old.db") == sqlite_layout(
        f"sqlite:///{tmp_path}/new.db"
    )
