"""relay/core/peers.py on its own: what the other relays' rows do to this relay's lanes.

The rows are built by hand (the database side is tested end to end in test_shared_limits.py)."""

from __future__ import annotations

from relay.core import peers
from relay.core.engine import Engine
from relay.core.flow import BreakerState
from relay.pg.store import PeerRow, Store
from relay.settings import Secret
from tests.relaykit import relay_settings


def _engine(**extra: str) -> Engine:
    settings = relay_settings("postgresql://x@127.0.0.1/x", "http://127.0.0.1:9", **extra)
    return Engine(settings, Store(Secret("postgresql://x@127.0.0.1/x")))


def _row(relay: str, state: str = "serving", paused_for: float | None = None, alive: bool = True) -> PeerRow:
    return PeerRow(
        relay, "default", state, "5 consecutive transient failures" if paused_for else None, paused_for, alive
    )


def test_the_rate_limit_is_divided_among_the_live_relays_of_the_target() -> None:
    engine = _engine(RELAY_RATE_LIMIT="30")
    bucket = engine.lanes["default"].bucket
    assert bucket is not None
    assert peers.apply(engine, [_row("b"), _row("c")]) == []
    assert bucket.rate == 10.0
    other_target = PeerRow("d", "eu", "serving", None, None, True)
    assert peers.apply(engine, [_row("b"), other_target]) == []
    assert bucket.rate == 15.0
    assert peers.apply(engine, [_row("b"), _row("c", alive=False)]) == ["c"]  # dead: not counted
    assert bucket.rate == 15.0
    assert peers.apply(engine, []) == []
    assert bucket.rate == 30.0


def test_a_target_without_a_rate_limit_gets_no_bucket() -> None:
    engine = _engine()
    peers.apply(engine, [_row("b")])
    assert engine.lanes["default"].bucket is None and engine.lanes["default"].relays == 2


def test_a_live_relays_pause_is_followed_and_ends_when_it_serves_again() -> None:
    engine = _engine()
    lane = engine.lanes["default"]
    peers.apply(engine, [_row("b", "paused", 4.0)])
    assert lane.breaker.state == BreakerState.OPEN and lane.followed == "b"
    assert lane.breaker.retry_in() > 4.0  # past the leader's pause: the leader probes first
    assert (lane.breaker.reason or "").startswith("paused by relay b: ")
    assert peers.own_pauses(engine) == {"default": None}  # a follower holds no pause of its own
    peers.apply(engine, [_row("b", "paused", 8.0)])  # its probe failed: held longer
    assert lane.breaker.retry_in() > 8.0
    peers.apply(engine, [_row("b")])
    assert lane.breaker.state == BreakerState.CLOSED and lane.followed is None


def test_a_dead_leaders_pause_runs_out_and_is_not_ended_early() -> None:
    engine = _engine()
    lane = engine.lanes["default"]
    peers.apply(engine, [_row("b", "paused", 4.0)])
    peers.apply(engine, [_row("b", "paused", 3.0, alive=False)])
    assert lane.followed is None and lane.breaker.state == BreakerState.OPEN  # this relay probes later
    held = peers.own_pauses(engine)["default"]
    assert held is not None and held > 0  # and now holds the pause for the others


def test_a_relay_with_its_own_pause_does_not_follow_another() -> None:
    engine = _engine()
    lane = engine.lanes["default"]
    lane.breaker.hold("HTTP 401")
    peers.apply(engine, [_row("b", "paused", 30.0)])
    assert lane.followed is None and lane.breaker.reason == "HTTP 401"
