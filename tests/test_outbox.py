"""Outbox semantics, on every store the suite can reach (see the store fixture).

Time is passed in explicitly, so leases, backoff and retention are tested
without waiting."""

from __future__ import annotations

import time

from service.outbox import DEAD, DELIVERED, IN_FLIGHT, PENDING
from service.outbox.delivery import (
    PERMANENT,
    RELEASE,
    RETRY,
    SUCCEEDED,
    Deliverer,
    Limits,
    Outcome,
    settle,
)
from service.results import Accept
from service.retry import backoff
from tests.conftest import wait_for
from tests.senders import ScriptedSender

A = "segment_to_vero"
B = "vero_to_segment"
T0 = 1_700_000_000.0
LIMITS = Limits(lease_seconds=30, max_attempts=5, max_age_seconds=3600)


def work(key: str, user: str = "u1", **payload) -> Accept:
    return Accept(dedup_key=key, order_key=user, payload={"key": key, **payload})


def claim_keys(store, now=T0, direction=A, limit=10):
    return [item.payload["key"] for item in store.claim(direction, limit, 30, now)]


def finish(store, items, outcome, now=T0, limits=LIMITS):
    store.settle([settle(item, outcome, now, limits) for item in items], now)


# -- de-duplication -----------------------------------------------------------


def test_enqueue_reports_duplicates_per_item_and_stores_each_key_once(store):
    assert store.enqueue(A, [work("m1"), work("m2"), work("m1")], T0) == [True, True, False]
    assert store.enqueue(A, [work("m2", note="changed")], T0) == [False]
    # The same key in the other direction is other work.
    assert store.enqueue(B, [work("m1")], T0) == [True]
    assert store.counts(T0) == {(A, PENDING): 2, (B, PENDING): 1}


def test_a_duplicate_of_delivered_work_is_still_recognised(store):
    store.enqueue(A, [work("m1")], T0)
    finish(store, store.claim(A, 10, 30, T0), Outcome(SUCCEEDED))
    assert store.enqueue(A, [work("m1")], T0 + 60) == [False]
    assert claim_keys(store, T0 + 60) == []


def test_a_key_is_known_until_its_delivered_item_is_purged(store):
    users = {"delivered": "u1", "dead": "u2", "backing-off": "u3", "out": "u4", "waiting": "u4"}
    store.enqueue(A, [work(key, user) for key, user in users.items()], T0)
    # "out" stays out (and "waiting" behind it) for the whole test.
    items = {item.payload["key"]: item for item in store.claim(A, 10, 300, T0)}
    store.settle(
        [
            settle(items["delivered"], Outcome(SUCCEEDED), T0, LIMITS),
            settle(items["dead"], Outcome(PERMANENT, "400", "4xx"), T0, LIMITS),
            settle(items["backing-off"], Outcome(RETRY, "503", retry_after=600), T0, LIMITS),
        ],
        T0,
    )
    again = [work(key, "someone-else") for key in users]
    assert store.enqueue(A, again, T0 + 1) == [False] * 5
    # Replayed work keeps its key, and so does work that dies again.
    assert store.replay(None, A, T0 + 2) == 1
    assert store.enqueue(A, [work("dead", "u9")], T0 + 2) == [False]
    (dead,) = store.claim(A, 10, 30, T0 + 2)
    finish(store, [dead], Outcome(PERMANENT, "400", "4xx"), now=T0 + 2)
    assert store.enqueue(A, [work("dead", "u9")], T0 + 3) == [False]
    # Purging forgets delivered work's key: the same message is new work,
    # with an id of its own.
    assert store.purge(T0 + 50) == 1
    assert store.enqueue(A, again, T0 + 60) == [True, False, False, False, False]
    (new,) = store.claim(A, 10, 30, T0 + 60)
    assert (new.payload["key"], new.order_key) == ("delivered", "someone-else")
    assert new.id > max(item.id for item in items.values())
    assert store.counts(T0 + 60) == {(A, DEAD): 1, (A, IN_FLIGHT): 2, (A, PENDING): 2}


# -- claims, leases and per-user order ---------------------------------------


