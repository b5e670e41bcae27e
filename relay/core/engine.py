"""Claim → send → classify → record.

``Engine.run_once()`` drains every configured target until nothing is due, pipelining claims
with sends: each target holds at most twice its concurrency in claimed rows, sends at most
``max_concurrency`` at once (rate-limited, behind its circuit breaker), and results are written
in batches by a :class:`Recorder`, each write guarded by the claim's fencing token. Tests call
``run_once()`` directly; :mod:`relay.service.daemon` only decides when.

A request leaves only when everything it needs fits in the row's lease: the rate limiter's wait,
the token fetch and the request's own deadline (``request_timeout``). A row that cannot make it
is released unsent, and a rate-limited target claims only what its limiter can release in time.
Before a request leaves, its row is marked as being sent (:mod:`relay.core.sending`): that mark, not
the claim, is what makes a row whose relay died "may have reached the API".
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

from relay.connect.answer import Answer
from relay.connect.client import RESPONSE_BODY_LIMIT, ApiClient, Sent, request_body
from relay.core.classify import Decision, Verdict, classify
from relay.core.flow import BreakerState, CircuitBreaker, TokenBucket
from relay.core.recorder import Recorder
from relay.core.sending import SendMarks
from relay.durations import human_duration
from relay.errors import AuthError, DatabaseError
from relay.pg.store import AttemptRecord, ClaimedRow, RowResult, Store
from relay.sanitize import one_line, storable_bytes
from relay.settings import Settings, TargetSettings

log = logging.getLogger("relay.engine")

# A claimed row is not sent when less than this much of its lease is left (plus the timeout).
LEASE_MARGIN = 1.0
# An answer waits at most about this long for its batch: it must be written while the lease lasts.
FLUSH_AFTER = LEASE_MARGIN / 4
# Statuses the API answers only once it accepted the credentials: seen for one row, they show
# that a 401/403 of another row sent before is that row's own refusal, not the whole target's.
_PAST_AUTH = frozenset({400, 404, 409, 410, 422})
_REFUSED_KEPT = 10_000


def reached_api(answer: Answer) -> str:
    """What an attempt row says of a request: ``answered``, ``maybe`` (no answer came and it may
    have been applied) or ``no`` (it never left: its connection was not established)."""
    if answer.status is not None:
        return "answered"
    return "maybe" if answer.maybe_sent else "no"


class Observer(Protocol):
    """What the engine reports as it goes (metrics); every method is optional in effect."""

    def request(self, target: str, outcome: str, seconds: float) -> None: ...
    def delivered(self, target: str, commit_to_delivery_seconds: float) -> None: ...
    def dead(self, target: str) -> None: ...
    def circuit(self, target: str, state: str) -> None: ...
    def unwritable(self, target: str) -> None: ...
    def dropped(self, target: str) -> None: ...


class _NoObserver:
    def request(self, target: str, outcome: str, seconds: float) -> None:
        pass

    def delivered(self, target: str, commit_to_delivery_seconds: float) -> None:
        pass

    def dead(self, target: str) -> None:
        pass

    def circuit(self, target: str, state: str) -> None:
        pass

    def unwritable(self, target: str) -> None:
        pass

    def dropped(self, target: str) -> None:
        pass


@dataclass
class Lane:
    """One target's runtime: its client, limits and breaker, and the rows it holds."""

    settings: TargetSettings
    client: ApiClient
    breaker: CircuitBreaker
    bucket: TokenBucket | None
    slots: asyncio.Semaphore
    adaptive: bool = False  # the bucket was made by a 429, not by rate_limit
    held: int = 0
    # Rows held that have not taken their rate-limit token yet: the limiter's queue.
    waiting: set[int] = field(default_factory=set)
    exhausted: bool = False
    # Live relays serving this target, this one included (relay.core.peers): the rate's divisor.
    relays: int = 1
    # The relay whose pause this lane follows (relay.core.peers), or None.
    followed: str | None = None
    last_state: str = "serving"
    paused_since: float | None = None  # time.monotonic() when the target stopped serving
    # time.monotonic() when the latest request whose credentials the API accepted (an answer that
    # only comes after authentication) had started: tells a 401/403 of one row from one of the
    # whole target.
    accepted_at: float = 0.0
    # Rows whose 401/403 paused the target, and when (time.monotonic()): if the API accepts other
    # rows after that, the next refusal of the same row is its own.
    refused: dict[int, float] = field(default_factory=dict)

    # Requests sent, counted per second, so a 429 on a target without a rate limit has a rate
    # to lower: the one we were sending at.
    _window_start: float = 0.0
    _window_sent: int = 0
    _last_rate: float = 0.0

    @property
    def name(self) -> str:
        return self.settings.name

    def refused_row(self, update_id: int, at: float) -> None:
        if len(self.refused) >= _REFUSED_KEPT:  # keep the newest half; forgetting costs one pause
            for old in sorted(self.refused, key=self.refused.__getitem__)[: _REFUSED_KEPT // 2]:
                del self.refused[old]
        self.refused.setdefault(update_id, at)

    def count_request(self) -> None:
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            elapsed = now - self._window_start
            self._last_rate = self._window_sent / elapsed if self._window_start and elapsed < 2.0 else 0.0
            self._window_start, self._window_sent = now, 0
        self._window_sent += 1

    def throttle(self) -> None:
        """The API answered 429: lower the rate (halving, then recovering over time).

        A target with ``rate_limit`` lowers its own bucket. One without gets an adaptive bucket
        starting at the rate it was sending; it goes away once it has recovered to that rate.
        """
        if self.bucket is None:
            in_window = self._window_sent / max(time.monotonic() - self._window_start, 0.1)
            self.bucket = TokenBucket(max(1.0, self._last_rate, in_window))
            self.adaptive = True
        self.bucket.throttled()

    def succeeded(self) -> None:
        if self.bucket is None:
            return
        self.bucket.succeeded()
        if self.adaptive and self.bucket.current_rate >= self.bucket.rate:
            self.bucket, self.adaptive = None, False

    def state(self) -> tuple[str, str | None]:
        """For heartbeats: serving, paused (breaker open) or probing (half open)."""
        s = self.breaker.state
        if s == BreakerState.OPEN:
            return "paused", self.breaker.reason
        if s == BreakerState.HALF_OPEN:
            return "probing", self.breaker.reason
        return "serving", None


class Engine:
    """Drains the outbox for the configured targets."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        clients: Mapping[str, ApiClient] | None = None,
        observer: Observer | None = None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_state_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        # Called with (target, state) each time a target starts or stops serving, or a probe
        # goes out or is refused: the daemon writes outbox.relay_targets at once.
        self.on_state_change = on_state_change
        self.store = store
        self.observer: Observer = observer or _NoObserver()
        self.rand = rand
        self.clock = clock
        self.lanes: dict[str, Lane] = {}
        for name, target in settings.targets.items():
            client = (clients or {}).get(name) or ApiClient(target)
            self.lanes[name] = Lane(
                settings=target,
                client=client,
                breaker=CircuitBreaker(settings.breaker),
                bucket=TokenBucket(target.rate_limit) if target.rate_limit else None,
                slots=asyncio.Semaphore(target.max_concurrency),
            )
        self.recorder = Recorder(
            store, settings.relay_id, settings.batch_size, self._unwritable, self._dropped
        )
        self.marks = SendMarks(store)
        self._tasks: set[asyncio.Task[None]] = set()
        # Claims whose request may have left: when it started, and its request number.
        self._sending: dict[tuple[int, uuid.UUID], tuple[datetime, float, int]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self.running = False
        self.delivered = 0  # rows delivered since the engine started
        self.dead = 0  # rows dead-lettered since the engine started
        self.next_due: datetime | None = None  # the earliest retry this engine scheduled
        # time.monotonic() of the last sign of progress: a claim that returned rows, an answer
        # (or a transport error) received, results written. The daemon's health check reads it.
        self._progress_at = time.monotonic()
        self.last_run_ok: datetime | None = None

    @property
    def progress_at(self) -> float:
        """time.monotonic() of the last sign of progress: a claim that returned rows, an answer
        (or a transport error) received, results written."""
        return max(self._progress_at, self.recorder.written_at)

    def _progress(self) -> None:
        self._progress_at = time.monotonic()

    def _unwritable(self, target: str) -> None:
        self.observer.unwritable(target if target in self.lanes else "")

    def _dropped(self, target: str) -> None:
        self.observer.dropped(target if target in self.lanes else "")

    # -- control ---------------------------------------------------------------------------
    def poke(self) -> None:
        """Something new was committed: claim again even if the last claim came back short."""
        self._wake.set()

    def stop(self) -> None:
        """Stop claiming; rows already claimed but not yet sent are released."""
        self._stopping = True
        self._wake.set()

    async def close(self) -> None:
        for lane in self.lanes.values():
            await lane.client.aclose()

    async def shutdown(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for in-flight requests, release the rest, write every result."""
        self.stop()
        if self._tasks:
            _done, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        await self.marks.close()
        await self.recorder.settle()
        for attempt in range(5):
            try:
                await self.recorder.flush()
                break
            except DatabaseError as exc:
                log.error("could not write final results, retrying", extra={"error": str(exc)})
                await asyncio.sleep(0.5 * (attempt + 1))

    @property
    def finished(self) -> int:
        """Rows that reached an end state (delivered or dead) since the engine started."""
        return self.delivered + self.dead

    # -- the drain -------------------------------------------------------------------------
    async def run_once(self) -> int:
        """Drain until nothing is due (or stop); returns the rows finished in this run."""
        self.running = True
        finished_before = self.finished
        try:
            await self.recorder.flush()
            for lane in self.lanes.values():
                lane.exhausted = False
            while not self._stopping:
                woken = self._wake.is_set()
                self._wake.clear()
                if woken:
                    for lane in self.lanes.values():
                        lane.exhausted = False
                claimed_full = await self._claim_round()
                if not self._tasks:
                    await self.recorder.flush()
                    if self._wake.is_set():
                        continue
                    break
                if claimed_full:
                    continue
                waiter = asyncio.ensure_future(self._wake.wait())
                flush_in = max(FLUSH_AFTER - self.recorder.age(), 0.0) if self.recorder.pending else None
                try:
                    await asyncio.wait(
                        {*self._tasks, waiter}, timeout=flush_in, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
                if self.recorder.pending >= self.settings.batch_size or self.recorder.age() >= FLUSH_AFTER:
                    await self.recorder.flush()
            if self._tasks:
                await asyncio.wait(set(self._tasks))
            await self.recorder.flush()
            self.last_run_ok = self.clock()
            return self.finished - finished_before
        finally:
            self.running = False

    async def _claim_round(self) -> bool:
        """Claim for every lane with room; True when some lane got a full batch (more may wait)."""
        full = False
        for lane in self.lanes.values():
            if lane.exhausted or self._stopping:
                continue
            if lane.breaker.state == BreakerState.OPEN and lane.breaker.retry_in() > 0:
                continue
            room = 2 * lane.settings.max_concurrency - lane.held
            want = min(self.settings.batch_size, room)
            if want < min(self.settings.batch_size, lane.settings.max_concurrency) // 2 or want <= 0:
                continue
            if lane.breaker.state != BreakerState.CLOSED:
                if lane.held:
                    continue  # the probe is out: wait for its answer
                want = 1  # one probe decides whether the target is back
            send_now = 0
            if lane.bucket is not None:
                want = min(want, self._rate_room(lane))
                if want <= 0:
                    continue
            elif lane.breaker.state == BreakerState.CLOSED:
                send_now = max(lane.settings.max_concurrency - lane.held, 0)
            rows = await self.store.claim(
                lane.name, want, self.settings.lease, uuid.uuid4(), self.settings.relay_id, send_now
            )
            if rows:
                self._progress()
            lane.exhausted = len(rows) < want
            full = full or (len(rows) == want and lane.breaker.state == BreakerState.CLOSED)
            for row in rows:
                lane.held += 1
                if lane.bucket is not None:
                    lane.waiting.add(row.id)
                task = asyncio.create_task(self._deliver(lane, row))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return full

    def _rate_room(self, lane: Lane) -> int:
        """How many more rows a rate-limited lane may queue for tokens: what its limiter releases
        in half of what a new lease leaves after the request itself, minus the rows still waiting.

        The other half is slack, for a slow claim and for an event loop that wakes a row late.
        Sized to the whole lease, each new row joined the queue at the very edge of its lease
        (the rows ahead of it took all of it), and a few milliseconds of lag sent it back unsent
        with its token spent, again and again. Rows already past the limiter (being sent) do not
        count, so a slow API does not hold the rate below the limit."""
        assert lane.bucket is not None
        usable = (self.settings.lease - lane.settings.request_timeout - LEASE_MARGIN) / 2
        room = int(lane.bucket.current_rate * max(usable, 0.0)) - len(lane.waiting)
        return room if lane.waiting else max(room, 1)

    async def _deliver(self, lane: Lane, row: ClaimedRow) -> None:
        try:
            result, attempts = await self._attempt(lane, row)
        except asyncio.CancelledError:
            # Shutdown timeout: if the request may have been sent, say so, and let another claim
            # find out what became of it.
            self.recorder.add(*self._cut_off(lane, row, "Cancelled", "cut off at shutdown"))
            raise
        except Exception:
            log.exception("unexpected error while delivering", extra={"action_id": row.action_id})
            result, attempts = self._cut_off(lane, row, "InternalError", "cut off by an internal error")
            result = replace(
                result, retry_at=self.clock() + timedelta(seconds=self.settings.retry.base_delay)
            )
        finally:
            lane.held -= 1
            lane.waiting.discard(row.id)
            self._sending.pop((row.id, row.token), None)
        self.recorder.add(result, attempts)
        if result.state == "pending" and result.retry_at is not None:
            self.next_due = result.retry_at if self.next_due is None else min(self.next_due, result.retry_at)
        self._report_lane(lane)
        if self.recorder.pending >= self.settings.batch_size and not self.recorder.backing_off():
            try:
                await self.recorder.flush()
            except DatabaseError as exc:
                if self.recorder.failures == 1:
                    log.warning(
                        "could not write results yet; keeping them and retrying", extra={"error": str(exc)}
                    )

    def _release(self, row: ClaimedRow, delay: float = 0.0) -> RowResult:
        return RowResult(
            row.id, row.token, "pending", self.clock() + timedelta(seconds=delay), action_id=row.action_id
        )

    def _cut_off(
        self, lane: Lane, row: ClaimedRow, code: str, why: str
    ) -> tuple[RowResult, list[AttemptRecord]]:
        """The row's delivery stopped half-way: released, and if its request may have left, an
        attempt row with the outcome ``unknown`` says so."""
        sending = self._sending.get((row.id, row.token))
        if sending is None:
            return self._release(row), []
        started_at, start, number = sending
        attempt = AttemptRecord(
            update_id=row.id,
            claim_token=row.token,
            action_id=row.action_id,
            target=lane.name,
            attempt=number,
            started_at=started_at,
            duration_ms=(time.perf_counter() - start) * 1000.0,
            http_status=None,
            outcome="unknown",
            error_code=code,
            reached_api="maybe",
            error_message=f"the request was {why} before its answer arrived; it may have reached the API",
            response_body=None,
        )
        result = RowResult(
            row.id,
            row.token,
            "pending",
            self.clock(),
            requests=number - row.requests,
            unknown=True,
            last_error=attempt.error_message,
            action_id=row.action_id,
        )
        return result, [attempt]

    def _needs(self, lane: Lane) -> float:
        """Lease seconds a request needs when it leaves: its deadline plus a margin to record it."""
        return lane.settings.request_timeout + LEASE_MARGIN

    def _left(self, row: ClaimedRow) -> float:
        return (row.lease_until - self.clock()).total_seconds()

    async def _attempt(self, lane: Lane, row: ClaimedRow) -> tuple[RowResult, list[AttemptRecord]]:
        async with lane.slots:
            if self._stopping:
                return self._release(row), []
            if not lane.breaker.allow():
                return self._release(row, lane.breaker.retry_in()), []
            self._report_lane(lane)  # a probe may have just left the pause
            if lane.bucket is not None:
                wait = lane.bucket.wait_time()
                if wait + self._needs(lane) > self._left(row):  # would outlive the lease: give it back
                    lane.breaker.release_probe()
                    return self._release(row, wait), []
                await lane.bucket.acquire()
                lane.waiting.discard(row.id)
            lane.count_request()
            if self._left(row) < self._needs(lane) or self._stopping:
                lane.breaker.release_probe()
                return self._release(row), []
            try:
                token = await lane.client.tokens.token()
            except AuthError as exc:
                self._pause(lane, f"cannot get a token: {exc}")
                return self._release(row, lane.breaker.retry_in()), []
            if self._left(row) < self._needs(lane) or self._stopping:  # the token took long
                lane.breaker.release_probe()
                return self._release(row), []
            if not row.marked and not await self.marks.mark((row.id, row.token)):
                lane.breaker.release_probe()
                return self._release(row, LEASE_MARGIN), []
            body = request_body(row.status, row.errors)
            attempts: list[AttemptRecord] = []
            sent, begun = await self._send(lane, row, body, token, len(attempts))
            decision = self._classify(lane, row, sent, begun, can_reauth=lane.client.tokens.can_renew)
            if decision.verdict == Verdict.REAUTH:
                attempts.append(self._attempt_row(lane, row, len(attempts), sent, decision))
                renewed = True
                try:
                    fresh = await lane.client.tokens.renew(token)
                except AuthError as exc:
                    fresh, renewed = None, False
                    log.error(
                        "token renewal failed", extra={"target": lane.name, "error": one_line(exc, 500)}
                    )
                if fresh and fresh != token:
                    if self._left(row) < self._needs(lane) or self._stopping:  # the renewal took long
                        released = RowResult(
                            row.id,
                            row.token,
                            "pending",
                            self.clock(),
                            requests=len(attempts),
                            http_status=sent.answer.status,
                            last_error=decision.reason,
                            action_id=row.action_id,
                        )
                        return released, attempts
                    sent, begun = await self._send(lane, row, body, fresh, len(attempts))
                # A refusal met without a token that works is the target's, never the row's own,
                # whatever other rows were accepted meanwhile (a token that expired in flight).
                decision = self._classify(lane, row, sent, begun, can_reauth=False, own_possible=renewed)
            attempts.append(self._attempt_row(lane, row, len(attempts), sent, decision))
            return self._settle(lane, row, decision, len(attempts), sent.answer.status), attempts

    async def _send(
        self, lane: Lane, row: ClaimedRow, body: bytes, token: str | None, made: int
    ) -> tuple[Sent, float]:
        """One PUT; returns what came back and when (time.monotonic()) it started."""
        begun = time.monotonic()
        self._sending[(row.id, row.token)] = (datetime.now(UTC), time.perf_counter(), row.requests + made + 1)
        sent = await lane.client.put(row.action_id, body, token)
        self._progress()
        status = sent.answer.status
        if status is not None and (200 <= status < 300 or status in _PAST_AUTH):
            # When it started, not when it came back: credentials accepted for a request sent
            # after another one began say nothing about a token that expired in between.
            lane.accepted_at = max(lane.accepted_at, begun)
        return sent, begun

    def _classify(
        self,
        lane: Lane,
        row: ClaimedRow,
        sent: Sent,
        begun: float,
        *,
        can_reauth: bool,
        own_possible: bool = True,
    ) -> Decision:
        return classify(
            sent.answer,
            attempts=row.attempts,
            earlier_unknown=row.outcome_unknown,
            created_at=row.budget_from,
            now=self.clock(),
            policy=self.settings.retry,
            rand=self.rand,
            can_reauth=can_reauth,
            others_accepted=own_possible and lane.accepted_at > min(begun, lane.refused.get(row.id, begun)),
        )

    def _attempt_row(
        self, lane: Lane, row: ClaimedRow, index: int, sent: Sent, decision: Decision
    ) -> AttemptRecord:
        self.observer.request(lane.name, decision.outcome, sent.duration_ms / 1000.0)
        return AttemptRecord(
            update_id=row.id,
            claim_token=row.token,
            action_id=row.action_id,
            target=lane.name,
            attempt=row.requests + index + 1,
            started_at=sent.started_at,
            duration_ms=sent.duration_ms,
            http_status=sent.answer.status,
            outcome=decision.outcome,
            error_code=decision.error_code,
            error_message=decision.error_message,
            response_body=storable_bytes(sent.answer.body, RESPONSE_BODY_LIMIT) or None,
            reached_api=reached_api(sent.answer),
        )

    def _settle(
        self, lane: Lane, row: ClaimedRow, decision: Decision, requests: int, status: int | None
    ) -> RowResult:
        result = RowResult(
            row.id,
            row.token,
            "pending",
            decision.retry_at,
            charged=1 if decision.charged else 0,
            requests=requests,
            unknown=decision.outcome_unknown,
            http_status=status,
            last_error=None if decision.verdict == Verdict.DELIVERED else decision.reason,
            action_id=row.action_id,
        )
        if decision.verdict in (Verdict.DELIVERED, Verdict.DEAD):
            lane.refused.pop(row.id, None)
        if decision.verdict == Verdict.DELIVERED:
            lane.breaker.record_success()
            lane.succeeded()
            self.delivered += 1
            self.observer.delivered(lane.name, (self.clock() - row.created_at).total_seconds())
            return replace(result, state="delivered", retry_at=None)
        if decision.verdict == Verdict.PAUSE:  # not charged: back to pending until the pause ends
            lane.refused_row(row.id, time.monotonic())
            self._pause(lane, decision.reason)
            # A little after the pause ends, so that another row probes first: if this refusal is
            # the row's own, the probe succeeds, and this row is then judged among accepted ones.
            later = lane.breaker.retry_in() + self.settings.breaker.open_for
            return replace(result, retry_at=self.clock() + timedelta(seconds=later))
        if decision.transient:
            lane.breaker.record_failure()
            if decision.throttled:
                lane.throttle()
        else:
            lane.breaker.record_success()
        if decision.verdict == Verdict.DEAD:
            self.dead += 1
            self.observer.dead(lane.name)
            log.warning(
                "row dead-lettered",
                extra={"action_id": row.action_id, "target": lane.name, "reason": decision.reason},
            )
            return replace(result, state="dead", retry_at=None)
        return result

    def _pause(self, lane: Lane, reason: str) -> None:
        """The target refuses us (401/403, no token): paused at once, probed with backoff."""
        lane.breaker.hold(reason)
        self._report_lane(lane, logging.ERROR)

    def report_lane(self, lane: Lane) -> None:
        """A lane's breaker was changed from outside the engine (a pause shared by another relay)."""
        self._report_lane(lane)

    def _report_lane(self, lane: Lane, level: int = logging.WARNING) -> None:
        """Log and announce a change of the lane's state, once per change.

        Serving → paused is logged at ``level`` (ERROR for refused credentials, WARNING for the
        breaker opening on transient failures), paused → serving at INFO (``target resumed``).
        Probes and refused probes in between (paused ↔ probing) are logged at DEBUG only: a long
        pause is recalled by the daemon's reminders, not once per probe.
        """
        state, reason = lane.state()
        if state == lane.last_state:
            return
        before, lane.last_state = lane.last_state, state
        self.observer.circuit(lane.name, lane.breaker.state.value)
        now = time.monotonic()
        if state == "serving":
            paused_for = now - lane.paused_since if lane.paused_since is not None else 0.0
            lane.paused_since = None
            log.info("target resumed", extra={"target": lane.name, "paused_for": human_duration(paused_for)})
        elif before == "serving":
            lane.paused_since = now
            next_probe = human_duration(lane.breaker.retry_in())
            log.log(
                level,
                "target paused",
                extra={"target": lane.name, "reason": reason, "next_probe_in": next_probe},
            )
        elif state == "probing":
            log.debug("probing target", extra={"target": lane.name})
        else:
            next_probe = human_duration(lane.breaker.retry_in())
            log.debug(
                "probe failed", extra={"target": lane.name, "reason": reason, "next_probe_in": next_probe}
            )
        if self.on_state_change is not None:
            self.on_state_change(lane.name, state)

    def lane_states(self) -> list[tuple[str, str, str | None]]:
        return [(name, *lane.state()) for name, lane in self.lanes.items()]

    def paused_for(self) -> dict[str, float]:
        """Seconds each target has not been serving (paused or probing) for, by name; serving
        targets are left out."""
        now = time.monotonic()
        lanes = self.lanes.items()
        return {name: now - lane.paused_since for name, lane in lanes if lane.paused_since is not None}
