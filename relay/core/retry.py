"""Pure retry policy: exponential backoff with jitter, ``Retry-After`` parsing, giving up.

Nothing here reads a clock or a random source: ``now`` and ``rand`` are passed in, so every
function is deterministic under test. Naive datetimes are taken to be UTC.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from relay.durations import human_duration
from relay.settings import RetrySettings

# human_duration lives in relay.durations; relay.core.classify calls it as retry.human_duration.
__all__ = ["backoff_delay", "give_up_reason", "human_duration", "parse_retry_after", "retry_delay"]

# Past this exponent 2**n times any sane base delay is far above any sane max delay; clamping it
# keeps ``2.0 ** n`` finite for absurd attempt numbers (2.0 ** 1024 raises OverflowError).
_MAX_EXPONENT = 1023

# RFC 9110 delta-seconds is digits only; a decimal fraction is tolerated, a sign or exponent is not.
_DELTA_SECONDS = re.compile(r"^\d+(?:\.\d+)?$")


def backoff_delay(attempts: int, policy: RetrySettings, rand: Callable[[], float]) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1 for the first failure).

    The ceiling is ``base_delay * 2 ** (attempts - 1)``, capped at ``max_delay``; the result is
    drawn uniformly from ``[ceiling / 2, ceiling]`` with ``rand()`` (expected in ``[0, 1)``;
    values outside are clamped). So it never exceeds ``max_delay`` and, with a valid policy
    (``base_delay <= max_delay``), is never below ``base_delay / 2``. ``attempts < 1`` counts as 1.
    """
    exponent = min(max(attempts, 1) - 1, _MAX_EXPONENT)
    ceiling = min(policy.base_delay * 2.0**exponent, policy.max_delay)
    fraction = min(max(rand(), 0.0), 1.0)
    return ceiling / 2 + ceiling / 2 * fraction


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from ``now`` that an HTTP ``Retry-After`` header asks us to wait.

    Accepts delta-seconds (``"120"``, also ``"1.5"``) or an HTTP date; a date in the past gives
    ``0.0``. Returns ``None`` for a missing, empty, negative or unparsable value. The result may
    be very large (even ``inf`` for an absurd number of digits): cap it with :func:`retry_delay`.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.match(text):
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max((_aware(when) - _aware(now)).total_seconds(), 0.0)


def retry_delay(
    attempts: int, policy: RetrySettings, rand: Callable[[], float], retry_after: float | None
) -> float:
    """Seconds to wait before the next attempt after the ``attempts``-th failure.

    The longer of :func:`backoff_delay` and a server-given ``retry_after`` (from
    :func:`parse_retry_after`), never more than ``max_delay``: a server asking for 1 s cannot make
    a row burn its attempts faster than the backoff would, and one asking for a day is capped.
    """
    backoff = backoff_delay(attempts, policy, rand)
    if retry_after is None or math.isnan(retry_after):
        return backoff
    return min(max(retry_after, backoff), policy.max_delay)


def give_up_reason(attempts: int, created_at: datetime, now: datetime, policy: RetrySettings) -> str | None:
    """Why a row that has made ``attempts`` attempts must go ``dead`` now, or ``None`` to keep going.

    Dead after ``max_attempts`` attempts, or once the row is at least ``max_age`` seconds old.
    """
    if attempts >= policy.max_attempts:
        return f"gave up after {attempts} attempts"
    if (_aware(now) - _aware(created_at)).total_seconds() >= policy.max_age:
        return f"gave up: older than {human_duration(policy.max_age)} (retry.max_age)"
    return None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
