"""The operator commands, through Flask's CLI runner on a real store."""

import json
import time

from service.outbox.delivery import PERMANENT, Limits, Outcome, settle
from service.results import Accept
from service.runtime import get_runtime
from tests.senders import ScriptedSender

A = "segment_to_vero"


def run(app, *args):
    result = app.test_cli_runner().invoke(args=["outbox", *args])
    return result.exit_code, result.output


def seed(app, failing=("m2",)):
    """Three messages: m1 delivered, m2 dead, m3 waiting."""
    store = get_runtime(app).store
    now = time.time()
    store.enqueue(
        A, [Accept("m1", "u1", {"key": "m1"}), Accept("m2", "u2", {"key": "m2"})], now - 60
    )
    items = store.claim(A, 10, 30, now)
    store.settle(
        [
            settle(
                item,
                Outcome(PERMANENT, "POST /users/track answered 400", "4xx")
                if item.payload["key"] in failing
                else Outcome("succeeded"),
                now,
                Limits(),
            )
            for item in items
        ],
        now,
    )
    store.enqueue(A, [Accept("m3", "u3", {"key": "m3"})], now - 10)
    return store


def test_status_counts_by_state_and_direction(make_app):
    app = make_app()
    seed(app)
    code, output = run(app, "status", "--json")
    assert code == 0
    rows = {row["direction"]: row for row in json.loads(output)}
    assert rows[A]["pending"] == 1 and rows[A]["delivered"] == 1 and rows[A]["dead"] == 1
    assert 9 <= rows[A]["oldest_pending_seconds"] < 60
    assert rows["vero_to_segment"]["oldest_pending_seconds"] is None
    code, output = run(app, "status")
    assert code == 0 and output.splitlines()[0].startswith("direction")
    assert any(line.startswith(A) for line in output.splitlines())


def test_dead_lists_dead_work_with_its_reason(make_app):
    app = make_app()
    seed(app)
    code, output = run(app, "dead")
    assert code == 0
    (line,) = output.splitlines()
    assert A in line and "POST /users/track answered 400" in line
    code, output = run(app, "dead", "--json")
    assert json.loads(output)["payload"] == {"key": "m2"}
    assert run(app, "dead", "--direction", "vero_to_segment") == (0, "no dead work\n")


def test_replay_by_id_or_all_and_refuses_neither(make_app):
    app = make_app()
    store = seed(app)
    code, output = run(app, "replay")
    assert code != 0 and "--all" in output
    (dead,) = store.dead(None, 10)
    assert run(app, "replay", str(dead.id)) == (0, "replayed 1\n")
    assert run(app, "replay", "--all") == (0, "replayed 0\n")
    assert store.dead(None, 10) == []


def test_deliver_once_sends_what_is_due(make_app):
    sender = ScriptedSender()
    app = make_app(senders=[sender])
    seed(app, failing=())
    assert run(app, "deliver", "--once") == (0, "handled 1\n")
    assert sender.sent == ["m3"]


def test_deliver_says_when_nothing_is_configured(make_app):
    code, output = run(make_app(senders=[]), "deliver", "--once")
    assert code != 0 and "no direction is configured" in output


def test_purge_deletes_delivered_work_past_retention(make_app):
    app = make_app()
    seed(app, failing=())
    assert run(app, "purge") == (0, "purged 0\n")  # within the default 168 hours
    assert run(app, "purge", "--older-than-hours", "0") == (0, "purged 2\n")


def test_a_store_that_cannot_be_reached_is_one_line_naming_why(make_app, tmp_path):
    # A folder that is a file: no SQLite outbox can be opened in it (as with a
    # PostgreSQL server that is down, each command once ended in a traceback).
    blocker = tmp_path / "file"
    blocker.write_text("")
    app = make_app({"DATABASE_URL": f"sqlite:///{blocker}/outbox.db", "VERO_AUTH_TOKEN": "t0ken"})
    for args in (["status"], ["dead"], ["replay", "--all"], ["purge"], ["deliver", "--once"]):
        code, output = run(app, *args)
        assert code == 1, args
        assert output.startswith("Error: ") and "SQLite outbox" in output, (args, output)
        assert len(output.strip().splitlines()) == 1, output
