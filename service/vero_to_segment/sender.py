"""Direction B's upstream: Segment's HTTP Tracking API, fed through `/batch`.

One delivery round hands `SegmentSender.send` the claimed items (at most one
per user, so per-user order is the store's business, not ours). The sender
packs their track messages into as few batch requests as Segment's limits
allow, sends them, and turns each answer into one Outcome per item. A batch
Segment refuses as a whole (400) is split in halves until the bad message
stands alone, so that it is dead-lettered with Segment's reason while its
neighbours are delivered.

The pure parts (packing, the request body, classifying an answer) are plain
functions, so they can be tested without a server.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import requests
from requests.adapters import HTTPAdapter

from service import version
from service.config import Config
from service.directions import VERO_TO_SEGMENT
from service.outbox import Item
from service.outbox.delivery import FAILED, RELEASE, RETRY, SUCCEEDED, Outcome
from service.redaction import redact_secrets
from service.retry import retry_after_seconds, retryable, status_class
from service.vero_to_segment.mapping import MAX_MESSAGE_BYTES, encode_message

log = logging.getLogger(__name__)

# Segment documents "500 KB" per batch request. Read as 500,000 bytes, the
# smaller of the two meanings, so that the limit holds whichever Segment means.
MAX_REQUEST_BYTES = 500_000
# Past this many messages in one request Segment drops the rest with a 200.
MAX_REQUEST_MESSAGES = 2_500
# Segment's reason is kept in the dead-letter error; an error page could be long.
MAX_REASON_CHARS = 500
# Statuses that refuse the whole request for what is in it: splitting finds the
# message at fault. Segment answers 400 for an invalid or oversized payload; a
# proxy in front of it may answer 413 for the size.
SPLIT_STATUSES = frozenset({400, 413})


# ---------------------------------------------------------------------------
# The request body


def sent_at(now: float) -> str:
    """ISO-8601 UTC with milliseconds, as Segment's libraries write it. Always
    24 characters, so the envelope's size is known before the time is."""
    moment = datetime.fromtimestamp(now, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def batch_body(messages: Sequence[bytes], sent_at_text: str, write_key: str) -> bytes:
    """The exact bytes of one `/batch` request, built from the messages'
    encoded bytes so that what was measured is what is sent."""
    return b"".join(
        [
            b'{"batch":[',
            b",".join(messages),
            b'],"sentAt":',
            json.dumps(sent_at_text).encode(),
            b',"writeKey":',
            json.dumps(write_key).encode(),
            b"}",
        ]
    )


def envelope_bytes(write_key: str) -> int:
    """Bytes a request carries besides its messages and the commas between them."""
    return len(batch_body([], sent_at(0.0), write_key))


def pack(
    sizes: Sequence[int],
    envelope: int,
    max_bytes: int = MAX_REQUEST_BYTES,
    max_count: int = MAX_REQUEST_MESSAGES,
) -> list[list[int]]:
    """Group messages (given by their sizes) into requests: lists of indexes.

    First fit: each message goes into the first request it fits in, so a
    large message that overflows one request does not leave the room after it
    unused by the small ones that follow. A request's size is the envelope,
    the messages, and a comma between each two. A message too large even for
    an empty request still gets one of its own (Segment will then say why).
    """
    groups: list[list[int]] = []
    used: list[int] = []
    for index, size in enumerate(sizes):
        for number, group in enumerate(groups):
            if len(group) < max_count and used[number] + 1 + size <= max_bytes:
                group.append(index)
                used[number] += 1 + size
                break
        else:
            groups.append([index])
            used.append(envelope + size)
    return groups


# ---------------------------------------------------------------------------
# Segment's answer


@dataclass(frozen=True)
class Answer:
    """What one request came to: the outcome for each of its messages, and
    whether the refusal may be about one message, so splitting can help."""

    outcome: Outcome
    split: bool = False
    status: int | None = None  # None when no answer came


def classify(status: int, reason: str, retry_after: str | None, now: float) -> Answer:
    """Segment's answer to one request, as the outcome of each message in it.

    2xx delivered; 408, 429 and 5xx other than 501/505 retried (honouring
    `Retry-After`); 400/413 permanent but worth splitting; other 4xx, 501 and
    505 permanent. 1xx and 3xx are not answers Segment gives: they come from a
    proxy or a wrong URL, which an operator can fix, so they are retried until
    the attempt and age limits dead-letter them."""
    klass = status_class(status)
    if 200 <= status < 300:
        return Answer(Outcome(SUCCEEDED, status=klass), status=status)
    error = f"Segment answered {status}" + (f": {reason}" if reason else "")
    if retryable(status):
        wait = retry_after_seconds(retry_after, now)
        return Answer(Outcome(RETRY, error, klass, retry_after=wait), status=status)
    if status in SPLIT_STATUSES:
        return Answer(Outcome(FAILED, error, klass), split=True, status=status)
    if 400 <= status < 600:
        return Answer(Outcome(FAILED, error, klass), status=status)
    return Answer(Outcome(RETRY, error, klass), status=status)


# ---------------------------------------------------------------------------
# The sender


@dataclass
class _Round:
    """State shared by the requests of one `send` call."""

    stopping: threading.Event
    deadline: float  # time.monotonic() after which no new request starts
    # Set once Segment answers 429: the rest of the round waits as long,
    # rather than asking again at once.
    held: Outcome | None = field(default=None)
    # Set once a request must be retried: what is not sent yet goes back
    # unsent, since it may hold a later message of a user now retrying.
    halted: bool = False


class SegmentSender:
    """Sends direction B's outbox items to Segment's `/batch` endpoint."""

    direction = VERO_TO_SEGMENT
    upstream = "segment"
    # One claim takes everything pending up to this, each user's due messages
    # oldest first, which fits in one or two requests for ordinary email events.
    claim_size = 500
    whole_runs = True
    # Two rounds in flight overlap one's network wait with the other's packing
    # and settling; more would only add pressure on Segment's rate limit.
    concurrency = 2

    def __init__(self, config: Config):
        if not config.segment_write_key:
            raise ValueError("SEGMENT_WRITE_KEY is not set")
        self._write_key = config.segment_write_key
        self.url = config.segment_api_url + "/batch"
        # A round must finish well inside the outbox lease, or another worker
        # could claim the same items while we still send them. No request
        # starts after a third of the lease, and none can last longer than
        # another half of it.
        lease = config.outbox_lease_seconds
        self.timeout = (min(5.0, lease / 6), min(15.0, lease / 3))
        self.send_window = lease / 3
        self._envelope = envelope_bytes(self._write_key)
        self.session = requests.Session()
        # Retrying is the outbox's job (with backoff and limits), not urllib3's.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.concurrency, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.session.auth = (self._write_key, "")
        self.session.headers.update(
            {
                "Content-Type": "application/json",
                "User-Agent": f"{version.NAME}/{version.VERSION}",
            }
        )

    def send(self, items: Sequence[Item], stopping: threading.Event) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(items)
        ready: list[tuple[int, bytes]] = []
        for index, item in enumerate(items):
            encoded = encode_item(item)
            if isinstance(encoded, Outcome):
                outcomes[index] = encoded
            else:
                ready.append((index, encoded))
        groups = pack([len(encoded) for _, encoded in ready], self._envelope)
        round_ = _Round(stopping, time.monotonic() + self.send_window)
        for group in groups:
            for index, outcome in self._deliver([ready[k] for k in group], round_):
                outcomes[index] = outcome
        return [outcome if outcome is not None else RELEASE for outcome in outcomes]

    def close(self) -> None:
        self.session.close()

    def _deliver(self, batch: list[tuple[int, bytes]], round_: _Round) -> list[tuple[int, Outcome]]:
        """Send one group; when Segment refuses it as a whole, send each half
        on its own, down to single messages."""
        if round_.stopping.is_set() or round_.halted or time.monotonic() > round_.deadline:
            return [(index, RELEASE) for index, _ in batch]
        if round_.held is not None:
            return [(index, round_.held) for index, _ in batch]
        answer = self._post([encoded for _, encoded in batch])
        if answer.split and len(batch) > 1:
            middle = len(batch) // 2
            return self._deliver(batch[:middle], round_) + self._deliver(batch[middle:], round_)
        outcome = answer.outcome
        if answer.status == 429:
            round_.held = Outcome(
                RETRY,
                "not sent: Segment asked to slow down (429) in this round",
                outcome.status,
                retry_after=outcome.retry_after,
            )
        elif outcome.kind == RETRY:
            round_.halted = True
        return [(index, outcome) for index, _ in batch]

    def _post(self, messages: list[bytes]) -> Answer:
        body = batch_body(messages, sent_at(time.time()), self._write_key)
        try:
            response = self.session.post(
                self.url, data=body, timeout=self.timeout, allow_redirects=False
            )
        except requests.Timeout:
            log.warning("Segment did not answer in time", extra={"messages": len(messages)})
            return Answer(Outcome(RETRY, "Segment did not answer in time", "network"))
        except requests.RequestException as exc:
            error = self._scrub(f"cannot reach Segment: {type(exc).__name__}: {exc}")[
                :MAX_REASON_CHARS
            ]
            log.warning("%s", error, extra={"messages": len(messages)})
            return Answer(Outcome(RETRY, error, "network"))
        with response:
            reason = self._scrub(" ".join(response.text.split()))[:MAX_REASON_CHARS]
        answer = classify(
            response.status_code, reason, response.headers.get("Retry-After"), time.time()
        )
        if answer.outcome.kind == SUCCEEDED:
            log.info("sent to Segment", extra={"messages": len(messages), "bytes": len(body)})
        else:
            log.warning(
                "Segment refused a batch: %s",
                answer.outcome.error,
                extra={"messages": len(messages), "status": response.status_code},
            )
        return answer

    def _scrub(self, text: str) -> str:
        """Never let the write key reach an error, a log or the dead letters."""
        return redact_secrets(text, (self._write_key,))


def encode_item(item: Item) -> bytes | Outcome:
    """The item's message as the exact bytes to send, or FAILED when it cannot
    be sent at all (checked at the door too; this guards work stored by an
    older version or replayed by hand)."""
    message = item.payload.get("message") if isinstance(item.payload, dict) else None
    if not isinstance(message, dict):
        return Outcome(FAILED, "the outbox item holds no Segment message", "none")
    try:
        encoded = encode_message(message)
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        return Outcome(
            FAILED, f"the message cannot be encoded as JSON: {type(exc).__name__}", "none"
        )
    if len(encoded) > MAX_MESSAGE_BYTES:
        return Outcome(
            FAILED,
            f"the message is {len(encoded)} bytes, over Segment's limit of "
            f"{MAX_MESSAGE_BYTES} bytes per message",
            "none",
        )
    return encoded
