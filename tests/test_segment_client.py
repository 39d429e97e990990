"""The Segment sender on its own: packing under Segment's limits, the exact
requests it makes, and how each answer becomes an outcome. Real HTTP against a
pytest-httpserver stand-in for Segment; items are made by hand, no store."""

import json
import logging
import threading
import time
from datetime import datetime
from email.utils import formatdate

import pytest
from werkzeug import Response

from service.config import Config
from service.outbox import Item
from service.outbox.delivery import PERMANENT, RELEASED, RETRY, SUCCEEDED
from service.vero_to_segment.mapping import MAX_MESSAGE_BYTES, encode_message
from service.vero_to_segment.sender import (
    MAX_REQUEST_BYTES,
    MAX_REQUEST_MESSAGES,
    SegmentSender,
    batch_body,
    classify,
    envelope_bytes,
    pack,
    retry_after_seconds,
    sent_at,
)
from tests.senders import FakeClock, gate
from tests.support import basic_auth

WRITE_KEY = "wk_test_3f9a1c"


def message(n: int, pad: int = 0) -> dict:
    """A track message like the door builds, with `pad` extra characters."""
    body = {
        "type": "track",
        "event": "Email Opened",
        "userId": f"u{n}",
        "timestamp": "2023-11-14T22:13:20.000Z",
        "messageId": f"vero-{n:064x}",
        "properties": {},
        "context": {"library": {"name": "vero-bridge", "version": "0.1.0"}},
    }
    if pad:
        body["properties"]["pad"] = "x" * pad
    return body


def sized(n: int, size: int) -> dict:
    """A message whose encoded form is exactly `size` bytes."""
    base = len(encode_message(message(n, pad=1))) - 1
    result = message(n, pad=size - base)
    assert len(encode_message(result)) == size
    return result


def item(n: int, msg: dict | None = None) -> Item:
    return Item(
        id=n,
        direction="vero_to_segment",
        order_key=f"u{n}",
        payload={"message": msg if msg is not None else message(n)},
        attempts=1,
        progress=0,
        created_at=time.time(),
        lease="lease",
    )


@pytest.fixture
def segment_url(httpserver):
    return httpserver.url_for("/v1").rstrip("/")


@pytest.fixture
def sender(segment_url):
    return SegmentSender(Config(segment_write_key=WRITE_KEY, segment_api_url=segment_url))


def requests_seen(httpserver) -> list:
    return [request for request, _ in httpserver.log]


def batch_of(request) -> list[dict]:
    return json.loads(request.get_data())["batch"]


def send(sender, items, stopping=None, **gate_options):
    return sender.send(items, gate(sender, stopping, **gate_options))


def kinds(outcomes) -> list[str]:
    return [outcome.kind for outcome in outcomes]


# ---------------------------------------------------------------------------
# Packing (pure)


def test_pack_puts_everything_in_one_request_when_it_fits():
    assert pack([100] * 5, envelope=50) == [[0, 1, 2, 3, 4]]


def test_pack_counts_the_envelope_the_messages_and_the_commas_exactly():
    # 50 + 3*100 + 2 commas = 352 bytes.
    assert pack([100] * 3, envelope=50, max_bytes=352) == [[0, 1, 2]]
    assert pack([100] * 3, envelope=50, max_bytes=351) == [[0, 1], [2]]


def test_pack_fills_earlier_requests_with_later_small_messages():
    # The big one does not fit beside the first; the small ones still go first.
    assert pack([60, 60, 10, 10], envelope=0, max_bytes=100) == [[0, 2, 3], [1]]


def test_pack_respects_the_message_count_limit():
    groups = pack([1] * 7, envelope=0, max_bytes=10_000, max_count=3)
    assert groups == [[0, 1, 2], [3, 4, 5], [6]]


def test_pack_gives_a_message_too_large_for_any_request_one_of_its_own():
    assert pack([5, 500, 5], envelope=10, max_bytes=100) == [[0, 2], [1]]


