"""Strict JSON for request bodies: UTF-8 only, no NaN or Infinity (Python's json
accepts them, but JSON, Segment and Vero do not), and any depth of nesting
refused cleanly rather than by a crash."""
from __future__ import annotations

import json
from typing import Any

from service.results import Reject


def loads(text: str) -> Any | Reject:
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        return Reject(f"body is not valid JSON: {error.msg} at line {error.lineno}"
                      f" column {error.colno}", "bad_json")
    except ValueError as error:
        return Reject(f"body is not valid JSON: {error}", "bad_json")
    except RecursionError:
        return Reject("body is not valid JSON: nested too deeply", "bad_json")


def parse(raw: bytes) -> Any | Reject:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return Reject(f"body is not valid UTF-8 (byte {error.start})", "bad_encoding")
    # A byte-order mark is not JSON, but some Windows tools add one.
    text = text.removeprefix("\ufeff")
    if not text.strip():
        return Reject("body is empty", "empty_body")
    return loads(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")
