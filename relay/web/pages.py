"""The console's HTML: Jinja2 templates in ``relay/web/templates``, every value escaped.

Autoescaping is on for every template and cannot be turned off by data: action ids, API messages
and kept bodies are written by others. :func:`visible` also shows control, format and bidi
characters as ``\\uXXXX`` so a crafted id cannot reorder or hide what is on the page.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

import jinja2

from relay.durations import human_duration


def visible(value: object) -> str:
    """``value`` as text with control, format (bidi overrides included) and unassigned
    characters shown as escapes; None as ``-``. Line breaks are kept (bodies are shown in <pre>)."""
    if value is None:
        return "-"
    out: list[str] = []
    for ch in str(value):
        if ch in "\n\t":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def age(value: float | timedelta | None) -> str:
    if value is None:
        return "-"
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    return human_duration(seconds)


def number(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{int(value):,}" if isinstance(value, int) else str(value)


class Pages:
    def __init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("relay.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(visible=visible, when=when, age=age, number=number)

    def render(self, name: str, **context: Any) -> str:
        return self.env.get_template(name).render(**context)
