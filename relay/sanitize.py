"""The one boundary where text from outside becomes storable.

Everything that arrives from the API or a transport (response bodies, error codes and messages,
header values, token-endpoint answers, exception texts) passes through :func:`storable` or
:func:`storable_bytes` before it reaches the database or a log line. PostgreSQL refuses NUL in
``text`` and a lone surrogate cannot even be encoded to UTF-8, so either would make a whole batch
of results unwritable; an unbounded string would make a row, a log line or a metric label as
large as the API chose. After this module, a string is valid UTF-8 without NUL and bounded.

* NUL (``\\x00``) is removed.
* Invalid UTF-8 (in bytes) and lone surrogates (in ``str``, e.g. from the JSON escape ``"\\ud800"``)
  become U+FFFD.
* The result is cut to at most ``limit`` characters (``storable``) or UTF-8 bytes
  (``storable_bytes``), never in the middle of a character; a cut string ends with ``…``.
"""

from __future__ import annotations

import re

__all__ = ["ELLIPSIS", "one_line", "storable", "storable_bytes"]

_SURROGATE = re.compile("[\ud800-\udfff]")

ELLIPSIS = "…"


def storable(text: object, limit: int) -> str:
    """``text`` (any object; ``str()`` of it) made storable and at most ``limit`` characters long."""
    value = text if isinstance(text, str) else _str(text)
    if "\x00" in value:
        value = value.replace("\x00", "")
    # A lone surrogate survives a str round trip but not encoding: replace it (and only it).
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = _SURROGATE.sub("\ufffd", value)
    if len(value) > limit:
        value = value[: max(limit - 1, 0)] + ELLIPSIS if limit > 0 else ""
    return value


def storable_bytes(body: bytes, limit: int) -> str:
    """Bytes from the wire as storable text of at most ``limit`` UTF-8 bytes (no ellipsis)."""
    text = body[: limit + 4].decode("utf-8", "replace").replace("\x00", "")
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", "ignore")


def one_line(text: object, limit: int) -> str:
    """:func:`storable`, with every run of whitespace (newlines included) turned into one space."""
    return storable(" ".join(storable(text, 4 * limit + 16).split()), limit)


def _str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a hostile __str__ must not break the caller
        return f"<{type(value).__name__}>"
