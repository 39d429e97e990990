"""How the Segment sender groups a claim into requests and units (pure): each
user's run stays whole in one request where it fits, in order across
consecutive requests of its own where it does not, so that units can go out
side by side without a user's later message overtaking an earlier one."""

from __future__ import annotations

import time

from service.config import Config
from service.outbox import Item
from service.outbox.delivery import PERMANENT
from service.vero_to_segment.mapping import MAX_MESSAGE_BYTES
from service.vero_to_segment.sender import SegmentSender, plan
from tests.senders import ScriptedSender, gate


def test_runs_that_fit_stay_whole_and_are_packed_first_fit():
    # Three users' runs: 60, 60 and 30 bytes (with the commas inside a run).
    runs = [[20, 19, 19], [59], [14, 15]]
    chains = plan(runs, envelope=0, max_bytes=100)
    assert chains == [
        [[(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]],  # run 2 fills the room after run 0
        [[(1, 0)]],
    ]


def test_a_run_too_big_for_one_request_gets_consecutive_requests_of_its_own():
    runs = [[10], [40, 40, 40, 10], [10]]
    chains = plan(runs, envelope=10, max_bytes=100)
    # The small runs share a request; the big one is cut in order, never first
    # fit (its last message would fit beside its first and overtake the middle).
    assert chains == [
        [[(0, 0), (2, 0)]],
        [[(1, 0), (1, 1)], [(1, 2), (1, 3)]],
    ]


def test_the_message_count_limit_holds_for_whole_runs():
    runs = [[1] * 3, [1] * 3, [1] * 2]
    chains = plan(runs, envelope=0, max_bytes=10_000, max_count=5)
    assert [[len(request) for request in chain] for chain in chains] == [[5], [3]]
    assert plan([[1] * 7], envelope=0, max_bytes=10_000, max_count=3) == [
        [[(0, 0), (0, 1), (0, 2)], [(0, 3), (0, 4), (0, 5)], [(0, 6)]]
    ]


def item(n: int, user: str, pad: int = 0, message: object = None) -> Item:
    if message is None:
        message = {"type": "track", "event": "E", "userId": user, "properties": {"p": "x" * pad}}
    return Item(n, "vero_to_segment", user, {"message": message}, 1, 0, time.time(), "lease")


def test_units_hold_each_users_run_whole_and_a_broken_item_alone():
    sender = SegmentSender(Config(segment_write_key="wk"))
    big = MAX_MESSAGE_BYTES // 2
    items = [item(n, user, big) for n, user in enumerate(["ann", "bob"] * 16)]
    items.append(item(99, "cat", message="not a message"))

    units = sender.units(items)

    assert len(units) == 3
    by_user = [{i.order_key for i in unit} for unit in units]
    assert by_user == [{"ann"}, {"bob"}, {"cat"}]
    assert [i.id for i in units[0]] == [i.id for i in items if i.order_key == "ann"]
    # The broken item makes no request; it is dead-lettered with the reason.
    [outcome] = sender.send(units[2], gate(ScriptedSender(direction="vero_to_segment")))
    assert outcome.kind == PERMANENT
