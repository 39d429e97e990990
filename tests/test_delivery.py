"""The delivery loop: claims sized by the window, the pause, the lease
guarantee, stopping, per-user order and resumption, and direction B's batches
side by side. On every store the suite can reach; time is a FakeClock where a
test would otherwise wait, and upstreams are real HTTP stand-ins where a real
sender is used."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Config
from service.outbox import DELIVERED, PENDING, open_store
from service.outbox.delivery import (
    PREFETCH,
    RETRY,
    SUCCEEDED,
    Deliverer,
    Limits,
    Outcome,
    Unit,
)
from service.results import Accept
from service.runtime import get_runtime
from service.segment_to_vero.sender import VeroSender
from service.vero_to_segment.mapping import MAX_MESSAGE_BYTES
from service.vero_to_segment.sender import SegmentSender
from tests.conftest import wait_for
from tests.senders import T0, FakeClock, ScriptedSender
from tests.standin import OK, Reply, Upstream
from tests.support import free_port

A, B = "segment_to_vero", "vero_to_segment"
LIMITS = Limits(lease_seconds=30, max_attempts=25, max_age_seconds=72 * 3600)


def work(key: str, user: str) -> Accept:
    return Accept(dedup_key=key, order_key=user, payload={"key": key})


def users(count: int, prefix: str = "m") -> list[Accept]:
    return [work(f"{prefix}{n}", f"user{n}") for n in range(count)]


def counts(store, now) -> dict:
    return {state: n for (_, state), n in store.counts(now).items()}


# -- claims and the window -------------------------------------------------------


def test_a_claim_takes_what_the_window_has_room_for_and_half_again(store):
    clock = FakeClock()
    sender = ScriptedSender(max_in_flight=4)
    deliverer = Deliverer(store, [sender], LIMITS, clock=clock)
    store.enqueue(A, users(20), T0)

    assert deliverer.run_once(A) == 4 + int(4 * PREFETCH)
    # The window halves on a congestion signal, and the next claim with it.
    deliverer.lanes[A].window.finish(deliverer.lanes[A].window.start(T0), 503, None, T0)
    assert deliverer.run_once(A) == 2 + int(2 * PREFETCH)


def test_a_429_with_retry_after_pauses_the_upstream_and_the_claims(store):
    clock = FakeClock()
    sender = ScriptedSender(
        {"m0": [Outcome(RETRY, "429", "4xx", retry_after=60), Outcome(SUCCEEDED)]}
    )
    deliverer = Deliverer(store, [sender], LIMITS, clock=clock)
    store.enqueue(A, users(4), T0)

    # m0 is answered 429: the items claimed with it wait in memory, and since
    # the pause outlasts their lease they go back unsent, their attempt given back.
    assert deliverer.run_once(A) == 4
    assert sender.sent == ["m0"]
    assert counts(store, clock.now) == {PENDING: 4}
    # While paused nothing is claimed, so nothing is sent.
    clock.advance(59)
    assert deliverer.run_once(A) == 0
    assert sender.sent == ["m0"]
    clock.advance(1)
    # The window halved on the 429 (to 2, so 3 are claimed); those handed
    # back are due first.
    assert deliverer.run_once(A) == 3
    assert deliverer.run_once(A) == 1
    assert sender.sent == ["m0", "m1", "m2", "m3", "m0"]
    assert counts(store, clock.now) == {DELIVERED: 4}


def test_a_short_pause_is_waited_out_by_the_calls_behind_it(store):
    clock = FakeClock()
    sender = ScriptedSender(
        {"m0": [Outcome(RETRY, "429", "4xx", retry_after=5), Outcome(SUCCEEDED)]}
    )
    deliverer = Deliverer(store, [sender], LIMITS, clock=clock)
    store.enqueue(A, users(3), T0)

    assert deliverer.run_once(A) == 3
    # The next call waited the five seconds, then went; no real time passed.
    assert sender.sent == ["m0", "m1", "m2"]
    assert clock.now == T0 + 5
    assert 5 in clock.waits


def test_no_call_starts_that_could_outlive_the_lease(store):
    clock = FakeClock()
    sender = ScriptedSender(max_in_flight=1)  # calls take up to 1 s
    deliverer = Deliverer(store, [sender], LIMITS, clock=clock)
    lane = deliverer.lanes[A]
    unit = Unit([], claimed_at=T0, lease_until=T0 + 30)

    # The window is full: the call waits for a slot, but only until the last
    # moment it could start and still end inside the lease; then it is handed back.
    lane.window.start(T0)
    assert lane.gate(unit).begin() is None
    assert clock.now == T0 + 29
    # With a slot free, a call may start until that moment, and not after.
    lane.window.abandon()
    gate = lane.gate(unit)
    clock.now = T0 + 10
    ticket = gate.begin()
    assert ticket is not None
    gate.end(ticket, 200)
    clock.now = T0 + 29.5
    assert gate.begin() is None


def test_when_the_lease_is_shorter_than_a_call_the_first_may_start_in_its_first_half(store):
    clock = FakeClock()
    deliverer = Deliverer(store, [ScriptedSender()], Limits(lease_seconds=1), clock=clock)
    lane = deliverer.lanes[A]
    lane.sender.call_seconds = 10.0
    unit = Unit([], claimed_at=T0, lease_until=T0 + 1)

    clock.now = T0 + 0.6
    assert lane.gate(unit).begin() is None
    clock.now = T0 + 0.4
    gate = lane.gate(unit)
    ticket = gate.begin()
    assert ticket is not None
    gate.end(ticket, 200)
    assert gate.begin() is None  # its next call waits for the next claim


def test_the_rate_cap_spaces_calls_on_the_clock(store):
    clock = FakeClock()
    sender = ScriptedSender(max_in_flight=8)
    sender.calls_per_second = 2.0
    deliverer = Deliverer(store, [sender], LIMITS, clock=clock)
    store.enqueue(A, users(8), T0)

    # Only what can start within the horizon is claimed: two seconds' worth.
    assert deliverer.run_once(A) == 4
    assert clock.now == T0 + 1.5  # the fourth call started 1.5 s after the first


def test_an_item_failing_alone_is_retried_within_30_s_while_others_succeed(store):
    clock = FakeClock()
    sender = ScriptedSender({"bad": [Outcome(RETRY, "503", "5xx")]}, max_in_flight=16)
    deliverer = Deliverer(store, [sender], LIMITS, clock=clock)
    store.enqueue(A, [work("bad", "unlucky")], T0)
    for attempt in range(1, 11):
        store.enqueue(A, users(10, prefix=f"ok{attempt}-"), clock.now)
        while deliverer.run_once(A):
            pass
        assert sender.sent.count("bad") == attempt
        # Without the bound, the seventh failure would wait 32 to 64 s, the
        # tenth 256 to 512 s.
        clock.advance(30)
    assert deliverer.lanes[A].window.healthy


def test_with_the_upstream_down_backoff_grows_past_the_bound(store):
    clock = FakeClock()
    down = [Outcome(RETRY, "no answer", "network")]
    sender = ScriptedSender({f"m{n}": down for n in range(10)}, max_in_flight=16)
    deliverer = Deliverer(store, [sender], LIMITS, clock=clock)
    store.enqueue(A, users(10), T0)
    for _ in range(10):
        # The window is down to one call: one item a claim.
        while deliverer.run_once(A):
            pass
        clock.advance(3600)  # past any backoff
    assert not deliverer.lanes[A].window.healthy
    assert deliverer.lanes[A].window.limit == 1
    # Ten attempts failed; this claim (its lease left to run out) is the eleventh.
    assert {item.attempts for item in store.claim(A, 50, 30, clock.now)} == {11}
    clock.advance(30)
    while deliverer.run_once(A):  # the twelfth attempts fail too...
        pass
    clock.advance(30)
    assert deliverer.run_once(A) == 0  # ... and wait far longer than 30 s


# -- the threads --------------------------------------------------------------------


def test_calls_in_flight_finish_and_work_waiting_goes_back_when_stopping(store):
    hold = threading.Event()
    sender = ScriptedSender(max_in_flight=2, hold=hold)
    deliverer = Deliverer(store, [sender], LIMITS, poll_seconds=0.05)
    store.enqueue(A, users(6), time.time())
    deliverer.start()
    try:
        wait_for(lambda: len(sender.sent) == 2)
        deliverer.request_stop()
        wait_for(deliverer.stopping.is_set)
    finally:
        hold.set()
        deliverer.stop(timeout=10)
    assert len(sender.sent) == 2
    now = time.time()
    assert counts(store, now) == {DELIVERED: 2, PENDING: 4}
    # What waited in memory went back with its attempt: claimed again, it is the first.
    assert {item.attempts for item in store.claim(A, 10, 30, now)} == {1}


def test_started_lanes_keep_each_users_order_and_resume_at_the_call_that_failed(store, tmp_path):
    def every_fourth_fails(number, request):
        # Retry-After 0: retried at once, so the test need not wait out backoffs.
        return Reply(503, {"Retry-After": "0"}) if number % 4 == 0 else OK

    vero = Upstream(every_fourth_fails).start()
    try:
        sender = VeroSender(Config(vero_auth_token="t", vero_api_url=vero.url))
        deliverer = Deliverer(store, [sender], LIMITS, poll_seconds=0.05)
        people = [f"user{n}" for n in range(5)]
        items = [
            Accept(
                f"{user}-{seq}",
                user,
                {
                    "calls": [
                        {
                            "method": "POST",
                            "path": "/users/track",
                            "body": {"id": user, "seq": seq, "step": step},
                        }
                        for step in range(3)
                    ]
                },
            )
            for seq in range(4)
            for user in people
        ]
        deliverer.start()
        try:
            store.enqueue(A, items, time.time())
            deliverer.wake(A)
            wait_for(lambda: counts(store, time.time()) == {DELIVERED: len(items)}, timeout=60)
        finally:
            deliverer.stop(timeout=10)
        taken = [r.json for r in vero.snapshot() if r.outcome == "delivered"]
        for user in people:
            mine = [(body["seq"], body["step"]) for body in taken if body["id"] == user]
            # Every call once (a retry resumes at the call that failed), in order.
            assert mine == [(seq, step) for seq in range(4) for step in range(3)], user
        assert any(r.outcome == "refused" for r in vero.snapshot())
    finally:
        vero.stop()


def segment_item(user: str, seq: int, pad: int) -> Accept:
    message = {
        "type": "track",
        "event": "Email Opened",
        "userId": user,
        "messageId": f"{user}-{seq}",
        "properties": {"seq": seq, "pad": "x" * pad},
    }
    return Accept(f"{user}-{seq}", user, {"message": message})


def test_segment_batches_for_different_users_go_side_by_side_and_one_users_run_stays_whole(
    store,
):
    segment = Upstream().start()
    segment.hold()
    try:
        sender = SegmentSender(Config(segment_write_key="wk", segment_api_url=segment.url))
        deliverer = Deliverer(store, [sender], LIMITS, poll_seconds=0.05)
        big = MAX_MESSAGE_BYTES // 2
        # Each run is some 300 kB: two cannot share a request.
        store.enqueue(
            B,
            [segment_item(user, seq, big) for user in ("ann", "bob") for seq in range(18)],
            time.time(),
        )
        deliverer.start()
        try:
            wait_for(lambda: len(segment.held()) == 2)
            batches = [
                [(m["userId"], m["properties"]["seq"]) for m in json.loads(r.body)["batch"]]
                for r in segment.held()
            ]
            segment.release()
            wait_for(lambda: counts(store, time.time()) == {DELIVERED: 36})
        finally:
            segment.release()
            deliverer.stop(timeout=10)
        assert sorted(batches) == [[("ann", s) for s in range(18)], [("bob", s) for s in range(18)]]
    finally:
        segment.stop()


def test_a_run_too_big_for_one_request_goes_in_order_one_request_at_a_time(store):
    segment = Upstream().start()
    segment.hold()
    try:
        sender = SegmentSender(Config(segment_write_key="wk", segment_api_url=segment.url))
        deliverer = Deliverer(store, [sender], LIMITS, poll_seconds=0.05)
        store.enqueue(
            B, [segment_item("ann", seq, MAX_MESSAGE_BYTES - 200) for seq in range(20)], time.time()
        )
        deliverer.start()
        try:
            wait_for(lambda: len(segment.held()) == 1)
            first = [m["properties"]["seq"] for m in json.loads(segment.held()[0].body)["batch"]]
            time.sleep(0.2)  # room for a second request to go out, were it allowed to
            assert len(segment.held()) == 1
            segment.release()
            wait_for(lambda: counts(store, time.time()) == {DELIVERED: 20})
        finally:
            segment.release()
            deliverer.stop(timeout=10)
        sent = [
            [m["properties"]["seq"] for m in json.loads(r.body)["batch"]]
            for r in segment.snapshot()
        ]
        assert first == sent[0]
        assert [seq for batch in sent for seq in batch] == list(range(20))
    finally:
        segment.stop()


# -- a store that fails -------------------------------------------------------------


def outbox_lines(caplog) -> list[tuple[int, str, dict]]:
    """What the lanes said about the store: level, message, and the counts."""
    return [
        (
            record.levelno,
            record.getMessage(),
            {
                key: getattr(record, key)
                for key in ("failures", "failing_seconds")
                if hasattr(record, key)
            },
        )
        for record in caplog.records
        if record.name == "service.outbox.delivery" and "outbox" in record.getMessage()
    ]


def started_on_failing(store, caplog):
    """A started deliverer on `store`, polling fast on a clock the test moves,
    with its lane's outage record; its log lines captured."""
    clock = FakeClock()
    deliverer = Deliverer(store, [ScriptedSender()], LIMITS, poll_seconds=0.01, clock=clock)
    caplog.set_level(logging.INFO, logger="service.outbox.delivery")
    deliverer.start()
    return deliverer, deliverer.lanes[A].outage, clock


