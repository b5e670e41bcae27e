"""The engine end to end: real PostgreSQL, the sandbox API on loopback, counted results."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from relay.engine import Engine
from relay.sandbox import Sandbox, SandboxConfig
from relay.store import Store
from tests.relaykit import expected_bodies, relay_settings, sample_updates, seed_rows, states


@pytest.fixture
def sandbox() -> Sandbox:
    with Sandbox(SandboxConfig(seed=1)) as sb:
        yield sb


async def _drain(database_url: str, api_url: str, rounds: int = 200, **extra: str) -> Engine:
    settings = relay_settings(database_url, api_url, **extra)
    store = Store(settings.require_database_url())
    engine = Engine(settings, store)
    try:
        for _ in range(rounds):
            await engine.run_once()
            s = states(database_url)
            if not s.get("pending") and not s.get("in_flight"):
                break
            await asyncio.sleep(0.05)
    finally:
        await engine.close()
        await store.close()
    return engine


async def test_2000_rows_each_received_exactly_once_with_the_stored_body(database_url: str, sandbox: Sandbox) -> None:
    updates = sample_updates(2000)
    seed_rows(database_url, updates)
    await _drain(database_url, sandbox.url)
    assert states(database_url) == {"delivered": 2000}
    assert sandbox.applied == expected_bodies(updates)
    assert max(sandbox.apply_count.values()) == 1
    assert sandbox.duplicates == 0
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "select count(*), count(distinct update_id), min(attempt), max(attempt), "
            "bool_and(outcome = 'delivered' and http_status = 204) from outbox.delivery_attempts"
        ).fetchone()
        assert rows == (2000, 2000, 1, 1, True)
        assert conn.execute(
            "select count(*) from outbox.action_status_updates where attempts = 1 and requests = 1 "
            "and delivered_at is not null and claim_token is null and last_http_status = 204"
        ).fetchone() == (2000,)
