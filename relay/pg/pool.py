"""A small pool of psycopg connections for the store: a fixed number of autocommit sessions.

What the relay needs from a pool, and no more: at most ``size`` sessions, each opened on first
use in the task that asks for it (so a connection error reaches that caller at once, with
PostgreSQL's own message), reused most-recent-first, and thrown away instead of reused when
its session may be in an unknown state: the server went away, the statement was cancelled
half-way, a transaction was left open, or the caller says so (:meth:`Pool.discard`).
When a session turns out lost (the server went away), the idle ones are closed with it: they
went to the same server, and each would otherwise be found dead by a caller of its own (after a
failover, one failed statement per pooled session).
A caller who finds every session taken waits up to ``timeout`` seconds for one.
``on_connect`` runs on each new session before it is handed out (the store learns there
whether a pooler stands in between, :meth:`relay.pg.store.Store._connected`).

Every session is in autocommit mode: a named query is one statement and its own transaction;
a caller who needs more wraps them in ``conn.transaction()``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import psycopg
from psycopg import pq

__all__ = ["Pool", "PoolTimeout"]


class PoolTimeout(Exception):
    """Every session of the pool stayed taken for ``timeout`` seconds."""


class Pool:
    def __init__(
        self,
        params: Mapping[str, Any],
        *,
        size: int,
        timeout: float = 30.0,
        on_connect: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a pool holds at least one connection")
        self.size = size
        self.timeout = timeout
        self._params = dict(params)
        self._on_connect = on_connect
        self._slots = asyncio.Semaphore(size)
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._taken: set[psycopg.AsyncConnection[Any]] = set()
        self._doomed: set[psycopg.AsyncConnection[Any]] = set()
        self._closed = False

    @property
    def checked_out(self) -> int:
        """Sessions handed out and not yet given back."""
        return len(self._taken)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A session for the time of the block; given back (or closed) on the way out."""
        if self._closed:
            raise psycopg.OperationalError("the connection pool is closed")
        try:
            async with asyncio.timeout(self.timeout):  # not wait_for: on 3.11 it can swallow a cancel
                await self._slots.acquire()
        except TimeoutError:
            raise PoolTimeout(f"no database connection free after {self.timeout:g} s") from None
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            conn = await self._take()
            self._taken.add(conn)
            yield conn
        except psycopg.Error as exc:
            # A statement PostgreSQL refused leaves the session usable; a lost or confused one does not.
            if conn is not None and isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                self._doomed.add(conn)
                if conn.broken:
                    await self._drop_idle()
            raise
        except BaseException:
            if conn is not None:  # cancelled or failed half-way: the session's state is not known
                self._doomed.add(conn)
            raise
        finally:
            try:
                if conn is not None:
                    self._taken.discard(conn)
                    await self._give_back(conn)
            finally:
                self._slots.release()

    def discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Close this session when it is given back instead of handing it out again."""
        self._doomed.add(conn)

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for stale in idle:
            await _close_quietly(stale)

    async def _take(self) -> psycopg.AsyncConnection[Any]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not conn.broken:
                return conn
        conn = await psycopg.AsyncConnection.connect(**self._params, autocommit=True)
        if self._on_connect is not None:
            try:
                await self._on_connect(conn)
            except BaseException:
                await _close_quietly(conn)
                raise
        return conn

    async def _give_back(self, conn: psycopg.AsyncConnection[Any]) -> None:
        doomed = conn in self._doomed
        self._doomed.discard(conn)
        reusable = (
            not doomed
            and not self._closed
            and not conn.closed
            and not conn.broken
            and conn.info.transaction_status == pq.TransactionStatus.IDLE
        )
        if reusable:
            self._idle.append(conn)
        else:
            await _close_quietly(conn)

    async def close(self) -> None:
        """Close idle sessions now; sessions still in use are closed when they are given back."""
        self._closed = True
        await self._drop_idle()


async def _close_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await conn.close()
