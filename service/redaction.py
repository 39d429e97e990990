"""The one redactor: secrets, in every spelling an encoder gives them, and
email addresses (personal data).

Used by both senders (an upstream's error answer may echo a credential), the
PostgreSQL store (libpq's messages may quote the password) and the log
formatter (every line the process writes, gunicorn's included).
"""

from __future__ import annotations

import base64
import functools
import html
import json
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote

REDACTED = "[redacted]"
EMAIL = "[email]"

# How many levels of escaping the redactor sees through: a body escaped
# once in an answer, that answer quoted in another, and a URL's quoting.
DECODE_LEVELS = 4

# A shorter value is not replaced wherever it occurs: a secret of two letters
# would turn every line into noise, and is guessed sooner than read anyway.
MIN_SECRET_CHARS = 4


@functools.lru_cache(maxsize=256)
def spellings(secret: str) -> tuple[str, ...]:
    """The ways `secret` can appear in text: as is; JSON-escaped (ASCII or not,
    with `/` escaped or not); URL-quoted (as a whole or as a path, `+` for a
    space, hex in either case); and as the start of an HTTP Basic credential
    whose user name it is. Longest first, so a longer spelling that contains
    a shorter one is replaced whole."""
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    forms |= {form.replace("/", "\\/") for form in forms}
    for quoted in (
        quote(secret, safe=""),
        quote(secret, safe="/"),
        quote_plus(secret),
        quote_plus(secret, safe="/"),
    ):
        forms |= {quoted, _lower_hex(quoted)}
    basic = base64.b64encode(secret.encode() + b":").decode().rstrip("=")
    forms.add(basic)
    # The part of the Basic credential fixed by the user name alone, whatever
    # password follows it (every three bytes make four characters).
    fixed = len(secret.encode()) // 3 * 4
    if fixed >= 16:
        forms.add(basic[:fixed])
    return tuple(sorted(forms, key=len, reverse=True))


def _lower_hex(quoted: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda match: match.group(0).lower(), quoted)


def _usable(secrets: Iterable[str | None]) -> tuple[str, ...]:
    return tuple(sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}))


def redact_secrets(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every spelling of each secret replaced by [redacted]."""
    return Redactor(secrets).secrets(text)


# -- email addresses ----------------------------------------------------------
#
# What RFC 5322 allows and mail systems use: a dot-atom local part (letters,
# digits and !#$%&'*+/=?^_`{|}~-, dots, and, as SMTPUTF8 allows, any non-ASCII
# letter) or a quoted one ("john doe"@..., with backslash escapes); a host name
# (underscores and non-ASCII labels included) or an address literal
# ([192.0.2.1], [IPv6:2001:db8::1]). Text that is itself JSON-escaped (an
# upstream's answer quoted in an error) writes non-ASCII letters as \uXXXX and
# quotes as \", so both spellings are covered; so is %40, the at sign in a URL.
# Lengths are bounded (as RFC 5321 bounds them; backslashes to eight, text
# escaped three times), which keeps a long run of address characters or
# backslashes from costing quadratic time.
_ESCAPED = r"\\{1,8}u[0-9A-Fa-f]{4}"  # \u00e9, or \\u00e9 in text escaped twice
_ATOM = rf"(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.-]|[^\x00-\x7f]|{_ESCAPED})"
# Quotes and quoted pairs with any number of backslashes before them (text
# escaped once or more); the shortest content that closes before an at sign.
_QUOTED = r'\\{0,8}"(?:[^"\\\r\n]|\\{1,8}[^\r\n]){1,64}?\\{0,8}"'
_LABEL = rf"(?:[A-Za-z0-9_-]|[^\x00-\x7f]|{_ESCAPED}){{1,63}}"
_DOMAIN = rf"(?:\[[^\]\s\\\"]{{1,64}}\]|{_LABEL}(?:\.{_LABEL}){{0,16}})"
_EMAIL = re.compile(rf"(?:{_QUOTED}|{_ATOM}{{1,64}})(?:@|%40){_DOMAIN}")


def mask_emails(text: str) -> str:
    if "@" not in text and "%40" not in text:
        return text
    return _EMAIL.sub(EMAIL, text)


# -- the webhook path ---------------------------------------------------------
#
# Whatever follows /vero/webhooks/ is a token, right or wrong (an old one, one
# mistyped by a character): it is never written, whatever the letter case or
# the number of slashes; nor is a `token` in a query.
_WEBHOOK_PATH = re.compile(r"(/+vero/+webhooks/+|[?&;]token=)[^/\s?&#\"'\\]+", re.IGNORECASE)


def redact_webhook_paths(text: str) -> str:
    return _WEBHOOK_PATH.sub(r"\1" + REDACTED, text)


class Redactor:
    """Redacts a fixed set of secrets (those of MIN_SECRET_CHARS or more)."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        self.forms = _forms(_usable(secrets))

    def has_secret(self, text: str) -> bool:
        return any(form in text for form in self.forms)

    def may_hide_secret(self, text: str) -> bool:
        """Whether `text` holds a secret, or an escape that may hide one."""
        if not self.forms:
            return False
        return self.has_secret(text) or any(marker in text for marker, _ in _DECODERS)

    def secrets(self, text: str) -> str:
        for form in self.forms:
            if form in text:
                text = text.replace(form, REDACTED)
        # Encoders escape more than the spellings above foresee: a client may
        # quote characters a quoter leaves alone (%7E for ~), Go's and Rails'
        # JSON write & < > as \u0026 \u003c \u003e (Gson = and ' too), an
        # answer may quote a body escaped once more, and an HTML page writes
        # &amp;. Decoded (a level at a time, as deep as text is escaped in
        # practice), the secret shows: write that instead. Each decoding
        # shortens the text, so this ends.
        decoded = text
        for _ in range(DECODE_LEVELS):
            before = decoded
            for marker, decode in _DECODERS:
                if marker in decoded:
                    decoded = decode(decoded)
            if decoded == before:
                break
            if self.has_secret(decoded):
                return self.secrets(decoded)
        return text

    def everything(self, text: str, personal: bool = True) -> str:
        """Secrets, webhook tokens and (with `personal`) email addresses."""
        text = redact_webhook_paths(self.secrets(text))
        return mask_emails(text) if personal else text


_JSON_ESCAPE = re.compile(r'\\(?:u([0-9A-Fa-f]{4})|(["\\/bfnrt]))')
_JSON_SHORT = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _json_unescaped(text: str) -> str:
    """`text` with one level of JSON string escapes decoded."""

    def decode(match: re.Match) -> str:
        if match.group(1):
            return chr(int(match.group(1), 16))
        char = match.group(2)
        return _JSON_SHORT.get(char, char)

    decoded = _JSON_ESCAPE.sub(decode, text)
    # A character beyond the BMP is escaped as two halves: join them.
    return decoded.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")


# (what shows a decoding may help, the decoding)
_DECODERS = (("%", unquote), ("\\", _json_unescaped), ("&", html.unescape))


@functools.lru_cache(maxsize=64)
def _forms(secrets: tuple[str, ...]) -> tuple[str, ...]:
    forms = {form for secret in secrets for form in spellings(secret)}
    return tuple(sorted(forms, key=len, reverse=True))
