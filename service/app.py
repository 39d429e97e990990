"""The application factory."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from service import logs
from service.config import Config, load_or_exit
from service.outbox import StoreError, open_store
from service.outbox.delivery import Sender
from service.runtime import Runtime, default_senders
from service.vero_to_segment.mapping import ignored_overrides

log = logging.getLogger("vero_bridge")
access_log = logging.getLogger("vero_bridge.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def create_app(config: Config | None = None, senders: list[Sender] | None = None) -> Flask:
    """Build the service. Without `config`, read it from the environment (and a
    local .env file); an invalid setting then stops the process with one line."""
    if config is None:
        config = load_or_exit()
    logs.configure(config.log_level)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
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

    ignored = ignored_overrides(config.vero_event_names)
    if ignored:
        log.warning(
            "VERO_EVENT_NAMES names types that are never forwarded; ignored: %s",
            ", ".join(map(str, ignored)),
        )
    try:
        store.check(time.time())
    except StoreError as exc:
        # Start anyway: /readyz says why, and the store may come back.
        log.error("outbox store unavailable at start: %s", exc)
    return app


def _install_request_hooks(app: Flask) -> None:
    @app.before_request
    def start_request():
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def finish_request(response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
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
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            message = f"request body is larger than the limit of {limit} bytes"
        else:
            message = exc.name.lower()
        return jsonify(error=message), exc.code

    @app.errorhandler(StoreError)
    def store_error(exc: StoreError):
        log.error("outbox unavailable: %s", exc)
        return jsonify(error="the outbox cannot be written; retry later"), 503

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        log.exception("unhandled error")
        return jsonify(error="internal error"), 500
