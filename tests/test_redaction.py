"""The one redactor: secrets in every spelling, webhook tokens whatever the
path's shape, and email addresses in every shape mail systems use, in plain
text and in text that is JSON-escaped once or twice (an upstream's answer
quoting a request body)."""

from __future__ import annotations

import base64
import html
import json
import logging
import sys
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import logs
from service.config import Config
from service.redaction import (
    EMAIL,
    MIN_SECRET_CHARS,
    REDACTED,
    Redactor,
    mask_emails,
    redact_secrets,
    redact_webhook_paths,
)

SECRET = "tok-3f9a/b+c=d~e é"


def test_every_spelling_of_a_secret_is_redacted():
    spelled = [
        SECRET,
        json.dumps(SECRET)[1:-1],
        json.dumps(SECRET, ensure_ascii=False)[1:-1],
        json.dumps(SECRET)[1:-1].replace("/", "\\/"),
        quote(SECRET, safe=""),
        quote(SECRET, safe="").lower(),
        quote(SECRET),
        quote_plus(SECRET),
        quote_plus(SECRET, safe="/"),
        base64.b64encode(f"{SECRET}:".encode()).decode(),
        # As the user name of a Basic credential that has a password too.
        base64.b64encode(f"{SECRET}:a-password".encode()).decode(),
    ]
    for form in spelled:
        text = f"Vero answered 401: {{'echo': '{form}'}}"
        assert redact_secrets(text, [SECRET]) != text, form
        assert "3f9a" not in redact_secrets(text, [SECRET]), form


def test_a_secret_quoted_in_part_is_found_once_decoded():
    # %7E for "~" is what an older quoter writes; decoded, it is the secret.
    partly = SECRET.replace("~", "%7E").replace(" ", "%20")
    assert "3f9a" not in redact_secrets(f"GET /vero/x/{partly} HTTP/1.1", [SECRET])


def html_safe_json(value: object, escaped: str = "&<>") -> str:
    """JSON as Go's encoding/json and Rails write it (and Gson, with = and '
    as well): characters HTML gives meaning to as \\u00XX."""
    text = json.dumps(value, ensure_ascii=False)
    for char in escaped:
        text = text.replace(char, "\\u%04x" % ord(char))
    return text


@pytest.mark.parametrize(
    "answer",
    [
        html_safe_json({"auth_token": "tok&<=>'1234"}),
        html_safe_json({"auth_token": "tok&<=>'1234"}, "&<>='"),
        '{"auth_token": "tok\\u0026\\u003C=\\u003E\'1234"}',  # hex in capitals
        # An answer quoting a JSON body: escaped twice.
        json.dumps({"error": html_safe_json({"auth_token": "tok&<=>'1234"})}),
        json.dumps({"error": json.dumps({"auth_token": "tok&<=>'1234"})}),
        json.dumps({"error": json.dumps({"auth_token": "tok&<=>'1234"}).replace("/", "\\/")}),
        # An HTML error page.
        "<p>auth_token=tok&amp;&lt;=&gt;&#x27;1234</p>",
        "<p>auth_token=tok&amp;&lt;&#61;&gt;&#39;1234</p>",
    ],
)
def test_a_secret_escaped_as_other_encoders_escape_it_is_found_once_decoded(answer):
    # Seen from a stand-in answering as Vero (Rails) would: the token, quoted
    # with \u0026 for "&", reached a warning and the dead letters.
    assert "1234" not in redact_secrets(f"Vero answered 400: {answer}", ["tok&<=>'1234"])


def test_the_formatter_finds_a_secret_only_an_escape_hides(formatter):
    answer = html_safe_json({"auth_token": SECRET.replace("tok", "tok&")})
    logs.use_secrets([SECRET.replace("tok", "tok&")])
    text = line(formatter, logging.WARNING, "Vero answered 400: %s", answer, error=answer)
    assert "3f9a" not in text and text.count(REDACTED) == 2