def test_the_body_is_the_documented_envelope_around_the_exact_message_bytes():
    messages = [encode_message(message(1)), encode_message({"text": "héllo"})]
    body = batch_body(messages, "2023-11-14T22:13:20.000Z", WRITE_KEY)
    assert json.loads(body) == {
        "batch": [message(1), {"text": "héllo"}],
        "sentAt": "2023-11-14T22:13:20.000Z",
        "writeKey": WRITE_KEY,
    }
    assert list(json.loads(body)) == ["batch", "sentAt", "writeKey"]
    assert messages[1] in body  # not re-encoded: UTF-8 as measured
    assert len(body) == envelope_bytes(WRITE_KEY) + sum(map(len, messages)) + 1


def test_sent_at_is_iso_8601_utc_with_milliseconds_and_fixed_length():
    assert sent_at(1700000000.25) == "2023-11-14T22:13:20.250Z"
    assert len(sent_at(0)) == len(sent_at(4102444800.999)) == 24


# ---------------------------------------------------------------------------
# Classification (pure)


@pytest.mark.parametrize(
    "status, kind, split",
    [
        (200, SUCCEEDED, False),
        (201, SUCCEEDED, False),
        (204, SUCCEEDED, False),
        (408, RETRY, False),
        (429, RETRY, False),
        (500, RETRY, False),
        (502, RETRY, False),
        (503, RETRY, False),
        (504, RETRY, False),
        (501, PERMANENT, False),
        (505, PERMANENT, False),
        (400, PERMANENT, True),
        (413, PERMANENT, True),
        (401, PERMANENT, False),
        (403, PERMANENT, False),
        (404, PERMANENT, False),
        (422, PERMANENT, False),
        (302, RETRY, False),
    ],
)
def test_classify(status, kind, split):
    answer = classify(status, "why", None, 0.0)
    assert (answer.outcome.kind, answer.split) == (kind, split)
    assert answer.outcome.status == f"{status // 100}xx"
    if kind != SUCCEEDED:
        assert answer.outcome.error == f"Segment answered {status}: why"


def test_retry_after_is_read_as_seconds_or_an_http_date():
    now = 1700000000.0
    assert retry_after_seconds("120", now) == 120.0
    assert retry_after_seconds(" 1.5 ", now) == 1.5
    assert retry_after_seconds(formatdate(now + 90, usegmt=True), now) == 90.0
    assert retry_after_seconds(formatdate(now - 90, usegmt=True), now) == 0.0
    assert retry_after_seconds("-3", now) == 0.0
    for unreadable in (None, "", "soon", "nan"):
        assert retry_after_seconds(unreadable, now) is None


def test_classify_passes_retry_after_on_retryable_answers_only():
    assert classify(429, "", "7", 0.0).outcome.retry_after == 7.0
    assert classify(503, "", "7", 0.0).outcome.retry_after == 7.0
    assert classify(429, "", None, 0.0).outcome.retry_after is None
    assert classify(404, "", "7", 0.0).outcome.retry_after is None


# ---------------------------------------------------------------------------
# The requests it makes


def test_one_request_to_batch_with_basic_auth_the_write_key_and_sent_at(httpserver, sender):
    httpserver.expect_request("/v1/batch", method="POST").respond_with_json({"success": True})
    items = [item(n) for n in range(3)]
    before = time.time()
    outcomes = send(sender, items)
    after = time.time()

    assert kinds(outcomes) == [SUCCEEDED] * 3
    [request] = requests_seen(httpserver)
    assert request.path == "/v1/batch"
    assert request.headers["Authorization"] == basic_auth(WRITE_KEY)
    assert request.headers["Content-Type"] == "application/json"
    body = json.loads(request.get_data())
    assert body["batch"] == [message(0), message(1), message(2)]
    assert body["writeKey"] == WRITE_KEY
    sent = datetime.fromisoformat(body["sentAt"].replace("Z", "+00:00")).timestamp()
    assert before - 0.001 <= sent <= after + 0.001


def test_a_retry_sends_the_same_messages_with_a_new_sent_at(httpserver, sender):
    httpserver.expect_oneshot_request("/v1/batch").respond_with_data("busy", status=503)
    httpserver.expect_oneshot_request("/v1/batch").respond_with_json({"success": True})
    items = [item(1), item(2)]
    assert kinds(send(sender, items)) == [RETRY, RETRY]
    time.sleep(0.002)  # so the two sentAt values can differ
    assert kinds(send(sender, items)) == [SUCCEEDED, SUCCEEDED]
    first, second = (json.loads(r.get_data()) for r in requests_seen(httpserver))
    assert first["batch"] == second["batch"] == [message(1), message(2)]
    assert first["sentAt"] != second["sentAt"]


