import subprocess
import sys

import pytest

from service.config import Config, ConfigError
from tests.support import ROOT


def test_defaults_match_the_spec():
    config = Config.from_env({})
    assert config.vero_api_url == "https://api.getvero.com/api/v2"
    assert config.segment_api_url == "https://api.segment.io/v1"
    assert (config.vero_enabled, config.segment_enabled) == (False, False)
    assert (config.port, config.max_body_bytes) == (8000, 4194304)
    assert (config.outbox_lease_seconds, config.outbox_max_attempts) == (30, 25)
    assert (config.outbox_max_age_hours, config.outbox_retention_hours) == (72, 168)
    assert (config.vero_allow_anonymous, config.delivery_in_web) == (False, True)
    assert config.database_url is None and config.vero_event_names == {}


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/api/v2",
        "https://api.getvero.com/api/v2/",
        "http://localhost:9",
        "http://[::1]:8080/v1",
        "https://events.eu1.segmentapis.com/v1",
    ],
)
def test_valid_urls_are_accepted(url):
    assert Config.from_env({"VERO_API_URL": url}).vero_api_url == url.rstrip("/")


def test_a_small_body_limit_is_allowed():
    assert Config.from_env({"MAX_BODY_BYTES": "100"}).max_body_bytes == 100


def test_every_variable_is_read():
    config = Config.from_env(
        {
            "VERO_TRACKING_API_KEY": "tk",
            "VERO_API_URL": "http://127.0.0.1:9/api/v2/",
            "VERO_ALLOW_ANONYMOUS": "true",
            "SEGMENT_SHARED_SECRET": "s",
            "SEGMENT_WRITE_KEY": "w",
            "SEGMENT_API_URL": "https://events.eu1.segmentapis.com/v1",
            "VERO_WEBHOOK_TOKEN": "t",
            "VERO_EVENT_NAMES": '{"unsubscribed": "Unsubscribed", "sent": null}',
            "DATABASE_URL": "postgres://u:p@db:5432/x",
            "PORT": "5000",
            "MAX_BODY_BYTES": "2048",
            "OUTBOX_LEASE_SECONDS": "12.5",
            "OUTBOX_MAX_ATTEMPTS": "3",
            "OUTBOX_MAX_AGE_HOURS": "1",
            "OUTBOX_RETENTION_HOURS": "24",
            "DELIVERY_IN_WEB": "false",
            "WEB_CONCURRENCY": "3",
            "GUNICORN_THREADS": "16",
            "HOST": "127.0.0.1",
        }
    )
    assert config.vero_credential == ("tracking_api_key", "tk")
    assert config.vero_api_url == "http://127.0.0.1:9/api/v2"
    assert config.vero_allow_anonymous and not config.delivery_in_web
    assert config.vero_event_names == {"unsubscribed": "Unsubscribed", "sent": None}
    assert config.database_url == "postgresql://u:p@db:5432/x"
    assert (config.port, config.max_body_bytes, config.outbox_lease_seconds) == (5000, 2048, 12.5)
    assert (config.outbox_max_attempts, config.outbox_max_age_hours) == (3, 1)
    assert config.outbox_retention_hours == 24
    assert (config.web_concurrency, config.gunicorn_threads) == (3, 16)
    assert (config.host, Config.from_env({}).host) == ("127.0.0.1", "0.0.0.0")
    assert Config.from_env({"VERO_AUTH_TOKEN": "a"}).vero_credential == ("auth_token", "a")


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"VERO_AUTH_TOKEN": "a", "VERO_TRACKING_API_KEY": "b"}, "VERO_AUTH_TOKEN"),
        ({"VERO_API_URL": "not a url"}, "VERO_API_URL"),
        ({"VERO_API_URL": "ftp://example.org"}, "VERO_API_URL"),
        ({"SEGMENT_API_URL": "https://host:notaport/v1"}, "SEGMENT_API_URL"),
        ({"VERO_EVENT_NAMES": "[1, 2]"}, "VERO_EVENT_NAMES"),
        ({"VERO_EVENT_NAMES": "{not json"}, "VERO_EVENT_NAMES"),
        ({"VERO_EVENT_NAMES": '{"sent": 5}'}, "VERO_EVENT_NAMES"),
        ({"DATABASE_URL": "mysql://u:hunter2@h/db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite://relative.db"}, "DATABASE_URL"),
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"MAX_BODY_BYTES": "-1"}, "MAX_BODY_BYTES"),
        ({"MAX_BODY_BYTES": "0"}, "MAX_BODY_BYTES"),
        ({"VERO_API_URL": "https://exa mple.com"}, "VERO_API_URL"),
        ({"VERO_API_URL": "https://ho_st!/api"}, "VERO_API_URL"),
        ({"VERO_API_URL": "https://-/"}, "VERO_API_URL"),
        ({"SEGMENT_API_URL": "https://api.segment.io/v1?x=1"}, "SEGMENT_API_URL"),
        ({"SEGMENT_API_URL": "https://api.segment.io/v1#frag"}, "SEGMENT_API_URL"),
        ({"OUTBOX_LEASE_SECONDS": "0"}, "OUTBOX_LEASE_SECONDS"),
        ({"OUTBOX_MAX_ATTEMPTS": "many"}, "OUTBOX_MAX_ATTEMPTS"),
        ({"OUTBOX_MAX_AGE_HOURS": "nan"}, "OUTBOX_MAX_AGE_HOURS"),
        ({"OUTBOX_RETENTION_HOURS": "-5"}, "OUTBOX_RETENTION_HOURS"),
        ({"DELIVERY_IN_WEB": "maybe"}, "DELIVERY_IN_WEB"),
        ({"OUTBOX_POOL_SIZE": "lots"}, "OUTBOX_POOL_SIZE"),
        ({"VERO_ALLOW_ANONYMOUS": "2"}, "VERO_ALLOW_ANONYMOUS"),
        ({"WEB_CONCURRENCY": "two"}, "WEB_CONCURRENCY"),
        ({"HOST": "0.0.0.0:8000"}, "HOST"),
        ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
        ({"GUNICORN_THREADS": "-8"}, "GUNICORN_THREADS"),
        ({"GUNICORN_THREADS": "8.5"}, "GUNICORN_THREADS"),
        # What libpq's own parser refuses, which would otherwise fail in
        # every worker: an unknown parameter, a bad escape in the password.
        ({"DATABASE_URL": "postgresql://u:hunter2@db/x?colour=blue"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://u:hunter2%zz@db/x"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgres://u:hunter2 x@db/x"}, "DATABASE_URL"),
    ],
)
def test_an_invalid_value_names_its_variable(env, variable):
    with pytest.raises(ConfigError) as raised:
        Config.from_env(env)
    assert str(raised.value).startswith(variable + ":")
    # Never echo a secret, such as a password in a database URL.
    assert "hunter2" not in str(raised.value)