def test_only_the_secret_goes_and_the_rest_stays():
    assert (
        redact_secrets("key abcdefgh and abcdefgh again, not abcdefg", ["abcdefgh"])
        == f"key {REDACTED} and {REDACTED} again, not abcdefg"
    )


def test_a_secret_too_short_to_redact_leaves_text_alone():
    short = "x" * (MIN_SECRET_CHARS - 1)
    assert redact_secrets("xxx marks the spot", [short, None, ""]) == "xxx marks the spot"


@pytest.mark.parametrize(
    "path",
    [
        "/vero/webhooks/SECRET",
        "//vero/webhooks/SECRET",
        "/vero//webhooks//SECRET",
        "/VERO/Webhooks/SECRET",
        "/vero/webhooks/SECRET/extra/segments",
        "/vero/webhooks/SECRET?token=SECRET",
    ],
)
def test_whatever_follows_the_webhook_path_is_redacted(path):
    # Also a wrong token: it may be the previous one, or one letter off.
    assert "SECRET" not in redact_webhook_paths(f'"POST {path} HTTP/1.1" 401')


# An address in each shape RFC 5322 allows and mail systems use, with a part
# of it that must not survive the mask.
ADDRESSES = {
    "first.last@mail_server.example.com": ["first", "mail_server"],
    "user@[192.0.2.1]": ["user", "192.0.2"],
    "user@[IPv6:2001:db8::1]": ["user", "2001"],
    "josé@example.com": ["jos", "example"],
    "用户@例子.广告": ["用户", "7528", "例子", "4f8b"],
    "δοκιμή@παράδειγμα.δοκιμή": ["δοκ", "03b4", "παρ"],
    "Pelé.Ñúñez@exämple.de": ["Pel", "ez@", "mple"],
    '"john doe"@example.com': ["john", "example"],
    '"very.(),:;<>[]\\".VERY.\\"very@\\\\ \\"very\\".unusual"@strange.example.com': [
        "VERY",
        "unusual",
        "strange",
    ],
    "user+tag@example.co.uk": ["user", "tag", "example"],
    "!#$%&'*+-/=?^_`{|}~@example.org": ["~@", "example"],
    "o'brien@example.ie": ["brien", "example"],
    "admin@mailserver1": ["admin", "mailserver"],
    "x.y%40example.com": ["x.y", "example"],
}


@pytest.mark.parametrize("address", ADDRESSES)
@pytest.mark.parametrize(
    "spell",
    [
        lambda a: f"before {a} after",
        lambda a: f"<{a}>, next",
        lambda a: json.dumps({"email": a}, ensure_ascii=False),
        lambda a: "Vero answered 400: " + json.dumps({"email": a}),
        lambda a: json.dumps({"you_sent": json.dumps({"email": a})}),
    ],
    ids=["plain", "angle", "json", "json-ascii", "json-twice"],
)
def test_every_address_shape_is_masked(address, spell):
    masked = mask_emails(spell(address))
    assert EMAIL in masked
    for part in ADDRESSES[address]:
        assert part not in masked


@pytest.mark.parametrize(
    "text", ["no address here", "@app.route('/x')", "x @ y", "a@ b", "price: 3 @ 5 EUR"]
)
def test_text_without_an_address_is_kept(text):
    assert mask_emails(text) == text


def test_a_long_run_without_an_address_costs_linear_time():
    # Would take minutes if the pattern backtracked quadratically.
    for text in ("a" * 200_000 + "@", "\\" * 200_000 + "@x", '\\"' * 100_000 + "@ x"):
        assert mask_emails(text) == text


@pytest.fixture
def formatter():
    logs.use_secrets([SECRET, "webhook-token-0123"])
    yield logs.JsonFormatter()
    logs.use_secrets([])


def line(formatter, level, message, *args, exc_info=None, **extra):
    record = logging.LogRecord("t", level, __file__, 1, message, args, exc_info)
    record.__dict__.update(extra)
    text = formatter.format(record)
    json.loads(text)  # still one JSON object
    assert "\n" not in text
    return text


