"""Flow control with a fake clock: token bucket spacing and adaptation, circuit breaker states."""

from __future__ import annotations

import asyncio

import pytest

from relay.core.flow import BreakerState, CircuitBreaker, TokenBucket
from relay.settings import BreakerSettings


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- token bucket ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst", "expected_burst"),
    [
        (1.0, None, 1.0),
        (5.0, None, 1.0),
        (10.0, None, 1.0),
        (50.0, None, 5.0),
        (200.0, None, 20.0),
        (0.2, None, 1.0),
        (10.0, 3.0, 3.0),
    ],
)
def test_burst_default(rate: float, burst: float | None, expected_burst: float) -> None:
    bucket = TokenBucket(rate, burst, clock=FakeClock())
    assert bucket.burst == pytest.approx(expected_burst)
    assert bucket.current_rate == rate


@pytest.mark.parametrize(("rate", "burst"), [(0.0, None), (-1.0, None), (5.0, 0.5)])
def test_invalid_arguments(rate: float, burst: float | None) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, clock=FakeClock())


@pytest.mark.parametrize(("rate", "burst"), [(1.0, 1.0), (10.0, 1.0), (10.0, 4.0), (250.0, None)])
def test_simultaneous_reservations_are_spaced_at_one_over_rate(rate: float, burst: float | None) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock=clock)
    waits = [bucket.reserve() for _ in range(40)]
    full = int(bucket.burst)
    assert waits[:full] == [0.0] * full
    for k, wait in enumerate(waits[full:], start=1):
        assert wait == pytest.approx(k / rate)
    assert all(b > a for a, b in zip(waits[full:], waits[full + 1 :], strict=False))


def test_tokens_come_back_with_time_up_to_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 3.0, clock=clock)
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve() == pytest.approx(0.1)  # debt of one token
    clock.advance(0.1)  # pays the debt only
    assert bucket.reserve() == pytest.approx(0.1)
    clock.advance(100.0)  # a long idle time refills only up to the burst
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve() > 0


@pytest.mark.parametrize("rate", [1.0, 2.0, 7.0, 10.0, 33.0, 100.0, 1000.0])
def test_ten_second_window_stays_within_ten_percent(rate: float) -> None:
    """Greedy callers that send as soon as allowed: any 10 s window holds <= 110% of rate*10."""
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate, clock=clock)
    sends: list[float] = []
    horizon = 30.0
    while clock.now < horizon:
        wait = bucket.reserve()
        clock.advance(wait)
        sends.append(clock.now)
    limit = rate * 10.0 * 1.10
    # Slide the window over every send time: [t, t + 10).
    j = 0
    worst = 0
    for i, start in enumerate(sends):
        while j < len(sends) and sends[j] < start + 10.0:
            j += 1
        worst = max(worst, j - i)
    assert worst <= limit
    assert worst >= rate * 10.0  # and the bucket does let the configured rate through
    # Long-run average equals the rate.
    assert len(sends) / horizon == pytest.approx(rate, rel=0.05)


async def test_acquire_sleeps_for_the_reserved_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(4.0, 1.0, clock=clock)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    for _ in range(3):
        await bucket.acquire(sleep=fake_sleep)
    assert slept == [pytest.approx(0.25), pytest.approx(0.5)]  # first token was free


async def test_concurrent_acquire_is_fair_and_spaced() -> None:
    clock = FakeClock()
    bucket = TokenBucket(20.0, 1.0, clock=clock)
    slept: dict[int, float] = {}

    async def caller(i: int) -> None:
        async def fake_sleep(seconds: float) -> None:
            slept[i] = seconds

        await bucket.acquire(sleep=fake_sleep)

    await asyncio.gather(*(caller(i) for i in range(10)))
    assert 0 not in slept  # the first caller got the one free token
    assert [slept[i] for i in range(1, 10)] == [pytest.approx(i / 20.0) for i in range(1, 10)]


