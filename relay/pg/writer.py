"""The Python API for applications: write an action's outcome in your own transaction.

::

    import relay

    with engine.begin() as conn:                        # your transaction
        conn.execute(update_order)                      # your change
        relay.enqueue(conn, action_id, "FAILED", [relay.Error("ORDER_IN_WRONG_STATE", "cancelled")])
    # committed together, or neither

:func:`enqueue` takes a SQLAlchemy ``Connection`` or ``Session`` or a plain ``psycopg.Connection``;
:func:`enqueue_async` an ``AsyncConnection``, ``AsyncSession`` or ``psycopg.AsyncConnection``. Both
call ``outbox.enqueue_action_status`` (the statement ``updates_enqueue`` of ``queries.sql``) on that
connection, in whatever transaction it is in: they never begin, commit or roll back anything.

PostgreSQL is the authority on what a valid row is (README, "Refused rows"). When it refuses the
row, the statement fails, PostgreSQL marks the whole transaction as failed, and we raise
:class:`~relay.errors.InvalidUpdate` (the rule's name in ``constraint``, PostgreSQL's message as
the text), or :class:`~relay.errors.ConflictingUpdate` when the action already has a different
outcome queued for the target; ``__cause__`` is the exception the driver (or SQLAlchemy) raised.
Let it leave your ``with engine.begin():`` / ``with session.begin():`` block and your own change is
rolled back with the row. To carry on in the same transaction after a refusal, write inside a
savepoint (``conn.begin_nested()``). An identical repeat is no error: it returns the id of the row
already queued.

Python checks only what PostgreSQL cannot: the types of the arguments (``TypeError``), and text
that cannot even be sent (a NUL character, a lone surrogate: :class:`InvalidUpdate` with no
constraint, before any statement). Every other database error (a lost connection, a
serialization failure, a missing schema) is the driver's own exception, unchanged, so the retry
logic an application already has keeps working.

SQLAlchemy connections must use the psycopg (version 3) driver (``postgresql+psycopg://``): it is
the driver whose errors carry the refused rule's name the way :mod:`relay.pg.refusals` reads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

import psycopg
from psycopg.rows import tuple_row
from sqlalchemy import Connection, Engine, TextClause, text
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from relay.errors import InvalidUpdate
from relay.pg.refusals import refusal
from relay.pg.store import driver_sql, queries

__all__ = ["AsyncConnectionLike", "Error", "ErrorLike", "SyncConnection", "enqueue", "enqueue_async"]

SyncConnection: TypeAlias = Connection | Session | psycopg.Connection[Any]
"""What :func:`enqueue` writes through."""

AsyncConnectionLike: TypeAlias = AsyncConnection | AsyncSession | psycopg.AsyncConnection[Any]
"""What :func:`enqueue_async` writes through."""

_QUERY = "updates_enqueue"


@dataclass(frozen=True, slots=True)
class Error:
    """One error of a ``FAILED`` outcome: ``code`` from ``outbox.error_codes`` (``ORDER_IN_WRONG_STATE``,
    ``OTHER``...) and a ``message`` for the person reading it in Mirakl (at most 2,000 characters).

    A mapping ``{"code": ..., "message": ...}`` is accepted wherever an ``Error`` is.
    """

    code: str
    message: str


ErrorLike: TypeAlias = Error | Mapping[str, object]
"""An :class:`Error`, or a mapping with ``code`` and ``message`` (PostgreSQL refuses other keys)."""


def enqueue(
    conn: SyncConnection,
    action_id: str,
    status: str,
    errors: Iterable[ErrorLike] = (),
    *,
    target: str = "default",
) -> int:
    """Queue the outcome of action ``action_id`` for ``target``, in ``conn``'s transaction; its row id.

    ``status`` is ``SUCCESS`` (no errors) or ``FAILED`` (at least one). Raises
    :class:`~relay.errors.InvalidUpdate` when PostgreSQL refuses the row,
    :class:`~relay.errors.ConflictingUpdate` when the action already has a different outcome queued
    for the target; an identical repeat returns the existing row's id. Nothing is committed here.
    """
    if isinstance(conn, AsyncConnection | AsyncSession | psycopg.AsyncConnection):
        raise TypeError(f"relay.enqueue got an async {type(conn).__name__}: await relay.enqueue_async(...)")
    if not isinstance(conn, Connection | Session | psycopg.Connection):
        _unsupported("enqueue", conn)
    params = _params(action_id, status, errors, target)
    if isinstance(conn, psycopg.Connection):
        try:
            with conn.cursor(row_factory=tuple_row) as cur:
                row = cur.execute(driver_sql(_QUERY), params).fetchone()
        except psycopg.Error as exc:
            _reraise(exc)
        assert row is not None  # the function returns a row or raises
        return int(row[0])
    sa_conn = conn.connection() if isinstance(conn, Session) else conn
    _require_psycopg(sa_conn.dialect)
    try:
        return int(sa_conn.execute(_statement(), params).scalar_one())
    except DBAPIError as exc:
        _reraise(exc)


async def enqueue_async(
    conn: AsyncConnectionLike,
    action_id: str,
    status: str,
    errors: Iterable[ErrorLike] = (),
    *,
    target: str = "default",
) -> int:
    """:func:`enqueue` for asyncio, through an ``AsyncConnection``, ``AsyncSession`` or
    ``psycopg.AsyncConnection``; the same errors, the same id."""
    if isinstance(conn, Connection | Session | psycopg.Connection):
        raise TypeError(f"relay.enqueue_async got a synchronous {type(conn).__name__}: call relay.enqueue")
    if not isinstance(conn, AsyncConnection | AsyncSession | psycopg.AsyncConnection):
        _unsupported("enqueue_async", conn)
    params = _params(action_id, status, errors, target)
    if isinstance(conn, psycopg.AsyncConnection):
        try:
            async with conn.cursor(row_factory=tuple_row) as cur:
                row = await (await cur.execute(driver_sql(_QUERY), params)).fetchone()
        except psycopg.Error as exc:
            _reraise(exc)
        assert row is not None  # the function returns a row or raises
        return int(row[0])
    sa_conn = await conn.connection() if isinstance(conn, AsyncSession) else conn
    _require_psycopg(sa_conn.dialect)
    try:
        return int((await sa_conn.execute(_statement(), params)).scalar_one())
    except DBAPIError as exc:
        _reraise(exc)


# -- arguments -------------------------------------------------------------------------------
def _params(action_id: str, status: str, errors: Iterable[ErrorLike], target: str) -> dict[str, str]:
    """The statement's parameters, ``errors`` as JSON text; TypeError for an argument of the wrong type."""
    return {
        "action_id": _text(action_id, "action_id"),
        "status": _text(status, "status"),
        "errors": _errors_json(errors),
        "target": _text(target, "target"),
    }


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    # A str subclass (a StrEnum member) as its plain value: psycopg would send an Enum's *name*.
    return _sendable(str.__str__(value), name)