def test_a_request_of_exactly_the_byte_limit_goes_whole_and_one_byte_more_splits(
    httpserver, sender
):
    httpserver.expect_request("/v1/batch").respond_with_json({"success": True})
    count = 16
    room = MAX_REQUEST_BYTES - envelope_bytes(WRITE_KEY) - (count - 1)
    sizes = [room // count] * count
    sizes[0] += room - sum(sizes)
    messages = [sized(n, size) for n, size in enumerate(sizes)]

    assert kinds(send(sender, [item(n, m) for n, m in enumerate(messages)])) == [SUCCEEDED] * count
    [request] = requests_seen(httpserver)
    assert len(request.get_data()) == MAX_REQUEST_BYTES

    httpserver.clear_log()
    messages[5] = sized(5, sizes[5] + 1)
    send(sender, [item(n, m) for n, m in enumerate(messages)])
    sent = requests_seen(httpserver)
    assert len(sent) == 2
    assert all(len(r.get_data()) <= MAX_REQUEST_BYTES for r in sent)
    assert sorted(m["userId"] for r in sent for m in batch_of(r)) == sorted(
        f"u{n}" for n in range(count)
    )


def test_no_request_carries_more_than_2500_messages(httpserver, sender):
    httpserver.expect_request("/v1/batch").respond_with_json({"success": True})
    items = [
        item(n, {"type": "track", "event": "E", "userId": f"u{n}"})
        for n in range(MAX_REQUEST_MESSAGES + 1)
    ]
    assert kinds(send(sender, items)) == [SUCCEEDED] * len(items)
    assert [len(batch_of(r)) for r in requests_seen(httpserver)] == [MAX_REQUEST_MESSAGES, 1]


def test_a_message_over_32_kb_fails_alone_and_one_of_exactly_32_kb_is_sent(httpserver, sender):
    httpserver.expect_request("/v1/batch").respond_with_json({"success": True})
    items = [
        item(0),
        item(1, sized(1, MAX_MESSAGE_BYTES + 1)),
        item(2, sized(2, MAX_MESSAGE_BYTES)),
    ]
    outcomes = send(sender, items)
    assert kinds(outcomes) == [SUCCEEDED, PERMANENT, SUCCEEDED]
    assert outcomes[1].error == (
        f"the message is {MAX_MESSAGE_BYTES + 1} bytes, over Segment's limit"
        f" of {MAX_MESSAGE_BYTES} bytes per message"
    )
    [request] = requests_seen(httpserver)
    assert [m["userId"] for m in batch_of(request)] == ["u0", "u2"]


def test_an_item_without_a_message_fails_without_a_request(httpserver, sender):
    broken = Item(
        id=9,
        direction="vero_to_segment",
        order_key="u9",
        payload={"oops": 1},
        attempts=1,
        progress=0,
        created_at=0.0,
        lease="l",
    )
    [outcome] = send(sender, [broken])
    assert (outcome.kind, outcome.error) == (PERMANENT, "the outbox item holds no Segment message")
    assert requests_seen(httpserver) == []


# ---------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize(
    "status, kind",
    [
        (200, SUCCEEDED),
        (408, RETRY),
        (429, RETRY),
        (500, RETRY),
        (503, RETRY),
        (501, PERMANENT),
        (505, PERMANENT),
        (401, PERMANENT),
        (404, PERMANENT),
    ],
)
def test_each_answer_applies_to_every_message_of_the_request(httpserver, sender, status, kind):
    httpserver.expect_request("/v1/batch").respond_with_data("reason text", status=status)
    outcomes = send(sender, [item(1), item(2), item(3)])
    assert kinds(outcomes) == [kind] * 3
    if kind != SUCCEEDED:
        assert outcomes[0].error == f"Segment answered {status}: reason text"
    assert len(requests_seen(httpserver)) == 1  # only a 400 is split


