"""Configuration, read from the environment exactly as SERVICE.md names it.

`Config.from_env` validates everything at start, so a deployment with a bad
value stops at once with one line naming the variable, instead of failing on
the first message hours later.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from service.redaction import redact_secrets

DEFAULT_VERO_API_URL = "https://api.getvero.com/api/v2"
DEFAULT_SEGMENT_API_URL = "https://api.segment.io/v1"


# A host name (letters, digits, hyphens, dots, and the underscores internal
# names use; no label starting or ending in a hyphen), an IPv4 address, or an
# IPv6 address (urlsplit strips its brackets).
_HOST = re.compile(
    r"^(?:(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)(?:\.(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?))*\.?"
    r"|[0-9A-Fa-f:.]+)$"
)


class ConfigError(ValueError):
    """A setting is invalid; the message starts with the variable's name."""


def _secret() -> Any:
    # Kept out of the repr, so that printing a Config (a traceback's locals,
    # a debugger, a log line) never shows a secret.
    return field(default=None, repr=False)


@dataclass(frozen=True)
class Config:
    vero_auth_token: str | None = _secret()
    vero_tracking_api_key: str | None = _secret()
    vero_api_url: str = DEFAULT_VERO_API_URL
    vero_allow_anonymous: bool = False
    segment_shared_secret: str | None = _secret()
    # A second accepted value while a secret is being changed (SERVICE.md).
    segment_shared_secret_previous: str | None = _secret()
    segment_write_key: str | None = _secret()
    segment_api_url: str = DEFAULT_SEGMENT_API_URL
    vero_webhook_token: str | None = _secret()
    vero_webhook_token_previous: str | None = _secret()
    vero_event_names: dict[str, str | None] = field(default_factory=dict)
    # None means "a SQLite file in the app's instance folder", which only the
    # app factory knows. Out of the repr: it usually carries a password.
    database_url: str | None = _secret()
    # Where gunicorn listens: every interface (what a PaaS needs), or
    # 127.0.0.1 on a VM, behind the reverse proxy.
    host: str = "0.0.0.0"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    outbox_lease_seconds: float = 30.0
    outbox_max_attempts: int = 25
    outbox_max_age_hours: float = 72.0
    outbox_retention_hours: float = 168.0
    delivery_in_web: bool = True
    # The adaptive window's ceiling, per process and upstream (SERVICE.md).
    # 96 calls at 150 ms are about 600 calls/s from the one delivering
    # process: the 500 calls/s target with a fifth to spare
    # (docs/service-decisions.md, "Delivery").
    delivery_max_in_flight: int = 96
    vero_max_requests_per_second: float | None = None
    outbox_pool_size: int = 16
    # Settings beyond SERVICE.md's fixed names, for operators and tests.
    delivery_poll_seconds: float = 0.25
    log_level: str = "INFO"
    # gunicorn's processes (None: one per core) and threads in each.
    web_concurrency: int | None = None
    gunicorn_threads: int = 8

    @property
    def vero_credential(self) -> tuple[str, str] | None:
        """The body parameter Vero authenticates by, as (name, value)."""
        if self.vero_auth_token:
            return ("auth_token", self.vero_auth_token)
        if self.vero_tracking_api_key:
            return ("tracking_api_key", self.vero_tracking_api_key)
        return None

    @property
    def vero_enabled(self) -> bool:
        return self.vero_credential is not None

    @property
    def segment_enabled(self) -> bool:
        return bool(self.segment_write_key)

    @property
    def secrets(self) -> list[str]:
        """Every secret value this configuration holds, the database password
        included: what the logs, errors and answers must never show."""
        values = [
            self.vero_auth_token,
            self.vero_tracking_api_key,
            self.segment_shared_secret,
            self.segment_shared_secret_previous,
            self.segment_write_key,
            self.vero_webhook_token,
            self.vero_webhook_token_previous,
            *database_passwords(self.database_url),
        ]
        return [value for value in values if value]

    def warnings(self) -> list[str]:
        """Settings that start but cannot work as meant, each saying why."""
        found = []
        for name, value in (
            ("SEGMENT_SHARED_SECRET", self.segment_shared_secret),
            ("SEGMENT_SHARED_SECRET_PREVIOUS", self.segment_shared_secret_previous),
        ):
            if value and ":" in value:
                found.append(
                    f"{name} contains ':', which HTTP Basic auth cannot carry in a user name"
                    " (the first ':' ends it), so Segment's libraries can never authenticate"
                    " with it; Authorization: Bearer, X-Signature and writeKey still work."
                    " Choose a secret without ':' to allow every way"
                )
        for name, value in (
            ("VERO_WEBHOOK_TOKEN", self.vero_webhook_token),
            ("VERO_WEBHOOK_TOKEN_PREVIOUS", self.vero_webhook_token_previous),
        ):
            if value and "/" in value:
                found.append(
                    f"{name} contains '/', which cannot be part of one URL path segment,"
                    " so no webhook can ever match it; choose a token without '/'"
                )
        return found

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        read = _Reader(env)
        config = cls(
            vero_auth_token=read.secret("VERO_AUTH_TOKEN"),
            vero_tracking_api_key=read.secret("VERO_TRACKING_API_KEY"),
            vero_api_url=read.url("VERO_API_URL", DEFAULT_VERO_API_URL, ("http", "https")),
            vero_allow_anonymous=read.boolean("VERO_ALLOW_ANONYMOUS", False),
            segment_shared_secret=read.secret("SEGMENT_SHARED_SECRET"),
            segment_shared_secret_previous=read.secret("SEGMENT_SHARED_SECRET_PREVIOUS"),
            segment_write_key=read.secret("SEGMENT_WRITE_KEY"),
            segment_api_url=read.url("SEGMENT_API_URL", DEFAULT_SEGMENT_API_URL, ("http", "https")),
            vero_webhook_token=read.secret("VERO_WEBHOOK_TOKEN"),
            vero_webhook_token_previous=read.secret("VERO_WEBHOOK_TOKEN_PREVIOUS"),
            vero_event_names=read.event_names("VERO_EVENT_NAMES"),
            database_url=read.database_url("DATABASE_URL"),
            host=read.host("HOST", "0.0.0.0"),
            port=read.integer("PORT", 8000, 1, 65535),
            max_body_bytes=read.integer("MAX_BODY_BYTES", 4 * 1024 * 1024, 1, 1 << 30),
            outbox_lease_seconds=read.number("OUTBOX_LEASE_SECONDS", 30.0, 1.0),
            outbox_max_attempts=read.integer("OUTBOX_MAX_ATTEMPTS", 25, 1, 1000),
            outbox_max_age_hours=read.number("OUTBOX_MAX_AGE_HOURS", 72.0, 0.001),
            outbox_retention_hours=read.number("OUTBOX_RETENTION_HOURS", 168.0, 0.0),
            delivery_in_web=read.boolean("DELIVERY_IN_WEB", True),
            delivery_max_in_flight=read.integer("DELIVERY_MAX_IN_FLIGHT", 96, 1, 1000),
            vero_max_requests_per_second=read.optional_number("VERO_MAX_REQUESTS_PER_SECOND", 0.01),
            outbox_pool_size=read.integer("OUTBOX_POOL_SIZE", 16, 1, 1000),
            delivery_poll_seconds=read.number("DELIVERY_POLL_SECONDS", 0.25, 0.01),
            log_level=read.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            web_concurrency=read.optional_integer("WEB_CONCURRENCY", 1, 256),
            gunicorn_threads=read.integer("GUNICORN_THREADS", 8, 1, 256),
        )
        if config.vero_auth_token and config.vero_tracking_api_key:
            raise ConfigError(
                "VERO_AUTH_TOKEN: set either VERO_AUTH_TOKEN or VERO_TRACKING_API_KEY, not both"
            )
        return config


