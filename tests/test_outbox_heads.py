"""Each user's queue head, on every store: only a user's oldest unfinished item
is handed out, however much waits behind it; settling it makes the next one
the head. And, under a random mix of every operation, what the stores keep
beside the items (heads, counts) never drifts from the items themselves.

The claim semantics themselves are in test_outbox.py; these tests read the
tables directly only to check the invariants the claims rely on."""

from __future__ import annotations

import random
import sqlite3
from collections import Counter

import pytest

from service.outbox import DEAD, DELIVERED, IN_FLIGHT, PENDING, Settlement
from service.results import Accept

A = "segment_to_vero"
B = "vero_to_segment"
T0 = 1_700_000_000.0


def work(key: str, user: str) -> Accept:
    return Accept(dedup_key=key, order_key=user, payload={"key": key})


def keys(items) -> list[str]:
    return [item.payload["key"] for item in items]


def delivered(items, now=T0) -> list[Settlement]:
    return [Settlement(item, DELIVERED, now, None, item.progress, item.attempts) for item in items]


def test_a_user_with_many_items_queued_has_only_its_oldest_claimed(store):
    store.enqueue(A, [work(f"heavy-{n}", "heavy") for n in range(2000)], T0)
    store.enqueue(A, [work(f"light-{n}", f"light{n}") for n in range(3)], T0 + 1)

    first = store.claim(A, 100, 30, T0 + 2)
    assert keys(first) == ["heavy-0", "light-0", "light-1", "light-2"]
    assert store.claim(A, 100, 30, T0 + 2) == []

    store.settle(delivered(first), T0 + 3)
    assert keys(store.claim(A, 100, 30, T0 + 3)) == ["heavy-1"]


def test_a_retried_head_holds_its_users_queue_and_no_one_elses(store):
    store.enqueue(A, [work("a1", "alice"), work("a2", "alice"), work("b1", "bob")], T0)
    a1, b1 = store.claim(A, 10, 30, T0)
    store.settle(
        [
            Settlement(a1, PENDING, T0 + 60, "503", 0, a1.attempts),
            *delivered([b1]),
        ],
        T0,
    )
    store.enqueue(A, [work("b2", "bob")], T0 + 1)
    assert keys(store.claim(A, 10, 300, T0 + 1)) == ["b2"]
    assert keys(store.claim(A, 10, 300, T0 + 61)) == ["a1"]


def test_a_run_claim_takes_a_long_run_up_to_the_limit_then_goes_on_from_there(store):
    store.enqueue(B, [work(f"a{n}", "alice") for n in range(500)], T0)
    run = store.claim(B, 200, 30, T0, whole_runs=True)
    assert keys(run) == [f"a{n}" for n in range(200)]
    # The rest waits until the run is settled: alice's head is out.
    assert store.claim(B, 200, 30, T0, whole_runs=True) == []
    store.settle(delivered(run), T0)
    assert keys(store.claim(B, 200, 30, T0, whole_runs=True)) == [f"a{n}" for n in range(200, 400)]


def test_a_replayed_item_goes_before_its_users_later_work(store):
    store.enqueue(A, [work("a1", "alice"), work("a2", "alice"), work("a3", "alice")], T0)
    (a1,) = store.claim(A, 10, 30, T0)
    store.settle([Settlement(a1, DEAD, T0, "400", 0, 1)], T0)
    assert store.replay([a1.id], None, T0 + 1) == 1
    # a2 became the head when a1 died; the replayed a1 is older and takes its place.
    assert keys(store.claim(A, 10, 30, T0 + 1)) == ["a1"]


def test_duplicates_of_dead_work_are_recognised(store):
    store.enqueue(A, [work("m1", "u1")], T0)
    (item,) = store.claim(A, 10, 30, T0)
    store.settle([Settlement(item, DEAD, T0, "400", 0, 1)], T0)
    assert store.enqueue(A, [work("m1", "u1")], T0 + 1) == [False]


# -- the invariants, under a random workload --------------------------------------


class Tables:
    """Direct reads of a store's tables, for the invariants below."""

    def __init__(self, url: str):
        self.sqlite = url.startswith("sqlite:///")
        if self.sqlite:
            self.conn = sqlite3.connect(url[len("sqlite:///") :])
        else:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)

    def rows(self, sql: str) -> list[tuple]:
        return list(self.conn.execute(sql).fetchall())

    def close(self) -> None:
        self.conn.close()


