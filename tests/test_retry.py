"""Table-driven tests of the pure retry policy in ``relay.core.retry``."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from relay.core.retry import backoff_delay, give_up_reason, parse_retry_after, retry_delay
from relay.durations import human_duration
from relay.settings import RetrySettings

POLICY = RetrySettings(base_delay=2.0, max_delay=60.0, max_attempts=5, max_age=3600.0)
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
ALMOST_ONE = math.nextafter(1.0, 0.0)


def const(value: float) -> Callable[[], float]:
    return lambda: value


# --- backoff_delay -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "rand", "expected"),
    [
        pytest.param(1, 0.0, 1.0, id="first failure, lowest jitter: base/2"),
        pytest.param(1, 0.5, 1.5, id="first failure, middle jitter"),
        pytest.param(1, ALMOST_ONE, 2.0, id="first failure, highest jitter: base"),
        pytest.param(2, 0.0, 2.0, id="second failure doubles"),
        pytest.param(3, 0.0, 4.0, id="third failure, low"),
        pytest.param(3, 0.5, 6.0, id="third failure, middle"),
        pytest.param(5, ALMOST_ONE, 32.0, id="fifth failure below the cap"),
        pytest.param(6, 0.0, 30.0, id="sixth failure capped: 64 -> 60, low half"),
        pytest.param(6, ALMOST_ONE, 60.0, id="sixth failure capped: high end is max_delay"),
        pytest.param(1_000, 0.0, 30.0, id="many attempts, low"),
        pytest.param(10**100, ALMOST_ONE, 60.0, id="absurd attempts do not overflow"),
        pytest.param(sys.maxsize, 0.25, 37.5, id="sys.maxsize attempts"),
        pytest.param(0, 0.0, 1.0, id="attempts 0 counts as 1"),
        pytest.param(-7, ALMOST_ONE, 2.0, id="negative attempts count as 1"),
        pytest.param(3, 1.5, 8.0, id="rand above 1 clamped"),
        pytest.param(3, -0.5, 4.0, id="rand below 0 clamped"),
    ],
)
def test_backoff_delay(attempts: int, rand: float, expected: float) -> None:
    assert backoff_delay(attempts, POLICY, const(rand)) == pytest.approx(expected)


@pytest.mark.parametrize("rand", [0.0, 0.1, 0.5, 0.9, ALMOST_ONE])
@pytest.mark.parametrize(
    "policy",
    [POLICY, RetrySettings(base_delay=0.25, max_delay=0.25), RetrySettings(base_delay=5.0, max_delay=7200.0)],
    ids=["default-ish", "base equals max", "long max"],
)
def test_backoff_delay_stays_within_bounds(policy: RetrySettings, rand: float) -> None:
    for attempts in [*range(1, 80), 1023, 1024, 1025, 10**6, 10**30]:
        delay = backoff_delay(attempts, policy, const(rand))
        assert policy.base_delay / 2 <= delay <= policy.max_delay, (attempts, delay)


def test_backoff_delay_never_decreases_with_more_attempts_at_fixed_jitter() -> None:
    delays = [backoff_delay(n, POLICY, const(0.3)) for n in range(1, 40)]
    assert delays == sorted(delays)
    assert delays[-1] == pytest.approx(POLICY.max_delay * 0.65)


def test_backoff_delay_calls_rand_once() -> None:
    calls: list[int] = []

    def rand() -> float:
        calls.append(1)
        return 0.0

    backoff_delay(4, POLICY, rand)
    assert len(calls) == 1


# --- parse_retry_after --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("120", 120.0, id="delta seconds"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("1.5", 1.5, id="decimal seconds"),
        pytest.param("  30\t", 30.0, id="surrounding whitespace"),
        pytest.param("86400000", 86400000.0, id="large but sane"),
        pytest.param("Wed, 01 May 2024 12:02:00 GMT", 120.0, id="IMF-fixdate in the future"),
        pytest.param("Wed, 01 May 2024 12:00:00 GMT", 0.0, id="date equal to now"),
        pytest.param("Wed, 01 May 2024 11:00:00 GMT", 0.0, id="date in the past gives 0"),
        pytest.param("Tue, 30 Apr 2024 12:00:00 GMT", 0.0, id="date a day in the past"),
        pytest.param("Wed, 01 May 2024 14:00:30 +0200", 30.0, id="date with numeric zone"),
        pytest.param("Wed, 01 May 2024 12:00:45 -0000", 45.0, id="naive date is taken as UTC"),
        pytest.param("Wednesday, 01-May-24 12:01:00 GMT", 60.0, id="obsolete RFC 850 date"),
        pytest.param("Wed May  1 12:00:10 2024", 10.0, id="obsolete asctime date (naive)"),
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("   ", None, id="blank"),
        pytest.param("-5", None, id="negative seconds"),
        pytest.param("-0.5", None, id="negative decimal"),
        pytest.param("+5", None, id="signed seconds"),
        pytest.param("1e3", None, id="exponent notation"),
        pytest.param("nan", None, id="nan"),
        pytest.param("inf", None, id="inf"),
        pytest.param("soon", None, id="word"),
        pytest.param("120 seconds", None, id="seconds with unit"),
        pytest.param("12abc", None, id="digits then garbage"),
        pytest.param("1.", None, id="dangling decimal point"),
        pytest.param("Wed, 32 May 2024 12:00:00 GMT", None, id="impossible day"),
        pytest.param("Wed, 01 May 99999 12:00:00 GMT", None, id="year out of range"),
        pytest.param("\x00\x01", None, id="control characters"),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    result = parse_retry_after(value, NOW)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


def test_parse_retry_after_accepts_naive_now_as_utc() -> None:
    naive_now = NOW.replace(tzinfo=None)
    assert parse_retry_after("Wed, 01 May 2024 12:02:00 GMT", naive_now) == pytest.approx(120.0)


def test_parse_retry_after_absurd_digit_count_is_huge_not_an_error() -> None:
    result = parse_retry_after("9" * 400, NOW)
    assert result is not None
    assert result > 1e300


# --- retry_delay --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "rand", "retry_after", "expected"),
    [
        pytest.param(3, 0.0, None, 4.0, id="no Retry-After: backoff"),
        pytest.param(6, ALMOST_ONE, None, 60.0, id="no Retry-After: backoff capped"),
        pytest.param(3, 0.0, float("nan"), 4.0, id="NaN Retry-After: backoff"),
        pytest.param(3, 0.0, 10.0, 10.0, id="Retry-After honoured"),
        pytest.param(1, 0.0, 45.5, 45.5, id="Retry-After above the backoff is honoured"),
        pytest.param(20, ALMOST_ONE, 0.5, 60.0, id="Retry-After below the backoff: the backoff"),
        pytest.param(3, 0.0, 1.0, 4.0, id="Retry-After 1 s cannot shorten a 4 s backoff"),
        pytest.param(3, 0.0, 60.0, 60.0, id="Retry-After equal to max_delay"),
        pytest.param(3, 0.0, 3600.0, 60.0, id="Retry-After capped at max_delay"),
        pytest.param(3, 0.0, math.inf, 60.0, id="infinite Retry-After capped"),
        pytest.param(3, 0.0, 0.0, 4.0, id="Retry-After zero: the backoff"),
        pytest.param(3, 0.0, -3.0, 4.0, id="negative Retry-After: the backoff"),
    ],
)
def test_retry_delay(attempts: int, rand: float, retry_after: float | None, expected: float) -> None:
    assert retry_delay(attempts, POLICY, const(rand), retry_after) == pytest.approx(expected)


def test_a_5xx_with_retry_after_1_cannot_burn_the_attempts_in_seconds() -> None:
    # Five failures each answered "Retry-After: 1": the waits follow the backoff, not the header.
    waits = [retry_delay(n, POLICY, const(0.0), 1.0) for n in range(1, 6)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert sum(waits) > 5 * 1.0


# --- give_up_reason -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "age", "policy", "expected"),
    [
        pytest.param(1, timedelta(0), POLICY, None, id="fresh row"),
        pytest.param(4, timedelta(minutes=59, seconds=59), POLICY, None, id="just under both limits"),
        pytest.param(5, timedelta(0), POLICY, "gave up after 5 attempts", id="max_attempts reached"),
        pytest.param(9, timedelta(0), POLICY, "gave up after 9 attempts", id="beyond max_attempts"),
        pytest.param(
            1, timedelta(hours=1), POLICY, "gave up: older than 1h (retry.max_age)", id="max_age reached"
        ),
        pytest.param(
            1, timedelta(days=3), POLICY, "gave up: older than 1h (retry.max_age)", id="far beyond max_age"
        ),
        pytest.param(5, timedelta(days=3), POLICY, "gave up after 5 attempts", id="both: attempts named"),
        pytest.param(
            1,
            timedelta(hours=12),
            RetrySettings(max_age=12 * 3600.0),
            "gave up: older than 12h (retry.max_age)",
            id="default max_age wording",
        ),
        pytest.param(
            1,
            timedelta(seconds=90),
            RetrySettings(max_age=90.0),
            "gave up: older than 1m30s (retry.max_age)",
            id="mixed units",
        ),
        pytest.param(1, -timedelta(minutes=5), POLICY, None, id="created in the future (clock skew)"),
    ],
)
def test_give_up_reason(attempts: int, age: timedelta, policy: RetrySettings, expected: str | None) -> None:
    assert give_up_reason(attempts, NOW - age, NOW, policy) == expected


def test_give_up_reason_accepts_naive_created_at_as_utc() -> None:
    created = (NOW - timedelta(hours=2)).replace(tzinfo=None)
    assert give_up_reason(1, created, NOW, POLICY) == "gave up: older than 1h (retry.max_age)"


# --- human_duration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.0, "0s"),
        (-1.0, "0s"),
        (float("nan"), "0s"),
        (math.inf, "forever"),
        (None, "-"),
        (0.0004, "0ms"),
        (0.25, "250ms"),
        (0.9996, "1s"),
        (1.0, "1s"),
        (4.0, "4s"),
        (3.2719, "3.27s"),
        (10.0, "10s"),
        (59.6, "1m"),
        (90.0, "1m30s"),
        (600.0, "10m"),
        (3600.0, "1h"),
        (12 * 3600.0, "12h"),
        (9.996, "10s"),
        (185.0, "3m05s"),
        (3725.0, "1h02m"),
        (86400.0 + 3600.0 + 1.0, "1d01h"),
        (7 * 86400.0, "7d"),
    ],
)
def test_human_duration(seconds: float | None, expected: str) -> None:
    assert human_duration(seconds) == expected