def refusing(*bad_users: str):
    """A Segment stand-in that refuses any batch holding one of these users."""

    def handler(request):
        users = {m.get("userId") for m in batch_of(request)}
        if users & set(bad_users):
            return Response(
                json.dumps({"success": False, "message": "Invalid messageId"}),
                status=400,
                content_type="application/json",
            )
        return Response(json.dumps({"success": True}), status=200, content_type="application/json")

    return handler


def test_a_400_batch_is_split_until_the_bad_message_fails_alone(httpserver, sender):
    httpserver.expect_request("/v1/batch").respond_with_handler(refusing("u5"))
    outcomes = send(sender, [item(n) for n in range(8)])

    assert kinds(outcomes) == [SUCCEEDED] * 5 + [PERMANENT] + [SUCCEEDED] * 2
    assert (
        outcomes[5].error
        == 'Segment answered 400: {"success": false, "message": "Invalid messageId"}'
    )
    sizes = [len(batch_of(r)) for r in requests_seen(httpserver)]
    # 8 refused; halves 4 (ok) and 4 refused; 2 (u4,u5) refused, 2 ok; 1 ok, 1 refused.
    assert sizes == [8, 4, 4, 2, 1, 1, 2]
    delivered = [
        m["userId"] for r, resp in httpserver.log if resp.status_code == 200 for m in batch_of(r)
    ]
    assert sorted(delivered) == sorted(f"u{n}" for n in range(8) if n != 5)


def test_two_bad_messages_in_one_batch_each_fail_and_the_rest_are_delivered(httpserver, sender):
    httpserver.expect_request("/v1/batch").respond_with_handler(refusing("u0", "u6"))
    outcomes = send(sender, [item(n) for n in range(7)])
    assert kinds(outcomes) == [PERMANENT] + [SUCCEEDED] * 5 + [PERMANENT]


def test_a_400_for_a_single_message_is_final(httpserver, sender):
    httpserver.expect_request("/v1/batch").respond_with_data("bad", status=400)
    [outcome] = send(sender, [item(1)])
    assert (outcome.kind, outcome.error, outcome.status) == (
        PERMANENT,
        "Segment answered 400: bad",
        "4xx",
    )
    assert len(requests_seen(httpserver)) == 1


def test_429_with_retry_after_pauses_segment_and_the_rest_of_the_round_goes_back(
    httpserver, sender
):
    httpserver.expect_request("/v1/batch").respond_with_data(
        "slow down", status=429, headers={"Retry-After": "42"}
    )
    big = MAX_MESSAGE_BYTES - 100
    items = [item(n, sized(n, big)) for n in range(20)]  # needs two requests
    clock = FakeClock()
    its_gate = gate(sender, clock=clock)
    outcomes = sender.send(items, its_gate)
    assert len(requests_seen(httpserver)) == 1  # the second request never went
    sent = len(batch_of(requests_seen(httpserver)[0]))
    assert kinds(outcomes) == [RETRY] * sent + [RELEASED] * (20 - sent)
    assert {outcome.retry_after for outcome in outcomes[:sent]} == {42.0}
    # Every call to Segment from this process now waits as long.
    assert its_gate.lane.window.paused_until == clock.now + 42


def test_a_request_to_retry_ends_the_round_and_the_rest_go_back_unsent(httpserver, sender):
    """The rest may hold a later message of a user now retrying: sending it
    would let it overtake the earlier one."""
    httpserver.expect_ordered_request("/v1/batch", method="POST").respond_with_data(
        "busy", status=503
    )
    items = [item(n, sized(n, MAX_MESSAGE_BYTES - 100)) for n in range(20)]  # needs two requests
    outcomes = send(sender, items)
    assert len(requests_seen(httpserver)) == 1
    sent = len(batch_of(requests_seen(httpserver)[0]))
    assert 0 < sent < 20
    assert kinds(outcomes) == [RETRY] * sent + [RELEASED] * (20 - sent)


def test_a_network_error_is_retried_and_names_no_secret():
    closed = SegmentSender(
        Config(segment_write_key=WRITE_KEY, segment_api_url="http://127.0.0.1:9/v1")
    )
    [outcome] = send(closed, [item(1)])
    assert (outcome.kind, outcome.status) == (RETRY, "network")
    assert outcome.error.startswith("cannot reach Segment: ConnectionError")
    assert WRITE_KEY not in outcome.error


