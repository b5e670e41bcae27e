"""The store's connection pool (:mod:`relay.pg.pool`) against a real PostgreSQL.

Counted on the server: never more sessions than the pool's size however many callers race for
them; a session whose state is unknown (cancelled half-way, terminated by the server) is never
handed out again, and a caller's slot always comes back; a refused statement keeps its session.
"""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from relay.pg.pool import Pool, PoolTimeout
from relay.settings import Secret, database_params
from tests.relaykit import until


def _pool(database_url: str, size: int, timeout: float = 30.0) -> tuple[Pool, str]:
    name = f"pool-test-{uuid.uuid4().hex[:8]}"
    params = {**database_params(Secret(database_url)), "application_name": name}
    return Pool(params, size=size, timeout=timeout), name


def _sessions(db: psycopg.Connection, name: str) -> int:
    row = db.execute("select count(*) from pg_stat_activity where application_name = %s", (name,)).fetchone()
    assert row is not None
    return int(row[0])


async def _pid(pool: Pool, sleep: float = 0.0) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("select pg_backend_pid(), pg_sleep(%s)", (sleep,))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_forty_racing_callers_share_three_sessions(database_url: str, db: psycopg.Connection) -> None:
    pool, name = _pool(database_url, size=3)
    most = 0

    async def one() -> int:
        nonlocal most
        async with pool.connection() as conn:
            most = max(most, pool.checked_out)
            cur = await conn.execute("select pg_backend_pid(), pg_sleep(0.02)")
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

    try:
        pids = await asyncio.gather(*(one() for _ in range(40)))
        assert len(pids) == 40
        assert len(set(pids)) == 3  # every session reused, none beyond the size
        assert most == 3
        assert (pool.checked_out, pool.idle) == (0, 3)
        assert _sessions(db, name) == 3
    finally:
        await pool.close()
    await until(lambda: _sessions(db, name) == 0, 10, "the pool's sessions to close")


async def test_a_caller_waits_at_most_the_timeout_for_a_session(database_url: str) -> None:
    pool, _ = _pool(database_url, size=1, timeout=0.3)
    try:
        async with pool.connection():
            with pytest.raises(PoolTimeout, match=r"no database connection free after 0\.3 s"):
                async with pool.connection():
                    pass
        assert pool.checked_out == 0
        await _pid(pool)  # the slot came back
    finally:
        await pool.close()


async def test_a_cancelled_statement_gives_back_its_slot_and_never_its_session(
    database_url: str, db: psycopg.Connection
) -> None:
    pool, name = _pool(database_url, size=1, timeout=5)
    try:
        first = await _pid(pool)
        stuck = asyncio.create_task(_pid(pool, sleep=30))
        await until(
            lambda: (
                db.execute(
                    "select count(*) from pg_stat_activity where pid = %s and state = 'active'", (first,)
                ).fetchone()
                == (1,)
            ),
            10,
            "the long statement to start on the server",
        )
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        assert pool.checked_out == 0
        second = await _pid(pool)  # the one slot is free again, on a new session
        assert second != first
        await until(
            lambda: (
                db.execute("select count(*) from pg_stat_activity where pid = %s", (first,)).fetchone()
                == (0,)
            ),
            10,
            "the cancelled session to be closed",
        )
        assert _sessions(db, name) == 1
    finally:
        await pool.close()


async def test_a_session_the_server_ended_is_replaced(database_url: str, db: psycopg.Connection) -> None:
    pool, _ = _pool(database_url, size=1)
    try:
        first = await _pid(pool)
        db.execute("select pg_terminate_backend(%s)", (first,))
        with pytest.raises(psycopg.OperationalError):  # the caller that finds it dead is told so
            await _pid(pool)
        second = await _pid(pool)
        assert second != first
    finally:
        await pool.close()


async def test_when_the_server_went_away_one_caller_finds_out_not_one_per_pooled_session(
    database_url: str, db: psycopg.Connection
) -> None:
    # What a failover does to the pool: every idle session goes to a server that is gone.
    pool, name = _pool(database_url, size=3)
    try:
        pids = set(await asyncio.gather(*(_pid(pool, 0.2) for _ in range(3))))
        assert len(pids) == 3 and pool.idle == 3
        db.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s", (name,)
        )
        await until(lambda: _sessions(db, name) == 0, 10, "the sessions to end")
        with pytest.raises(psycopg.OperationalError):
            await _pid(pool)
        assert pool.idle == 0  # the other idle sessions went with the one found dead
        assert {await _pid(pool) for _ in range(3)}.isdisjoint(pids)  # the next callers are served
    finally:
        await pool.close()


async def test_a_refused_statement_keeps_its_session(database_url: str) -> None:
    pool, _ = _pool(database_url, size=1)
    try:
        first = await _pid(pool)
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with pool.connection() as conn:
                await conn.execute("select 1 / 0")
        assert await _pid(pool) == first
    finally:
        await pool.close()


async def test_a_session_left_in_a_transaction_is_not_reused(database_url: str) -> None:
    pool, _ = _pool(database_url, size=1)
    try:
        async with pool.connection() as conn:
            await conn.execute("begin")
            cur = await conn.execute("select pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None
            first = int(row[0])
        assert await _pid(pool) != first
    finally:
        await pool.close()


async def test_a_closed_pool_refuses_new_callers_and_closes_sessions_given_back(
    database_url: str, db: psycopg.Connection
) -> None:
    pool, name = _pool(database_url, size=2)
    async with pool.connection() as held:
        await _pid(pool)  # one idle session besides the held one
        assert _sessions(db, name) == 2
        await pool.close()
        await until(lambda: _sessions(db, name) == 1, 10, "the idle session to close")
        await held.execute("select 1")  # still the caller's until given back
    await until(lambda: _sessions(db, name) == 0, 10, "the held session to close when given back")
    with pytest.raises(psycopg.OperationalError, match="pool is closed"):
        await _pid(pool)