def check_invariants(tables: Tables, store, now: float) -> None:
    users = tables.rows(
        "SELECT direction, order_key, min(id), sum(CASE WHEN head THEN 1 ELSE 0 END),"
        " min(CASE WHEN head THEN id END) FROM outbox GROUP BY direction, order_key"
    )
    for direction, order_key, oldest, heads, head in users:
        assert (heads, head) == (1, oldest), f"{direction}/{order_key}: heads {heads}, at {head}"
    expected: Counter[tuple[str, str]] = Counter()
    for direction, lease, available_at in tables.rows(
        "SELECT direction, lease, available_at FROM outbox"
    ):
        out = lease is not None and available_at > now
        expected[direction, IN_FLIGHT if out else PENDING] += 1
    for direction, state, n in tables.rows(
        "SELECT direction, state, count(*) FROM outbox_history GROUP BY direction, state"
    ):
        expected[direction, state] += n
    assert store.counts(now) == {key: n for key, n in expected.items() if n}
    assert tables.rows("SELECT id FROM outbox INTERSECT SELECT id FROM outbox_history") == []
    if tables.sqlite:
        # The keys table knows every item's key, and nothing else: a purged
        # item's key goes with it.
        assert sorted(tables.rows("SELECT direction, dedup_key FROM outbox_keys")) == sorted(
            tables.rows(
                "SELECT direction, dedup_key FROM outbox"
                " UNION ALL SELECT direction, dedup_key FROM outbox_history"
            )
        )


def oldest_of(tables: Tables, direction: str, order_key: str) -> list[int]:
    """The user's unfinished ids, oldest first (order keys here are plain names)."""
    return [
        row[0]
        for row in tables.rows(
            f"SELECT id FROM outbox WHERE direction = '{direction}'"
            f" AND order_key = '{order_key}' ORDER BY id"
        )
    ]


@pytest.mark.parametrize("seed", [1, 2])
def test_heads_and_counts_stay_true_under_a_random_workload(store, store_url, seed):
    rand = random.Random(seed)
    store.check(T0)  # the tables exist from here on
    tables = Tables(store_url)
    now = T0
    out: list = []  # claimed items not yet settled (their leases may run out)
    stats: Counter[str] = Counter()
    try:
        for _ in range(250):
            step = rand.choice(
                ["enqueue", "enqueue", "claim", "claim", "settle", "settle"] * 3
                + ["replay", "purge", "wait"]
            )
            if step == "enqueue":
                direction = rand.choice([A, B])
                batch = [
                    work(f"k{rand.randrange(60)}", f"user{rand.randrange(6)}")
                    for _ in range(rand.randint(1, 5))
                ]
                store.enqueue(direction, batch, now)
            elif step == "claim":
                direction, runs = rand.choice([(A, False), (B, True), (B, False)])
                items = store.claim(direction, rand.randint(1, 6), 5, now, whole_runs=runs)
                by_user: dict[str, list[int]] = {}
                for item in items:
                    by_user.setdefault(item.order_key, []).append(item.id)
                for user, ids in by_user.items():
                    # Each user's claimed items are its oldest unfinished ones.
                    assert ids == oldest_of(tables, direction, user)[: len(ids)]
                    assert runs or len(ids) == 1
                out.extend(items)
                stats["claimed"] += len(items)
            elif step == "settle" and out:
                rand.shuffle(out)
                chosen, out = out[: rand.randint(1, len(out))], out[len(out) // 2 :]
                # Some of `out` is never settled, as by a worker that crashed:
                # its leases run out and the items are claimed again, and a
                # settlement that comes after that is ignored.
                out = [item for item in out if item not in chosen]
                store.settle([random_settlement(rand, item, now) for item in chosen], now)
                stats["settled"] += len(chosen)
            elif step == "replay":
                dead = store.dead(None, 100)
                if dead and rand.random() < 0.5:
                    stats["replayed"] += store.replay([rand.choice(dead).id], None, now)
                else:
                    stats["replayed"] += store.replay(None, rand.choice([None, A, B]), now)
            elif step == "purge":
                stats["purged"] += store.purge(now - 10)
            now += rand.choice([0, 0, 0.5, 1, 3])
            check_invariants(tables, store, now)
    finally:
        tables.close()
    # The mix did reach every path.
    assert min(stats[kind] for kind in ("claimed", "settled", "replayed", "purged")) > 0, stats


def random_settlement(rand: random.Random, item, now: float) -> Settlement:
    state = rand.choice([DELIVERED, DELIVERED, DEAD, PENDING, PENDING])
    if state != PENDING:
        return Settlement(item, state, now, "gone" if state == DEAD else None, 0, item.attempts)
    return Settlement(item, PENDING, now + rand.choice([0, 1, 4]), "retry", 1, item.attempts)