def test_the_service_stops_at_start_with_one_line_naming_the_variable():
    env = {"PATH": "/usr/bin:/bin", "VERO_EVENT_NAMES": "[]"}
    result = subprocess.run(
        [sys.executable, "-c", "import wsgi"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 4
    assert result.stderr.strip().splitlines() == [
        "vero-bridge: invalid configuration: VERO_EVENT_NAMES: expected a JSON object"
    ]


def test_libpq_says_what_is_wrong_with_a_database_url():
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"DATABASE_URL": "postgresql://u:hunter2@db/x?colour=blue"})
    assert str(raised.value) == (
        'DATABASE_URL: not a valid PostgreSQL URL: invalid URI query parameter: "colour"'
    )


def test_a_password_with_an_unescaped_at_sign_is_refused_without_echoing_it():
    # libpq ends the password at the first "@" and takes the rest for the
    # host, so the service would log "no PostgreSQL answers at hunter2@db",
    # half the password, which the redactor (knowing "p@hunter2") misses.
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"DATABASE_URL": "postgres://u:p@hunter2@db:5432/x"})
    assert str(raised.value) == (
        "DATABASE_URL: the user name or password holds '@', which a URL must write as %40"
    )
    # Written as it must be, the same password is accepted.
    assert Config.from_env({"DATABASE_URL": "postgres://u:p%40hunter2@db:5432/x"})


def test_processes_and_threads_default_to_one_per_core_and_eight():
    config = Config.from_env({})
    assert (config.web_concurrency, config.gunicorn_threads) == (None, 8)


@pytest.mark.parametrize("name", ["SEGMENT_SHARED_SECRET", "SEGMENT_SHARED_SECRET_PREVIOUS"])
def test_a_shared_secret_basic_auth_cannot_carry_is_warned_about(name, make_app, caplog):
    config = Config.from_env({name: "half:half"})
    [warning] = config.warnings()
    assert warning.startswith(f"{name} contains ':', which HTTP Basic auth cannot carry")
    assert "Bearer" in warning
    make_app({name: "half:half"})
    assert warning in caplog.messages  # said at start
    assert Config.from_env({name: "whole"}).warnings() == []


def test_a_webhook_token_no_path_can_carry_is_warned_about():
    [warning] = Config.from_env({"VERO_WEBHOOK_TOKEN": "a/b"}).warnings()
    assert warning.startswith("VERO_WEBHOOK_TOKEN contains '/'")
