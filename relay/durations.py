"""The one way a duration is shown to people: log fields, stored reasons, operator tables.

``human_duration`` gives ``250ms``, ``3.27s``, ``42s``, ``1m30s``, ``3m05s``, ``1h02m``, ``1d01h``,
``30d``: below a second in milliseconds, below ten seconds with three significant digits, then
whole seconds in at most two units, the second one zero-padded so columns of them line up.
(Settings error messages name limits in their own terms, ``10ms`` to ``1h``: relay.settings.)
"""

from __future__ import annotations

import math

__all__ = ["human_duration"]

_UNITS = (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1))


def human_duration(seconds: float | None) -> str:
    """``seconds`` for people: ``-`` for none, ``0s`` for zero, less or NaN, ``forever`` for infinity."""
    if seconds is None:
        return "-"
    if math.isnan(seconds) or seconds <= 0:
        return "0s"
    if math.isinf(seconds):
        return "forever"
    if round(seconds * 1000) < 1000:
        return f"{round(seconds * 1000)}ms"
    if seconds < 9.995:  # 3 significant digits would round up to 10.0
        return f"{seconds:.3g}s"
    whole = round(seconds)
    for unit, size, sub, sub_size in _UNITS:
        if whole >= size:
            rest = whole % size // sub_size
            return f"{whole // size}{unit}" + (f"{rest:02d}{sub}" if rest else "")
    return f"{whole}s"
