"""Retention and upkeep of the ledger: partitions made ahead, the report rollup, old rows removed.

``outbox.delivery_attempts`` is partitioned by month of ``started_at`` (migration 0006). The
daemon's maintenance job (:func:`maintain`, at start and hourly) creates next months' partitions
and counts ended days into ``outbox.daily_reports``. Retention (:func:`cycle`: the ``retention``
setting's hourly job and ``outbox-relay purge``) deletes finished updates in batches through
``outbox.purge_finished``, then drops the attempt partitions that ended before the cutoff, one per
transaction, through ``outbox.drop_old_attempts``: no attempt row is deleted one by one, except
the few the default partition holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from relay.pg.store import Store
from relay.settings import PURGE_BATCH

Progress = Callable[[int, int, int], None]  # (batch number, updates deleted, attempts deleted)
Dropped = Callable[[str, int, int], None]  # (partition, attempt rows dropped, rows kept)

MONTHS_AHEAD = 2  # partitions exist for this month and the next two
ROLLUP_DAYS = 31  # days counted per transaction by the rollup


@dataclass
class Maintained:
    """What one maintenance run did."""

    partitions: list[str] = field(default_factory=list)  # created
    days: int = 0  # counted into the rollup


@dataclass
class Retained:
    """What one retention cycle removed."""

    updates: int = 0
    partitions: list[tuple[str, int, int]] = field(default_factory=list)  # (name, dropped, kept)

    @property
    def attempts(self) -> int:
        return sum(dropped - kept for _, dropped, kept in self.partitions)


async def maintain(store: Store, months_ahead: int = MONTHS_AHEAD) -> Maintained:
    """Create the coming months' attempt partitions, then count every ended day not counted yet."""
    done = Maintained(partitions=await store.ensure_partitions(months_ahead))
    while True:
        days = await store.rollup_reports(ROLLUP_DAYS)
        done.days += len(days)
        if len(days) < ROLLUP_DAYS:
            return done


async def purge(
    store: Store,
    older_than: float,
    include_dead: bool,
    batch_size: int = PURGE_BATCH,
    *,
    progress: Progress | None = None,
) -> int:
    """Delete delivered updates (and dead ones with ``include_dead``) finished more than
    ``older_than`` seconds ago (at least one hour, ``settings.PURGE_MIN_AGE``: PostgreSQL
    refuses less), ``batch_size`` rows per transaction, through ``outbox.purge_finished``.
    Rows another transaction holds are skipped, pending and in-flight rows are never touched,
    delivered rows wait until their day is counted in the rollup. Their attempt rows stay until
    their partition is dropped (:func:`drop_attempts`). Returns the number of updates deleted;
    ``progress(batch, updates, attempts)`` is called per batch."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    total = batch = 0
    state: str | None = "delivered"
    start: datetime | None = None
    while state is not None:
        updates, attempts, state, start = await store.purge_batch(
            older_than, include_dead, batch_size, state, start
        )
        if updates:
            batch += 1
            total += updates
            if progress is not None:
                progress(batch, updates, attempts)
    return total


async def drop_attempts(
    store: Store, older_than: float, *, dropped: Dropped | None = None
) -> list[tuple[str, int, int]]:
    """Drop every attempt partition that ended more than ``older_than`` seconds ago, one per
    transaction, keeping the rows of updates that still exist; then the default partition's
    rows of that age whose update is gone. Returns (partition, rows dropped, rows kept)."""
    done: list[tuple[str, int, int]] = []
    while (step := await store.drop_old_attempts(older_than)) is not None:
        done.append(step)
        if dropped is not None:
            dropped(*step)
    return done


async def cycle(
    store: Store,
    older_than: float,
    include_dead: bool,
    batch_size: int = PURGE_BATCH,
    *,
    progress: Progress | None = None,
    dropped: Dropped | None = None,
) -> Retained:
    """One retention cycle: :func:`purge` the updates, then :func:`drop_attempts` (in that
    order: the updates deleted are what makes their attempt rows droppable)."""
    updates = await purge(store, older_than, include_dead, batch_size, progress=progress)
    return Retained(updates, await drop_attempts(store, older_than, dropped=dropped))
