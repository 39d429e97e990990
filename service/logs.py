"""JSON logs on stdout, one object per line, with the request id.

The same formatter is given to gunicorn (see gunicorn.conf.py), so every line
the process writes has one shape and passes through the same redaction.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# The webhook token is a secret that travels in the URL path.
_WEBHOOK_PATH = re.compile(r"(/vero/webhooks/)[^/\s?#\"']+")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


# Email addresses are personal data: they may only be logged at debug level,
# yet an upstream's error answer can echo a message's body into a warning.
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")


def redact(text: str) -> str:
    # The substring test first: most lines hold no webhook path, and a regex
    # on every line of every request is a measurable share of a request.
    if "/vero/webhooks/" not in text:
        return text
    return _WEBHOOK_PATH.sub(r"\1[redacted]", text)


def redact_personal(text: str) -> str:
    if "@" not in text:
        return text
    return _EMAIL.sub("[email]", text)


def _request_id() -> str | None:
    # Imported here so gunicorn's master can use this module without Flask.
    from flask import g, has_request_context

    if has_request_context():
        return g.get("request_id")
    return None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or _request_id()
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = redact(json.dumps(entry, default=str))
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            line = redact_personal(line)
        return line


def configure(level: str = "INFO") -> None:
    """Send the service's own loggers to stdout as JSON (idempotent)."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in root.handlers:
        if isinstance(handler.formatter, JsonFormatter):
            return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