def test_a_store_that_keeps_failing_is_logged_once_then_once_a_minute_then_when_it_answers(
    tmp_path, caplog
):
    # The outbox's volume is gone: no connection can open. The lane tries
    # again every few polls, and says so once, then once a minute of its
    # clock (which moves only when the test says), then once when it answers.
    volume = tmp_path / "volume"
    volume.mkdir()
    store = open_store(f"sqlite:///{volume}/outbox.db")
    volume.rmdir()
    deliverer, outage, clock = started_on_failing(store, caplog)
    try:
        wait_for(lambda: outage.total >= 6)
        first = outbox_lines(caplog)
        assert len(first) == 1, first
        level, message, _ = first[0]
        assert level == logging.WARNING
        assert message.startswith("outbox unavailable: ") and "does not exist" in message

        clock.advance(60)
        wait_for(lambda: len(outbox_lines(caplog)) == 2)
        seen = outage.total
        wait_for(lambda: outage.total >= seen + 6)  # failing on, within the same minute
        clock.advance(30)
        wait_for(lambda: outage.total >= seen + 12)
        clock.advance(30)
        wait_for(lambda: len(outbox_lines(caplog)) == 3)

        volume.mkdir()  # back: the next claim opens it
        wait_for(lambda: len(outbox_lines(caplog)) == 4)
    finally:
        deliverer.stop(timeout=10)
        store.close()
    lines = outbox_lines(caplog)
    assert [(level, message.split(":")[0]) for level, message, _ in lines] == [
        (logging.WARNING, "outbox unavailable"),
        (logging.WARNING, "outbox still unavailable"),
        (logging.WARNING, "outbox still unavailable"),
        (logging.INFO, "outbox available again"),
    ]
    (_, _, minute), (_, _, second), (_, _, back) = lines[1:]
    # Each line counts the failures since the one before; the last, the outage's.
    assert minute["failures"] >= 5 and minute["failing_seconds"] == 60
    assert second["failures"] >= 12 and second["failing_seconds"] == 120
    assert back["failures"] >= 1 + minute["failures"] + second["failures"]
    assert back["failing_seconds"] >= 120
    assert outage.since is None


