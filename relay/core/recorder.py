"""Results of claimed rows, collected as answers arrive and written in batches.

Each write is guarded in SQL by the claim's fencing token (``updates_record``): a row whose
lease ran out and was claimed again is never overwritten by a late answer.

What can go wrong with a write, and what happens then:

* PostgreSQL is unreachable (:class:`~relay.errors.DatabaseError`): everything is kept for the
  next flush, and the error is raised to the caller.
* PostgreSQL answered but refused the batch (:class:`~relay.errors.WriteRefused`): the batch is
  written again row by row, so one unwritable result never blocks the others. A row whose own
  result is still refused is released for a later attempt, with only what is certain (a request
  was made, its outcome is not recorded) and the reason in ``last_error``; the observer's
  ``unwritable`` counts it.
* A row is no longer in the database (deleted while in flight, or never replicated to a standby
  promoted in a failover): the statement writes nothing for it, neither its state nor its
  attempt rows (an attempt of a row the database does not hold is an orphan), and the flush
  reports it once: one log line with the count, and the observer's ``dropped`` per row.
* The caller is cancelled (shutdown, a timeout around a drain): the write runs in a task of its
  own, shielded, so results taken out of the buffers are written or put back, never dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from uuid import UUID

from relay.errors import DatabaseError, WriteRefused
from relay.pg.store import AttemptRecord, Recorded, RowResult, Store
from relay.sanitize import one_line

log = logging.getLogger("relay.engine")

# A row whose result could not be recorded is offered again after this many seconds.
RELEASE_AFTER = 2.0


def _count_unwritable(target: str) -> None:
    pass


def _count_dropped(target: str) -> None:
    pass


@dataclass
class Recorder:
    """Collects row results and attempt rows; writes them in batches."""

    store: Store
    relay_id: str
    batch_size: int
    unwritable: Callable[[str], None] = _count_unwritable  # called once per row released unwritten
    dropped: Callable[[str], None] = _count_dropped  # called once per row the database does not hold
    results: list[RowResult] = field(default_factory=list)
    attempts: list[AttemptRecord] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _since: float = 0.0  # time.monotonic() of the oldest result not yet written
    failures: int = 0  # consecutive failed writes
    _failed_at: float = 0.0
    written_at: float = 0.0  # time.monotonic() of the last successful write
    refused: int = 0  # rows released because their result could not be stored
    gone: int = 0  # rows whose results were dropped: the database does not hold them
    _gone_now: set[int] = field(default_factory=set)  # ids dropped by the flush under way
    _writes: set[asyncio.Task[int]] = field(default_factory=set)

    def add(self, result: RowResult | None, attempts: list[AttemptRecord]) -> None:
        if result is not None:
            if not self.results:
                self._since = time.monotonic()
            self.results.append(result)
        self.attempts.extend(attempts)

    def age(self) -> float:
        return time.monotonic() - self._since if self.results else 0.0

    @property
    def pending(self) -> int:
        return len(self.results)

    def backing_off(self) -> bool:
        """After a failed write, opportunistic flushes wait a second (the drain loop still tries)."""
        return self.failures > 0 and time.monotonic() - self._failed_at < 1.0

    async def flush(self) -> int:
        """Write what was collected; on a database error keep it for the next flush and raise.

        Returns the rows whose result was recorded (a row whose lease ran out is not).
        """
        task = asyncio.ensure_future(self._flush())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    async def settle(self) -> None:
        """Wait for writes still running after their caller was cancelled."""
        if self._writes:
            await asyncio.wait(set(self._writes))

    def _keep(self, results: list[RowResult], attempts: list[AttemptRecord]) -> None:
        self.results[:0], self.attempts[:0] = results, attempts
        if results:
            self._since = min(self._since, time.monotonic()) if self._since else time.monotonic()
        self.failures += 1
        self._failed_at = time.monotonic()

    async def _flush(self) -> int:
        async with self._lock:
            if not self.results and not self.attempts:
                return 0
            results, attempts = self.results, self.attempts
            self.results, self.attempts = [], []
            try:
                try:
                    recorded = await self._write(results, attempts)
                except WriteRefused as exc:
                    log.warning(
                        "a batch of results was refused; writing them one by one",
                        extra={"rows": len(results), "error": one_line(exc, 300)},
                    )
                    recorded = await self._one_by_one(results, attempts)
                except DatabaseError:
                    self._keep(results, attempts)
                    raise
            finally:
                dropped = self._report_gone(attempts)
            if self.failures:
                log.info("results written again after %d failed attempts", self.failures)
            self.failures = 0
            self.written_at = time.monotonic()
            lost = len(results) - recorded - sum(1 for r in results if r.id in dropped)
            if lost:
                log.warning(
                    "results discarded: the lease ran out and the rows were claimed again",
                    extra={"rows": lost},
                )
            return recorded

    async def _write(self, results: list[RowResult], attempts: list[AttemptRecord]) -> int:
        done: Recorded = await self.store.record_batch(results, attempts, self.relay_id)
        self._gone_now.update(done.dropped)
        return done.recorded

    def _report_gone(self, attempts: list[AttemptRecord]) -> set[int]:
        """One log line and the observer's ``dropped`` per row for the ids this flush dropped."""
        gone, self._gone_now = self._gone_now, set()
        if not gone:
            return gone
        targets = {a.update_id: a.target for a in attempts}
        for update_id in gone:
            self.dropped(targets.get(update_id, ""))
        self.gone += len(gone)
        log.warning(
            "results dropped: rows not in this database (deleted, or lost in a failover)",
            extra={"rows": len(gone), "update_ids": one_line(sorted(gone), 300)},
        )
        return gone

    async def _one_by_one(self, results: list[RowResult], attempts: list[AttemptRecord]) -> int:
        """Each result with its own attempt rows, in a write of its own (the lock is held)."""
        own: dict[tuple[int, UUID], list[AttemptRecord]] = {}
        for attempt in attempts:
            own.setdefault((attempt.update_id, attempt.claim_token), []).append(attempt)
        items: list[tuple[RowResult | None, list[AttemptRecord]]] = [
            (result, own.pop((result.id, result.token), [])) for result in results
        ]
        items += [(None, rest) for rest in own.values()]
        recorded = 0
        for index, (result, rows) in enumerate(items):
            try:
                recorded += await self._write_one(result, rows)
            except DatabaseError:  # unreachable now: keep what is left for the next flush
                rest = items[index:]
                self._keep([r for r, _ in rest if r is not None], [a for _, aa in rest for a in aa])
                raise
        return recorded

    async def _write_one(self, result: RowResult | None, attempts: list[AttemptRecord]) -> int:
        try:
            return await self._write([result] if result else [], attempts)
        except WriteRefused as exc:
            reason = one_line(exc, 300)
        update_id = result.id if result is not None else attempts[0].update_id
        target = attempts[0].target if attempts else ""
        self.refused += 1
        self.unwritable(target)
        log.error(
            "a result could not be recorded; releasing the row for a later attempt",
            extra={"update_id": update_id, "target": target, "error": reason},
        )
        note = f"the answer could not be recorded ({reason}); the request may have been applied"
        plain = [
            replace(a, outcome="unknown", error_code="UNRECORDABLE", error_message=note, response_body=None)
            for a in attempts
        ]
        released: list[RowResult] = []
        if result is not None:
            retry_at = datetime.now(UTC) + timedelta(seconds=RELEASE_AFTER)
            unknown = result.unknown or result.requests > 0
            last_error = f"the result could not be recorded: {reason}"
            released.append(
                replace(result, state="pending", retry_at=retry_at, unknown=unknown, last_error=last_error)
            )
        try:
            return await self.store.record(released, plain, self.relay_id)
        except WriteRefused as again:
            log.error(
                "the row could not even be released; its lease will return it",
                extra={"update_id": update_id, "target": target, "error": one_line(again, 300)},
            )
            return 0
