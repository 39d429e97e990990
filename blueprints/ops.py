"""Liveness, readiness and metrics."""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Response, jsonify

from service import health, metrics
from service.runtime import get_runtime

bp = Blueprint("ops", __name__)
log = logging.getLogger(__name__)

# What an unauthenticated caller is told; the reason itself (which may name
# the database host and quote libpq) goes to the log.
NOT_READY = "the outbox cannot be written; the service's log says why"


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    runtime = get_runtime()
    problem = health.problem(
        runtime.config.database_url, runtime.store, runtime.writes, time.time()
    )
    if problem:
        log.warning("not ready: %s", problem)
        return jsonify(status="unavailable", reason=NOT_READY), 503
    return jsonify(status="ready")


@bp.get("/metrics")
def prometheus():
    return Response(metrics.exposition(get_runtime().store), content_type=metrics.CONTENT_TYPE)