def test_throttled_halves_down_to_a_sixteenth() -> None:
    clock = FakeClock()
    bucket = TokenBucket(64.0, clock=clock, throttle_cooldown=1.0)
    expected = [32.0, 16.0, 8.0, 4.0, 4.0, 4.0]
    seen: list[float] = []
    lowered: list[bool] = []
    for _ in expected:
        lowered.append(bucket.throttled())
        seen.append(bucket.current_rate)
        clock.advance(1.0)
    assert seen == expected
    assert lowered == [True, True, True, True, False, False]
    assert bucket.floor == 4.0


def test_throttles_within_the_cooldown_count_once() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100.0, clock=clock, throttle_cooldown=1.0)
    results = [bucket.throttled() for _ in range(30)]  # a wave of 429s at the same instant
    assert results == [True] + [False] * 29
    assert bucket.current_rate == 50.0
    clock.advance(0.99)
    assert bucket.throttled() is False
    clock.advance(0.01)
    assert bucket.throttled() is True
    assert bucket.current_rate == 25.0


def test_throttled_without_cooldown_halves_every_time() -> None:
    bucket = TokenBucket(100.0, clock=FakeClock(), throttle_cooldown=0.0)
    bucket.throttled()
    bucket.throttled()
    assert bucket.current_rate == 25.0


def test_throttled_drops_the_saved_burst_and_slows_spacing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100.0, 10.0, clock=clock)
    bucket.throttled()
    # No saved tokens after a 429, and reservations now come at 1/50 s.
    waits = [bucket.reserve() for _ in range(3)]
    assert waits == [pytest.approx(0.02), pytest.approx(0.04), pytest.approx(0.06)]


@pytest.mark.parametrize(
    ("recovery", "after", "expected"),
    [
        (20.0, 0.0, 50.0),
        (20.0, 5.0, 75.0),
        (20.0, 10.0, 100.0),
        (20.0, 60.0, 100.0),  # never above the configured rate
        (10.0, 2.0, 70.0),
    ],
)
def test_succeeded_recovers_additively_over_time(recovery: float, after: float, expected: float) -> None:
    clock = FakeClock()
    bucket = TokenBucket(100.0, clock=clock, recovery=recovery)
    bucket.throttled()
    assert bucket.current_rate == 50.0
    steps = 10
    for _ in range(steps):
        clock.advance(after / steps)
        bucket.succeeded()
    assert bucket.current_rate == pytest.approx(expected)


def test_many_successes_at_one_instant_do_not_recover() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100.0, clock=clock)
    bucket.throttled()
    for _ in range(1000):
        bucket.succeeded()
    assert bucket.current_rate == 50.0


def test_succeeded_at_full_rate_changes_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, clock=clock)
    clock.advance(5.0)
    bucket.succeeded()
    assert bucket.current_rate == 10.0


# --- circuit breaker ------------------------------------------------------------------------

SETTINGS = BreakerSettings(failure_threshold=3, open_for=2.0, max_open_for=10.0)


def state(breaker: CircuitBreaker) -> BreakerState:
    """Read the state through a call, so type checkers do not narrow it across actions."""
    return breaker.state


def make_breaker(settings: BreakerSettings = SETTINGS) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(settings, clock=clock), clock


def test_breaker_starts_closed() -> None:
    breaker, _ = make_breaker()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow() is True
    assert breaker.reason is None
    assert breaker.opened_at is None
    assert breaker.retry_in() == 0.0


@pytest.mark.parametrize("threshold", [1, 3, 5])
def test_opens_at_the_threshold_of_consecutive_failures(threshold: int) -> None:
    breaker, clock = make_breaker(BreakerSettings(failure_threshold=threshold, open_for=2.0))
    for _ in range(threshold - 1):
        breaker.record_failure()
        assert state(breaker) is BreakerState.CLOSED
        assert breaker.allow() is True
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN
    assert breaker.allow() is False
    assert breaker.reason == f"{threshold} consecutive transient failures"
    assert breaker.opened_at == clock.now
    assert breaker.retry_in() == pytest.approx(2.0)


