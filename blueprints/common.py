"""What both directions' edges share: reading the request body, comparing
secrets, refusing requests and shaping answers."""

from __future__ import annotations

import hmac
import logging
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import IO

from flask import jsonify, request

from service import metrics
from service.results import Reject, Result
from service.runtime import get_runtime

log = logging.getLogger("vero_bridge.intake")


# ---------------------------------------------------------------------------
# Answers


def is_segment_api() -> bool:
    """Whether the request is on Segment's HTTP API routes (`/v1/...`), whose
    clients read `code` and `message` from an error (analytics-python 1.x
    retries a 400 it cannot read as such eleven times)."""
    return request.path == "/v1" or request.path.startswith("/v1/")


def error(status: int, message: str, code: str = "invalid"):
    body = {"error": message}
    if is_segment_api():
        body.update(code=code, message=message)
    return jsonify(body), status


def refuse(direction: str, status: int, reason: str, message: str):
    """Refuse a whole request (not configured, unauthorized, unreadable body)."""
    metrics.REJECTED.labels(direction, reason).inc()
    return error(status, message, reason)


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
        return error(400, results[0].error, results[0].code)
    return jsonify(get_runtime().accept(direction, results).as_json()), 200


# ---------------------------------------------------------------------------
# Secrets


def accepted_secrets(current: str | None, previous: str | None) -> list[str]:
    """The values a credential may have: the secret and, while a secret is
    being changed, the previous one (SERVICE.md)."""
    return [secret for secret in (current, previous) if secret]


def matching_secret(given: str | bytes | None, secrets: Iterable[str]) -> str | None:
    """The secret `given` equals, or None. Every secret is compared, in
    constant time, so the time taken says nothing about which one (if any)
    came close."""
    if given is None:
        return None
    given_bytes = given.encode("utf-8", "surrogateescape") if isinstance(given, str) else given
    found = None
    for secret in secrets:
        if hmac.compare_digest(given_bytes, secret.encode("utf-8")) and found is None:
            found = secret
    return found


# ---------------------------------------------------------------------------
# The request body

# Compressed bodies whose every layer is decompressed within the size limit
# still cost one pass per layer; nobody sends more than two.
MAX_CODINGS = 2
_READ_SIZE = 64 * 1024
_GZIP = "gzip"
_DEFLATE = "deflate"
_CODINGS = {"gzip": _GZIP, "x-gzip": _GZIP, "deflate": _DEFLATE}


@dataclass(frozen=True)
class Refusal:
    """A body that cannot be read: the status, a short reason (the metric
    label and the `code` of /v1 answers) and the message for the sender."""

    status: int
    reason: str
    message: str


