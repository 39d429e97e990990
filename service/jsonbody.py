"""Request bodies as JSON, one way for both directions.

The bytes (already decompressed by the edge) are decoded once: UTF-8 only, a
byte-order mark ignored, an empty body refused. The text is parsed strictly: no
NaN or Infinity (Python's json accepts them, but JSON, Segment and Vero do
not), any depth of nesting refused cleanly rather than by a crash, and a number
too large for a float (`1e400`, or an integer of more than 308 digits) kept as a
`TooLarge` marker, so that the message holding it, and only that one, is
refused naming the field (`too_large_field`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
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

# The largest float is about 1.8e308: an integer of 310 or more digits is past
# it; one of 309 digits may be.
_FLOAT_DIGITS = 309


@dataclass(frozen=True)
class TooLarge:
    """A number in the body that no float can hold; `text` as it was written."""

    text: str


@dataclass(frozen=True)
class Document:
    """A parsed body. `has_too_large` says whether a `TooLarge` marker is in
    `value` somewhere, so ordinary bodies are never walked to look for one."""

    value: Any
    has_too_large: bool = False


@dataclass(frozen=True)
class Messages:
    """The messages of one body, in order, and its shape: `single` when the
    body was one message (its refusal is then the answer, a 400) rather than a
    collection (each refusal listed in a 200, the others accepted). The shape
    is decided where the body is parsed, and nowhere else."""

    items: list[Any]
    single: bool


def decode(raw: bytes) -> str | Reject:
    """The body as text: UTF-8, without a byte-order mark, not empty."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return Reject(f"body is not valid UTF-8 (byte {error.start})", "bad_encoding")
    text = without_bom(text)
    if not text.strip():
        return Reject("body is empty", "empty_body")
    return text


def without_bom(text: str) -> str:
    """The text without a leading byte-order mark: not JSON, but some Windows
    tools add one (and a proxy URL-encoding such a body keeps it, as %EF%BB%BF)."""
    return text.removeprefix("\ufeff")


def parse(raw: bytes, max_nesting: int = MAX_NESTING) -> Document | Reject:
    text = decode(raw)
    if isinstance(text, Reject):
        return text
    return loads(text, max_nesting)


def loads(text: str, max_nesting: int = MAX_NESTING) -> Document | Reject:
    numbers = _Numbers()
    try:
        value = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=numbers.parse_float,
            parse_int=numbers.parse_int,
        )
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
    if text.count("{") + text.count("[") >= max_nesting or _SURROGATE_ESCAPE.search(text):
        refused = _refuse_unusable(value, max_nesting)
        if refused is not None:
            return refused
    return Document(value, numbers.too_large)


def too_large_field(value: Any, root: str) -> Reject | None:
    """A Reject naming the first number too large for a float in `value`
    (`root` names the value itself, e.g. "message"), or None when there is none.

    >>> too_large_field({"properties": {"price": TooLarge("1e400")}}, "message")
    Reject(error='properties.price is a number too large for a float (1e400)', code='number')
    """
    pending: list[tuple[Any, str]] = [(value, "")]
    while pending:
        node, path = pending.pop()
        if isinstance(node, TooLarge):
            shown = node.text if len(node.text) <= 24 else node.text[:20] + "..."
            return Reject(f"{path or root} is a number too large for a float ({shown})", "number")
        if isinstance(node, dict):
            children = [
                (child, f"{path}.{key}" if path else str(key)) for key, child in node.items()
            ]
        elif isinstance(node, list):
            children = [(child, f"{path or root}[{index}]") for index, child in enumerate(node)]
        else:
            continue
        # Reversed onto the stack, so the first in document order is found first.
        pending.extend(reversed(children))
    return None


class _Numbers:
    """json's number hooks for one parse: finite numbers as Python reads
    them, the others as TooLarge markers, noting that there was one."""

    def __init__(self) -> None:
        self.too_large = False

    def parse_float(self, text: str) -> float | TooLarge:
        number = float(text)
        if math.isinf(number):
            self.too_large = True
            return TooLarge(text)
        return number

    def parse_int(self, text: str) -> int | TooLarge:
        digits = len(text) - text.startswith("-")
        if digits < _FLOAT_DIGITS:
            return int(text)
        # Also spares Python's limit on converting long digit strings, which
        # would refuse the whole body instead of the message holding it.
        if digits == _FLOAT_DIGITS:
            number = int(text)
            try:
                float(number)
                return number
            except OverflowError:
                pass
        self.too_large = True
        return TooLarge(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _refuse_unusable(value: Any, max_nesting: int) -> Reject | None:
    """A Reject when the value nests too deeply or holds a lone surrogate.
    Walks with its own stack, so it cannot hit the recursion limit."""
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
    return None