def test_while_postgresql_does_not_answer_the_lane_says_so_without_the_password(caplog):
    pytest.importorskip("psycopg")
    password = "n0t-a-real-Passw0rd"
    port = free_port()  # nothing listens there
    store = open_store(f"postgresql://bridge:{password}@127.0.0.1:{port}/test")
    deliverer, outage, clock = started_on_failing(store, caplog)
    try:
        wait_for(lambda: outage.total >= 4)
        assert len(outbox_lines(caplog)) == 1
        clock.advance(60)
        wait_for(lambda: len(outbox_lines(caplog)) == 2)
    finally:
        deliverer.stop(timeout=10)
        store.close()
    (level, first, _), (_, again, counts) = outbox_lines(caplog)[:2]
    assert level == logging.WARNING and f"127.0.0.1:{port}" in first
    assert again.startswith("outbox still unavailable: ") and counts["failures"] >= 3
    assert password not in caplog.text


# -- metrics ----------------------------------------------------------------------------


def samples(text: str, name: str) -> dict[str, float]:
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {sample.labels["upstream"]: sample.value for sample in family.samples}
    return {}


def test_metrics_show_each_upstreams_window_calls_in_flight_and_pause(make_app):
    sender = ScriptedSender({"m0": [Outcome(RETRY, "429", "4xx", retry_after=60)]}, max_in_flight=6)
    app = make_app(senders=[sender])
    runtime = get_runtime(app)
    runtime.accept(A, users(1))
    clock = FakeClock(time.time() + 1)
    runtime.deliverer.clock = clock
    assert runtime.deliverer.run_once(A) == 1

    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert samples(text, "vero_bridge_upstream_window") == {"vero": 3}
    assert samples(text, "vero_bridge_upstream_calls_in_flight") == {"vero": 0}
    assert samples(text, "vero_bridge_upstream_paused_until_timestamp_seconds") == {
        "vero": pytest.approx(clock.now + 60)
    }


