"""What both directions' edges share: refusing requests and shaping answers."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from dataclasses import asdict

from flask import jsonify

from service import metrics
from service.results import Reject, Result
from service.runtime import get_runtime

log = logging.getLogger("vero_bridge.intake")


def error(status: int, message: str):
    return jsonify(error=message), status


def refuse(direction: str, status: int, reason: str, message: str):
    """Refuse a whole request (not configured, unauthorized, unreadable body)."""
    metrics.REJECTED.labels(direction, reason).inc()
    return error(status, message)


def secret_matches(given: str | None, secret: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


def answer(direction: str, results: Sequence[Result], single: bool):
    """A lone invalid message is a 400 naming the field; in a batch, invalid items
    are listed and the valid ones accepted. Raises StoreError (-> 503) when the
    outbox cannot be written."""
    if log.isEnabledFor(logging.DEBUG):
        # Bodies hold personal data (emails): only ever at debug level.
        log.debug(
            "mapped",
            extra={
                "direction": direction,
                "results": [{type(r).__name__: asdict(r)} for r in results],
            },
        )
    if single and isinstance(results[0], Reject):
        get_runtime().accept(direction, results)  # counted, nothing stored
        return error(400, results[0].error)
    return jsonify(get_runtime().accept(direction, results).as_json()), 200
