"""The application factory."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid

from flask import Flask, g, request
from werkzeug.exceptions import HTTPException

from service import health, logs
from service.config import Config, load_or_exit
from service.outbox import StoreError, open_store
from service.outbox.delivery import Sender
from service.runtime import Runtime, default_senders
from service.vero_to_segment.mapping import ignored_overrides

log = logging.getLogger("vero_bridge")
access_log = logging.getLogger("vero_bridge.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SLASHES = re.compile(r"/{2,}")


def create_app(config: Config | None = None, senders: list[Sender] | None = None) -> Flask:
    """Build the service. Without `config`, read it from the environment (and a
    local .env file); an invalid setting then stops the process with one line."""
    if config is None:
        config = load_or_exit()
    logs.configure(config.log_level, config.secrets)

    app = Flask(__name__)
    # No redirects: a 308 for "//v1/batch" would be followed by some clients,
    # counted as delivered by others (3xx is success to analytics-node), and
    # would echo a webhook token in its Location. Such a path is a 404.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    # Repeated slashes are merged here rather than answered with Werkzeug's
    # redirect, whose Location (and body) would repeat a webhook token.
    app.wsgi_app = _merged_slashes(app.wsgi_app)  # type: ignore[method-assign]
    database_url = config.database_url
    if not database_url:
        # The default lives in the app's own instance folder, which only we
        # would create; a folder named in DATABASE_URL must already exist.
        with contextlib.suppress(OSError):  # if it cannot be made, the store says why
            os.makedirs(app.instance_path, exist_ok=True)
        database_url = "sqlite:///" + os.path.join(app.instance_path, "vero-bridge.db")
    store = open_store(database_url, pool_size=config.outbox_pool_size)
    if senders is None:
        senders = default_senders(config)
    Runtime(config, store, senders).init_app(app)

    _install_request_hooks(app)
    _install_error_handlers(app)

    from blueprints import ops, segment, vero

    app.register_blueprint(ops.bp)
    app.register_blueprint(segment.bp)
    app.register_blueprint(vero.bp)

    from service.cli import outbox

    app.cli.add_command(outbox)

    for warning in config.warnings():
        log.warning("%s", warning)
    ignored = ignored_overrides(config.vero_event_names)
    if ignored:
        log.warning(
            "VERO_EVENT_NAMES names types that are never forwarded; ignored: %s",
            ", ".join(map(str, ignored)),
        )
    missing = health.missing_folder(config.database_url)
    if missing:
        # Never made here: a folder that is not there is usually a volume
        # that is not mounted, and an outbox on the disk below it would be
        # lost with the machine.
        log.error(
            "DATABASE_URL: the SQLite outbox's folder %s is missing (or not a folder), and is not made;"
            " create it (or mount its volume): until then /readyz and every write answer 503",
            missing,
        )
        return app
    try:
        store.check(time.time())
    except StoreError as exc:
        # Start anyway: /readyz says why, and the store may come back.
        log.error("outbox store unavailable at start: %s", exc)
    return app


def _merged_slashes(wsgi_app):
    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if "//" in path:
            environ["PATH_INFO"] = _SLASHES.sub("/", path)
        return wsgi_app(environ, start_response)

    return app


def _install_request_hooks(app: Flask) -> None:
    @app.before_request
    def start_request():
        given = request.headers.get("X-Request-ID", "")
        # A given id is repeated in every line and in the answer: never a secret.
        safe = _REQUEST_ID.match(given) and not logs.shows_secret(given)
        g.request_id = given if safe else uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def finish_request(response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
        if "Location" in response.headers:
            response.headers["Location"] = logs.redact(response.headers["Location"])
        rule = request.url_rule.rule if request.url_rule else logs.redact(request.path)
        access_log.info(
            "%s %s %s",
            request.method,
            rule,
            response.status_code,
            extra={
                "method": request.method,
                "route": rule,
                "status": response.status_code,
                "duration_ms": round((time.perf_counter() - g.get("started", 0)) * 1000, 2),
            },
        )
        return response


def _install_error_handlers(app: Flask) -> None:
    # Answers in the edges' shape: {"error": ...}, with Segment's `code` and
    # `message` too on the /v1 routes, whose clients read them.
    from blueprints.common import error

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        status = exc.code or 500
        if status == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            message = f"request body is larger than the limit of {limit} bytes"
        else:
            message = exc.name.lower()
        return error(status, message, "_".join(exc.name.lower().split()))

    @app.errorhandler(StoreError)
    def store_error(exc: StoreError):
        log.error("outbox unavailable: %s", exc)
        return error(503, "the outbox cannot be written; retry later", "outbox_unavailable")

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        log.exception("unhandled error")
        return error(500, "internal error", "internal_error")
