"""Per-target flow control: an adaptive token bucket and a circuit breaker.

Both classes are pure bookkeeping around an injected monotonic ``clock`` (seconds as a
float); neither reads the time in any other way, sleeps on its own, or uses randomness,
so tests drive them with a fake clock. They are meant for one asyncio event loop: every
method is synchronous (except :meth:`TokenBucket.acquire`, which only sleeps), so no
lock is needed and no two tasks can interleave inside a method.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Protocol

__all__ = ["BreakerConfig", "BreakerState", "CircuitBreaker", "TokenBucket"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


class BreakerConfig(Protocol):
    """What the breaker reads from ``relay.settings.BreakerSettings`` (kept structural so
    this module imports nothing of ours)."""

    @property
    def failure_threshold(self) -> int: ...
    @property
    def open_for(self) -> float: ...
    @property
    def max_open_for(self) -> float: ...


class TokenBucket:
    """A token bucket that hands out reservations, spacing callers at ``1 / rate``.

    ``reserve()`` always takes a token, letting the bucket go into debt, and returns how
    long the caller must wait before using it. Because every reservation extends the debt
    by one token, N callers reserving at the same instant are told to wait ``0, 1/r,
    2/r, ...`` (after the burst is spent): first come, first served, never more than the
    rate on average.

    Burst: by default ``max(1, rate / 10)`` tokens, i.e. 100 ms worth of requests. In any
    window of length ``w`` at most ``burst + rate * w`` tokens are handed out, so a 10 s
    window carries at most ``10 * rate + max(1, rate / 10)`` requests: within 1% of the
    configured rate for ``rate >= 10``, and within 10% for any ``rate >= 1``.

    Adaptive: :meth:`throttled` (call it on a 429) halves the current rate, never below
    ``rate / 16``, and drops any saved-up burst. Halvings closer together than
    ``throttle_cooldown`` seconds count once, so a wave of 429s answering requests that
    were all sent before the first one arrived does not collapse the rate to the floor.
    :meth:`succeeded` (call it on any answer that is not a 429) climbs back additively,
    by ``rate / recovery`` per second elapsed since the last adjustment: the full range
    from zero to ``rate`` takes ``recovery`` seconds, one halving takes ``recovery / 2``.

    A reservation whose caller is cancelled while waiting is not refunded: the bucket errs
    on the side of sending less.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Clock = time.monotonic,
        *,
        recovery: float = 20.0,
        throttle_cooldown: float = 1.0,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        if burst is not None and not burst >= 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        if not recovery > 0:
            raise ValueError(f"recovery must be positive, got {recovery!r}")
        if throttle_cooldown < 0:
            raise ValueError(f"throttle_cooldown must not be negative, got {throttle_cooldown!r}")
        self._rate = float(rate)
        self._own_burst = burst is None
        self._burst = float(burst) if burst is not None else max(1.0, self._rate / 10.0)
        self._clock = clock
        self._recovery = float(recovery)
        self._cooldown = float(throttle_cooldown)
        self._current = self._rate
        now = clock()
        self._tokens = self._burst
        self._last_refill = now
        self._last_adjust = now
        self._last_halving: float | None = None

    @property
    def rate(self) -> float:
        """The configured rate (requests per second)."""
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def floor(self) -> float:
        """The lowest rate :meth:`throttled` can bring the bucket to: ``rate / 16``."""
        return self._rate / 16.0

    @property
    def current_rate(self) -> float:
        """The rate in force now, lowered by :meth:`throttled`, raised by :meth:`succeeded`."""
        return self._current

    def _refill(self, now: float) -> None:
        elapsed = now - self._last_refill
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._current)
            self._last_refill = now

    def wait_time(self) -> float:
        """The seconds :meth:`reserve` would ask to wait if called now (takes nothing)."""
        now = self._clock()
        self._refill(now)
        tokens = self._tokens - 1.0
        return 0.0 if tokens >= 0 else -tokens / self._current

    def reserve(self) -> float:
        """Take one token; return the seconds to wait before using it (0 if one is ready)."""
        now = self._clock()
        self._refill(now)
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self._current

    async def acquire(self, sleep: Sleep = asyncio.sleep) -> None:
        """Reserve a token and sleep until it may be used."""
        delay = self.reserve()
        if delay > 0:
            await sleep(delay)

    def throttled(self) -> bool:
        """The target answered 429: halve the current rate (not below ``rate / 16``).

        Returns whether the rate was lowered (False within the cool-down or at the floor).
        """
        now = self._clock()
        self._refill(now)
        self._tokens = min(self._tokens, 0.0)
        self._last_adjust = now
        if self._last_halving is not None and now - self._last_halving < self._cooldown:
            return False
        lowered = max(self.floor, self._current / 2.0)
        changed = lowered < self._current
        self._current = lowered
        self._last_halving = now
        return changed

    def succeeded(self) -> None:
        """A request went through without a 429: move the rate back toward the configured one."""
        now = self._clock()
        self._refill(now)
        if self._current < self._rate:
            elapsed = max(0.0, now - self._last_adjust)
            self._current = min(self._rate, self._current + self._rate * elapsed / self._recovery)
        self._last_adjust = now

    def set_rate(self, rate: float) -> None:
        """Change the configured rate (a relay's share of a limit shared with others).

        The current rate keeps its ratio to the configured one (a 429's lowering carries over),
        the default burst follows the new rate, and saved-up tokens beyond it are dropped.
        Reservations already handed out keep their times, so a new one never comes before them:
        on a raise, the debt grows with the rate (it still takes as long to clear); on a cut, it
        stays, and is repaid at the lower rate, so the callers who reserved at the old rate are
        compensated for.
        """
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        if rate == self._rate:
            return
        self._refill(self._clock())
        if self._tokens < 0:
            self._tokens = min(self._tokens, self._tokens * rate / self._rate)
        self._current = self._current * rate / self._rate
        self._rate = float(rate)
        if self._own_burst:
            self._burst = max(1.0, self._rate / 10.0)
        self._tokens = min(self._tokens, self._burst)

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self._rate:g}, current_rate={self._current:g}, burst={self._burst:g})"


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Pauses a target whose requests keep failing transiently; one probe decides when to resume.

    * closed: every request is allowed. ``record_failure()`` counts consecutive transient
      failures; ``record_success()`` resets the count. At ``failure_threshold`` it opens.
    * open: nothing is allowed for the open period (``open_for`` at first).
    * half_open: once the period is over, ``allow()`` lets exactly one probe through and
      refuses everything else until the probe's outcome is recorded. ``record_success()``
      closes the breaker and resets the period; ``record_failure()`` re-opens it for twice
      the previous period, at most ``max_open_for``.

    ``trip(reason, seconds)`` opens it at once for a given time; ``hold(reason)`` opens it at
    once with the same doubling as above (persistent 401/403, no token: the target is paused
    until credentials work again, probed after 2, 4, 8, ... seconds); a probe follows as above.

    A probe whose outcome is never recorded (its task was cancelled, say) would hold the
    breaker half-open forever, so after ``probe_timeout`` seconds another probe is let
    through; :meth:`release_probe` gives the slot back at once when a probe was not sent.

    Outcomes recorded while open (answers to requests sent before it opened) do not extend
    the open period; a success recorded at any time closes it, since the target evidently
    answers.
    """

    def __init__(
        self,
        settings: BreakerConfig,
        clock: Clock = time.monotonic,
        *,
        probe_timeout: float = 60.0,
    ) -> None:
        if settings.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if not settings.open_for > 0 or settings.max_open_for < settings.open_for:
            raise ValueError("need 0 < open_for <= max_open_for")
        self._settings = settings
        self._clock = clock
        self._probe_timeout = float(probe_timeout)
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._period = settings.open_for
        self._opened_at: float | None = None
        self._open_until = 0.0
        self._reason: str | None = None
        self._probe_sent_at: float | None = None

    def _advance(self, now: float) -> None:
        if self._state is BreakerState.OPEN and now >= self._open_until:
            self._state = BreakerState.HALF_OPEN
            self._probe_sent_at = None
        elif (
            self._state is BreakerState.HALF_OPEN
            and self._probe_sent_at is not None
            and now - self._probe_sent_at >= self._probe_timeout
        ):
            self._probe_sent_at = None

    def _open(self, now: float, period: float, reason: str) -> None:
        self._state = BreakerState.OPEN
        self._period = period
        self._opened_at = now
        self._open_until = now + period
        self._reason = reason
        self._probe_sent_at = None

    @property
    def state(self) -> BreakerState:
        self._advance(self._clock())
        return self._state

    @property
    def reason(self) -> str | None:
        """Why the breaker is open (or half-open); None while closed."""
        return self._reason if self._state is not BreakerState.CLOSED else None

    @property
    def opened_at(self) -> float | None:
        """Clock reading when it last opened; None while closed."""
        return self._opened_at if self._state is not BreakerState.CLOSED else None

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def open_period(self) -> float:
        """Length of the current (or last) open period, in seconds."""
        return self._period

    def retry_in(self) -> float:
        """Seconds until the next request may go out: 0 when closed or a probe slot is free,
        the rest of the open period when open, the rest of the probe timeout when a probe
        is out."""
        now = self._clock()
        self._advance(now)
        if self._state is BreakerState.OPEN:
            return max(0.0, self._open_until - now)
        if self._state is BreakerState.HALF_OPEN and self._probe_sent_at is not None:
            return max(0.0, self._probe_sent_at + self._probe_timeout - now)
        return 0.0

    def allow(self) -> bool:
        """May a request be sent now? In half-open, True for exactly one caller (the probe)."""
        now = self._clock()
        self._advance(now)
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.HALF_OPEN and self._probe_sent_at is None:
            self._probe_sent_at = now
            return True
        return False

    def release_probe(self) -> None:
        """The probe allowed by :meth:`allow` was not sent: let the next caller probe."""
        if self._state is BreakerState.HALF_OPEN:
            self._probe_sent_at = None

    def record_success(self) -> None:
        """The target answered (anything but a transient failure): close and reset."""
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._period = self._settings.open_for
        self._opened_at = None
        self._reason = None
        self._probe_sent_at = None

    def record_failure(self) -> None:
        """A request failed transiently (timeout, connection error, 5xx, ...)."""
        now = self._clock()
        self._advance(now)
        self._failures += 1
        if self._state is BreakerState.CLOSED:
            if self._failures >= self._settings.failure_threshold:
                self._open(now, self._settings.open_for, f"{self._failures} consecutive transient failures")
        elif self._state is BreakerState.HALF_OPEN:
            period = min(self._settings.max_open_for, self._period * 2.0)
            self._open(now, period, f"probe failed after {self._failures} consecutive transient failures")

    def hold(self, reason: str) -> float:
        """Open at once because the target refuses us (credentials refused, no token), with backoff.

        From closed: for ``open_for``. When the probe was refused too (half-open): for twice the
        last period, at most ``max_open_for``, so a target that keeps refusing is probed less and
        less often. While already open (answers to requests sent before the pause): the period
        starts over at its current length. Returns the period.
        """
        now = self._clock()
        self._advance(now)
        period = max(self._period, self._settings.open_for)
        if self._state is BreakerState.HALF_OPEN:
            period = min(self._settings.max_open_for, period * 2.0)
        elif self._state is BreakerState.CLOSED:
            period = self._settings.open_for
        self._open(now, period, reason)
        return period

    def trip(self, reason: str, seconds: float) -> None:
        """Open at once for ``seconds`` (e.g. an auth pause), whatever the state."""
        if seconds < 0:
            raise ValueError(f"seconds must not be negative, got {seconds!r}")
        self._open(self._clock(), float(seconds), reason)

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self._state.value}, failures={self._failures}, reason={self._reason!r})"
        )
