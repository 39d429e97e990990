"""What is special to the PostgreSQL outbox: several processes at once.

The store semantics every store shares are in test_outbox.py, which runs on
PostgreSQL too (see the store_url fixture). Here two stores with pools of their
own stand in for two processes, and threads make them race.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict

import psycopg
import pytest

from service.config import Config
from service.outbox import DEAD, DELIVERED, IN_FLIGHT, PENDING, StoreError, open_store
from service.outbox.delivery import PERMANENT, RELEASE, RETRY, SUCCEEDED, Limits, Outcome, settle
from service.outbox.postgres import SCHEMA_VERSION, PostgresStore
from service.results import Accept
from tests.conftest import wait_for, with_pg_options

pytestmark = pytest.mark.postgres

A = "segment_to_vero"
B = "vero_to_segment"
LIMITS = Limits(lease_seconds=300, max_attempts=5, max_age_seconds=3600)
# Long enough that no lease runs out during a test: every claim here is a real one.
LEASE = 300


def work(key: str, user: str, **payload) -> Accept:
    return Accept(dedup_key=key, order_key=user, payload={"key": key, **payload})


@pytest.fixture
def stores(postgres_url):
    """Two stores on one database, each with its own pool, as two processes have."""
    opened = [PostgresStore(postgres_url), PostgresStore(postgres_url)]
    yield opened
    for store in opened:
        store.close()


def run_threads(targets, timeout: float = 60.0) -> None:
    """Start every target at once; re-raise the first failure in the test."""
    barrier = threading.Barrier(len(targets))
    failures: list[BaseException] = []

    def run(target):
        try:
            barrier.wait()
            target()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(target,), daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    if failures:
        raise failures[0]


class Ledger:
    """What the workers saw, checked as they go: a user never has two items out."""

    def __init__(self):
        self.lock = threading.Lock()
        self.out: set[str] = set()
        self.claimed: dict[str, list[int]] = defaultdict(list)
        self.overlaps: list[str] = []
        self.claims = 0

    def took(self, item) -> None:
        with self.lock:
            if item.order_key in self.out:
                self.overlaps.append(f"{item.order_key} had two items out (item {item.id})")
            self.out.add(item.order_key)
            self.claimed[item.order_key].append(item.id)

    def took_run(self, items) -> None:
        """A claim may hold several items of one user, but no user may have
        items out in two claims at once."""
        with self.lock:
            self.claims += 1
            users = {item.order_key for item in items}
            for user in users & self.out:
                self.overlaps.append(f"{user} had items out in two claims")
            self.out |= users
            for item in items:
                self.claimed[item.order_key].append(item.id)

    def returning(self, item) -> None:
        # Called before the settlement commits: the user's next item can only
        # be claimed after that, so an overlap seen here is a real one.
        with self.lock:
            self.out.discard(item.order_key)


def unfinished(store) -> int:
    counts = store.counts(time.time())
    return sum(n for (_, state), n in counts.items() if state in (PENDING, IN_FLIGHT))


# -- concurrent claims ---------------------------------------------------------


def test_concurrent_claimers_never_take_the_same_item_or_a_users_second_item(stores):
    users, per_user = 50, 4
    stores[0].enqueue(
        A,
        [work(f"{u}-{n}", f"user{u}") for n in range(per_user) for u in range(users)],
        time.time(),
    )
    taken: list = []
    lock = threading.Lock()

    def claimer(store):
        while batch := store.claim(A, 7, LEASE, time.time()):
            with lock:
                taken.extend(batch)

    run_threads([lambda s=store: claimer(s) for store in stores for _ in range(4)])

    ids = [item.id for item in taken]
    assert len(ids) == len(set(ids)), "an item was claimed twice"
    # Nothing is settled, so each user's first item is all that may go out.
    assert sorted(item.payload["key"] for item in taken) == sorted(f"{u}-0" for u in range(users))
    assert stores[1].claim(A, 100, LEASE, time.time()) == []


def outcome_for(item) -> Outcome:
    """A fixed mix: some items fail for good, some need a second attempt."""
    number = int(item.payload["key"].split("-")[1])
    if number % 5 == 3:
        return Outcome(PERMANENT, "400", "4xx")
    if number % 3 == 1 and item.attempts == 1:
        return Outcome(RETRY, "503", "5xx", retry_after=0)
    return Outcome(SUCCEEDED)


def deliver_until_done(store, ledger: Ledger, done: threading.Event):
    while not done.is_set():
        items = store.claim(A, 5, LEASE, time.time())
        if not items:
            if unfinished(store) == 0:
                done.set()
            continue
        for item in items:
            ledger.took(item)
        now = time.time()
        settlements = [settle(item, outcome_for(item), now, LIMITS) for item in items]
        for item in items:
            ledger.returning(item)
        store.settle(settlements, now)


def test_one_users_items_go_out_one_at_a_time_in_order_under_concurrent_settlers(stores):
    users, per_user = 12, 10
    stores[0].enqueue(
        A,
        [work(f"{u}-{n}", f"user{u}") for u in range(users) for n in range(per_user)],
        time.time(),
    )
    ledger, done = Ledger(), threading.Event()

    run_threads(
        [lambda s=store: deliver_until_done(s, ledger, done) for store in stores for _ in range(3)]
    )

    assert ledger.overlaps == []
    for user, ids in ledger.claimed.items():
        # A retried item comes back before its successor, never after it.
        assert ids == sorted(ids), user
    assert sum(len(set(ids)) for ids in ledger.claimed.values()) == users * per_user
    counts = stores[0].counts(time.time())
    assert counts[(A, DELIVERED)] + counts[(A, DEAD)] == users * per_user


def deliver_runs_until_done(store, ledger: Ledger, finished: dict, done: threading.Event):
    """Like the Segment sender: claim users' runs, and after a retry send
    nothing more of that user in the round."""
    while not done.is_set():
        items = store.claim(B, 20, LEASE, time.time(), whole_runs=True)
        if not items:
            if unfinished(store) == 0:
                done.set()
            continue
        ledger.took_run(items)
        outcomes, halted = [], set()
        for item in items:
            if item.order_key in halted:
                outcomes.append(RELEASE)
                continue
            outcome = outcome_for(item)
            outcomes.append(outcome)
            if outcome.kind == RETRY:
                halted.add(item.order_key)
            else:
                with ledger.lock:
                    finished[item.order_key].append(item.id)
        now = time.time()
        settlements = [
            settle(item, outcome, now, LIMITS)
            for item, outcome in zip(items, outcomes, strict=True)
        ]
        for item in items:
            ledger.returning(item)
        store.settle(settlements, now)


def test_run_claims_from_two_processes_keep_each_users_items_in_order(stores):
    users, per_user = 12, 10
    stores[0].enqueue(
        B,
        [work(f"{u}-{n}", f"user{u}") for u in range(users) for n in range(per_user)],
        time.time(),
    )
    ledger, done, finished = Ledger(), threading.Event(), defaultdict(list)

    run_threads(
        [
            lambda s=store: deliver_runs_until_done(s, ledger, finished, done)
            for store in stores
            for _ in range(3)
        ]
    )

    assert ledger.overlaps == []
    for user, ids in finished.items():
        assert ids == sorted(ids), user
    assert sum(len(ids) for ids in finished.values()) == users * per_user
    # Runs were taken: far fewer claims than items.
    assert ledger.claims < users * per_user / 2


def waiting_on_locks(url, application_name) -> int:
    with psycopg.connect(url) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND application_name = %s",
            (application_name,),
        ).fetchone()
    return count


def test_a_users_later_request_cannot_overtake_an_earlier_one_still_committing(postgres_url):
    """Ids are handed out at insert, rows appear at commit. A request whose
    transaction is slow (here: held up on a duplicate another connection is
    still writing) has its user's id already; a later request for that user
    must not commit past it, or a claimer would send the later item first."""
    name = f"overtake-{uuid.uuid4().hex[:8]}"  # to find this test's waiting sessions
    url = f"{postgres_url}&application_name={name}"
    stores = [PostgresStore(url), PostgresStore(url)]
    try:
        overtake_attempt(stores, postgres_url, lambda: waiting_on_locks(postgres_url, name))
    finally:
        for store in stores:
            store.close()


def overtake_attempt(stores, postgres_url, waiting) -> None:
    stores[0].check(time.time())
    results: dict[str, list[bool]] = {}
    with psycopg.connect(postgres_url) as blocker:
        blocker.execute(
            "INSERT INTO outbox (direction, dedup_key, order_key, payload, available_at,"
            " created_at, updated_at) VALUES (%s, 'held', 'v', '{}', 0, 0, 0)",
            (A,),
        )
        slow = threading.Thread(
            target=lambda: results.update(
                slow=stores[0].enqueue(A, [work("first", "u"), work("held", "v")], time.time())
            )
        )
        slow.start()
        wait_for(lambda: waiting() == 1)
        later = threading.Thread(
            target=lambda: results.update(
                later=stores[1].enqueue(A, [work("second", "u")], time.time())
            )
        )
        later.start()
        wait_for(lambda: not later.is_alive() or waiting() == 2)

        assert [item.payload["key"] for item in stores[1].claim(A, 10, LEASE, time.time())] == []
        blocker.rollback()  # the duplicate goes away: the slow request commits
    slow.join(30)
    later.join(30)
    assert results == {"slow": [True, True], "later": [True]}

    first = stores[1].claim(A, 10, LEASE, time.time())
    assert sorted(item.payload["key"] for item in first) == ["first", "held"]
    assert stores[0].claim(A, 10, LEASE, time.time()) == []
    stores[0].settle(
        [settle(item, Outcome(SUCCEEDED), time.time(), LIMITS) for item in first], time.time()
    )
    assert [item.payload["key"] for item in stores[0].claim(A, 10, LEASE, time.time())] == [
        "second"
    ]


# -- the schema -------------------------------------------------------------------


def schema_version_rows(url):
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT version FROM outbox_schema").fetchall()


def test_stores_starting_at_once_in_threads_create_the_schema_once(postgres_url):
    opened = [PostgresStore(postgres_url) for _ in range(8)]
    try:
        run_threads([lambda s=store: s.check(time.time()) for store in opened])
    finally:
        for store in opened:
            store.close()
    assert schema_version_rows(postgres_url) == [(SCHEMA_VERSION,)]


STARTER = """
import sys, time
from service.outbox.postgres import SCHEMA_VERSION, PostgresStore
url, start_at = sys.argv[1], float(sys.argv[2])
store = PostgresStore(url)
time.sleep(max(start_at - time.time(), 0))  # all processes begin together
store.enqueue("segment_to_vero", [], time.time())
store.check(time.time())
store.close()
"""


def test_processes_starting_at_once_create_the_schema_once(postgres_url):
    start_at = str(time.time() + 2)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, postgres_url, start_at],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    errors = [process.communicate(timeout=60)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * 6, errors
    assert schema_version_rows(postgres_url) == [(SCHEMA_VERSION,)]


# -- configuration and failures -------------------------------------------------


def test_the_postgres_url_form_reaches_the_same_outbox(postgres_url):
    short_form = "postgres://" + postgres_url.split("://", 1)[1]
    config = Config.from_env({"DATABASE_URL": short_form})
    via_short, via_long = open_store(config.database_url), open_store(postgres_url)
    try:
        assert isinstance(via_short, PostgresStore)
        assert via_short.enqueue(A, [work("m1", "u1")], time.time()) == [True]
        assert via_long.enqueue(A, [work("m1", "u1")], time.time()) == [False]
    finally:
        via_short.close()
        via_long.close()


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PASSWORD = "s3cr@t-pw"
ENCODED_PASSWORD = "s3cr%40t-pw"


def unreachable_url() -> str:
    return f"postgresql://postgres:{ENCODED_PASSWORD}@127.0.0.1:{closed_port()}/test"


def assert_safe(message: str) -> None:
    assert PASSWORD not in message and ENCODED_PASSWORD not in message, message


def test_an_unreachable_server_gives_store_errors_without_the_password():
    url = unreachable_url()
    store = PostgresStore(url)  # opening connects nothing yet
    try:
        calls = [
            lambda: store.check(time.time()),
            lambda: store.enqueue(A, [work("m1", "u1")], time.time()),
            lambda: store.claim(A, 10, LEASE, time.time()),
            lambda: store.counts(time.time()),
            lambda: store.dead(None, 10),
        ]
        for call in calls:
            with pytest.raises(StoreError) as raised:
                call()
            assert_safe(str(raised.value))
            assert "127.0.0.1" in str(raised.value)
    finally:
        store.close()


def test_the_app_starts_without_its_database_and_readyz_says_why(make_app, caplog):
    app = make_app({"DATABASE_URL": unreachable_url()})
    answer = app.test_client().get("/readyz")
    assert answer.status_code == 503
    # Callers are not told the host or libpq's words (issue 12); the log is.
    assert "PostgreSQL" not in answer.json["reason"] and "PostgreSQL" in caplog.text
    assert_safe(answer.get_data(as_text=True))


def test_check_fails_where_the_database_is_read_only(postgres_url):
    read_only_url = with_pg_options(postgres_url, "default_transaction_read_only=on")
    # A fresh database cannot even get its tables.
    read_only = PostgresStore(read_only_url)
    with pytest.raises(StoreError, match="read-only"):
        read_only.check(time.time())
    read_only.close()

    writable = PostgresStore(postgres_url)
    writable.check(time.time())
    writable.enqueue(A, [work("m1", "u1")], time.time())
    writable.close()

    # With the tables in place it still reads, and says it cannot write.
    read_only = PostgresStore(read_only_url)
    try:
        assert read_only.counts(time.time()) == {(A, PENDING): 1}
        with pytest.raises(StoreError, match="read-only"):
            read_only.check(time.time())
        with pytest.raises(StoreError, match="read-only"):
            read_only.enqueue(A, [work("m2", "u1")], time.time())
    finally:
        read_only.close()


def test_more_threads_than_connections_wait_their_turn(postgres_url):
    store = PostgresStore(postgres_url, max_size=2)

    def writer(name):
        for n in range(10):
            store.enqueue(A, [work(f"{name}-{n}", name)], time.time())

    try:
        run_threads([lambda i=i: writer(f"w{i}") for i in range(8)])
        assert store.counts(time.time()) == {(A, PENDING): 80}
    finally:
        store.close()


def test_payloads_come_back_exactly_as_given(postgres_url):
    store = PostgresStore(postgres_url)
    payload = {"zeta": 1, "alpha": "nul \u0000 inside", "list": [3, 1.5, None], "key": "m1"}
    try:
        store.enqueue(A, [Accept(dedup_key="m1", order_key="u1", payload=payload)], time.time())
        (item,) = store.claim(A, 10, LEASE, time.time())
        assert item.payload == payload
        assert list(item.payload) == list(payload)  # key order too
    finally:
        store.close()


def test_a_closed_store_answers_with_store_errors(postgres_url):
    store = PostgresStore(postgres_url)
    store.check(time.time())
    store.close()
    with pytest.raises(StoreError, match="cannot be reached"):
        store.check(time.time())
