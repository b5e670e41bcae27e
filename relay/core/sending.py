"""Marks claimed rows as "being sent" in PostgreSQL before their requests leave.

A relay killed between sending a request and recording its answer leaves a row whose request
may have reached the API. The mark (``sending_at``, set under the claim's token) is what lets
the next claim tell that row apart from one that was held but never sent: only the former is
treated as ambiguous (``outcome_unknown``, an attempt row with the outcome ``unknown``).

Marks are group-committed: every sender that asks while a write is out joins the next write, so
a busy relay pays one short statement per batch of requests, not one per request. The claim
itself marks the rows it can send at once, so a lone new row costs no extra round trip.
"""

from __future__ import annotations

import asyncio
import logging
from uuid import UUID

from relay.pg.store import Store
from relay.sanitize import one_line

log = logging.getLogger("relay.engine")

Claim = tuple[int, UUID]


class SendMarks:
    """Group-committed ``updates_mark_sending`` writes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._waiting: list[tuple[Claim, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def mark(self, claim: Claim) -> bool:
        """True once the row is marked under its claim; False when it must not be sent (the
        claim was lost, or the database could not be reached)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((claim, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
        return await future

    async def _write(self) -> None:
        await asyncio.sleep(0)  # let the senders released in the same loop turn join this write
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                held = await self.store.mark_sending([claim for claim, _ in batch])
            except Exception as exc:  # the database is unreachable, or refused: do not send
                log.warning(
                    "could not mark rows as being sent; they wait", extra={"error": one_line(exc, 300)}
                )
                held = set()
            for (update_id, _), future in batch:
                if not future.done():
                    future.set_result(update_id in held)

    async def close(self) -> None:
        if self._writer is not None and not self._writer.done():
            await asyncio.wait({self._writer})
