"""Direction B's edge: Vero posts email-event webhooks here; each becomes a
Segment track call, queued for batched delivery."""
from __future__ import annotations

import time

from flask import Blueprint, request

from blueprints.common import answer, bridge, refuse, secret_matches
from service import version
from service.bridge import VERO_TO_SEGMENT
from service.results import Reject
from service.to_segment import event_names_with, map_webhook, parse_body

bp = Blueprint("vero", __name__)

LIBRARY = {"name": version.NAME, "version": version.VERSION}


@bp.post("/vero/webhooks/<token>")
def webhook(token: str):
    config = bridge().config
    if not config.segment_enabled:
        return refuse(VERO_TO_SEGMENT, 503, "not_configured", "not configured: set SEGMENT_WRITE_KEY")
    if not config.vero_webhook_token:
        return refuse(VERO_TO_SEGMENT, 401, "unauthorized",
                       "VERO_WEBHOOK_TOKEN is not set, so no webhook can be authenticated")
    if not secret_matches(token, config.vero_webhook_token):
        return refuse(VERO_TO_SEGMENT, 401, "unauthorized", "unauthorized: the token in the URL is not valid")
    raw = request.get_data(cache=False)
    items = parse_body(raw, request.content_type)
    if isinstance(items, Reject):
        return refuse(VERO_TO_SEGMENT, 400, items.code, items.error)
    # A lone webhook that is invalid is a 400; in an array, a per-item rejection.
    single = not raw.lstrip()[:3].upper().startswith((b"[", b"%5B"))
    names = event_names_with(config.vero_event_names)
    now = time.time()
    results = [map_webhook(item, event_names=names, library=LIBRARY, received_at=now)
               for item in items]
    return answer(VERO_TO_SEGMENT, results, single and len(results) == 1)