def test_a_success_resets_the_consecutive_count() -> None:
    breaker, _ = make_breaker()
    for _ in range(5):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0


def test_open_then_half_open_single_probe_then_close() -> None:
    breaker, clock = make_breaker()
    for _ in range(3):
        breaker.record_failure()
    clock.advance(1.999)
    assert breaker.allow() is False
    assert breaker.retry_in() == pytest.approx(0.001)
    clock.advance(0.001)
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow() is True  # the probe
    assert [breaker.allow() for _ in range(5)] == [False] * 5
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.reason is None
    assert all(breaker.allow() for _ in range(5))


@pytest.mark.parametrize(
    ("settings", "expected_periods"),
    [
        (BreakerSettings(3, 2.0, 10.0), [2.0, 4.0, 8.0, 10.0, 10.0]),
        (BreakerSettings(1, 1.0, 60.0), [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]),
        (BreakerSettings(2, 5.0, 5.0), [5.0, 5.0, 5.0]),
    ],
)
def test_failed_probe_doubles_the_open_time_up_to_the_cap(
    settings: BreakerSettings, expected_periods: list[float]
) -> None:
    breaker, clock = make_breaker(settings)
    for _ in range(settings.failure_threshold):
        breaker.record_failure()
    periods: list[float] = []
    for _ in expected_periods:
        assert state(breaker) is BreakerState.OPEN
        periods.append(breaker.retry_in())
        clock.advance(breaker.retry_in() - 0.01)
        assert breaker.allow() is False
        clock.advance(0.01)
        assert breaker.allow() is True  # probe
        breaker.record_failure()  # probe failed
    assert periods == [pytest.approx(p) for p in expected_periods]
    assert breaker.reason is not None and breaker.reason.startswith("probe failed")


def test_success_after_reopening_resets_the_period() -> None:
    breaker, clock = make_breaker()
    for _ in range(3):
        breaker.record_failure()
    clock.advance(2.0)
    assert breaker.allow()
    breaker.record_failure()  # reopened for 4 s
    assert breaker.retry_in() == pytest.approx(4.0)
    clock.advance(4.0)
    assert breaker.allow()
    breaker.record_success()
    for _ in range(3):
        breaker.record_failure()
    assert breaker.retry_in() == pytest.approx(2.0)  # back to open_for


def test_failures_while_open_do_not_extend_it() -> None:
    breaker, clock = make_breaker()
    for _ in range(3):
        breaker.record_failure()
    clock.advance(1.0)
    for _ in range(10):  # answers to requests sent before it opened
        breaker.record_failure()
    assert breaker.retry_in() == pytest.approx(1.0)
    clock.advance(1.0)
    assert state(breaker) is BreakerState.HALF_OPEN


def test_trip_opens_at_once_for_the_given_time() -> None:
    breaker, clock = make_breaker()
    breaker.trip("HTTP 401 with a fresh token: check the credentials", 300.0)
    assert state(breaker) is BreakerState.OPEN
    assert breaker.allow() is False
    assert breaker.reason == "HTTP 401 with a fresh token: check the credentials"
    assert breaker.opened_at == clock.now
    assert breaker.retry_in() == pytest.approx(300.0)
    clock.advance(300.0)
    assert breaker.allow() is True  # a probe
    assert breaker.allow() is False
    breaker.trip("still 401", 300.0)  # the probe got 401 again
    assert breaker.reason == "still 401"
    assert breaker.retry_in() == pytest.approx(300.0)
    clock.advance(300.0)
    assert breaker.allow() is True
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED


