"""Drain rate with a large backlog: bench/run's backlog rows (issue 10).

For each store (SQLite; PostgreSQL where one answers), each backlog shape and
each state of the planner's statistics, N items are queued straight into the
store's tables (bulk inserts: enqueueing a million through the API would take
longer than draining them) and then drained through the real Store API, the way
the delivery loop uses it: claim CLAIM_SIZE items, settle them all as
delivered (an in-process sender that succeeds at once), until nothing is left.
The rate is N over the time the drain takes.

Each figure is a ratio to the 1,000-item rate of the same store and shape with
fresh statistics, taken beside it: BASELINE_SAMPLES drains of 1,000 right
before it and as many right after, so a shared machine's swings, which last
minutes, reach both sides of the ratio. A drain of 1,000 takes a tenth of a
second, so one hiccup halves it: the baseline is the median of its drains, and
a 1,000-item figure is itself the median of REPEATS drains.

Dedup keys are random, like the messageIds real traffic has (uuid4-style,
from a seeded generator, so every run queues the same ones): sequential keys
would make every index on them cheap to write, at the end, where real keys
land anywhere.

- Shapes: A, one item each from N users; B, the first half from 20 users whose
  work built up while the upstream was down (interleaved, as it arrived), then
  one item each from N/2 new users.
- Statistics: fresh (ANALYZE after queueing); never (never analyzed); stale
  (ANALYZE after 60,000 items went through the store and were delivered, then
  the backlog queued). Autovacuum is off for the benchmark's PostgreSQL tables
  in every case, so nothing analyzes behind the measurement; what vacuuming
  there is, is the store's own (every VACUUM_EVERY settlements; a VACUUM also
  refreshes the table's row count, not its column statistics).
- PostgreSQL: a database of its own (BENCH_PG_DATABASE, default
  vero_bridge_backlog_bench) on the server of BENCH_DATABASE_URL (default
  postgresql://postgres@127.0.0.1:5432/postgres), created for the run and
  dropped after it; each drain gets a fresh schema. For each drain the claim's
  plan is recorded with EXPLAIN ANALYZE (rolled back) when the drain starts and
  when half is drained.

    .venv/bin/python -m bench.backlog [--skip-million] [--stores sqlite postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from service.outbox import DELIVERED, Settlement, Store, open_store

A = "segment_to_vero"
CLAIM_SIZE = 128
LEASE_SECONDS = 30.0
SIZES = (1_000, 100_000, 1_000_000)
BASELINE = 1_000
REPEATS = 5
BASELINE_SAMPLES = 3
HEAVY_USERS = 20
STALE_HISTORY = 60_000
SHAPES = {
    "A": "one item each from N users",
    "B": f"first half from {HEAVY_USERS} users, then one each from N/2 users",
}
STATS = {
    "fresh": "ANALYZE after queueing",
    "never": "never analyzed",
    "stale": f"ANALYZE after {STALE_HISTORY:,} delivered, then the backlog",
}
TARGET = 0.7
# About the size of a direction A item: one Vero call with its body.
PAYLOAD = json.dumps(
    {
        "calls": [
            {
                "method": "POST",
                "path": "/users/track",
                "body": {
                    "id": "user-0000000",
                    "email": "someone@example.com",
                    "data": {"first_name": "Some", "plan": "pro", "signed_up": "2024-01-01"},
                    "channels": [],
                },
            }
        ],
        "message_id": "00000000-0000-0000-0000-000000000000",
    },
    separators=(",", ":"),
)


def backlog_rows(shape: str, n: int, at: float, tag: str) -> Iterator[tuple]:
    """(dedup_key, order_key, head) for each item, in the order they were queued."""
    keys = random.Random(tag)

    def message_id() -> str:
        return str(uuid.UUID(int=keys.getrandbits(128), version=4))

    if shape == "B":
        built_up = n // 2
        for i in range(built_up):
            yield (message_id(), f"{tag}-heavy{i % HEAVY_USERS}", i < HEAVY_USERS)
        first_new = built_up
    else:
        first_new = 0
    for i in range(first_new, n):
        yield (message_id(), f"{tag}-user{i}", True)


# -- the stores ---------------------------------------------------------------


class SQLiteBacklog:
    """A fresh SQLite outbox file for one drain."""

    name = "SQLite"

    def __init__(self, where: Path):
        self.path = where / f"outbox-{uuid.uuid4().hex[:8]}.db"
        self.url = f"sqlite:///{self.path}"

    def open(self) -> Store:
        return open_store(self.url)

    def load(self, shape: str, n: int, at: float, tag: str) -> None:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            conn.execute("PRAGMA synchronous = OFF")  # setup only: the drain runs as configured
            with conn:
                (before,) = conn.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()
                conn.executemany(
                    "INSERT INTO outbox (direction, dedup_key, order_key, payload, available_at,"
                    " created_at, updated_at, head) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        (A, key, user, PAYLOAD, at, at, at, head)
                        for key, user, head in backlog_rows(shape, n, at, tag)
                    ),
                )
                # Each item's key, as enqueue writes it.
                conn.execute(
                    "INSERT INTO outbox_keys (direction, dedup_key)"
                    " SELECT direction, dedup_key FROM outbox WHERE id > ?",
                    (before,),
                )
                conn.execute(
                    "INSERT INTO outbox_counts (direction, state, n) VALUES (?, 'pending', ?)"
                    " ON CONFLICT (direction, state) DO UPDATE SET n = n + excluded.n",
                    (A, n),
                )

    def analyze(self) -> None:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            conn.execute("ANALYZE")

    def explain(self, now: float) -> str:
        return ""

    def drop(self) -> None:
        for suffix in ("", "-wal", "-shm", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{self.path}{suffix}")


class PostgresBacklog:
    """A fresh schema in the benchmark's database for one drain."""

    name = "PostgreSQL"

    def __init__(self, database_url: str):
        import psycopg

        self.psycopg = psycopg
        self.schema = f"backlog_{uuid.uuid4().hex[:8]}"
        self.admin = database_url
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {self.schema}")
        separator = "&" if "?" in database_url else "?"
        self.url = f"{database_url}{separator}options={quote(f'-c search_path={self.schema}')}"

    def connect(self):
        return self.psycopg.connect(self.url, autocommit=True)

    def open(self) -> Store:
        store = open_store(self.url)
        store.check(time.time())  # the tables, before autovacuum is turned off for them
        with self.connect() as conn:
            for table in ("outbox", "outbox_history", "outbox_counts"):
                conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
        return store

    def load(self, shape: str, n: int, at: float, tag: str) -> None:
        with self.connect() as conn:
            with conn.cursor().copy(
                "COPY outbox (direction, dedup_key, order_key, payload, available_at, created_at,"
                " updated_at, head) FROM STDIN"
            ) as copy:
                for key, user, head in backlog_rows(shape, n, at, tag):
                    copy.write_row((A, key, user, PAYLOAD, at, at, at, head))
            conn.execute(
                "INSERT INTO outbox_counts (direction, state, slot, n) VALUES (%s, 'pending', 0, %s)"
                " ON CONFLICT (direction, state, slot) DO UPDATE SET n = outbox_counts.n + EXCLUDED.n",
                (A, n),
            )

    def analyze(self) -> None:
        with self.connect() as conn:
            conn.execute("ANALYZE outbox, outbox_history, outbox_counts")

    def explain(self, now: float) -> str:
        """The claim's plan and cost, executed and rolled back."""
        from service.outbox.postgres import CLAIM

        params = {
            "direction": A,
            "now": now,
            "limit": CLAIM_SIZE,
            "lease": "explain",
            "lease_until": now + LEASE_SECONDS,
        }
        from psycopg.conninfo import conninfo_to_dict

        from service.outbox.postgres import _connection_kwargs

        # With the settings the store's own connections have.
        settings = _connection_kwargs(conninfo_to_dict(self.url), "")
        settings.pop("autocommit")
        with self.psycopg.connect(self.url, **settings) as conn:
            ((plan,),) = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + CLAIM, params
            ).fetchall()
            conn.rollback()
        top = plan[0]
        scans = []

        def walk(node):
            if "Scan" in node["Node Type"]:
                scans.append(
                    f"{node['Node Type']} {node.get('Index Name', node.get('Relation Name', ''))}".strip()
                )
            for child in node.get("Plans", []):
                walk(child)

        walk(top["Plan"])
        buffers = top["Plan"].get("Shared Hit Blocks", 0) + top["Plan"].get("Shared Read Blocks", 0)
        return f"{' + '.join(scans)}: {top['Execution Time']:.1f} ms, {buffers} buffers"

    def drop(self) -> None:
        with self.psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {self.schema} CASCADE")


