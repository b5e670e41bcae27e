"""The console's HTML: Jinja2 templates in ``relay/web/templates``, every value escaped.

Autoescaping is on for every template and cannot be turned off by data: action ids, API messages
and kept bodies are written by others. :func:`visible` also shows control, format and bidi
characters as ``\\uXXXX`` so a crafted id cannot reorder or hide what is on the page.
"""

from __future__ import annotations

import unicodedata
from datetime import timedelta
from typing import Any

import jinja2

from relay.cli.report import INVISIBLE, escaped, when
from relay.durations import human_duration


def visible(value: object) -> str:
    """``value`` as text with control, format (bidi overrides included) and unassigned characters
    shown as escapes, as the command line shows them (:mod:`relay.cli.report`), and line and
    paragraph separators too; None as ``-``. Line breaks and tabs are kept (bodies are in <pre>)."""
    if value is None:
        return "-"
    hidden = (*INVISIBLE, "Zl", "Zp")
    return "".join(
        escaped(ch) if ch not in "\n\t" and unicodedata.category(ch) in hidden else ch for ch in str(value)
    )


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
