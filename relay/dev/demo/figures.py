"""The demo's figures, read from the outbox with the demo's own named queries (``queries.sql``)."""

from __future__ import annotations

from typing import Any

from relay.pg.store import NamedQueries, Store

QUERIES = NamedQueries("relay.dev.demo")


async def counts(store: Store) -> dict[str, int]:
    """Rows per state: ``pending``, ``in_flight``, ``delivered``, ``dead``."""
    rows = await store.fetch(QUERIES, "demo_counts")
    return {str(k): int(v) for k, v in rows[0].items()}


async def summary(store: Store) -> dict[str, Any]:
    """Attempt counts by outcome and commit-to-delivery latency percentiles (ms, None if none)."""
    return (await store.fetch(QUERIES, "demo_summary"))[0]


async def outcomes(store: Store) -> list[dict[str, Any]]:
    """Every update's ``action_id``, ``state`` and ``delivered_on_404``, in id order."""
    return await store.fetch(QUERIES, "demo_outcomes")


async def retried_example(store: Store) -> str | None:
    """The action id of a delivered update that needed more than one request, if any."""
    rows = await store.fetch(QUERIES, "demo_retried_example")
    return str(rows[0]["action_id"]) if rows else None