def test_claim_hands_out_one_item_per_user_oldest_first(store):
    store.enqueue(
        A, [work("a1", "alice"), work("b1", "bob"), work("a2", "alice"), work("c1", "carol")], T0
    )
    assert claim_keys(store) == ["a1", "b1", "c1"]
    # While alice's first item is out, her second waits.
    assert claim_keys(store) == []


def test_claim_respects_the_limit(store):
    store.enqueue(A, [work(f"m{i}", f"user{i}") for i in range(5)], T0)
    assert claim_keys(store, limit=2) == ["m0", "m1"]
    assert claim_keys(store, limit=10) == ["m2", "m3", "m4"]


def claim_runs(store, now=T0, limit=10):
    return [item.payload["key"] for item in store.claim(B, limit, 30, now, whole_runs=True)]


def test_a_run_claim_takes_each_users_due_items_oldest_first(store):
    store.enqueue(
        B, [work("a1", "alice"), work("b1", "bob"), work("a2", "alice"), work("a3", "alice")], T0
    )
    assert claim_runs(store) == ["a1", "b1", "a2", "a3"]
    store.enqueue(B, [work("a4", "alice"), work("c1", "carol")], T0)
    # alice's earlier items are out: her new one waits; carol's goes.
    assert claim_runs(store) == ["c1"]


def test_a_run_stops_at_an_item_backing_off(store):
    store.enqueue(B, [work("a1", "alice"), work("a2", "alice")], T0)
    first, second = store.claim(B, 10, 30, T0, whole_runs=True)
    store.settle(
        [
            settle(first, Outcome(RETRY, "503", "5xx", retry_after=60), T0, LIMITS),
            settle(second, RELEASE, T0, LIMITS),
        ],
        T0,
    )
    assert claim_runs(store, T0 + 1) == []
    assert claim_runs(store, T0 + 61) == ["a1", "a2"]


def test_the_limit_cuts_a_run_keeping_its_oldest_items(store):
    store.enqueue(B, [work(f"a{n}", "alice") for n in range(5)] + [work("b1", "bob")], T0)
    assert claim_runs(store, limit=3) == ["a0", "a1", "a2"]
    assert claim_runs(store) == ["b1"]


def test_claims_are_per_direction(store):
    store.enqueue(A, [work("a")], T0)
    store.enqueue(B, [work("b")], T0)
    assert claim_keys(store, direction=B) == ["b"]
    assert claim_keys(store, direction=A) == ["a"]


def test_a_users_next_item_waits_for_delivery_of_the_previous(store):
    store.enqueue(A, [work("m1"), work("m2"), work("m3")], T0)
    first = store.claim(A, 10, 30, T0)
    finish(store, first, Outcome(SUCCEEDED))
    assert claim_keys(store) == ["m2"]


def test_a_users_next_item_waits_while_the_previous_backs_off(store):
    store.enqueue(A, [work("m1"), work("m2")], T0)
    finish(store, store.claim(A, 10, 30, T0), Outcome(RETRY, "503", "5xx", retry_after=60))
    assert claim_keys(store, T0 + 30) == []  # m1 is not due, and m2 may not overtake it
    assert claim_keys(store, T0 + 61) == ["m1"]


def test_dead_letter_frees_the_users_next_item(store):
    store.enqueue(A, [work("m1"), work("m2")], T0)
    finish(store, store.claim(A, 10, 30, T0), Outcome(PERMANENT, "400 bad data", "4xx"))
    assert claim_keys(store) == ["m2"]


def test_a_crashed_workers_claim_becomes_claimable_after_the_lease(store):
    store.enqueue(A, [work("m1")], T0)
    crashed = store.claim(A, 10, 30, T0)
    assert [item.attempts for item in crashed] == [1]
    assert claim_keys(store, T0 + 29) == []
    again = store.claim(A, 10, 30, T0 + 31)
    assert [(item.payload["key"], item.attempts) for item in again] == [("m1", 2)]
    # The first worker comes back late: its lease is gone, its settlement ignored.
    finish(store, crashed, Outcome(SUCCEEDED), now=T0 + 32)
    assert store.counts(T0 + 32) == {(A, IN_FLIGHT): 1}
    finish(store, again, Outcome(SUCCEEDED), now=T0 + 33)
    assert store.counts(T0 + 33) == {(A, DELIVERED): 1}