# -- one drain ------------------------------------------------------------------


@dataclass
class Drain:
    store: str
    shape: str
    stats: str
    size: int
    rate: float
    seconds: float
    worst_round_ms: float
    plans: list[str] = field(default_factory=list)
    wall: float = 0.0  # the whole drain, setup included
    # Which figure it belongs to: a measured drain and the baseline drains
    # taken beside it share a group.
    group: int = 0
    role: str = "measured"


def drain(make, shape: str, stats: str, size: int, group: int, role: str = "measured") -> Drain:
    began = time.monotonic()
    backlog = make()
    store = backlog.open()
    try:
        store.check(time.time())
        at = time.time() - 60
        if stats == "stale":
            backlog.load("A", STALE_HISTORY, at, "history")
            run(store, STALE_HISTORY)
            backlog.analyze()
        backlog.load(shape, size, at, "backlog")
        if stats == "fresh":
            backlog.analyze()
        plans = [backlog.explain(time.time())]
        seconds, worst = run(
            store, size, halfway=lambda: plans.append(backlog.explain(time.time()))
        )
        done = Drain(
            backlog.name,
            shape,
            stats,
            size,
            size / seconds,
            seconds,
            worst * 1000,
            list(filter(None, plans)),
            group=group,
            role=role,
        )
        done.wall = time.monotonic() - began
        return done
    finally:
        store.close()
        backlog.drop()