def test_hold_backs_off_while_the_probes_are_refused() -> None:
    """An auth pause: open_for at first, doubled for each refused probe up to max_open_for; late
    refusals while open start the period over without doubling; a success starts from scratch."""
    breaker, clock = make_breaker(BreakerSettings(failure_threshold=3, open_for=2.0, max_open_for=15.0))
    periods = []
    for _ in range(6):
        periods.append(breaker.hold("HTTP 401: credentials refused"))
        assert state(breaker) is BreakerState.OPEN and breaker.allow() is False
        assert breaker.retry_in() == pytest.approx(periods[-1])
        clock.advance(periods[-1])
        assert breaker.allow() is True  # the probe, refused again on the next turn
    assert periods == [2.0, 4.0, 8.0, 15.0, 15.0, 15.0]

    breaker.record_success()
    assert breaker.hold("403") == 2.0
    clock.advance(1.0)
    assert breaker.hold("403 sent before the pause") == 2.0  # while open: no doubling
    assert breaker.retry_in() == pytest.approx(2.0)
    assert breaker.reason == "403 sent before the pause"


def test_trip_replaces_a_longer_failure_pause() -> None:
    breaker, _ = make_breaker()
    for _ in range(3):
        breaker.record_failure()
    breaker.trip("auth", 0.5)
    assert breaker.retry_in() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        breaker.trip("negative", -1.0)


async def test_concurrent_allow_in_half_open_lets_one_through() -> None:
    breaker, clock = make_breaker()
    for _ in range(3):
        breaker.record_failure()
    clock.advance(2.0)

    async def try_send() -> bool:
        await asyncio.sleep(0)
        return breaker.allow()

    results = await asyncio.gather(*(try_send() for _ in range(100)))
    assert results.count(True) == 1
    assert state(breaker) is BreakerState.HALF_OPEN


def test_lost_probe_is_replaced_after_the_probe_timeout() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(SETTINGS, clock=clock, probe_timeout=15.0)
    for _ in range(3):
        breaker.record_failure()
    clock.advance(2.0)
    assert breaker.allow() is True
    clock.advance(14.0)
    assert breaker.allow() is False
    assert breaker.retry_in() == pytest.approx(1.0)
    clock.advance(1.0)
    assert breaker.allow() is True
    assert breaker.allow() is False


def test_release_probe_frees_the_slot() -> None:
    breaker, clock = make_breaker()
    for _ in range(3):
        breaker.record_failure()
    clock.advance(2.0)
    assert breaker.allow() is True
    breaker.release_probe()
    assert breaker.allow() is True
    assert breaker.allow() is False


@pytest.mark.parametrize(
    "settings",
    [BreakerSettings(0, 2.0, 10.0), BreakerSettings(3, 0.0, 10.0), BreakerSettings(3, 20.0, 10.0)],
)
def test_breaker_refuses_bad_settings(settings: BreakerSettings) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(settings, clock=FakeClock())


def test_breaker_state_values() -> None:
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]
    assert BreakerState("half_open") is BreakerState.HALF_OPEN


def test_set_rate_shares_the_limit_and_keeps_a_429s_lowering() -> None:
    now = [0.0]
    bucket = TokenBucket(30.0, clock=lambda: now[0])
    bucket.throttled()
    assert bucket.current_rate == 15.0
    bucket.set_rate(10.0)  # three relays share 30/s
    assert (bucket.rate, bucket.current_rate, bucket.burst) == (10.0, 5.0, 1.0)
    waits = [bucket.reserve() for _ in range(3)]
    assert waits == [pytest.approx(0.2), pytest.approx(0.4), pytest.approx(0.6)]
    bucket.set_rate(30.0)  # alone again: the lowering carries over in proportion
    assert bucket.current_rate == 15.0
    with pytest.raises(ValueError):
        bucket.set_rate(0.0)


def test_set_rate_never_lets_a_new_reservation_overtake_one_already_handed_out() -> None:
    now = [0.0]
    bucket = TokenBucket(10.0, clock=lambda: now[0])
    waits = [bucket.reserve() for _ in range(5)]  # the burst (1), then 0.1 s apart
    assert waits[-1] == pytest.approx(0.4)
    bucket.set_rate(20.0)  # a peer left: the debt still takes 0.4 s to clear
    assert bucket.reserve() == pytest.approx(0.45)
    bucket.set_rate(5.0)  # a peer joined: the debt is repaid at the lower rate
    assert bucket.reserve() == pytest.approx(10 / 5.0)
