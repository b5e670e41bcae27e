"""Re-queueing dead updates: ``outbox-relay dead retry`` and the web console's redrive.

One rule for both: only dead rows are touched, through ``outbox.requeue_dead`` (granted to
``outbox_operator``; a trigger records who and when in the row and in ``outbox.requeues``),
``batch_size`` rows per transaction, and the relays are woken up afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay.settings import RETRY_BATCH

if TYPE_CHECKING:
    from relay.pg.store import Store


@dataclass
class Requeued:
    count: int = 0
    action_ids: set[str] = field(default_factory=set)  # only collected when action ids were named


async def retry_dead(
    store: Store,
    *,
    action_ids: list[str] | None,
    target: str | None,
    code: str | None,
    reason: str,
    batch_size: int = RETRY_BATCH,
) -> Requeued:
    """Put matching dead rows back to pending, ``batch_size`` per transaction, then wake the relays."""
    done = Requeued()
    after = 0
    while True:
        batch = await store.dead_retry_batch(
            after=after, reason=reason, limit=batch_size, action_ids=action_ids, target=target, code=code
        )
        if not batch:
            break
        done.count += len(batch)
        if action_ids:
            done.action_ids.update(r["action_id"] for r in batch)
        after = max(r["id"] for r in batch)
    if done.count:
        await store.notify_relays()
    return done