def test_the_formatter_redacts_secrets_in_message_fields_and_tracebacks(formatter):
    try:
        raise ValueError(f"boom {quote(SECRET, safe='')}")
    except ValueError:
        exc_info = sys.exc_info()
    text = line(
        formatter,
        logging.WARNING,
        "answered: %s",
        json.dumps({"key": SECRET}),
        exc_info=exc_info,
        headers={"Authorization": "Basic " + base64.b64encode(f"{SECRET}:".encode()).decode()},
        path="//VERO/webhooks/webhook-token-0123/x",
    )
    assert "3f9a" not in text and "webhook-token" not in text
    assert text.count(REDACTED) >= 4


def test_emails_are_masked_above_debug_only(formatter):
    for level in (logging.INFO, logging.WARNING, logging.ERROR):
        text = line(formatter, level, "Vero answered 400: %s", '{"email":"jos\\u00e9@x.org"}')
        assert "x.org" not in text and EMAIL in text
    assert "jos\\\\u00e9@x.org" in line(formatter, logging.DEBUG, "body %s", "jos\\u00e9@x.org")


def test_an_ordinary_line_is_left_as_it_is(formatter):
    text = line(formatter, logging.INFO, "POST /segment 200", route="/segment", status=200)
    assert json.loads(text)["message"] == "POST /segment 200"
    assert json.loads(text)["route"] == "/segment"


def test_the_configuration_names_every_secret_and_shows_none():
    env = {
        "VERO_AUTH_TOKEN": "vero-auth-token",
        "SEGMENT_SHARED_SECRET": "shared-secret-now",
        "SEGMENT_SHARED_SECRET_PREVIOUS": "shared-secret-before",
        "SEGMENT_WRITE_KEY": "segment-write-key",
        "VERO_WEBHOOK_TOKEN": "webhook-token-now",
        "VERO_WEBHOOK_TOKEN_PREVIOUS": "webhook-token-before",
        "DATABASE_URL": "postgres://user:pass%2Fword@db.internal:5432/outbox",
    }
    config = Config.from_env(env)
    assert set(config.secrets) >= {*env.values()} - {env["DATABASE_URL"]} | {"pass/word"}
    shown = repr(config) + str(config)
    for value in [*config.secrets, "db.internal"]:
        assert value not in shown
    assert "vero_api_url" in shown  # the rest is still there to read
    assert Redactor(config.secrets).secrets(env["DATABASE_URL"]).count(REDACTED) == 1


# Fuzzing: any secret in any text, and any address hypothesis can make.
texts = st.text(max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    secret=st.text(min_size=MIN_SECRET_CHARS, max_size=30).filter(lambda s: s.strip() == s),
    before=texts,
    after=texts,
    spell=st.sampled_from(
        [
            lambda s: s,
            lambda s: json.dumps(s)[1:-1],
            lambda s: json.dumps({"k": s}),
            lambda s: quote(s, safe=""),
            lambda s: quote_plus(s),
            lambda s: base64.b64encode(f"{s}:".encode()).decode(),
            lambda s: html_safe_json({"k": s}, "&<>='"),
            lambda s: json.dumps({"error": html_safe_json({"k": s})}),
            lambda s: html.escape(s),
        ]
    ),
)
def test_no_spelling_of_any_secret_survives(secret, before, after, spell):
    text = before + spell(secret) + after
    redacted = redact_secrets(text, [secret])
    assert spell(secret) not in redacted or spell(secret) in before + after


@settings(max_examples=300, deadline=None)
@given(address=st.emails(), before=st.sampled_from(["", " ", "to: <", '{"email": "']))
def test_every_generated_address_is_masked(address, before):
    for text in (before + address + " ok", json.dumps({"x": before + address})):
        masked = mask_emails(text)
        assert address not in masked
        assert address.split("@", 1)[1] not in masked