def test_release_gives_the_attempt_back_and_the_item_is_due_at_once(store):
    store.enqueue(A, [work("m1")], T0)
    finish(store, store.claim(A, 10, 30, T0), RELEASE)
    again = store.claim(A, 10, 30, T0)
    assert [item.attempts for item in again] == [1]


def test_progress_is_kept_between_attempts(store):
    store.enqueue(A, [work("m1")], T0)
    finish(store, store.claim(A, 10, 30, T0), Outcome(RETRY, "timeout", "network", progress=1))
    (item,) = store.claim(A, 10, 30, T0 + 10)
    assert item.progress == 1


# -- backoff, retry and dead-letter ------------------------------------------


def test_backoff_doubles_from_one_second_to_an_hour_with_jitter():
    lowest = [backoff(n, rand=lambda: 0.0) for n in range(1, 15)]
    highest = [backoff(n, rand=lambda: 1.0) for n in range(1, 15)]
    assert highest == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600]
    assert lowest == [value / 2 for value in highest]
    assert backoff(1000, rand=lambda: 1.0) == 3600


def test_retry_schedules_the_item_by_backoff(store):
    store.enqueue(A, [work("m1")], T0)
    (item,) = store.claim(A, 10, 30, T0)
    settled = settle(item, Outcome(RETRY, "502", "5xx"), T0, LIMITS, rand=lambda: 1.0)
    assert (settled.state, settled.available_at, settled.error) == (PENDING, T0 + 1, "502")
    store.settle([settled], T0)
    assert claim_keys(store, T0 + 0.9) == []
    (item,) = store.claim(A, 10, 30, T0 + 1)
    settled = settle(item, Outcome(RETRY, "502", "5xx"), T0 + 1, LIMITS, rand=lambda: 1.0)
    assert settled.available_at == T0 + 1 + 2


def test_retry_after_is_honoured_instead_of_backoff(store):
    store.enqueue(A, [work("m1")], T0)
    (item,) = store.claim(A, 10, 30, T0)
    settled = settle(item, Outcome(RETRY, "429", "4xx", retry_after=120), T0, LIMITS)
    assert settled.available_at == T0 + 120


def test_work_is_dead_lettered_after_the_last_attempt(store):
    store.enqueue(A, [work("m1")], T0)
    now = T0
    for attempt in range(1, LIMITS.max_attempts + 1):
        (item,) = store.claim(A, 10, 30, now)
        assert item.attempts == attempt
        finish(store, [item], Outcome(RETRY, "503 unavailable", "5xx", retry_after=1), now=now)
        now += 2
    assert store.counts(now) == {(A, DEAD): 1}
    (dead,) = store.dead(None, 10)
    assert dead.error == "503 unavailable (gave up after 5 attempts)"
    assert dead.payload == {"key": "m1"}


def test_work_is_dead_lettered_past_the_age_limit(store):
    store.enqueue(A, [work("m1")], T0)
    (item,) = store.claim(A, 10, 30, T0 + 3600)
    finish(store, [item], Outcome(RETRY, "timeout", "network"), now=T0 + 3600)
    (dead,) = store.dead(A, 10)
    assert dead.error == "timeout (gave up after 1 hours)"


def test_a_permanent_failure_is_dead_lettered_at_once_with_its_reason(store):
    store.enqueue(A, [work("m1"), work("m2", "bob")], T0)
    items = store.claim(A, 10, 30, T0)
    store.settle(
        [
            settle(
                items[0], Outcome(PERMANENT, "POST /users/track answered 400", "4xx"), T0, LIMITS
            ),
            settle(items[1], Outcome(SUCCEEDED), T0, LIMITS),
        ],
        T0,
    )
    assert [
        (item.id, item.direction, item.order_key, item.error) for item in store.dead(None, 10)
    ] == [(items[0].id, A, "u1", "POST /users/track answered 400")]
    assert store.dead(B, 10) == []


# -- replay and purge -----------------------------------------------------------


def test_replay_puts_dead_work_back_with_fresh_attempts(store):
    store.enqueue(A, [work("m1"), work("m2", "bob")], T0)
    items = store.claim(A, 10, 30, T0)
    finish(store, items, Outcome(PERMANENT, "400", "4xx"))
    assert store.replay([items[1].id], None, T0 + 5) == 1
    assert claim_keys(store, T0 + 5) == ["m2"]
    assert store.replay(None, A, T0 + 6) == 1
    (item,) = store.claim(A, 10, 30, T0 + 6)
    assert (item.payload["key"], item.attempts) == ("m1", 1)
    assert store.replay(None, None, T0 + 7) == 0


