"""Retention: finished rows deleted in batches through ``outbox.purge_finished``.

Used by ``outbox-relay purge`` and by the daemon's retention job (``retention`` setting).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from relay.pg.store import Store
from relay.settings import PURGE_BATCH

Progress = Callable[[int, int, int], None]  # (batch number, updates deleted, attempts deleted)


async def purge(
    store: Store,
    older_than: float,
    include_dead: bool,
    batch_size: int = PURGE_BATCH,
    *,
    progress: Progress | None = None,
) -> int:
    """Delete delivered rows (and dead ones with ``include_dead``) finished more than ``older_than``
    seconds ago (at least one hour, ``settings.PURGE_MIN_AGE``: PostgreSQL refuses less), with their attempts,
    ``batch_size`` rows per transaction, through ``outbox.purge_finished``. Rows another
    transaction holds are skipped, pending and in-flight rows are never touched. Returns the
    number of updates deleted; ``progress(batch, updates, attempts)`` is called per batch."""
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
