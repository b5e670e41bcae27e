"""Formatting for the operator commands: aligned tables, safe one-line text, JSON values.

Durations are :func:`relay.durations.human_duration`, as everywhere else.

Everything shown to a terminal goes through :func:`clean`, because action ids, error messages
and response bodies come from applications and from the API: a control character or a bidi
override in them must not rewrite the operator's screen.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

ELLIPSIS = "…"


INVISIBLE = ("Cc", "Cf", "Cs", "Co", "Cn")  # control, format (bidi overrides), surrogate, private, unassigned


def escaped(ch: str) -> str:
    """A character shown as its escape: ``\\x1b``, ``\\u202e``."""
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def clean(value: object, limit: int | None = None) -> str:
    """``value`` as one printable line: whitespace runs become one space, other control and
    format characters are escaped; cut to ``limit`` characters with an ellipsis."""
    if value is None:
        return "-"
    out: list[str] = []
    for ch in str(value):
        kind = unicodedata.category(ch)
        if ch.isspace():
            if out and out[-1] != " ":
                out.append(" ")
        elif kind in INVISIBLE:
            out.append(escaped(ch))
        else:
            out.append(ch)
    text = "".join(out).strip()
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)] + ELLIPSIS
    return text or "-"


def when(value: datetime | None) -> str:
    """A timestamp in UTC with milliseconds, e.g. ``2025-03-01 12:00:07.250Z``."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


class Approx(int):
    """An estimated count: shown ``~12,345,678`` (and right-aligned with the other numbers)."""


def value(item: object, limit: int | None = None) -> str:
    """Any column value for a human view."""
    if isinstance(item, Approx):
        return f"~{int(item):,}"
    if isinstance(item, datetime):
        return when(item)
    if isinstance(item, timedelta):
        return f"{item.total_seconds():.3f}s"
    if isinstance(item, list | dict):
        return clean(json.dumps(item, ensure_ascii=False), limit)
    if isinstance(item, bool):
        return "yes" if item else "no"
    if isinstance(item, float):
        return f"{item:.1f}"
    return clean(item, limit)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """An aligned table; numeric columns are right-aligned. Cells are shown with :func:`value`."""
    cells = [[value(c) for c in row] for row in rows]
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float | Decimal) or r[i] is None for r in rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(parts: Sequence[str]) -> str:
        padded = [p.rjust(w) if num else p.ljust(w) for p, w, num in zip(parts, widths, numeric, strict=True)]
        return (indent + "  ".join(padded)).rstrip()

    return "\n".join([line(headers), *(line(r) for r in cells)])


def fields(pairs: Mapping[str, object], indent: str = "  ", limit: int | None = None) -> str:
    """``name  value`` lines, aligned."""
    width = max((len(k) for k in pairs), default=0)
    return "\n".join(f"{indent}{k.ljust(width)}  {value(v, limit)}" for k, v in pairs.items())


def jsonable(item: Any) -> Any:
    """Plain JSON values: timestamps and days in ISO 8601, intervals in seconds."""
    if isinstance(item, date):  # datetime too
        return item.isoformat()
    if isinstance(item, timedelta):
        return item.total_seconds()
    if isinstance(item, Decimal):
        return float(item)
    if isinstance(item, Mapping):
        return {str(k): jsonable(v) for k, v in item.items()}
    if isinstance(item, list | tuple):
        return [jsonable(v) for v in item]
    return item


def dumps(data: Any) -> str:
    return json.dumps(jsonable(data), indent=2, ensure_ascii=False)


def csv_cell(item: object) -> str:
    """One CSV field: null empty, booleans ``true``/``false``, timestamps ISO 8601, intervals in
    seconds, JSON values as JSON; text exactly as stored (the csv module quotes it)."""
    if item is None:
        return ""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, list | dict):
        return json.dumps(jsonable(item), ensure_ascii=False)
    return str(jsonable(item))


def csv_text(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """RFC 4180 CSV (CRLF line ends, fields quoted when needed) with a header row."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(headers)
    writer.writerows([csv_cell(c) for c in row] for row in rows)
    return out.getvalue()