class _Reader:
    """Reads one variable at a time, raising ConfigError that names it."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def secret(self, name: str) -> str | None:
        return self.raw(name)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        number = self.optional_integer(name, low, high)
        return default if number is None else number

    def optional_integer(self, name: str, low: int, high: int) -> int | None:
        value = self.raw(name)
        if value is None:
            return None
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a whole number, got {value!r}") from None
        if not low <= number <= high:
            raise ConfigError(f"{name}: expected a number from {low} to {high}, got {number}")
        return number

    def number(self, name: str, default: float, low: float) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if not number >= low or number == float("inf"):
            raise ConfigError(f"{name}: expected a number of at least {low}, got {value!r}")
        return number

    def optional_number(self, name: str, low: float) -> float | None:
        if self.raw(name) is None:
            return None
        return self.number(name, low, low)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if value.upper() not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
        return value.upper()

    def host(self, name: str, default: str) -> str:
        value = self.raw(name)
        if value is None:
            return default
        try:
            ipaddress.ip_address(value.strip("[]"))
        except ValueError:
            if ":" in value or not _HOST.match(value):
                raise ConfigError(
                    f"{name}: expected a host name or IP address, got {value!r}"
                ) from None
        return value

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value is None:
            return default
        try:
            parts = urlsplit(value)
            _ = parts.port  # raises ValueError on a malformed port
        except ValueError:
            raise ConfigError(f"{name}: not a valid URL") from None
        if parts.scheme not in schemes or not parts.hostname:
            raise ConfigError(f"{name}: expected an {' or '.join(schemes)} URL with a host")
        if not _HOST.match(parts.hostname) or any(c.isspace() for c in value):
            raise ConfigError(f"{name}: not a valid URL (the host or a character is malformed)")
        if parts.query or parts.fragment or "?" in value or "#" in value:
            # Paths are appended to this base; a query or fragment would swallow them.
            raise ConfigError(f"{name}: a base URL takes no query or fragment")
        return value.rstrip("/")

    def database_url(self, name: str) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        scheme = value.split(":", 1)[0].lower()
        if scheme == "sqlite":
            if not value.lower().startswith("sqlite:///") or len(value) <= len("sqlite:///"):
                raise ConfigError(f"{name}: expected sqlite:///path/to/file.db")
            return value
        if scheme in ("postgres", "postgresql"):
            try:
                parts = urlsplit(value)
                _ = parts.port  # raises ValueError on a malformed port
            except ValueError:
                raise ConfigError(f"{name}: not a valid PostgreSQL URL") from None
            if parts.netloc.count("@") > 1:
                # libpq ends the password at the first "@" and takes the rest
                # for the host: it could never connect, and its messages
                # would show the rest of the password as a host name.
                raise ConfigError(
                    f"{name}: the user name or password holds '@', which a URL must write as %40"
                )
            # The "postgres://" form is what Heroku and others set.
            url = "postgresql" + value[len(scheme) :]
            _check_postgres(name, url)
            return url
        # Never echo the value: a database URL usually carries a password.
        raise ConfigError(f"{name}: expected a sqlite:/// or postgresql:// URL")

    def event_names(self, name: str) -> dict[str, str | None]:
        value = self.raw(name)
        if value is None:
            return {}
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            raise ConfigError(f"{name}: not valid JSON") from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"{name}: expected a JSON object")
        for key, event in parsed.items():
            if event is not None and (not isinstance(event, str) or not event.strip()):
                raise ConfigError(
                    f"{name}: the name for {key!r} must be a non-empty string or null"
                )
        return parsed


def database_passwords(url: str | None) -> list[str]:
    """The password a PostgreSQL URL carries (in the user part or as a
    `password` parameter), as written and decoded."""
    if not url or not url.lower().startswith("postgres"):
        return []
    try:
        parts = urlsplit(url)
        found = [parts.password, *parse_qs(parts.query).get("password", [])]
    except ValueError:
        return []
    return [form for value in found if value for form in {value, unquote(value)}]


# What to run to install the PostgreSQL driver; both are what a deployment
# and a checkout install from.
POSTGRES_INSTALL = (
    "pip install -r requirements.txt (in a checkout: .venv/bin/pip install -e '.[postgres]')"
)


def _check_postgres(name: str, url: str) -> None:
    """Refuse now what would otherwise fail in every worker: no driver, or a
    URL that libpq's own parser refuses."""
    try:
        import psycopg_pool  # noqa: F401  (the store needs both)
        from psycopg import Error
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ConfigError(
            f"{name}: names PostgreSQL, but its driver (psycopg) is not installed;"
            f" install it with: {POSTGRES_INSTALL}"
        ) from None
    try:
        conninfo_to_dict(url)
    except Error as exc:
        reason = redact_secrets(" ".join(str(exc).split()), database_passwords(url))
        if any(password in reason for password in database_passwords(url)):
            reason = "a part of it is malformed"  # a password too short to redact
        raise ConfigError(f"{name}: not a valid PostgreSQL URL: {reason}") from None


def load_or_exit() -> Config:
    """Read the environment (and a local .env file, which never overrides it);
    on an invalid setting print one line naming the variable and exit."""
    from dotenv import load_dotenv

    load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
    try:
        return Config.from_env()
    except ConfigError as exc:
        print(f"vero-bridge: invalid configuration: {exc}", file=sys.stderr, flush=True)
        # 4 is gunicorn's "app failed to load": its master then stops instead
        # of restarting workers that can never boot.
        raise SystemExit(4) from None
