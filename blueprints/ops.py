"""Liveness, readiness and metrics."""
from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify

from blueprints.common import bridge
from service import metrics
from service.outbox import StoreError

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    try:
        bridge().store.check(time.time())
    except StoreError as exc:
        return jsonify(status="unavailable", reason=str(exc)), 503
    return jsonify(status="ready")


@bp.get("/metrics")
def prometheus():
    return Response(metrics.exposition(bridge().store), content_type=metrics.CONTENT_TYPE)
