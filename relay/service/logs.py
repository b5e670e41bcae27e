"""Logging setup: ``text`` (one grep-able line per event) or ``json`` (one object per line).

Structured fields travel in ``extra``::

    log.info("row dead-lettered", extra={"action_id": "abc", "reason": "HTTP 400 INVALID_INPUT"})

renders, in ``text``, as::

    2026-11-27T10:00:00.123Z INFO relay.engine row dead-lettered action_id=abc reason="HTTP 400 INVALID_INPUT"

and, in ``json``, as ``{"ts": ..., "level": ..., "logger": ..., "msg": ..., "action_id": ...}``.

A redaction filter on the handler is a safety net, not the primary defence (secrets are held in
:class:`relay.settings.Secret` and never formatted): it runs :func:`relay.redact.redact` (``Bearer``
tokens, ``client_secret=``/``password=``-style assignments, the password part of URLs) over the
final message, string ``extra`` values and exception text, and masks whole ``extra`` values whose
name says they hold a secret.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from relay.redact import MASK, redact

__all__ = ["JsonFormatter", "RedactingFilter", "TextFormatter", "configure_logging"]

# Third-party loggers that are chatty at INFO. apscheduler logs every job run, so it stays at
# WARNING even when the relay itself runs at DEBUG.
_QUIET_UNLESS_DEBUG = ("httpx", "httpcore")
_ALWAYS_QUIET = ("apscheduler",)

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
# Extra fields whose name says they hold a secret (``token``, ``api_token``, ``client_secret``...).
_SENSITIVE_KEY = re.compile(r"(?i)(?:^|_)(?:secret|password|passwd|token|authorization)$")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class RedactingFilter(logging.Filter):
    """Rewrite a record so its message, string extras and traceback carry no secrets."""

    _exc_formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # bad %-args: let the formatter fail and the handler report it
            return True
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        for key, value in _extras(record).items():
            if isinstance(value, str):
                masked = MASK if _SENSITIVE_KEY.search(key) and value else redact(value)
                if masked != value:
                    setattr(record, key, masked)
        if record.exc_info and not record.exc_text:
            record.exc_text = self._exc_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _timestamp(record: logging.LogRecord) -> str:
    stamp = datetime.fromtimestamp(record.created, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{int(record.msecs):03d}Z"


_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


class TextFormatter(logging.Formatter):
    """``TIMESTAMP LEVEL LOGGER message key=value ...`` on one line (tracebacks follow, indented)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        parts = [_timestamp(record), record.levelname, record.name, message]
        parts.extend(f"{key}={_text_value(value)}" for key, value in _extras(record).items())
        line = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        tail = [t for t in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)) if t]
        for block in tail:
            line += "\n" + "\n".join("    " + ln for ln in block.splitlines())
        return line


def _json_default(value: object) -> str:
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            doc[key if key not in doc else f"extra_{key}"] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=_json_default, ensure_ascii=False)


class _RelayHandler(logging.StreamHandler[TextIO]):
    """The handler ``configure_logging`` installs; recognised (and replaced) on the next call."""


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send the relay's logs to ``stream`` (``sys.stderr`` when omitted) as ``text`` or ``json``.

    Safe to call more than once: the handler installed by an earlier call is replaced, and
    handlers installed by others (pytest's, for instance) are left alone.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (expected text or json)")

    handler = _RelayHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    handler.addFilter(RedactingFilter())

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RelayHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)

    for name in _QUIET_UNLESS_DEBUG:
        logging.getLogger(name).setLevel(logging.NOTSET if numeric <= logging.DEBUG else logging.WARNING)
    for name in _ALWAYS_QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