def run(store: Store, expected: int, halfway=None) -> tuple[float, float]:
    """Claim and settle until nothing is left: (seconds, slowest round)."""
    left, worst = expected, 0.0
    started = time.perf_counter()
    while True:
        round_started = time.perf_counter()
        items = store.claim(A, CLAIM_SIZE, LEASE_SECONDS, time.time())
        if not items:
            break
        now = time.time()
        store.settle(
            [
                Settlement(item, DELIVERED, now, None, item.progress, item.attempts)
                for item in items
            ],
            now,
        )
        worst = max(worst, time.perf_counter() - round_started)
        before, left = left, left - len(items)
        if halfway and before > expected // 2 >= left:
            paused = time.perf_counter()
            halfway()
            started += time.perf_counter() - paused  # the EXPLAIN is not part of the drain
    seconds = time.perf_counter() - started
    if left:
        raise RuntimeError(f"the drain stopped with {left} items left")
    return seconds, worst


# -- the phase ----------------------------------------------------------------------


def figure(make, shape: str, stats: str, size: int, group: int) -> tuple[list[Drain], list[Drain]]:
    """One figure's drains, and the baseline drains right before and after them."""
    before = [
        drain(make, shape, "fresh", BASELINE, group, "baseline") for _ in range(BASELINE_SAMPLES)
    ]
    measured = [
        drain(make, shape, stats, size, group) for _ in range(REPEATS if size == BASELINE else 1)
    ]
    after = [
        drain(make, shape, "fresh", BASELINE, group, "baseline") for _ in range(BASELINE_SAMPLES)
    ]
    return before + after, measured


def stores_available(where: Path, wanted: list[str]) -> tuple[list, dict[str, str]]:
    """[(name, maker)], and why a store is skipped."""
    makers: list = []
    skipped: dict[str, str] = {}
    if "sqlite" in wanted:
        makers.append(("SQLite", lambda: SQLiteBacklog(where)))
    if "postgres" in wanted:
        admin = os.environ.get(
            "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        )
        database = os.environ.get("BENCH_PG_DATABASE", "vero_bridge_backlog_bench")
        try:
            import psycopg

            with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {database}")
                conn.execute(f"CREATE DATABASE {database}")
            url = admin.rsplit("/", 1)[0] + "/" + database
            makers.append(("PostgreSQL", lambda: PostgresBacklog(url)))
        except Exception as exc:  # no server, no driver: the SQLite rows still run
            skipped["PostgreSQL"] = " ".join(str(exc).split())[:200]
    return makers, skipped


def drop_database() -> None:
    admin = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    database = os.environ.get("BENCH_PG_DATABASE", "vero_bridge_backlog_bench")
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database}")


