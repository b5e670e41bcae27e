"""The database for one command: a one-connection :class:`~relay.pg.store.Store`, closed afterwards.

The store (and with it SQLAlchemy and psycopg) is imported here only when a command opens it,
so ``outbox-relay --help`` and usage errors never load the database driver.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from relay.settings import Settings

if TYPE_CHECKING:
    from relay.pg.store import Store

T = TypeVar("T")

OPS = "outbox-relay ops"  # application_name of the operator commands' connections
OPERATOR = "outbox_operator"  # the group role the operator commands' user needs (README "Roles")


@contextlib.asynccontextmanager
async def open_store(
    settings: Settings,
    application_name: str = OPS,
    role: str | None = OPERATOR,
    notices: Callable[[str], None] | None = None,
) -> AsyncIterator[Store]:
    """A store with a pool of one connection on the configured database, closed on the way out.

    ``role`` is named in a permission error (``grant ROLE to USER``); ``notices`` gets the
    server's notices while migrating (:class:`~relay.pg.store.Store`)."""
    from relay.pg.store import Store

    store = Store(
        settings.require_database_url(),
        pool_size=1,
        application_name=application_name,
        role=role,
        notices=notices,
        listen_url=settings.listen_database_url,
    )
    try:
        yield store
    finally:
        await store.close()


def run_with_store(
    settings: Settings,
    work: Callable[[Store], Awaitable[T]],
    application_name: str = OPS,
    role: str | None = OPERATOR,
    notices: Callable[[str], None] | None = None,
) -> T:
    """``await work(store)`` on a fresh event loop with :func:`open_store`; its result."""
    import asyncio

    async def go() -> T:
        async with open_store(settings, application_name, role, notices) as store:
            return await work(store)

    return asyncio.run(go())
