"""The PostgreSQL outbox's plans do not depend on the planner's statistics.

Each hot statement is EXPLAINed, on a connection of the store's own (so with
its session settings), in the two states that used to go wrong: tables never
analyzed, and tables analyzed while the outbox was empty (after work went
through it) and then given a backlog. Every plan must reach rows through the
index meant for it, or by ctid, and never scan, sort or hash its way through a
table."""

from __future__ import annotations

import time
from collections import Counter

import psycopg
import pytest

from service.outbox import DELIVERED, PENDING, Settlement
from service.outbox import postgres as pg
from service.outbox.postgres import PostgresStore
from service.results import Accept
from tests.conftest import wait_for

pytestmark = pytest.mark.postgres

A = "segment_to_vero"
B = "vero_to_segment"
T0 = 1_700_000_000.0


def nodes(plan: dict) -> list[str]:
    """Every node of a JSON plan, as 'Node Type [index or relation]'."""
    name = plan["Node Type"]
    target = plan.get("Index Name") or plan.get("Relation Name")
    found = [f"{name} [{target}]" if target else name]
    for child in plan.get("Plans", []):
        found += nodes(child)
    return found


def explain(store: PostgresStore, sql: str, params: dict) -> list[str]:
    with store._transaction("read") as conn:
        ((plan,),) = conn.execute("EXPLAIN (FORMAT JSON) " + sql, params).fetchall()
    return nodes(plan[0]["Plan"])


# (Small tables, a row per claim or per counter, may be read whole.)
WALKS = ("Seq Scan [outbox]", "Seq Scan [outbox_history]", "Bitmap", "Sort", "Hash Join", "Merge")


def assert_no_table_walks(plan: list[str], allowed: tuple[str, ...] = ()) -> None:
    for node in plan:
        assert not node.startswith(WALKS) or node.startswith(allowed), plan


def settle_params(settlements: list[Settlement], now: float) -> dict:
    return {
        "now": now,
        "directions": [s.item.direction for s in settlements],
        "order_keys": [s.item.order_key for s in settlements],
        "ids": [s.item.id for s in settlements],
        "leases": [s.item.lease for s in settlements],
        "states": [str(s.state) for s in settlements],
        "available_at": [s.available_at for s in settlements],
        "errors": [s.error for s in settlements],
        "progress": [s.progress for s in settlements],
        "attempts": [s.attempts for s in settlements],
    }


def backlog(store: PostgresStore, now: float) -> None:
    store.enqueue(A, [Accept(f"a{n}", f"user{n}", {}) for n in range(1500)], now)
    store.enqueue(A, [Accept(f"h{n}", "heavy", {}) for n in range(500)], now)


@pytest.mark.parametrize("statistics", ["never analyzed", "analyzed while empty"])
def test_hot_statements_keep_their_plans_whatever_the_statistics(postgres_url, statistics):
    store = PostgresStore(postgres_url)
    try:
        store.check(T0)
        if statistics == "analyzed while empty":
            store.enqueue(A, [Accept(f"old{n}", f"old{n}", {}) for n in range(300)], T0)
            items = store.claim(A, 300, 30, T0)
            store.settle([Settlement(i, DELIVERED, T0, None, 0, 1) for i in items], T0)
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                conn.execute("ANALYZE outbox, outbox_history, outbox_leases, outbox_counts")
        backlog(store, T0 + 1)
        now = T0 + 2
        claim = {"direction": A, "now": now, "limit": 128, "lease": "x", "lease_until": now + 30}

        plan = explain(store, pg.CLAIM, claim)
        assert_no_table_walks(plan)
        assert "Index Scan [outbox_heads]" in plan and "Tid Scan [outbox]" in plan

        plan = explain(store, pg.CLAIM_RUNS, claim)
        # Its one sort is of at most `limit` items of one user, read in order
        # through the primary key (the window function sorts them again).
        assert_no_table_walks(plan, allowed=("Sort",))
        assert plan.count("Sort") == 1
        assert "Index Scan [outbox_pkey]" in plan

        items = store.claim(A, 128, 30, now)
        done = [Settlement(item, DELIVERED, now, None, 0, item.attempts) for item in items]
        plan = explain(store, pg.SETTLE, settle_params(done, now))
        assert_no_table_walks(plan)
        assert "Index Scan [outbox_pkey]" in plan and "Tid Scan [outbox]" in plan

        heads = {
            "head_directions": [A] * len(items),
            "head_order_keys": [item.order_key for item in items],
            "after": [item.id for item in items],
            **pg._deltas(Counter({(A, PENDING): -len(items), (A, DELIVERED): len(items)})),
        }
        plan = explain(store, pg.SETTLED, heads)
        assert_no_table_walks(plan)
        assert "Index Scan [outbox_pkey]" in plan

        new = {
            "direction": A,
            "now": now,
            "dedup_keys": ["n1", "n2"],
            "order_keys": ["heavy", "someone"],
            "payloads": ["{}", "{}"],
        }
        plan = explain(store, pg.INSERT, new)
        assert_no_table_walks(plan)
        assert "Index Only Scan [outbox_history_direction_dedup_key_key]" in plan

        for sql, params in [
            (pg.COUNTS, {"in_flight": "in_flight", "now": now}),
            (pg.OLDEST, {}),
            (pg.DEAD_ITEMS, {"direction": None, "ids": None, "limit": 100}),
            (pg.PURGE, {"before": now, "batch": 1000}),
        ]:
            assert_no_table_walks(explain(store, sql, params))
    finally:
        store.close()


def vacuums(url: str) -> int:
    with psycopg.connect(url) as conn:
        (count,) = conn.execute(
            "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'outbox'::regclass"
        ).fetchone()
    return count


def test_the_store_vacuums_the_table_claims_read_as_work_goes_through(postgres_url):
    store = PostgresStore(postgres_url, vacuum_every=50)
    try:
        store.enqueue(A, [Accept(f"m{n}", f"user{n}", {}) for n in range(60)], time.time())
        assert vacuums(postgres_url) == 0
        items = store.claim(A, 100, 30, time.time())
        store.settle(
            [Settlement(i, DELIVERED, time.time(), None, 0, 1) for i in items], time.time()
        )
        wait_for(lambda: vacuums(postgres_url) > 0)
        # And it goes on working as before.
        assert store.counts(time.time()) == {(A, DELIVERED): 60}
    finally:
        store.close()
