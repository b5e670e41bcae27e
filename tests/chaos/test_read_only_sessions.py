"""A session opened while the database was read-only stays read-only: the store must drop it.

The regression test behind the ``read_only`` scenario of ``test_steady_load.py``: before the
fix, a relay whose pooled sessions were opened during a read-only spell failed every claim
("cannot execute UPDATE in a read-only transaction") for ever after the database was writable
again.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

from relay.errors import DatabaseError
from relay.pg.store import Store
from relay.settings import Secret
from tests.chaos.kit import admin_url, database_name

pytestmark = pytest.mark.chaos


async def test_sessions_opened_read_only_are_dropped_once_it_is_over(database_url: str) -> None:
    name = database_name(database_url)
    store = Store(Secret(database_url), pool_size=4)
    try:
        with psycopg.connect(admin_url(database_url), autocommit=True) as admin:
            admin.execute(f'alter database "{name}" set default_transaction_read_only = on')
            try:
                # Read-only sessions that work (a SELECT) go back to the pool, read-only for life.
                await store.backlog()
                with pytest.raises(DatabaseError, match="read-only"):
                    await store.claim("default", 1, 30.0, uuid.uuid4(), "chaos")
                await store.backlog()
            finally:
                admin.execute(f'alter database "{name}" reset default_transaction_read_only')
        outcomes = []
        for _ in range(6):
            try:
                await store.claim("default", 1, 30.0, uuid.uuid4(), "chaos")
                outcomes.append("ok")
            except DatabaseError as exc:
                outcomes.append(str(exc))
        # A stale session may fail once (then it is dropped); never for ever.
        assert outcomes[-3:] == ["ok"] * 3, outcomes
    finally:
        await store.close()
