from __future__ import annotations

import time

import pytest

from service.app import create_app
from service.config import Config
from service.outbox import open_store


def pytest_collection_modifyitems(items):
    # Whole-process tests last, so a quick failure shows first.
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/outbox.db"


@pytest.fixture(params=["sqlite"])
def store_url(request, tmp_path):
    """Every outbox store the suite can reach (PostgreSQL is added where it answers)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/outbox.db"
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
        app.extensions["vero_bridge"].stop_delivery(timeout=5)
        app.extensions["vero_bridge"].store.close()


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
