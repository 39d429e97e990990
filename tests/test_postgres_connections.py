"""The PostgreSQL outbox's connections: timeouts and keepalives, so that a
silent network or a runaway statement cannot hold a connection for minutes,
and the URL's own settings winning over ours."""

from __future__ import annotations

import threading
import time
import uuid
from urllib.parse import unquote

import psycopg
import pytest

from service.outbox import StoreError
from service.outbox.postgres import PostgresStore, _lock_key
from service.results import Accept
from tests.conftest import with_pg_options

pytestmark = pytest.mark.postgres

A = "segment_to_vero"


def session(store: PostgresStore) -> dict[str, str]:
    """What one of the store's connections runs with: server settings and the
    libpq parameters it connected with."""
    with store._transaction("read") as conn:
        shown = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("statement_timeout", "idle_in_transaction_session_timeout", "search_path")
        }
        return {**shown, **conn.info.get_parameters()}


def test_connections_get_timeouts_and_keepalives_by_default(postgres_url):
    store = PostgresStore(postgres_url)
    try:
        settings = session(store)
    finally:
        store.close()
    assert settings["statement_timeout"] == "15s"
    assert settings["idle_in_transaction_session_timeout"] == "30s"
    assert (settings["keepalives"], settings["keepalives_idle"]) == ("1", "10")
    assert (settings["keepalives_interval"], settings["keepalives_count"]) == ("5", "3")
    assert settings["tcp_user_timeout"] == "25000"
    # The URL's own options (the test's schema) are kept beside ours.
    assert settings["search_path"].startswith("test_")


def test_the_urls_own_settings_win(postgres_url):
    url = with_pg_options(postgres_url, "statement_timeout=2min") + "&keepalives_idle=60"
    store = PostgresStore(url)
    try:
        settings = session(store)
    finally:
        store.close()
    assert settings["statement_timeout"] == "2min"
    assert settings["idle_in_transaction_session_timeout"] == "30s"
    assert settings["keepalives_idle"] == "60"


def test_pgoptions_counts_as_the_urls_own_when_the_url_has_none(postgres_url, monkeypatch):
    # The test's schema moves from the URL's options to PGOPTIONS.
    url, options = postgres_url.split("?options=")
    monkeypatch.setenv("PGOPTIONS", unquote(options) + " -c statement_timeout=42s")
    store = PostgresStore(url)
    try:
        settings = session(store)
    finally:
        store.close()
    assert settings["search_path"].startswith("test_")
    assert settings["statement_timeout"] == "42s"
    assert settings["idle_in_transaction_session_timeout"] == "30s"


def test_a_statement_that_runs_away_is_cut_off_and_the_server_stops_it(postgres_url):
    """An enqueue stuck behind a lock nothing releases: with the timeout cut to
    a second through the URL, it fails with a StoreError instead of hanging, and
    the server is no longer working on it."""
    name = f"runaway-{uuid.uuid4().hex[:8]}"
    url = with_pg_options(postgres_url, "statement_timeout=1s") + f"&application_name={name}"
    store = PostgresStore(url)
    store.check(time.time())
    failure: list[BaseException] = []

    def stuck_enqueue():
        try:
            store.enqueue(A, [Accept("m1", "u1", {"key": "m1"})], time.time())
        except BaseException as exc:
            failure.append(exc)

    try:
        with psycopg.connect(postgres_url, autocommit=True) as holder:
            # The user's lock, as a transaction that never ends would hold it.
            holder.execute("SELECT pg_advisory_lock(%s)", (_lock_key(A, "u1"),))
            enqueue = threading.Thread(target=stuck_enqueue)
            enqueue.start()
            enqueue.join(60)
            assert not enqueue.is_alive()
            (error,) = failure
            assert isinstance(error, StoreError)
            assert "statement timeout" in str(error)
            (running,) = holder.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = %s AND state = 'active'",
                (name,),
            ).fetchone()
            assert running == 0
        # Once the lock is gone, the same store writes again.
        assert store.enqueue(A, [Accept("m1", "u1", {"key": "m1"})], time.time()) == [True]
    finally:
        store.close()