def _sendable(value: str, name: str) -> str:
    """``value`` unless PostgreSQL could not even receive it: InvalidUpdate naming ``name``."""
    if "\x00" in value:
        raise InvalidUpdate(f"{name} contains a NUL character (\\x00), which PostgreSQL cannot store")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidUpdate(f"{name} is not valid Unicode: lone surrogate at position {exc.start}") from None
    return value


def _errors_json(errors: Iterable[ErrorLike]) -> str:
    """``errors`` as a JSON array of objects; PostgreSQL checks what they hold (codes, keys, sizes)."""
    if isinstance(errors, str | bytes | Mapping | Error) or not isinstance(errors, Iterable):
        raise TypeError(
            "errors must be a list of relay.Error or {'code': ..., 'message': ...} mappings, "
            f"not {type(errors).__name__}"
        )
    entries: list[dict[str, object]] = []
    for pos, item in enumerate(errors):
        if isinstance(item, Error):
            entry: dict[str, object] = {"code": item.code, "message": item.message}
        elif isinstance(item, Mapping):
            entry = dict(item)
        else:
            raise TypeError(
                f"errors[{pos}] must be a relay.Error or a mapping with 'code' and 'message', "
                f"not {type(item).__name__}"
            )
        for key, value in entry.items():
            if isinstance(value, str):
                _sendable(value, f"errors[{pos}].{key}")
        entries.append(entry)
    return json.dumps(entries, ensure_ascii=False, allow_nan=False)


# -- connections and errors ------------------------------------------------------------------
def _statement() -> TextClause:
    return text(queries()[_QUERY])


def _require_psycopg(dialect: Dialect) -> None:
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        raise TypeError(
            f"relay needs SQLAlchemy's psycopg (version 3) driver, not {dialect.name}+{dialect.driver}: "
            "create the engine with a postgresql+psycopg:// URL"
        )


def _unsupported(function: str, conn: object) -> NoReturn:
    kind = type(conn).__name__
    if isinstance(conn, Engine | AsyncEngine):
        raise TypeError(
            f"relay.{function} got an {kind}: pass the Connection of your transaction "
            "(`with engine.begin() as conn:`) so the outcome commits with your change"
        )
    expected = (
        "a SQLAlchemy Connection or Session, or a psycopg.Connection"
        if function == "enqueue"
        else "a SQLAlchemy AsyncConnection or AsyncSession, or a psycopg.AsyncConnection"
    )
    raise TypeError(f"relay.{function} writes through {expected}, not {kind}")


def _reraise(exc: Exception) -> NoReturn:
    """Raise our error for a refused row (from ``exc``), or ``exc`` itself for anything else."""
    refused = refusal(exc)
    if refused is None:
        raise exc
    raise refused from exc