def test_no_answer_in_time_is_retried(httpserver):
    def slow(request):
        time.sleep(1.0)
        return Response("{}", status=200)

    httpserver.expect_request("/v1/batch").respond_with_handler(slow)
    # The smallest lease allowed (1 s) bounds the read timeout to a third of it.
    quick = SegmentSender(
        Config(
            segment_write_key=WRITE_KEY,
            outbox_lease_seconds=1.0,
            segment_api_url=httpserver.url_for("/v1").rstrip("/"),
        )
    )
    [outcome] = send(quick, [item(1)])
    assert (outcome.kind, outcome.error, outcome.status) == (
        RETRY,
        "Segment did not answer in time",
        "network",
    )


def test_the_write_key_never_reaches_an_error_or_a_log(httpserver, sender, caplog):
    httpserver.expect_request("/v1/batch").respond_with_data(f"unknown key {WRITE_KEY}", status=403)
    caplog.set_level(logging.DEBUG)
    [outcome] = send(sender, [item(1)])
    assert outcome.error == "Segment answered 403: unknown key [redacted]"
    assert caplog.records  # the refusal was logged ...
    assert all(
        WRITE_KEY not in record.getMessage() and WRITE_KEY not in str(record.__dict__)
        for record in caplog.records
    )  # ... without the key


# ---------------------------------------------------------------------------
# Stopping and the lease


def test_items_are_released_unsent_when_stopping_is_already_set(httpserver, sender):
    stopping = threading.Event()
    stopping.set()
    outcomes = send(sender, [item(1), item(2)], stopping)
    assert kinds(outcomes) == [RELEASED, RELEASED]
    assert requests_seen(httpserver) == []


def test_stopping_mid_round_releases_the_requests_not_yet_sent(httpserver, sender):
    stopping = threading.Event()

    def answer_then_stop(request):
        stopping.set()
        return Response("{}", status=200)

    httpserver.expect_request("/v1/batch").respond_with_handler(answer_then_stop)
    items = [item(n, sized(n, MAX_MESSAGE_BYTES - 100)) for n in range(20)]
    outcomes = send(sender, items, stopping)
    [request] = requests_seen(httpserver)
    sent = {m["userId"] for m in batch_of(request)}
    assert 0 < len(sent) < 20
    for n, outcome in enumerate(outcomes):
        assert outcome.kind == (SUCCEEDED if f"u{n}" in sent else RELEASED)


def test_no_request_starts_that_the_lease_might_not_cover(httpserver, sender):
    clock = FakeClock()

    def slow(request):
        clock.advance(20)  # the first request takes 20 of the lease's 30 s
        return Response("{}", status=200)

    httpserver.expect_request("/v1/batch").respond_with_handler(slow)
    items = [item(n, sized(n, MAX_MESSAGE_BYTES - 100)) for n in range(20)]
    outcomes = send(sender, items, clock=clock)
    [request] = requests_seen(httpserver)
    sent = {m["userId"] for m in batch_of(request)}
    # The second request could last 15 s more (its timeouts): past the lease.
    assert sender.call_seconds == 15
    assert kinds(outcomes) == [SUCCEEDED] * len(sent) + [RELEASED] * (20 - len(sent))


def test_the_timeouts_fit_inside_the_lease():
    for lease in (1.0, 30.0, 300.0):
        made = SegmentSender(Config(segment_write_key=WRITE_KEY, outbox_lease_seconds=lease))
        # A request started in the first half of the lease ends inside it.
        assert made.call_seconds <= lease / 2


def test_segment_s_reason_goes_to_the_dead_letter_and_never_to_the_log(httpserver, sender, caplog):
    httpserver.expect_request("/v1/batch").respond_with_data(
        '{"message": "bad email ann@example.org"}', status=403
    )
    caplog.set_level(logging.INFO)
    [outcome] = send(sender, [item(1)])
    assert "ann@example.org" in outcome.error
    [record] = [r for r in caplog.records if r.name == "service.vero_to_segment.sender"]
    assert (record.getMessage(), record.status, record.messages) == (
        "Segment refused a batch",
        403,
        1,
    )
    assert "example.org" not in str(record.__dict__)