def measure(sizes: tuple[int, ...], stores: list[str], log=print) -> dict:
    where = Path(tempfile.mkdtemp(prefix="backlog-", dir=os.environ.get("BENCH_TMP")))
    started = time.monotonic()
    results: dict = {"drains": [], "skipped": {}, "sizes": list(sizes), "claim_size": CLAIM_SIZE}
    try:
        makers, results["skipped"] = stores_available(where, stores)
        group = 0
        for name, make in makers:
            for shape in SHAPES:
                for stats in STATS:
                    for size in sizes:
                        if (stats, size) == ("fresh", BASELINE):
                            continue  # the baseline itself, taken beside every other figure
                        group += 1
                        beside, measured = figure(make, shape, stats, size, group)
                        results["drains"] += [vars(d) for d in beside + measured]
                        rate = statistics.median(d.rate for d in measured)
                        base = statistics.median(d.rate for d in beside)
                        log(
                            f"  [{time.monotonic() - started:5.0f}s] {name} {shape} {stats}"
                            f" {size:>9,}: {rate:8,.0f}/s ({rate / base:.2f}x of {base:,.0f}/s"
                            f" beside it), last in {measured[-1].seconds:6.1f} s,"
                            f" slowest round {max(d.worst_round_ms for d in measured):.0f} ms"
                            f" {measured[-1].plans}"
                        )
    finally:
        shutil.rmtree(where, ignore_errors=True)
        if "postgres" in stores:
            drop_database()
    results["seconds"] = time.monotonic() - started
    return results


def phase(run) -> None:
    """bench/run's backlog phase (bench/harness.py), with the 1,000,000 rows
    unless the run skips them."""
    skip = getattr(run, "skip_million", False)
    run.results["backlog"] = measure(
        tuple(s for s in SIZES if not (skip and s == 1_000_000)),
        ["sqlite", "postgres"],
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )


def rows(results: dict) -> list[str]:
    """The table rows: one per store, shape and state of statistics. Each
    figure is divided by the baseline taken beside it (its group's)."""
    lines = []
    for store, reason in results.get("skipped", {}).items():
        lines.append(f"| backlog drain, {store} | skipped: {reason} | - | - | - | - |")
    drains = results.get("drains", [])
    seen = []
    for d in drains:
        key = (d["store"], d["shape"], d["stats"])
        if d["role"] == "measured" and key not in seen:
            seen.append(key)
    for store, shape, stats in seen:
        cells, ratios, bases, took = [], [], [], 0.0
        for size in results["sizes"]:
            mine = [
                d
                for d in drains
                if d["role"] == "measured"
                and (d["store"], d["shape"], d["stats"], d["size"]) == (store, shape, stats, size)
            ]
            if not mine:
                continue
            (group,) = {d["group"] for d in mine}
            beside = [d for d in drains if d["group"] == group and d["role"] == "baseline"]
            rate = statistics.median(d["rate"] for d in mine)
            base = statistics.median(d["rate"] for d in beside)
            ratios.append(rate / base)
            bases.append(base)
            took += sum(d["wall"] for d in mine + beside)
            seconds = statistics.median(d["seconds"] for d in mine)
            cells.append(
                f"{size:,}: {rate:,.0f}/s against {base:,.0f}/s"
                f" ({rate / base:.2f}x, {seconds:.1f} s)"
            )
        worst = min(ratios)
        lines.append(
            f"| backlog drain, {store}, shape {shape}, statistics {stats} | {'; '.join(cells)}"
            f" (row: {took:.0f} s with setup)"
            f" | 1,000 queued, fresh statistics, beside each figure (median of"
            f" {2 * BASELINE_SAMPLES}, half before and half after): {min(bases):,.0f}"
            f" to {max(bases):,.0f}/s"
            f" | worst {worst:.2f}x | >= {TARGET}x at every size |"
            f" {'met' if worst >= TARGET else 'NOT met'} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Drain rate with large backlogs (bench/backlog.py)."
    )
    parser.add_argument("--skip-million", action="store_true", help="leave out the 1,000,000 rows")
    parser.add_argument(
        "--stores", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    sizes = tuple(s for s in SIZES if not (args.skip_million and s == 1_000_000))
    results = measure(sizes, args.stores, log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print("| row | measured | baseline (same run) | result | target | |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows(results)))
    print(f"\n{results['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
