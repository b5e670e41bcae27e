"""Several relays of one database, one set of limits: rate shares, shared pauses, dead relays.

Design: every relay touches its rows of ``outbox.relay_targets`` once a second
(:data:`PRESENCE_SECONDS`) and, in the same round trip, reads the other relays' rows
(``relay_peers`` in ``relay/pg/queries.sql``). From them:

* **Rate.** A target's ``rate_limit`` is divided among the live relays that serve it: each
  relay's token bucket runs at ``rate_limit / n`` (:meth:`relay.core.flow.TokenBucket.set_rate`).
  The bucket, the 429 adaptation and the engine's claim sizing all scale with that rate, so
  nothing else changes. A starting relay registers first and waits
  :data:`JOIN_SECONDS` before it sends, so the running ones have lowered their share by then; a
  relay that stops cleanly deletes its rows (the others raise theirs at their next read); a dead
  one stops counting once its rows are older than :data:`ALIVE_SECONDS`.
* **Pauses.** A relay whose breaker opened for a target (transient failures, refused
  credentials) writes until when it holds the pause (``paused_until``). The other live relays
  follow it: their breaker is held open a little past that time (:data:`FOLLOW_MARGIN`), so they
  never probe while a live peer holds the pause. When that peer serves again, they resume at
  once; when it dies or stops, its pause is no longer seen, theirs runs out and they probe
  themselves. A relay that opened its own breaker does not follow another's.
* **Dead relays.** A relay none of whose rows was touched for :data:`ALIVE_SECONDS` longer than
  our own previous touch is dead: the caller releases its claims (makes them due now). Measured
  against our own touch, a database that stalls everybody's writes makes nobody look dead.

Why a share and not leases of send slots from a row per target: the share keeps the bucket
local (no round trip per request or block of requests, no new hot row every relay updates), its
error is bounded by one presence period at a membership change, and the presence row it needs
also tells a dead relay from a live one, which releasing claims needs anyway.

Why these periods (the daemon's state heartbeat is ``HEARTBEAT_SECONDS`` = 10 s): the presence
touch is ten times as frequent, one small UPDATE a second per relay; a relay is dead after five
missed touches, so a relay whose event loop or database session is late by a few seconds keeps
its claims, while a killed relay's share and claims are taken over within about
``ALIVE_SECONDS + PRESENCE_SECONDS`` = 6 s: within one heartbeat interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from relay.core.flow import BreakerState

if TYPE_CHECKING:
    from relay.core.engine import Engine, Lane
    from relay.pg.store import PeerRow

__all__ = ["ALIVE_SECONDS", "FOLLOW_MARGIN", "JOIN_SECONDS", "PRESENCE_SECONDS", "apply", "own_pauses"]

# How often a relay touches its presence and reads the others'.
PRESENCE_SECONDS = 1.0
# A relay whose rows are older than this is not counted, and (see the module doc) is dead.
ALIVE_SECONDS = 5.0
# A starting relay with a rate limit waits this long after registering before it sends.
JOIN_SECONDS = 1.5 * PRESENCE_SECONDS
# A follower holds a peer's pause this much longer than the peer, so that the peer probes first.
FOLLOW_MARGIN = 2.0 * PRESENCE_SECONDS
# A probing relay holds the pause at least this long on top of its request's own deadline.
_PROBE_MARGIN = 1.0


def own_pauses(engine: Engine) -> dict[str, float | None]:
    """Per target: the seconds left of the pause this relay holds itself, or None (serving, or
    only following another relay's pause)."""
    held: dict[str, float | None] = {}
    for name, lane in engine.lanes.items():
        state = lane.breaker.state
        if state == BreakerState.CLOSED or lane.followed is not None:
            held[name] = None
        elif state == BreakerState.OPEN:
            held[name] = lane.breaker.retry_in()
        else:  # probing: hold the others while the probe may be out
            held[name] = max(lane.breaker.retry_in(), lane.settings.request_timeout + _PROBE_MARGIN)
    return held


def apply(engine: Engine, peers: Sequence[PeerRow]) -> list[str]:
    """Apply what the other relays' rows say to the engine's lanes; returns the dead relays."""
    alive = {p.relay_id for p in peers if p.alive}
    for name, lane in engine.lanes.items():
        live = [p for p in peers if p.alive and p.target == name]
        lane.relays = 1 + len({p.relay_id for p in live})
        if lane.settings.rate_limit and lane.bucket is not None and not lane.adaptive:
            lane.bucket.set_rate(lane.settings.rate_limit / lane.relays)
        _follow(engine, lane, live)
    return sorted({p.relay_id for p in peers} - alive)


def _follow(engine: Engine, lane: Lane, live: Sequence[PeerRow]) -> None:
    holders = [p for p in live if p.paused_for is not None and p.paused_for > 0]
    if holders and (lane.followed is not None or lane.breaker.state == BreakerState.CLOSED):
        leader = max(holders, key=lambda p: p.paused_for or 0.0)
        assert leader.paused_for is not None
        lane.breaker.trip(
            f"paused by relay {leader.relay_id}: {leader.reason or 'breaker open'}",
            leader.paused_for + FOLLOW_MARGIN,
        )
        lane.followed = leader.relay_id
        engine.report_lane(lane)
    elif lane.followed is not None:
        leader_rows = [p for p in live if p.relay_id == lane.followed]
        lane.followed = None
        if leader_rows and all(p.state == "serving" for p in leader_rows):
            lane.breaker.record_success()  # its probe went through: the target serves again
            engine.report_lane(lane)
        # Otherwise the leader died or stopped: our pause runs out and we probe ourselves.
