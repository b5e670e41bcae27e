"""Logging setup: text and json output, extras, redaction, idempotence."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from relay.redact import redact, redact_url
from relay.service.logs import configure_logging
from relay.settings import Secret

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<level>[A-Z]+) (?P<logger>\S+) (?P<rest>.*)$"
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "apscheduler")}
    yield
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
    root.setLevel(saved_level)
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def _text(level: str = "INFO") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, "text", stream=stream)
    return stream


def _json(level: str = "INFO") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, "json", stream=stream)
    return stream


def test_text_line_with_extras() -> None:
    stream = _text()
    logging.getLogger("relay.engine").warning(
        "row dead-lettered",
        extra={"action_id": "abc", "target": "default", "reason": "HTTP 400 INVALID_INPUT"},
    )
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    m = TEXT_LINE.match(lines[0])
    assert m, lines[0]
    assert m["level"] == "WARNING"
    assert m["logger"] == "relay.engine"
    assert m["rest"] == 'row dead-lettered action_id=abc target=default reason="HTTP 400 INVALID_INPUT"'


def test_text_values_are_quoted_and_escaped() -> None:
    stream = _text()
    logging.getLogger("relay.x").info(
        "two\nlines %d", 7, extra={"empty": "", "quote": 'say "hi"', "n": 3, "nl": "a\nb"}
    )
    out = stream.getvalue()
    assert out.count("\n") == 1
    assert out.rstrip("\n").endswith('two\\nlines 7 empty="" quote="say \\"hi\\"" n=3 nl="a\\nb"')


def test_text_exception_follows_indented() -> None:
    stream = _text()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("relay.x").exception("failed", extra={"k": "v"})
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith(" ERROR relay.x failed k=v")
    assert rest and all(line.startswith("    ") for line in rest)
    assert rest[-1].strip() == "RuntimeError: boom"


def test_json_object_per_line() -> None:
    stream = _json()
    log = logging.getLogger("relay.engine")
    log.info("delivered %s", "abc", extra={"action_id": "abc", "attempt": 2, "secret": Secret("s3")})
    log.debug("not shown at INFO")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert set(doc) == {"ts", "level", "logger", "msg", "action_id", "attempt", "secret"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"])
    assert doc["level"] == "INFO"
    assert doc["logger"] == "relay.engine"
    assert doc["msg"] == "delivered abc"
    assert doc["action_id"] == "abc"
    assert doc["attempt"] == 2
    assert doc["secret"] == "***"


def test_json_exception_and_colliding_extra() -> None:
    stream = _json()
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("relay.x").error("oops", exc_info=True, extra={"ts": "mine"})
    doc = json.loads(stream.getvalue())
    assert doc["extra_ts"] == "mine"
    assert doc["ts"] != "mine"
    assert doc["exc"].endswith("ValueError: bad")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_redaction_in_message_extras_and_traceback(fmt: str) -> None:
    stream = io.StringIO()
    configure_logging("INFO", fmt, stream=stream)
    log = logging.getLogger("relay.auth")
    log.info("sending Authorization: Bearer eyJhbGciOi.abc-def_123==", extra={"api_token": "tok-42"})
    log.info("connecting to %s", "postgresql://relay:hunter2@db.example:5432/app")
    log.info("token request body grant_type=client_credentials&client_secret=s3cr3t&x=1")
    log.info("libpq dsn host=db password=pa55 user=relay", extra={"url": "https://u:pw@h/x"})
    try:
        raise RuntimeError("cannot connect to postgresql://relay:tr4ceback@db/app")
    except RuntimeError:
        log.exception("failed")
    out = stream.getvalue()
    for secret in ("eyJhbGciOi", "tok-42", "hunter2", "s3cr3t", "pa55", ":pw@", "tr4ceback"):
        assert secret not in out, (secret, out)
    for kept in (
        "Bearer ***",
        "postgresql://relay:***@db.example:5432/app",
        "client_secret=***&x=1",
        "password=***",
        "https://u:***@h/x",
        "postgresql://relay:***@db/app",
    ):
        assert kept in out, (kept, out)


def test_redact_url() -> None:
    assert redact_url("postgresql://user:secret@db.example:5432/app") == (
        "postgresql://user:***@db.example:5432/app"
    )
    assert redact_url("postgresql://:secret@[::1]/app") == "postgresql://:***@[::1]/app"
    assert redact_url("postgresql://user@db/app") == "postgresql://user@db/app"
    assert redact_url("postgresql:///app?host=/run/postgresql&password=x") == (
        "postgresql:///app?host=/run/postgresql&password=***"
    )
    assert redact_url("https://example.com/api") == "https://example.com/api"


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "claimed 5 rows for target=default token_ttl=300 in 12ms"
    assert redact(text) == text


@pytest.mark.parametrize(
    "text",
    [
        # The sandbox's 401 (and Mirakl's) as the relay's pause reason quotes it.
        "HTTP 401 UNAUTHORIZED: missing, invalid or expired bearer token: credentials refused, pausing the target",
        'WWW-Authenticate: Bearer realm="connect", error="invalid_token"',
        "bearer tokens are required; Bearer authentication failed",
    ],
)
def test_redact_leaves_words_after_bearer_alone(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("Authorization: Bearer sandbox-token", "Authorization: Bearer ***"),
        ("Bearer abc123", "Bearer ***"),
        ("bearer s3cr3t, then", "bearer ***, then"),
        ("Bearer QWxhZGRpbjpvcGVu", "Bearer ***"),  # letters only, 8 and more: a token
        ("Bearer tokenvalue", "Bearer ***"),  # begins with a word, is not one
        ("token: abc", "token: ***"),
        ('{"token": "credentials"}', '{"token": "***"}'),
        ("token=credentials", "token=***"),
    ],
)
def test_redact_still_masks_what_looks_like_a_token(text: str, masked: str) -> None:
    assert redact(text) == masked


def test_configure_twice_does_not_duplicate_handlers() -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    first = io.StringIO()
    configure_logging("INFO", "json", stream=first)
    second = io.StringIO()
    configure_logging("INFO", "text", stream=second)
    assert len(root.handlers) == before + 1
    logging.getLogger("relay.x").info("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("relay.x once") == 1


def test_levels_and_third_party_quieting() -> None:
    stream = _text("INFO")
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("httpcore.connection").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("apscheduler.scheduler").getEffectiveLevel() == logging.WARNING
    logging.getLogger("httpx").info("HTTP Request: POST ...")
    assert stream.getvalue() == ""

    _text("DEBUG")
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("apscheduler").getEffectiveLevel() == logging.WARNING


@pytest.mark.parametrize(("level", "fmt"), [("LOUD", "text"), ("INFO", "xml")])
def test_bad_arguments(level: str, fmt: str) -> None:
    with pytest.raises(ValueError):
        configure_logging(level, fmt, stream=io.StringIO())
