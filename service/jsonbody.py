"""Strict JSON for request bodies: UTF-8 only, no NaN or Infinity (Python's json
accepts them, but JSON, Segment and Vero do not), and any depth of nesting
refused cleanly rather than by a crash."""

from __future__ import annotations

import json
import re
from typing import Any

from service.results import Reject

# Segment messages nest a few levels (properties may hold objects of their
# own). A cap far above that, and far below Python's recursion limit, keeps a
# body that parses from failing later, when its dedup key or stored form is
# encoded: that would be a 500 instead of a 400.
MAX_NESTING = 64

# JSON can escape half of a surrogate pair ("\ud800"), which decodes to text
# that is not Unicode: it cannot be hashed for de-duplication or sent as UTF-8.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Text decoded from UTF-8 holds no surrogates, so only such an escape can
# bring one in.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def loads(text: str, max_nesting: int = MAX_NESTING) -> Any | Reject:
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        return Reject(
            f"body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}",
            "bad_json",
        )
    except ValueError as error:
        return Reject(f"body is not valid JSON: {error}", "bad_json")
    except RecursionError:
        return Reject("body is not valid JSON: nested too deeply", "bad_json")
    # Walking the value costs more than parsing it; an ordinary body can be
    # cleared from its text: fewer brackets than the limit cannot nest past
    # it, and no surrogate escape means no lone surrogate.
    if text.count("{") + text.count("[") < max_nesting and not _SURROGATE_ESCAPE.search(text):
        return value
    return _refuse_unusable(value, max_nesting)


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


def _refuse_unusable(value: Any, max_nesting: int) -> Any | Reject:
    """The value, or a Reject when it nests too deeply or holds a lone
    surrogate. Walks with its own stack, so it cannot hit the recursion limit."""
    pending = [(value, 0)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, str):
            if _LONE_SURROGATE.search(node):
                return Reject(
                    "body is not valid JSON: a text value is not valid Unicode"
                    " (unpaired surrogate)",
                    "bad_encoding",
                )
        elif isinstance(node, (dict, list)):
            if depth >= max_nesting:
                return Reject(
                    f"body is not valid JSON: nested more than {max_nesting} levels deep",
                    "bad_json",
                )
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            pending.extend((child, depth + 1) for child in children)
    return value