def test_drain_delivers_what_is_due_on_the_lanes_then_stops(store):
    again_now = Outcome(RETRY, "503", "5xx", retry_after=0)
    # A 500's Retry-After is the item's alone: it pauses nothing.
    later = (500, Outcome(RETRY, "500", "5xx", retry_after=3600))
    sender = ScriptedSender({"m3": [again_now, Outcome(SUCCEEDED)], "m5": [later]}, max_in_flight=2)
    deliverer = Deliverer(store, [sender], LIMITS, poll_seconds=0.05)
    store.enqueue(A, users(10), time.time())

    # Each item once, m3 twice (due again at once); m5 waits an hour.
    assert deliverer.drain() == 11
    assert counts(store, time.time()) == {DELIVERED: 9, PENDING: 1}
    assert sorted(sender.sent) == sorted([f"m{n}" for n in range(10)] + ["m3"])
    assert deliverer.stopping.is_set()
    assert all(not thread.is_alive() for thread in deliverer.lanes[A].threads)


def test_drain_stops_while_the_upstream_is_paused(store):
    paused = Outcome(RETRY, "429", "4xx", retry_after=3600)
    sender = ScriptedSender({"m0": [paused]}, max_in_flight=1)
    deliverer = Deliverer(store, [sender], LIMITS, poll_seconds=0.05)
    store.enqueue(A, users(3), time.time())

    # Nothing more can go out now: the rest waits for the pause, and a later run.
    assert deliverer.drain() == 1
    assert sender.sent == ["m0"]
    assert counts(store, time.time()) == {PENDING: 3}
