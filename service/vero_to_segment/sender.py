"""Direction B's upstream: Segment's HTTP Tracking API, fed through `/batch`.

The delivery loop hands `SegmentSender.units` each claim (every user's run of
due messages, oldest first); it groups them into units, each one or a few
`/batch` requests, so that one user's run never spans two units: units then
go out side by side without a user's later message overtaking an earlier
one. `send` delivers one unit: its requests one after another, each only once
the loop's gate lets it start, and turns each answer into one Outcome per
item. A batch Segment refuses as a whole (400) is split in halves until the
bad message stands alone, so that it is dead-lettered with Segment's reason
while its neighbours are delivered.

The pure parts (packing, the request body, classifying an answer) are plain
functions, so they can be tested without a server.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import requests

from service import upstream
from service.config import Config
from service.directions import VERO_TO_SEGMENT
from service.outbox import Item
from service.outbox.delivery import PERMANENT, RELEASE, RETRY, SUCCEEDED, Gate, Outcome
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
# Items claimed for each request the window has room for: one request's worth
# of ordinary email events.
ITEMS_PER_REQUEST = 500
# Requests in flight at once, whatever DELIVERY_MAX_IN_FLIGHT allows: each
# carries up to ITEMS_PER_REQUEST messages, so a few already move thousands a
# second, and what a process holds claimed stays small.
MAX_REQUESTS_IN_FLIGHT = 8
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
    counts: Sequence[int] | None = None,
) -> list[list[int]]:
    """Group messages (given by their sizes) into requests: lists of indexes.

    First fit: each message goes into the first request it fits in, so a
    large message that overflows one request does not leave the room after it
    unused by the small ones that follow. A request's size is the envelope,
    the messages, and a comma between each two. A message too large even for
    an empty request still gets one of its own (Segment will then say why).
    `counts` gives how many messages each entry stands for (default one):
    `plan` packs whole runs of messages this way.
    """
    groups: list[list[int]] = []
    used: list[int] = []
    held: list[int] = []
    for index, size in enumerate(sizes):
        count = counts[index] if counts is not None else 1
        for number, group in enumerate(groups):
            if held[number] + count <= max_count and used[number] + 1 + size <= max_bytes:
                group.append(index)
                used[number] += 1 + size
                held[number] += count
                break
        else:
            groups.append([index])
            used.append(envelope + size)
            held.append(count)
    return groups


def plan(
    runs: Sequence[Sequence[int]],
    envelope: int,
    max_bytes: int = MAX_REQUEST_BYTES,
    max_count: int = MAX_REQUEST_MESSAGES,
) -> list[list[list[tuple[int, int]]]]:
    """Requests for users' runs of messages (each run: its messages' sizes,
    oldest first), as chains: requests to send one after another, each a list
    of (run, message) positions. Different chains may go side by side.

    A run that fits in one request is never split: such runs are packed first
    fit (`pack`), one chain of one request per group. A run too large for one
    request gets a chain of its own, cut into consecutive requests, so that
    its messages still leave in order and a later one waits for the earlier.
    """
    whole: list[int] = []
    chains: list[list[list[tuple[int, int]]]] = []
    for run, sizes in enumerate(runs):
        if envelope + sum(sizes) + len(sizes) - 1 <= max_bytes and len(sizes) <= max_count:
            whole.append(run)
        else:
            chains.append(_consecutive(run, sizes, envelope, max_bytes, max_count))
    groups = pack(
        [sum(runs[run]) + len(runs[run]) - 1 for run in whole],
        envelope,
        max_bytes,
        max_count,
        counts=[len(runs[run]) for run in whole],
    )
    packed = [
        [[(whole[g], m) for g in group for m in range(len(runs[whole[g]]))]] for group in groups
    ]
    return packed + chains


def _consecutive(
    run: int, sizes: Sequence[int], envelope: int, max_bytes: int, max_count: int
) -> list[list[tuple[int, int]]]:
    """One run cut into requests in order: a new one whenever the next
    message does not fit."""
    requests: list[list[tuple[int, int]]] = []
    used = 0
    for message, size in enumerate(sizes):
        if requests and len(requests[-1]) < max_count and used + 1 + size <= max_bytes:
            requests[-1].append((run, message))
            used += 1 + size
        else:
            requests.append([(run, message)])
            used = envelope + size
    return requests


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
        return Answer(Outcome(PERMANENT, error, klass), split=True, status=status)
    if 400 <= status < 600:
        return Answer(Outcome(PERMANENT, error, klass), status=status)
    return Answer(Outcome(RETRY, error, klass), status=status)


# ---------------------------------------------------------------------------
# The sender


@dataclass
class _Send:
    """State shared by the requests of one `send` call."""

    gate: Gate
    # Set once a request must be retried: what is not sent yet goes back
    # unsent, since it may hold a later message of a user now retrying.
    halted: bool = False


class SegmentSender:
    """Sends direction B's outbox items to Segment's `/batch` endpoint."""

    direction = VERO_TO_SEGMENT
    upstream = "segment"
    whole_runs = True
    items_per_call = ITEMS_PER_REQUEST
    calls_per_second: float | None = None

    def __init__(self, config: Config):
        if not config.segment_write_key:
            raise ValueError("SEGMENT_WRITE_KEY is not set")
        self._write_key = config.segment_write_key
        self.url = config.segment_api_url + "/batch"
        self.max_in_flight = min(config.delivery_max_in_flight, MAX_REQUESTS_IN_FLIGHT)
        # Timeouts well inside the outbox lease, so that a request started in
        # the first half of the lease (see Unit.latest_start) ends inside it.
        lease = config.outbox_lease_seconds
        self.timeout = (min(5.0, lease / 6), min(15.0, lease / 3))
        self._envelope = envelope_bytes(self._write_key)
        self.session = upstream.session(
            self.url, self.max_in_flight, {"Content-Type": "application/json"}
        )
        self.session.auth = (self._write_key, "")

    @property
    def call_seconds(self) -> float:
        return sum(self.timeout)

    def units(self, items: Sequence[Item]) -> list[list[Item]]:
        """The claim's users' runs packed into requests; each chain of requests
        (see `plan`) is one unit. An item that cannot be sent is a unit of its
        own, which makes no request."""
        chains, _, unsendable = self._plan(items)
        units = [[items[index] for request in chain for index in request] for chain in chains]
        return units + [[items[index]] for index in unsendable]

    def send(self, items: Sequence[Item], gate: Gate) -> list[Outcome]:
        chains, encoded, unsendable = self._plan(items)
        outcomes: list[Outcome | None] = [None] * len(items)
        for index, outcome in unsendable.items():
            outcomes[index] = outcome
        state = _Send(gate)
        for chain in chains:
            for request in chain:
                batch = [(index, encoded[index]) for index in request]
                for index, outcome in self._deliver(batch, state):
                    outcomes[index] = outcome
        return [outcome if outcome is not None else RELEASE for outcome in outcomes]

    def _plan(
        self, items: Sequence[Item]
    ) -> tuple[list[list[list[int]]], dict[int, bytes], dict[int, Outcome]]:
        """(chains of requests as lists of item indexes, each sendable item's
        bytes, each unsendable item's outcome)."""
        encoded: dict[int, bytes] = {}
        unsendable: dict[int, Outcome] = {}
        runs: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            result = encode_item(item)
            if isinstance(result, Outcome):
                unsendable[index] = result
            else:
                encoded[index] = result
                runs.setdefault(item.order_key, []).append(index)
        members = list(runs.values())
        chains = plan([[len(encoded[i]) for i in run] for run in members], self._envelope)
        as_indexes = [
            [[members[run][message] for run, message in request] for request in chain]
            for chain in chains
        ]
        return as_indexes, encoded, unsendable

    def _deliver(self, batch: list[tuple[int, bytes]], state: _Send) -> list[tuple[int, Outcome]]:
        """Send one group; when Segment refuses it as a whole, send each half
        on its own, down to single messages."""
        if state.halted:
            return [(index, RELEASE) for index, _ in batch]
        ticket = state.gate.begin()
        if ticket is None:
            state.halted = True
            return [(index, RELEASE) for index, _ in batch]
        answer = self._post([encoded for _, encoded in batch])
        state.gate.end(ticket, answer.status, answer.outcome.retry_after)
        if answer.split and len(batch) > 1:
            middle = len(batch) // 2
            return self._deliver(batch[:middle], state) + self._deliver(batch[middle:], state)
        outcome = answer.outcome
        if outcome.kind == RETRY:
            state.halted = True
        return [(index, outcome) for index, _ in batch]

    def _post(self, messages: list[bytes]) -> Answer:
        body = batch_body(messages, sent_at(time.time()), self._write_key)
        try:
            response = upstream.call(self.session, "POST", self.url, body, self.timeout)
        except requests.Timeout:
            log.warning("Segment did not answer in time", extra={"messages": len(messages)})
            return Answer(Outcome(RETRY, "Segment did not answer in time", "network"))
        except requests.RequestException as exc:
            error = self._scrub(f"cannot reach Segment: {type(exc).__name__}: {exc}")[
                :MAX_REASON_CHARS
            ]
            log.warning(
                "cannot reach Segment",
                extra={"messages": len(messages), "error": type(exc).__name__},
            )
            return Answer(Outcome(RETRY, error, "network"))
        with response:
            reason = self._scrub(" ".join(response.text.split()))[:MAX_REASON_CHARS]
        answer = classify(
            response.status_code, reason, response.headers.get("Retry-After"), time.time()
        )
        if answer.outcome.kind == SUCCEEDED:
            log.info("sent to Segment", extra={"messages": len(messages), "bytes": len(body)})
        else:
            # Segment's reason can quote a message (personal data): it goes to
            # the dead letters, never to this line.
            log.warning(
                "Segment refused a batch",
                extra={"messages": len(messages), "status": response.status_code},
            )
        return answer

    def _scrub(self, text: str) -> str:
        """Never let the write key reach an error, a log or the dead letters."""
        return redact_secrets(text, (self._write_key,))


def encode_item(item: Item) -> bytes | Outcome:
    """The item's message as the exact bytes to send, or PERMANENT when it cannot
    be sent at all (checked at the door too; this guards work stored by an
    older version or replayed by hand)."""
    message = item.payload.get("message") if isinstance(item.payload, dict) else None
    if not isinstance(message, dict):
        return Outcome(PERMANENT, "the outbox item holds no Segment message", "none")
    try:
        encoded = encode_message(message)
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        return Outcome(
            PERMANENT, f"the message cannot be encoded as JSON: {type(exc).__name__}", "none"
        )
    if len(encoded) > MAX_MESSAGE_BYTES:
        return Outcome(
            PERMANENT,
            f"the message is {len(encoded)} bytes, over Segment's limit of "
            f"{MAX_MESSAGE_BYTES} bytes per message",
            "none",
        )
    return encoded
