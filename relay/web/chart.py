"""The overview's chart, drawn here as SVG: deliveries and dead letters per minute.

Pure: rows in, SVG text out. Only numbers and fixed words go into it (escaped all the same), and
it is served as an image (``/chart.svg``), which a browser never runs scripts in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape

WIDTH, PANEL, GAP, LEFT, BOTTOM = 960, 110, 26, 56, 22
TITLE = 'font-family="sans-serif" font-size="13" fill="#222"'
AXIS = 'font-family="sans-serif" font-size="11" fill="#555"'


def _panel(values: Sequence[int], top: int, colour: str, title: str) -> list[str]:
    n = max(len(values), 1)
    peak = max(values, default=0)
    scale = (PANEL - 14) / peak if peak else 0.0
    step = (WIDTH - LEFT - 8) / n
    base = top + PANEL
    points = [f"{LEFT:.1f},{base:.1f}"]
    for i, v in enumerate(values):
        x = LEFT + i * step
        y = base - v * scale
        points.append(f"{x:.1f},{y:.1f} {x + step:.1f},{y:.1f}")
    points.append(f"{LEFT + n * step:.1f},{base:.1f}")
    total = sum(values)
    return [
        f'<text x="{LEFT}" y="{top - 6}" {TITLE}>{escape(title)}: {total:,} in 24 h, '
        f"at most {peak:,} a minute</text>",
        f'<line x1="{LEFT}" y1="{base}" x2="{WIDTH - 8}" y2="{base}" stroke="#888" stroke-width="1"/>',
        f'<text x="{LEFT - 6}" y="{top + 10}" text-anchor="end" {AXIS}>{peak:,}</text>',
        f'<text x="{LEFT - 6}" y="{base}" text-anchor="end" {AXIS}>0</text>',
        f'<polygon points="{" ".join(points)}" fill="{colour}" fill-opacity="0.55" stroke="{colour}"'
        ' stroke-width="1"/>',
    ]


def per_minute_svg(rows: Sequence[Mapping[str, Any]]) -> str:
    """Two panels over the rows' minutes (oldest first): delivered, then dead, with hour marks."""
    delivered = [int(r["delivered"]) for r in rows]
    dead = [int(r["dead"]) for r in rows]
    height = 2 * PANEL + 2 * GAP + BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img">',
        "<title>Deliveries and dead letters per minute, last 24 hours (UTC)</title>",
    ]
    parts += _panel(delivered, GAP, "#2a7d3f", "Delivered per minute")
    parts += _panel(dead, 2 * GAP + PANEL, "#b3261e", "Dead letters per minute")
    n = max(len(rows), 1)
    step = (WIDTH - LEFT - 8) / n
    for i, r in enumerate(rows):
        minute: datetime = r["minute"]
        x = LEFT + i * step
        # an hour mark every 3 hours, but none so near the right edge that its label would be cut
        if minute.astimezone(UTC).minute == 0 and minute.astimezone(UTC).hour % 3 == 0 and x < WIDTH - 24:
            label = minute.astimezone(UTC).strftime("%H:%M")
            parts.append(
                f'<line x1="{x:.1f}" y1="{GAP}" x2="{x:.1f}" y2="{height - BOTTOM}" stroke="#ddd"/>'
                f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle" {AXIS}>{escape(label)}</text>'
            )
    parts.append("</svg>")
    return "\n".join(parts)
