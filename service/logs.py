"""JSON logs on stdout, one object per line, with the request id.

The same formatter is given to gunicorn (see gunicorn.conf.py), so every line
the process writes has one shape and passes through the same redaction: the
configured secrets by value in every spelling, whatever follows
/vero/webhooks/, and, on lines above debug level, email addresses.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

from service.redaction import Redactor, mask_emails, redact_webhook_paths

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_WEBHOOKS = re.compile("webhooks|token=", re.IGNORECASE)

# One per process: the secrets are the process's configuration, and gunicorn's
# formatter is built from its own settings before any app exists.
_redactor = Redactor()


def use_secrets(secrets: Iterable[str | None]) -> None:
    """Redact these values (in every spelling) from every line from now on."""
    global _redactor
    _redactor = Redactor(secrets)


def redact(text: str) -> str:
    """`text` as a log line may show it, personal data aside."""
    return _redactor.everything(text, personal=False)


def shows_secret(text: str) -> bool:
    return _redactor.has_secret(text)


def _request_id() -> str | None:
    # Imported here so gunicorn's master can use this module without Flask.
    from flask import g, has_request_context

    if has_request_context():
        return g.get("request_id")
    return None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
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
        line = json.dumps(entry, default=str)
        # Emails are personal data: only debug lines, which an operator asks
        # for with LOG_LEVEL=DEBUG, may show them.
        personal = record.levelno > logging.DEBUG
        steps = _steps_for(line, personal)
        if not steps:
            return line
        # Redact each value before encoding, not the encoded line: a
        # replacement then never cuts through the line's JSON.
        return json.dumps(_clean(entry, steps), default=str)


def _steps_for(line: str, personal: bool) -> list:
    """What `line` needs, judged from the encoded line: every spelling the
    redactor knows includes the JSON-escaped one, so a value holding a secret
    shows here as one."""
    redactor = _redactor
    steps: list = []
    if redactor.may_hide_secret(line):
        steps.append(redactor.secrets)
    if _WEBHOOKS.search(line):
        steps.append(redact_webhook_paths)
    if personal and ("@" in line or "%40" in line):
        steps.append(mask_emails)
    return steps


def _clean(value: Any, steps: list) -> Any:
    if isinstance(value, str):
        for step in steps:
            value = step(value)
        return value
    if isinstance(value, dict):
        return {_clean(key, steps): _clean(item, steps) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item, steps) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _clean(str(value), steps)


def configure(level: str = "INFO", secrets: Iterable[str | None] = ()) -> None:
    """Send the service's own loggers to stdout as JSON (idempotent), redacting
    `secrets`."""
    use_secrets(secrets)
    root = logging.getLogger()
    root.setLevel(level)
    for handler in root.handlers:
        if isinstance(handler.formatter, JsonFormatter):
            return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
