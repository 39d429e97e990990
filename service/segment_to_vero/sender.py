"""Direction A's sender: delivers claimed outbox items to Vero's REST API.

Each item holds the ordered Vero calls one Segment message maps to
(`service.segment_to_vero.mapping`). The calls are sent one after another, each only after
the one before it succeeded, starting at `item.progress` (calls already
delivered are never sent again), and each only once the delivery loop's gate
lets it start (the window, a pause, the lease). The credential is added to
each body here, at send time, so the outbox never stores it.

What an answer means (SERVICE.md, "Delivery"; the rules are service/retry.py's):
- 2xx: delivered; go on with the next call.
- no answer (network error, timeout), 408, 429, 5xx other than 501/505:
  retry later, from the call that failed.
- anything else: permanent. The item goes to dead-letter with the reason,
  and so do the calls after the one that failed, since they were never sent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import requests

from service import upstream
from service.config import Config
from service.directions import SEGMENT_TO_VERO
from service.outbox import Item
from service.outbox.delivery import (
    PERMANENT,
    RELEASE,
    RELEASED,
    RETRY,
    SUCCEEDED,
    Gate,
    Outcome,
)
from service.redaction import redact_secrets
from service.retry import retry_after_seconds, retryable, status_class

log = logging.getLogger(__name__)

# (connect, read): a little over a multiple of 3 s for the connect, TCP's
# retransmission interval; ten seconds for Vero to answer.
TIMEOUTS = (3.05, 10.0)
EXCERPT_CHARS = 200


class VeroSender:
    direction = SEGMENT_TO_VERO
    upstream = "vero"
    # One message per user per claim: its calls go one by one, and the next
    # message of that user waits until this one is settled.
    whole_runs = False
    items_per_call = 1

    def __init__(self, config: Config):
        credential = config.vero_credential
        if credential is None:
            raise ValueError("VeroSender needs VERO_AUTH_TOKEN or VERO_TRACKING_API_KEY")
        self.credential_name, self._credential = credential
        self.base_url = config.vero_api_url.rstrip("/")
        self.max_in_flight = config.delivery_max_in_flight
        self.calls_per_second = config.vero_max_requests_per_second
        self.timeouts = TIMEOUTS
        self.session = upstream.session(
            self.base_url,
            self.max_in_flight,
            {"Content-Type": "application/json", "Accept": "application/json"},
        )

    @property
    def call_seconds(self) -> float:
        return sum(self.timeouts)

    def units(self, items: Sequence[Item]) -> list[list[Item]]:
        # Each item is one user's (a claim holds one per user): all go side by side.
        return [[item] for item in items]

    def send(self, items: Sequence[Item], gate: Gate) -> list[Outcome]:
        return [self._deliver(item, gate) for item in items]

    # -- one item ----------------------------------------------------------

    def _deliver(self, item: Item, gate: Gate) -> Outcome:
        calls = item.payload.get("calls") if isinstance(item.payload, dict) else None
        if not isinstance(calls, list) or not all(_is_call(call) for call in calls):
            # Only a bug or a hand-edited store gets here; retrying cannot fix it.
            return Outcome(
                PERMANENT,
                "the outbox item holds no valid list of Vero calls",
                status="none",
                progress=item.progress,
            )
        done = item.progress
        while done < len(calls):
            ticket = gate.begin()
            if ticket is None:
                # Hand the rest back, keeping what was delivered: stopping
                # workers drain quickly, and no call outlives the lease (after
                # which another worker could send the same call).
                return RELEASE if done == item.progress else Outcome(RELEASED, progress=done)
            call = calls[done]
            status, outcome = self._call(call, done, len(calls))
            gate.end(ticket, status, outcome.retry_after if outcome else None)
            if outcome is not None:
                self._log_failure(item, call, status, outcome)
                return outcome
            done += 1
        return Outcome(SUCCEEDED, status="2xx", progress=done)

    def _call(self, call: dict, index: int, total: int) -> tuple[int | None, Outcome | None]:
        """Send one call: Vero's status (None when no answer came), and None
        when Vero took it, else the item's outcome."""
        label = f"{call['method'].upper()} {call['path']}"
        body = {**call["body"], self.credential_name: self._credential}
        try:
            # A Vero URL that redirects is a configuration error to see: the
            # redirect is not followed, and its status is permanent.
            response = upstream.call(
                self.session,
                call["method"].upper(),
                self.base_url + call["path"],
                json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
                self.timeouts,
            )
        except requests.Timeout as exc:
            return None, Outcome(
                RETRY,
                f"{label}: no answer from Vero in time ({type(exc).__name__})",
                status="network",
                progress=index,
            )
        except requests.RequestException as exc:
            reason = _shorten(self._redact(f"{type(exc).__name__}: {exc}"))
            return None, Outcome(
                RETRY, f"{label}: could not reach Vero ({reason})", status="network", progress=index
            )
        with response:
            status = response.status_code
            if 200 <= status < 300:
                return status, None
            excerpt = _shorten(self._redact(response.text)) or "(empty answer)"
        said = f"{label}: Vero answered {status}: {excerpt}"
        if retryable(status):
            return status, Outcome(
                RETRY,
                said,
                status=status_class(status),
                progress=index,
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        return status, Outcome(
            PERMANENT,
            said + _not_sent(total - index - 1),
            status=status_class(status),
            progress=index,
        )

    def _redact(self, text: str) -> str:
        """Remove the credential should an answer or error message echo it,
        in the spellings a JSON or URL encoder would give it."""
        return redact_secrets(text, (self._credential,))

    def _log_failure(self, item: Item, call: dict, status: int | None, outcome: Outcome) -> None:
        # Vero's answer can echo the message (personal data): it goes to the
        # dead letters (`outbox dead`), never to these lines.
        log.warning(
            "Vero delivery %s",
            "will be retried" if outcome.kind == RETRY else "failed",
            extra={
                "item": item.id,
                "attempt": item.attempts,
                "call": f"{call['method']} {call['path']}",
                "status": status,
                "status_class": outcome.status,
            },
        )


def _is_call(call: Any) -> bool:
    return (
        isinstance(call, dict)
        and isinstance(call.get("method"), str)
        and isinstance(call.get("path"), str)
        and call["path"].startswith("/")
        and isinstance(call.get("body"), dict)
    )


def _shorten(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= EXCERPT_CHARS else flat[:EXCERPT_CHARS] + "..."


def _not_sent(later: int) -> str:
    if later <= 0:
        return ""
    calls = "call" if later == 1 else "calls"
    return f" ({later} later {calls} of this message not sent)"
