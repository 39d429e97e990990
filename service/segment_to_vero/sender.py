"""Direction A's sender: delivers claimed outbox items to Vero's REST API.

Each item holds the ordered Vero calls one Segment message maps to
(`service.segment_to_vero.mapping`). The calls are sent one after another, each only after
the one before it succeeded, starting at `item.progress` (calls already
delivered are never sent again). The credential is added to each body here,
at send time, so the outbox never stores it.

What an answer means (SERVICE.md, "Delivery"):
- 2xx: delivered; go on with the next call.
- no answer (network error, timeout), 408, 429, 5xx other than 501/505:
  retry later, from the call that failed.
- anything else: permanent. The item goes to dead-letter with the reason,
  and so do the calls after the one that failed, since they were never sent.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from service.config import Config
from service.directions import SEGMENT_TO_VERO
from service.outbox import Item
from service.outbox.delivery import FAILED, RELEASE, RELEASED, RETRY, SUCCEEDED, Outcome
from service.redaction import redact_secrets
from service.retry import retry_after_seconds, retryable, status_class
from service.version import NAME, VERSION

log = logging.getLogger(__name__)

# (connect, read): a little over a multiple of 3 s for the connect, TCP's
# retransmission interval; ten seconds for Vero to answer.
TIMEOUTS = (3.05, 10.0)
CLAIM_SIZE = 16
EXCERPT_CHARS = 200


class VeroSender:
    direction = SEGMENT_TO_VERO
    upstream = "vero"
    claim_size = CLAIM_SIZE
    # One message per user per claim: its calls go one by one, and the next
    # message of that user waits until this one is settled.
    whole_runs = False

    def __init__(self, config: Config):
        credential = config.vero_credential
        if credential is None:
            raise ValueError("VeroSender needs VERO_AUTH_TOKEN or VERO_TRACKING_API_KEY")
        self.credential_name, self._credential = credential
        self.base_url = config.vero_api_url.rstrip("/")
        self.concurrency = config.delivery_threads
        self.lease_seconds = config.outbox_lease_seconds
        self.timeouts = TIMEOUTS
        self.session = _session(config.delivery_threads)

    def send(self, items: Sequence[Item], stopping: threading.Event) -> list[Outcome]:
        round_ = _Round(time.monotonic(), self.lease_seconds - sum(self.timeouts))
        outcomes: list[Outcome] = []
        for item in items:
            if stopping.is_set() or not round_.may_start_call():
                outcomes.append(RELEASE)
                continue
            outcomes.append(self._deliver(item, stopping, round_))
        return outcomes

    def close(self) -> None:
        self.session.close()

    # -- one item ----------------------------------------------------------

    def _deliver(self, item: Item, stopping: threading.Event, round_: _Round) -> Outcome:
        calls = item.payload.get("calls") if isinstance(item.payload, dict) else None
        if not isinstance(calls, list) or not all(_is_call(call) for call in calls):
            # Only a bug or a hand-edited store gets here; retrying cannot fix it.
            return Outcome(
                FAILED,
                "the outbox item holds no valid list of Vero calls",
                status="none",
                progress=item.progress,
            )
        done = item.progress
        while done < len(calls):
            if done > item.progress and (stopping.is_set() or not round_.may_start_call()):
                # Hand the rest back, keeping what was delivered: stopping
                # workers drain quickly, and a slow round does not outlive its
                # lease (after which another worker could send the same call).
                return Outcome(RELEASED, status="none", progress=done)
            call = calls[done]
            round_.calls_started += 1
            outcome = self._call(call, done, len(calls))
            if outcome is not None:
                self._log_failure(item, call, outcome)
                return outcome
            done += 1
        return Outcome(SUCCEEDED, status="2xx", progress=done)

    def _call(self, call: dict, index: int, total: int) -> Outcome | None:
        """Send one call; None when Vero took it, else the item's outcome."""
        label = f"{call['method'].upper()} {call['path']}"
        body = {**call["body"], self.credential_name: self._credential}
        try:
            response = self.session.request(
                call["method"].upper(),
                self.base_url + call["path"],
                data=json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                timeout=self.timeouts,
                # A redirect would turn a POST into a GET and drop the body;
                # a Vero URL that redirects is a configuration error to see.
                allow_redirects=False,
            )
        except requests.Timeout as exc:
            return Outcome(
                RETRY,
                f"{label}: no answer from Vero in time ({type(exc).__name__})",
                status="network",
                progress=index,
            )
        except requests.RequestException as exc:
            reason = self._redact(_shorten(f"{type(exc).__name__}: {exc}"))
            return Outcome(
                RETRY, f"{label}: could not reach Vero ({reason})", status="network", progress=index
            )
        with response:
            status = response.status_code
            if 200 <= status < 300:
                return None
            excerpt = self._redact(_shorten(response.text)) or "(empty answer)"
        said = f"{label}: Vero answered {status}: {excerpt}"
        if retryable(status):
            return Outcome(
                RETRY,
                said,
                status=status_class(status),
                progress=index,
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        return Outcome(
            FAILED, said + _not_sent(total - index - 1), status=status_class(status), progress=index
        )

    def _redact(self, text: str) -> str:
        """Remove the credential should an answer or error message echo it,
        in the spellings a JSON or URL encoder would give it."""
        return redact_secrets(text, (self._credential,))

    def _log_failure(self, item: Item, call: dict, outcome: Outcome) -> None:
        log.warning(
            "Vero delivery %s",
            "will be retried" if outcome.kind == RETRY else "failed",
            extra={
                "item": item.id,
                "attempt": item.attempts,
                "call": f"{call['method']} {call['path']}",
                "status_class": outcome.status,
                "error": outcome.error,
            },
        )


class _Round:
    """Keeps one send round inside its lease: once the claim's lease could run
    out during the next call (`last_start` seconds in, the lease less the
    longest a call can take), no further call starts. The first call always
    does, so every round makes progress whatever the lease."""

    def __init__(self, started: float, last_start: float):
        self.started = started
        self.last_start = last_start
        self.calls_started = 0

    def may_start_call(self) -> bool:
        if self.calls_started == 0:
            return True
        return time.monotonic() - self.started <= self.last_start


def _session(pool_size: int) -> requests.Session:
    session = requests.Session()
    # One connection per delivery thread; requests retries nothing itself,
    # since the outbox decides when to try again.
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(pool_size, 1), max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers["User-Agent"] = f"{NAME}/{VERSION}"
    return session


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