def test_purge_removes_only_delivered_work_past_retention(store):
    store.enqueue(A, [work("old"), work("dead", "bob")], T0)
    items = {item.payload["key"]: item for item in store.claim(A, 10, 30, T0)}
    store.settle(
        [
            settle(items["old"], Outcome(SUCCEEDED), T0, LIMITS),
            settle(items["dead"], Outcome(PERMANENT, "400", "4xx"), T0, LIMITS),
        ],
        T0,
    )
    store.enqueue(A, [work("recent", "dave")], T0 + 100)
    finish(store, store.claim(A, 10, 30, T0 + 100), Outcome(SUCCEEDED), now=T0 + 100)
    store.enqueue(A, [work("waiting", "carol")], T0 + 100)

    assert store.purge(T0 + 50) == 1
    assert store.counts(T0 + 100) == {(A, DELIVERED): 1, (A, DEAD): 1, (A, PENDING): 1}
    # Past retention a key is forgotten: the same message would be new work again.
    assert store.enqueue(A, [work("old")], T0 + 200) == [True]


def test_counts_and_oldest_pending(store):
    store.enqueue(A, [work("m1"), work("m2", "bob")], T0)
    store.enqueue(B, [work("w1")], T0 + 10)
    store.claim(A, 1, 30, T0 + 20)
    assert store.counts(T0 + 20) == {(A, IN_FLIGHT): 1, (A, PENDING): 1, (B, PENDING): 1}
    assert store.oldest_pending() == {A: T0, B: T0 + 10}


def test_check_passes_on_a_writable_store(store):
    store.check(T0)


# -- the delivery loop ------------------------------------------------------------


def test_run_once_claims_sends_and_settles(store):
    sender = ScriptedSender({"m2": [Outcome(PERMANENT, "400", "4xx")]})
    deliverer = Deliverer(store, [sender], LIMITS)
    store.enqueue(A, [work("m1"), work("m2", "bob"), work("m3")], time.time())
    assert deliverer.run_once(A) == 2
    assert deliverer.run_once(A) == 1
    assert deliverer.run_once(A) == 0
    assert sender.sent == ["m1", "m2", "m3"]
    assert {key: value for key, value in store.counts(time.time()).items()} == {
        (A, DELIVERED): 2,
        (A, DEAD): 1,
    }


def test_a_sender_that_crashes_loses_nothing(store):
    sender = ScriptedSender({"m1": [RuntimeError("bug"), Outcome(SUCCEEDED)]})
    deliverer = Deliverer(store, [sender], Limits(lease_seconds=30, max_attempts=5))
    store.enqueue(A, [work("m1")], time.time())
    assert deliverer.run_once(A) == 1
    (key_state,) = store.counts(time.time()).items()
    assert key_state == ((A, PENDING), 1)


def test_started_workers_deliver_what_is_enqueued_and_stop_cleanly(store):
    sender = ScriptedSender()
    deliverer = Deliverer(store, [sender], LIMITS, poll_seconds=0.05)
    deliverer.start()
    try:
        store.enqueue(A, [work(f"m{i}", f"user{i % 3}") for i in range(30)], time.time())
        deliverer.wake(A)
        wait_for(lambda: store.counts(time.time()).get((A, DELIVERED)) == 30)
    finally:
        deliverer.stop(timeout=5)
    assert sorted(sender.sent) == sorted(f"m{i}" for i in range(30))
    # Per user, in the order accepted.
    for user in range(3):
        mine = [key for key in sender.sent if int(key[1:]) % 3 == user]
        assert mine == sorted(mine, key=lambda key: int(key[1:]))


def test_a_stopping_sender_releases_what_it_did_not_send(store):
    deliverer = Deliverer(store, [ScriptedSender()], LIMITS)
    deliverer.stopping.set()
    store.enqueue(A, [work("m1")], time.time())
    deliverer.run_once(A)
    (item,) = store.claim(A, 10, 30, time.time())
    assert item.attempts == 1
