"""Results of claimed rows, collected as answers arrive and written in batches.

Each write is guarded in SQL by the claim's fencing token (``updates_record``): a row whose
lease ran out and was claimed again is never overwritten by a late answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from relay.errors import DatabaseError
from relay.store import AttemptRecord, RowResult, Store

log = logging.getLogger("relay.engine")


@dataclass
class Recorder:
    """Collects row results and attempt rows; writes them in batches."""

    store: Store
    relay_id: str
    batch_size: int
    results: list[RowResult] = field(default_factory=list)
    attempts: list[AttemptRecord] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _since: float = 0.0  # time.monotonic() of the oldest result not yet written
    failures: int = 0  # consecutive failed writes
    _failed_at: float = 0.0

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
        """Write what was collected; on a database error keep it for the next flush and raise."""
        async with self._lock:
            if not self.results and not self.attempts:
                return 0
            results, attempts = self.results, self.attempts
            self.results, self.attempts = [], []
            try:
                recorded = await self.store.record(results, attempts, self.relay_id)
            except DatabaseError:
                self.results[:0], self.attempts[:0] = results, attempts
                self._since = min(self._since, time.monotonic()) if self._since else time.monotonic()
                self.failures += 1
                self._failed_at = time.monotonic()
                raise
            if self.failures:
                log.info("results written again after %d failed attempts", self.failures)
            self.failures = 0
            lost = len(results) - recorded
            if lost:
                log.warning(
                    "results discarded: the lease ran out and the rows were claimed again",
                    extra={"rows": lost},
                )
            return recorded