class _Refused(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.refusal = Refusal(status, reason, message)


def read_body(limit: int) -> bytes | Refusal:
    """The request body as its sender wrote it, or why it cannot be had.

    - `Content-Encoding: gzip` or `deflate` (zlib-wrapped, or raw as some
      clients send it) is decompressed as the body is read; `identity` is
      nothing to undo; any other coding is refused with 415.
    - `limit` holds for the body as sent and for the body decompressed: past
      it, 413 at once, whatever `Content-Length` says or whether there is one
      (a chunked body), so a small body that inflates without end is stopped
      at `limit` bytes, and a body is never cut short to fit.
    - A body that ends before its `Content-Length`, a malformed chunked body
      (the WSGI server raises while reading it) and a corrupt compressed
      stream are refused with 400: half a body is never a message.
    """
    try:
        inflaters = [_Inflater(coding, limit) for coding in reversed(_codings())]
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(limit)
        parts: list[bytes] = []
        for chunk in _wire_chunks(request.environ, length, limit):
            for inflater in inflaters:
                chunk = inflater.feed(chunk)
            parts.append(chunk)
        for inflater in inflaters:
            inflater.finish()
        return b"".join(parts)
    except _Refused as refused:
        return refused.refusal


def _codings() -> list[str]:
    header = request.headers.get("Content-Encoding", "")
    codings = []
    for name in header.split(","):
        name = name.strip().lower()
        if not name or name == "identity":
            continue
        if name not in _CODINGS:
            raise _Refused(
                415,
                "unsupported_encoding",
                f"Content-Encoding {name!r} is not supported: send the body as it is,"
                " or compressed with gzip or deflate",
            )
        codings.append(_CODINGS[name])
    if len(codings) > MAX_CODINGS:
        raise _Refused(
            415, "unsupported_encoding", f"more than {MAX_CODINGS} content codings in one body"
        )
    return codings


def _too_large(limit: int) -> _Refused:
    return _Refused(413, "too_large", f"request body is larger than the limit of {limit} bytes")


def _wire_chunks(environ: dict, length: int | None, limit: int) -> Iterator[bytes]:
    """The body's bytes as they arrive, at most `limit` of them."""
    stream: IO[bytes] = environ["wsgi.input"]
    if length is None and not environ.get("wsgi.input_terminated"):
        # Without a length the stream can only be read to its end when the
        # server marks where that is (gunicorn does, for chunked bodies);
        # otherwise there is no body to read (as werkzeug reads it).
        return
    received = 0
    while length is None or received < length:
        wanted = _READ_SIZE if length is None else min(_READ_SIZE, length - received)
        try:
            # One byte past the limit is enough to know the body is too large.
            data = stream.read(min(wanted, limit + 1 - received))
        except Exception as exc:
            # How a server reports a malformed chunk or a connection that went
            # away is its own (gunicorn raises its parse errors, OSError or
            # ValueError); for us each means the same: no whole body.
            raise _Refused(
                400, "bad_framing", f"the request body could not be read ({type(exc).__name__})"
            ) from None
        if not data:
            break
        received += len(data)
        if received > limit:
            raise _too_large(limit)
        yield data
    if length is not None and received < length:
        raise _Refused(
            400,
            "bad_framing",
            f"the request body ended after {received} of the {length} bytes its"
            " Content-Length announced",
        )


class _Inflater:
    """One content coding undone as the body arrives, never producing more
    than `limit` + 1 bytes in all (enough to know the body is too large), so a
    small body that inflates to gigabytes costs no more than `limit`."""

    def __init__(self, coding: str, limit: int):
        self.coding = coding
        self.limit = limit
        self.room = limit + 1
        self.started = False
        self.decompressor = zlib.decompressobj()

    def feed(self, data: bytes) -> bytes:
        out = []
        while data:
            if not self.started:
                self.decompressor = zlib.decompressobj(self._wbits(data))
                self.started = True
            elif self.decompressor.eof:
                if self.coding != _GZIP:
                    raise self._corrupt("data after the end of the stream")
                # A gzip body may hold several members, one after another.
                self.decompressor = zlib.decompressobj(self._wbits(data))
            try:
                chunk = self.decompressor.decompress(data, self.room)
            except zlib.error as exc:
                raise self._corrupt(str(exc)) from None
            out.append(chunk)
            self.room -= len(chunk)
            if self.room <= 0:
                raise _Refused(
                    413,
                    "too_large",
                    f"request body is larger than the limit of {self.limit} bytes"
                    f" once decompressed ({self.coding})",
                )
            # With room left, all input was consumed: what is left over is
            # what followed the end of the stream.
            data = self.decompressor.unused_data if self.decompressor.eof else b""
        return b"".join(out)

    def finish(self) -> None:
        if not self.started or not self.decompressor.eof:
            raise self._corrupt("the stream is empty or cut short")

    def _wbits(self, data: bytes) -> int:
        if self.coding == _GZIP:
            return 16 + zlib.MAX_WBITS
        # HTTP's "deflate" is the zlib format (RFC 9110), but some clients
        # send a raw deflate stream; a zlib header says which.
        if len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0:
            return zlib.MAX_WBITS
        return -zlib.MAX_WBITS

    def _corrupt(self, detail: str) -> _Refused:
        return _Refused(400, "bad_encoding", f"the body is not valid {self.coding} data ({detail})")
