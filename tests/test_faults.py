"""Proof of no loss: the real service under gunicorn, between loopback
stand-ins for Vero and Segment that fail, go down, hold answers while the
service is killed, or serve two instances and a separate worker at once.

Every test sends messages for several users in both directions, with a
per-user sequence number inside each message, and then checks what the
stand-ins received:
- every acknowledged message was delivered;
- duplicates only after a crash, and no more than the work then in flight;
- per user, no call arrived before the user's earlier one was delivered;
- a Segment message kept its messageId on every attempt.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import requests

from service.outbox import DEAD, DELIVERED, IN_FLIGHT, PENDING, open_store
from tests.conftest import wait_for
from tests.standin import CONNECTION_RESET, OK, Received, Reply, Upstream
from tests.standin import DELIVERED as TAKEN
from tests.support import ROOT, Service, basic_auth, metric, scrape, sign

pytestmark = pytest.mark.e2e

SHARED_SECRET = "faults-shared-secret"
WRITE_KEY = "faults-write-key"
WEBHOOK_TOKEN = "faults-webhook-token"
VERO_TOKEN = "faults-vero-token"
USERS = [f"user-{n}" for n in range(6)]
A, B = "segment_to_vero", "vero_to_segment"
FLASK = Path(sys.executable).with_name("flask")
# Bounds for waits only: a healthy run takes a fraction of these.
DELIVERY_TIMEOUT = 40.0
WORKER_EXIT_TIMEOUT = 30.0


# ---------------------------------------------------------------------------
# The traffic


def segment_messages(run: str, first: int, count: int) -> list[dict]:
    """Direction A input: `count` sequence numbers from `first` for every user,
    interleaved across users, alternating tracks and identifies."""
    messages = []
    for seq in range(first, first + count):
        for user in USERS:
            common = {"userId": user, "messageId": f"{run}-{user}-{seq}"}
            if seq % 2:
                messages.append({"type": "identify", "traits": {"seq": seq}, **common})
            else:
                messages.append(
                    {"type": "track", "event": "Fault Step", "properties": {"seq": seq}, **common}
                )
    return messages


def vero_webhooks(run: str, first: int, count: int) -> list[dict]:
    """Direction B input; the sequence number travels in `message_id`, which
    Segment receives as properties.email_id."""
    webhooks = []
    for seq in range(first, first + count):
        for user in USERS:
            kind = "opened" if seq % 2 else "delivered"
            webhooks.append(
                {
                    "type": kind,
                    f"{kind}_at": 1_700_000_000 + seq,
                    "user": {"id": user},
                    "campaign": {"id": 7, "name": "Faults"},
                    "message_id": f"{run}|{user}|{seq}",
                }
            )
    return webhooks


def chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def post_segment(base_url: str, messages: list[dict]) -> None:
    """Send in order, alternating Segment's two ways in: the Segment library
    route with Basic auth, and the webhook route with a signed array (which,
    holding several messages, also needs the Authorization header a Webhooks
    (Actions) destination sends: X-Signature authenticates one message)."""
    for number, chunk in enumerate(chunks(messages, 8)):
        if number % 2:
            answer = requests.post(
                base_url + "/v1/batch", json={"batch": chunk}, auth=(SHARED_SECRET, ""), timeout=10
            )
        else:
            first = json.dumps(chunk[0])
            body = ("[" + ",".join([first] + [json.dumps(m) for m in chunk[1:]]) + "]").encode()
            answer = requests.post(
                base_url + "/segment",
                data=body,
                timeout=10,
                headers={
                    "Content-Type": "application/json",
                    "X-Signature": sign(first.encode(), SHARED_SECRET),
                    "Authorization": f"Bearer {SHARED_SECRET}",
                },
            )
        assert_accepted(answer, len(chunk))


def post_webhooks(base_url: str, webhooks: list[dict]) -> None:
    """Send in order: arrays of webhooks, and now and then a single one."""
    url = f"{base_url}/vero/webhooks/{WEBHOOK_TOKEN}"
    for number, chunk in enumerate(chunks(webhooks, 6)):
        if number % 3 == 0:
            for webhook in chunk:
                assert_accepted(requests.post(url, json=webhook, timeout=10), 1)
        else:
            assert_accepted(requests.post(url, json=chunk, timeout=10), len(chunk))


def assert_accepted(answer: requests.Response, count: int) -> None:
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["accepted"], body["duplicate"], body["skipped"], body["rejected"]) == (
        count,
        0,
        0,
        [],
    )


def post_both(base_url: str, run: str, first: int, count: int) -> None:
    post_segment(base_url, segment_messages(run, first, count))
    post_webhooks(base_url, vero_webhooks(run, first, count))


def expected(first: int, count: int) -> set[tuple[str, int]]:
    return {(user, seq) for seq in range(first, first + count) for user in USERS}


# ---------------------------------------------------------------------------
# What the stand-ins saw


def vero_attempts(received: list[Received]) -> list[tuple[str, int, str, None]]:
    """(user, seq, outcome, None) per Vero call, in arrival order."""
    attempts = []
    for request in received:
        body = request.json
        assert body["auth_token"] == VERO_TOKEN
        user = body["id"] if request.path.endswith("/users/track") else body["identity"]["id"]
        attempts.append((user, body["data"]["seq"], request.outcome, None))
    return attempts


def segment_requests(received: list[Received]) -> list[list[tuple[str, int, str, str]]]:
    """Per /batch request, (user, seq, outcome, messageId) per message in it."""
    requests = []
    for request in received:
        assert request.path.endswith("/batch")
        assert request.headers["Authorization"] == basic_auth(WRITE_KEY)
        attempts = []
        for message in request.json["batch"]:
            _, user, seq = message["properties"]["email_id"].split("|")
            assert message["userId"] == user
            attempts.append((user, int(seq), request.outcome, message["messageId"]))
        requests.append(attempts)
    return requests


def segment_attempts(received: list[Received]) -> list[tuple[str, int, str, str]]:
    """(user, seq, outcome, messageId) per message in each /batch request."""
    return [attempt for request in segment_requests(received) for attempt in request]


def delivered(attempts) -> set[tuple[str, int]]:
    return {(user, seq) for user, seq, outcome, _ in attempts if outcome == TAKEN}


def extra_copies(attempts) -> Counter:
    """(user, seq) -> how many times more than once it was delivered."""
    copies = Counter((user, seq) for user, seq, outcome, _ in attempts if outcome == TAKEN)
    return Counter({key: count - 1 for key, count in copies.items() if count > 1})


def check_order(requests) -> None:
    """No message of a user arrived before each of the user's earlier ones had
    been delivered, or stood before it in the same request (sequence numbers
    are consecutive from the first). A Segment /batch request is taken whole
    and in order, so a user's burst may travel together; each Vero call is a
    request of its own."""
    done: dict[str, set[int]] = defaultdict(set)
    first = min(seq for request in requests for _, seq, _, _ in request)
    for request in requests:
        ahead: dict[str, set[int]] = defaultdict(set)
        for user, seq, _outcome, _ in request:
            missing = set(range(first, seq)) - done[user] - ahead[user]
            assert not missing, f"{user} #{seq} was sent before #{min(missing)} was delivered"
            ahead[user].add(seq)
        for user, seq, outcome, _ in request:
            if outcome == TAKEN:
                done[user].add(seq)


def check_message_ids(attempts) -> None:
    """One messageId per message, the same on every attempt, never shared."""
    ids: dict[tuple[str, int], set[str]] = defaultdict(set)
    for user, seq, _, message_id in attempts:
        ids[(user, seq)].add(message_id)
    assert all(len(found) == 1 for found in ids.values()), "a retry changed a messageId"
    assert len({next(iter(found)) for found in ids.values()}) == len(ids)


def check_all(vero: Upstream, segment: Upstream, wanted: set, allowed_extra=(0, 0)) -> tuple:
    """Everything wanted delivered, nothing else, in order; returns the extra
    copies per direction, which must not exceed `allowed_extra`."""
    results = []
    vero_units = [[attempt] for attempt in vero_attempts(vero.snapshot())]
    for units, allowed in (
        (vero_units, allowed_extra[0]),
        (segment_requests(segment.snapshot()), allowed_extra[1]),
    ):
        attempts = [attempt for unit in units for attempt in unit]
        assert delivered(attempts) == wanted
        check_order(units)
        extra = extra_copies(attempts)
        assert sum(extra.values()) <= allowed, f"duplicates beyond the work in flight: {extra}"
        results.append(extra)
    check_message_ids(segment_attempts(segment.snapshot()))
    return tuple(results)


def drained(store_url: str, total: int) -> bool:
    """The outbox holds `total` delivered items per direction and nothing else."""
    store = open_store(store_url)
    try:
        counts = store.counts(time.time())
    finally:
        store.close()
    return all(
        counts.get((direction, DELIVERED), 0) == total
        and not any(counts.get((direction, state), 0) for state in (PENDING, IN_FLIGHT, DEAD))
        for direction in (A, B)
    )


def wait_until_delivered(store_url: str, vero: Upstream, segment: Upstream, wanted: set) -> None:
    def done() -> bool:
        return (
            drained(store_url, len(wanted))
            and wanted <= delivered(vero_attempts(vero.snapshot()))
            and wanted <= delivered(segment_attempts(segment.snapshot()))
        )

    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while not done():
        if time.monotonic() > deadline:
            store = open_store(store_url)
            counts = store.counts(time.time())
            store.close()
            missing_a = wanted - delivered(vero_attempts(vero.snapshot()))
            missing_b = wanted - delivered(segment_attempts(segment.snapshot()))
            pytest.fail(
                f"not delivered within {DELIVERY_TIMEOUT}s: outbox {counts}; "
                f"missing at Vero {sorted(missing_a)[:5]} ({len(missing_a)}), "
                f"at Segment {sorted(missing_b)[:5]} ({len(missing_b)})"
            )
        time.sleep(0.1)


def in_flight(store_url: str, at: float) -> dict[str, int]:
    """Claimed and unsettled work per direction, as it stood at time `at`."""
    store = open_store(store_url)
    try:
        counts = store.counts(at)
    finally:
        store.close()
    return {direction: counts.get((direction, IN_FLIGHT), 0) for direction in (A, B)}


# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def upstreams():
    vero, segment = Upstream().start(), Upstream().start()
    yield vero, segment
    for upstream in (vero, segment):
        upstream.release()
        upstream.stop()


def service_env(store_url: str, vero_url: str, segment_url: str, **overrides: str) -> dict:
    env = {
        "DATABASE_URL": store_url,
        "VERO_AUTH_TOKEN": VERO_TOKEN,
        "VERO_API_URL": vero_url,
        "SEGMENT_SHARED_SECRET": SHARED_SECRET,
        "SEGMENT_WRITE_KEY": WRITE_KEY,
        "SEGMENT_API_URL": segment_url,
        "VERO_WEBHOOK_TOKEN": WEBHOOK_TOKEN,
        "WEB_CONCURRENCY": "2",
        "GUNICORN_THREADS": "4",
        "DELIVERY_POLL_SECONDS": "0.05",
        "OUTBOX_LEASE_SECONDS": "5",
        "OUTBOX_POOL_SIZE": "8",
    }
    env.update(overrides)
    return env


# ---------------------------------------------------------------------------
# (a) upstreams failing a share of calls


FAILURES = [Reply(503), Reply(500), Reply(429, {"Retry-After": "1"}), CONNECTION_RESET]


def every_third_call_fails(number: int, request) -> Reply:
    # The first calls fail once in each way, so that every kind happens even
    # where batching leaves an upstream only a few calls; then one in three.
    if number <= len(FAILURES):  # numbers start at 1
        return FAILURES[number - 1]
    if number % 3:
        return OK
    return FAILURES[(number // 3) % len(FAILURES)]


def test_nothing_is_lost_when_upstreams_fail_a_share_of_calls(store_url, upstreams, tmp_path):
    vero, segment = upstreams
    vero.reply = segment.reply = every_third_call_fails
    run = uuid.uuid4().hex[:8]
    env = service_env(store_url, vero.url, segment.url)
    with Service(env, tmp_path / "service.log") as service:
        post_both(service.url, run, 0, 8)
        wait_until_delivered(store_url, vero, segment, expected(0, 8))
    check_all(vero, segment, expected(0, 8))
    # The failures really happened, in both directions and of every kind.
    for upstream in (vero, segment):
        assert {r.outcome for r in upstream.snapshot()} >= {"refused", "reset", TAKEN}


# ---------------------------------------------------------------------------
# (b) upstreams down for a while


def test_nothing_is_lost_while_upstreams_are_down(store_url, upstreams, tmp_path):
    vero, segment = upstreams
    run = uuid.uuid4().hex[:8]
    env = service_env(store_url, vero.url, segment.url)
    with Service(env, tmp_path / "service.log") as service:
        post_both(service.url, run, 0, 3)
        vero.stop()
        segment.stop()
        post_both(service.url, run, 3, 3)
        # Down means the service tried and could not connect, in both directions.
        for upstream in ("vero", "segment"):
            wait_for(
                lambda upstream=upstream: (
                    (
                        metric(
                            scrape(service.url),
                            "vero_bridge_deliveries_total",
                            upstream=upstream,
                            result="failed",
                            status_class="network",
                        )
                        or 0
                    )
                    >= 2
                ),
                timeout=DELIVERY_TIMEOUT,
            )
        vero.start()
        segment.start()
        post_both(service.url, run, 6, 3)
        wait_until_delivered(store_url, vero, segment, expected(0, 9))
    check_all(vero, segment, expected(0, 9))


# ---------------------------------------------------------------------------
# (c) the service killed mid-delivery, restarted on the same store


def test_a_service_killed_mid_delivery_loses_nothing_and_repeats_only_work_in_flight(
    store_url, upstreams, tmp_path
):
    vero, segment = upstreams
    run = uuid.uuid4().hex[:8]
    # A short lease, so the killed service's claims expire quickly; long enough
    # that nothing is claimed twice between the hold and the kill.
    env = service_env(store_url, vero.url, segment.url, OUTBOX_LEASE_SECONDS="3")
    first = Service(env, tmp_path / "first.log")
    with first:
        post_both(first.url, run, 0, 3)
        vero.hold()
        segment.hold()
        post_both(first.url, run, 3, 5)
        wait_for(lambda: vero.held() and segment.held(), timeout=DELIVERY_TIMEOUT, interval=0.01)
        first.kill()
        killed_at = time.time()
    held = {
        A: {(u, s) for u, s, *_ in vero_attempts(vero.held())},
        B: {(u, s) for u, s, *_ in segment_attempts(segment.held())},
    }
    flying = in_flight(store_url, killed_at)
    # The upstreams now take what they held: the service never heard so.
    vero.release()
    segment.release()

    with Service(env, tmp_path / "second.log"):
        wait_until_delivered(store_url, vero, segment, expected(0, 8))
    extra_a, extra_b = check_all(vero, segment, expected(0, 8), (flying[A], flying[B]))
    # Unconfirmed work is sent again: every held call was repeated, and
    # nothing else was.
    assert set(extra_a) == held[A]
    assert set(extra_b) == held[B]


# ---------------------------------------------------------------------------
# (d) two instances on one PostgreSQL, and a separate worker stopped mid-burst


@pytest.mark.postgres
def test_two_instances_and_a_worker_share_postgres_and_the_worker_stops_gracefully(
    postgres_url, upstreams, tmp_path
):
    vero, segment = upstreams
    run = uuid.uuid4().hex[:8]
    # One instance delivers in its web processes; the other only answers, and
    # the Procfile's worker delivers for it. The worker reaches the stand-ins
    # under /worker, so its calls can be told apart (and held).
    web = service_env(postgres_url, vero.url, segment.url)
    answer_only = service_env(postgres_url, vero.url, segment.url, DELIVERY_IN_WEB="false")
    worker_env = {
        **answer_only,
        "VERO_API_URL": vero.url + "/worker",
        "SEGMENT_API_URL": segment.url + "/worker",
    }
    from_worker = lambda request: request.path.startswith("/worker/")  # noqa: E731

    with (
        Service(answer_only, tmp_path / "answer-only.log") as two,
        worker_process(worker_env, tmp_path / "worker.log") as worker,
    ):
        # Both delivering processes at work on one outbox, fed by both instances.
        with Service(web, tmp_path / "web.log") as one:
            post_both(one.url, run, 0, 1)
            post_both(two.url, run, 1, 1)
            post_both(one.url, run, 2, 1)
            wait_until_delivered(postgres_url, vero, segment, expected(0, 3))
        # The delivering instance is gone, so the burst below is the worker's.
        # Mid-burst, the worker has calls out in both directions, unanswered.
        vero.hold(from_worker)
        segment.hold(from_worker)
        post_both(two.url, run, 3, 4)
        wait_for(
            lambda: vero.held(from_worker) and segment.held(from_worker),
            timeout=DELIVERY_TIMEOUT,
            interval=0.01,
        )
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # let the signal land while the calls are out
        vero.release()
        segment.release()
        assert worker.wait(WORKER_EXIT_TIMEOUT) == 0
        # What the worker handed back, the instance delivers when it returns.
        with Service(web, tmp_path / "web-again.log") as one:
            post_both(one.url, run, 7, 1)
            post_both(two.url, run, 8, 1)
            wait_until_delivered(postgres_url, vero, segment, expected(0, 9))
    # The worker finished what it had out; had it dropped it, the lease would
    # have run out and the instance sent it again: a duplicate.
    check_all(vero, segment, expected(0, 9))
    for upstream in (vero, segment):
        assert {from_worker(r) for r in upstream.snapshot()} == {True, False}


@contextlib.contextmanager
def worker_process(env: dict, log_path: Path):
    """`flask --app wsgi outbox deliver`, the Procfile's worker line."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(FLASK), "--app", "wsgi", "outbox", "deliver"],
            cwd=ROOT,
            env={**env, "PATH": str(FLASK.parent) + ":/usr/bin:/bin"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
