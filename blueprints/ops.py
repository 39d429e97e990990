"""Liveness, readiness and metrics."""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify

from service import metrics
from service.outbox import StoreError
from service.runtime import get_runtime

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    try:
        get_runtime().store.check(time.time())
    except StoreError as exc:
        return jsonify(status="unavailable", reason=str(exc)), 503
    return jsonify(status="ready")


@bp.get("/metrics")
def prometheus():
    return Response(metrics.exposition(get_runtime().store), content_type=metrics.CONTENT_TYPE)
