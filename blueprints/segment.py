"""Direction A's edge: Segment (Webhooks destination or any Segment library)
posts here; messages are mapped to Vero calls and queued."""
from __future__ import annotations

import time

from flask import Blueprint, request

from blueprints.common import answer, bridge, refuse
from service import jsonbody
from service.bridge import SEGMENT_TO_VERO
from service.results import Reject
from service.to_vero import basic_auth_ok, map_message, signature_ok, split_body

bp = Blueprint("segment", __name__)

TYPES = "identify,track,page,screen,group,alias,batch"


@bp.post("/segment")
def segment():
    return _ingest(route_type=None)


@bp.post(f"/v1/<any({TYPES}):kind>")
def segment_api(kind: str):
    return _ingest(route_type=None if kind == "batch" else kind)


def _ingest(route_type: str | None):
    config = bridge().config
    if not config.vero_enabled:
        return refuse(SEGMENT_TO_VERO, 503, "not_configured",
                       "not configured: set VERO_AUTH_TOKEN or VERO_TRACKING_API_KEY")
    secret = config.segment_shared_secret
    if not secret:
        return refuse(SEGMENT_TO_VERO, 401, "unauthorized",
                       "SEGMENT_SHARED_SECRET is not set, so no request can be authenticated")
    # Basic auth needs no body, so an unauthenticated request is refused
    # before its body is read (SERVICE.md: authentication, then 400/413).
    username = request.authorization.username if request.authorization else None
    basic_ok = basic_auth_ok(username, secret)
    signature = request.headers.get("X-Signature")
    if not basic_ok and not signature:
        return _unauthorized()
    raw = request.get_data(cache=False)
    if not basic_ok and not signature_ok(raw, signature, secret):
        return _unauthorized()
    body = jsonbody.parse(raw)
    items = body if isinstance(body, Reject) else split_body(body, route_type)
    if isinstance(items, Reject):
        return refuse(SEGMENT_TO_VERO, 400, items.code, items.error)
    single = isinstance(body, dict) and "batch" not in body
    allow_anonymous = config.vero_allow_anonymous
    now = time.time()
    results = [item if isinstance(item, Reject)
               else map_message(item, allow_anonymous=allow_anonymous, received_at=now)
               for item in items]
    return answer(SEGMENT_TO_VERO, results, single)



def _unauthorized():
    return refuse(SEGMENT_TO_VERO, 401, "unauthorized",
                  "unauthorized: send X-Signature (HMAC-SHA1 of the body with the shared"
                  " secret) or HTTP Basic auth with the shared secret as the user name")
