"""The adaptive window's arithmetic and the retry policy's rules, on times
passed in: no clock, no waiting."""

from __future__ import annotations

import pytest

from service.retry import (
    HEALTHY_BACKOFF_CAP_SECONDS,
    RETRY_AFTER_CAP_SECONDS,
    backoff,
    congested,
    pause_seconds,
)
from service.upstream import RATE_HORIZON_SECONDS, Window

T0 = 1_700_000_000.0


def answered(window: Window, *statuses: int | None, now: float = T0) -> None:
    """Each status answers a call started now, one after another."""
    for status in statuses:
        window.finish(window.start(now), status, None, now)


@pytest.mark.parametrize("status", [None, 408, 429, 500, 501, 502, 503, 504, 505, 599])
def test_no_answer_408_429_and_every_5xx_mean_congestion(status):
    assert congested(status)


@pytest.mark.parametrize("status", [200, 204, 301, 400, 401, 404, 409, 413, 422])
def test_other_answers_are_good_news_about_the_upstream(status):
    assert not congested(status)


def test_only_a_429_or_503_with_retry_after_pauses_the_upstream():
    assert pause_seconds(429, 7.0) == 7.0
    assert pause_seconds(503, 0.5) == 0.5
    assert pause_seconds(429, None) == 0.0
    assert pause_seconds(500, 7.0) == 0.0
    assert pause_seconds(502, 7.0) == 0.0
    assert pause_seconds(None, 7.0) == 0.0
    assert pause_seconds(429, -3.0) == 0.0
    assert pause_seconds(429, 10 * RETRY_AFTER_CAP_SECONDS) == RETRY_AFTER_CAP_SECONDS


def test_the_window_starts_at_its_ceiling():
    window = Window(64)
    assert (window.size, window.limit, window.in_flight) == (64.0, 64, 0)
    with pytest.raises(ValueError):
        Window(0)


def test_a_congestion_signal_halves_the_window_down_to_one_call():
    window = Window(64)
    for expected in (32, 16, 8, 4, 2, 1, 1):
        answered(window, 503)
        assert window.limit == expected


def test_failures_of_calls_in_flight_together_halve_the_window_once():
    window = Window(64)
    tickets = [window.start(T0) for _ in range(10)]
    for ticket in tickets:
        window.finish(ticket, 503, None, T0)
    assert (window.limit, window.in_flight) == (32, 0)
    # A call started after the cut may cut again.
    answered(window, None)
    assert window.limit == 16


def test_good_answers_grow_the_window_by_one_call_per_window_of_answers():
    window = Window(64)
    answered(window, 429, 429)  # 64 -> 32 -> 16
    assert window.limit == 16
    answered(window, *[200] * 16)
    assert window.limit == 16  # each adds 1/size: a little under one call
    answered(window, 200)
    assert window.limit == 17
    answered(window, *[200] * 2000)
    assert (window.size, window.limit) == (64.0, 64)  # never past the ceiling


def test_a_permanent_4xx_is_a_good_answer_for_the_window():
    window = Window(8)
    answered(window, 503)
    answered(window, *[400] * 5)
    assert window.limit == 5


def test_the_window_admits_calls_up_to_its_limit():
    window = Window(2)
    assert window.admits(T0)
    first, second = window.start(T0), window.start(T0)
    assert not window.admits(T0)
    window.finish(first, 200, None, T0)
    assert window.admits(T0)
    window.abandon()  # the second ends without an answer to learn from
    assert (window.in_flight, window.limit) == (0, 2)
    assert second == first  # same generation: no cut between them


def test_a_429_with_retry_after_pauses_until_then_and_a_later_one_extends_it():
    window = Window(8)
    window.finish(window.start(T0), 429, 30.0, T0)
    assert window.paused(T0 + 29.9) and not window.paused(T0 + 30)
    assert not window.admits(T0 + 10)
    assert window.delay(T0 + 10) == 20.0
    # A shorter wish does not shorten the pause; a longer one extends it.
    window.finish(window.start(T0), 503, 5.0, T0 + 1)
    assert window.paused_until == T0 + 30
    window.finish(window.start(T0), 503, 60.0, T0 + 1)
    assert window.paused_until == T0 + 61
    assert window.admits(T0 + 61)


def test_the_rate_cap_spaces_the_starts_of_calls():
    window = Window.for_rate(10, per_second=4.0)
    window.start(T0)
    assert window.delay(T0) == 0.25
    window.start(T0 + 0.25)
    assert window.next_start == T0 + 0.5
    # A call starting late does not bank the time it was not used.
    window.start(T0 + 5)
    assert window.next_start == T0 + 5.25
    assert window.hold_limit() == RATE_HORIZON_SECONDS * 4
    assert Window(10).hold_limit() is None


def test_the_upstream_is_healthy_while_most_recent_answers_are_good():
    window = Window(8)
    assert window.healthy
    # Three in ten failing (the head-of-line case): still healthy.
    for _ in range(30):
        answered(window, 200, 503, 200, 200, 503, 200, 200, 503, 200, 200)
    assert window.healthy
    # Down: every call fails.
    answered(window, *[None] * 30)
    assert not window.healthy
    answered(window, *[200] * 30)
    assert window.healthy


def test_backoff_is_capped_lower_while_the_upstream_is_healthy():
    assert backoff(10, rand=lambda: 1.0) == 512
    assert backoff(10, rand=lambda: 1.0, cap=HEALTHY_BACKOFF_CAP_SECONDS) == 30
    assert backoff(10, rand=lambda: 0.0, cap=HEALTHY_BACKOFF_CAP_SECONDS) == 15
    assert backoff(3, rand=lambda: 1.0, cap=HEALTHY_BACKOFF_CAP_SECONDS) == 4
