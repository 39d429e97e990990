from __future__ import annotations

import os
import time
import uuid
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pytest

from service.app import create_app
from service.config import Config
from service.outbox import open_store
from service.runtime import get_runtime
from tests.standin import SEGMENT_BASE_PATH, VERO_BASE_PATH, Upstream

DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


def pytest_collection_modifyitems(items):
    # Whole-process tests last, so a quick failure shows first.
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/outbox.db"


@pytest.fixture(scope="session")
def postgres_server():
    """TEST_DATABASE_URL, once the server has answered; skips where it does not."""
    url = os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 5432}{parts.path}"  # never the password
    try:
        import psycopg

        psycopg.connect(url, connect_timeout=3).close()
    except ImportError:
        pytest.skip("psycopg is not installed (the postgres extra)")
    except Exception as exc:
        reason = " ".join(str(exc).split())
        if parts.password:
            reason = reason.replace(parts.password, "***")
        pytest.skip(f"no PostgreSQL answers at {where}: {reason}")
    return url


@pytest.fixture
def postgres_url(postgres_server):
    """A PostgreSQL URL of one's own: a fresh schema first on its search_path,
    dropped afterwards, so tests neither see nor disturb each other's tables."""
    import psycopg

    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield with_pg_options(postgres_server, f"search_path={schema}")
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def with_pg_options(url: str, *settings: str) -> str:
    """`url` with server settings added to its `options` (`-c name=value` each)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    options = [query.get("options", "")] + [f"-c {setting}" for setting in settings]
    query["options"] = " ".join(filter(None, options))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    """Every outbox store the suite can reach (PostgreSQL where it answers)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/outbox.db"
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    raise AssertionError(request.param)


@pytest.fixture
def store(store_url):
    store = open_store(store_url)
    yield store
    store.close()


@pytest.fixture
def make_app(sqlite_url):
    """Build the app from an environment mapping, as the service would read it."""
    apps = []

    def make(env: dict[str, str] | None = None, senders=None, **overrides):
        env = {"DATABASE_URL": sqlite_url, **(env or {})}
        config = Config.from_env(env)
        if overrides:
            config = Config(**{**config.__dict__, **overrides})
        app = create_app(config, senders=senders)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        get_runtime(app).stop_delivery(timeout=5)
        get_runtime(app).store.close()


@pytest.fixture
def vero():
    """A stand-in Vero API on a loopback port (VERO_API_URL = `vero.url`)."""
    yield from _serving(Upstream(base_path=VERO_BASE_PATH))


@pytest.fixture
def segment():
    """A stand-in Segment HTTP API on a loopback port (SEGMENT_API_URL = `segment.url`)."""
    yield from _serving(Upstream(base_path=SEGMENT_BASE_PATH))


def _serving(upstream: Upstream):
    yield upstream.start()
    upstream.release()  # nothing held outlives the test
    upstream.stop()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll until predicate() is truthy; returns its value or fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(interval)
