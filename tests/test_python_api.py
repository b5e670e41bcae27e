"""The Python API (``relay.enqueue``, ``relay.enqueue_async``, ``relay.tables``) against a real PostgreSQL.

Every connection kind writes in the caller's transaction: the caller's own change commits with the
row, and rolls back with it when PostgreSQL refuses the row. The README's "From Python" examples
run here verbatim, ``relay.tables`` is compared with the migrated catalog, and ``import relay``
stays free of SQLAlchemy.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, String, create_engine, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import relay
from relay.pg import tables as schema_tables

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLES = ("connection", "session", "async", "psycopg", "refused", "audit")


class Base(DeclarativeBase):
    pass


class Order(Base):
    """The application's own table, as the README's examples assume it."""

    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(String)


def sa_url(database_url: str) -> str:
    return database_url.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture
def orders(db: psycopg.Connection) -> psycopg.Connection:
    """The application's table, orders 42 to 45 all ``new``; returns the autocommit connection."""
    db.execute("create table orders (id integer primary key, state text not null)")
    db.execute("insert into orders select n, 'new' from generate_series(42, 45) n")
    return db


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    e = create_engine(sa_url(database_url))
    try:
        yield e
    finally:
        e.dispose()


@pytest.fixture
async def async_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    e = create_async_engine(sa_url(database_url))
    try:
        yield e
    finally:
        await e.dispose()


def order_state(db: psycopg.Connection, order_id: int = 42) -> str:
    row = db.execute("select state from orders where id = %s", [order_id]).fetchone()
    assert row is not None
    return str(row[0])


def queued(db: psycopg.Connection, action_id: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "select id, status, errors, target from outbox.action_status_updates where action_id = %s",
        [action_id],
    ).fetchall()


# -- the README's examples, verbatim ----------------------------------------------------------
def example(name: str) -> str:
    """The README's python block marked ``<!-- example: name -->``."""
    found = re.findall(rf"^<!-- example: {re.escape(name)} -->\n```python\n(.*?)^```", README, re.M | re.S)
    assert len(found) == 1, f"README has {len(found)} examples named {name!r}"
    return str(found[0])


def run_example(name: str, **names: object) -> dict[str, object]:
    namespace: dict[str, object] = dict(names)
    exec(compile(example(name), f"README.md (example: {name})", "exec"), namespace)  # noqa: S102 (our README)
    return namespace


def from_python_section() -> str:
    match = re.search(r"^## From Python\n(.*?)(?=^## )", README, re.M | re.S)
    assert match, "README has no '## From Python' section"
    return match.group(1)


def test_every_python_example_in_the_readme_section_is_marked_and_run_here() -> None:
    section = from_python_section()
    assert re.findall(r"^<!-- example: ([\w-]+) -->\n```python$", section, re.M) == list(EXAMPLES)
    assert section.count("```python") == len(EXAMPLES)
    # "How an application writes" points here instead of hand-writing text() and json.dumps.
    writes = re.search(r"^## How an application writes\n(.*?)(?=^## )", README, re.M | re.S)
    assert writes and "```python" not in writes.group(1)
    assert "[From Python](#from-python)" in writes.group(1)


def test_readme_connection_example_commits_the_row_with_the_order(
    orders: psycopg.Connection, engine: Engine
) -> None:
    run_example("connection", engine=engine)
    assert order_state(orders, 42) == "refused"
    ((_, status, errors, target),) = queued(orders, "accept-action-125")
    assert (status, target) == ("FAILED", "default")
    assert errors == [{"code": "ORDER_IN_WRONG_STATE", "message": "order 42 was cancelled by the customer"}]
    # The same block again is an identical repeat: accepted, still one row.
    run_example("connection", engine=engine)
    assert len(queued(orders, "accept-action-125")) == 1


def test_readme_session_example(orders: psycopg.Connection, engine: Engine) -> None:
    run_example("session", engine=engine, Order=Order)
    assert order_state(orders, 43) == "shipped"
    assert [r[1:] for r in queued(orders, "ship-action-126")] == [("SUCCESS", [], "default")]


async def test_readme_async_example(orders: psycopg.Connection, async_engine: AsyncEngine) -> None:
    namespace = run_example("async", async_engine=async_engine, Order=Order)
    report_refund = namespace["report_refund"]
    assert callable(report_refund)
    await report_refund(44, "refund-action-127")
    assert order_state(orders, 44) == "refunded"
    assert [r[1:] for r in queued(orders, "refund-action-127")] == [("SUCCESS", [], "marketplace-eu")]


def test_readme_psycopg_example(orders: psycopg.Connection, database_url: str) -> None:
    run_example("psycopg", database_url=database_url)
    assert order_state(orders, 44) == "accepted"
    assert [r[1:] for r in queued(orders, "accept-action-128")] == [("SUCCESS", [], "default")]


def test_readme_refused_example_logs_the_rule_and_rolls_back_the_order(
    orders: psycopg.Connection, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="shop"):
        run_example("refused", engine=engine)
    assert [r.getMessage() for r in caplog.records if r.name == "shop"] == [
        'outcome refused (error_code_known): unknown error code "OUT_OF_STOK" in errors[0] '
        "(accepted codes are listed in outbox.error_codes)"
    ]
    # The sentence under the example quotes the same line.
    prose = " ".join(from_python_section().split())
    assert (
        'This logs `outcome refused (error_code_known): unknown error code "OUT_OF_STOK" in errors[0] '
        "(accepted codes are listed in outbox.error_codes)`" in prose
    )
    assert order_state(orders, 45) == "new"
    assert queued(orders, "accept-action-129") == []


def test_readme_audit_example_runs_as_outbox_auditor(
    orders: psycopg.Connection, engine: Engine, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_example("connection", engine=engine)
    ((update_id, *_),) = queued(orders, "accept-action-125")
    for attempt, status, outcome, code in [
        (1, None, "retry", "ReadTimeout"),
        (2, 503, "retry", "HTTP_503"),
        (3, 500, "retry", "HTTP_500"),
        (4, 400, "dead", "INVALID_INPUT"),
    ]:
        orders.execute(
            "insert into outbox.delivery_attempts (update_id, action_id, target, attempt, started_at, "
            "duration_ms, http_status, outcome, error_code, relay_id) "
            "values (%s, 'accept-action-125', 'default', %s, now(), 12.5, %s, %s, %s, 'relay-1')",
            [update_id, attempt, status, outcome, code],
        )
    auditor = create_engine(sa_url(database_url), connect_args={"options": "-c role=outbox_auditor"})
    try:
        run_example("audit", engine=auditor)
    finally:
        auditor.dispose()
    assert capsys.readouterr().out.splitlines() == [
        "pending 4 400 dead INVALID_INPUT",
        "pending 3 500 retry HTTP_500",
        "pending 2 503 retry HTTP_503",
    ]


# -- every connection kind, in the caller's transaction ---------------------------------------
KINDS = ("connection", "session", "async-connection", "async-session", "psycopg", "psycopg-async")
_CHANGE = "update orders set state = :state where id = 42"


async def write(kind: str, database_url: str, state: str, *args: Any, **kwargs: Any) -> int:
    """One transaction of ``kind``, as an application writes it: its own change to order 42 (to
    ``state``), then ``enqueue(*args, **kwargs)``; committed at the end of the block, rolled back
    when anything raises."""
    if kind in ("connection", "session"):
        engine = create_engine(sa_url(database_url))
        try:
            if kind == "connection":
                with engine.begin() as conn:
                    conn.execute(text(_CHANGE), {"state": state})
                    return relay.enqueue(conn, *args, **kwargs)
            with Session(engine) as session, session.begin():
                session.get_one(Order, 42).state = state
                session.flush()  # in the database before the outcome, so a rollback has to undo it
                return relay.enqueue(session, *args, **kwargs)
        finally:
            engine.dispose()
    if kind in ("async-connection", "async-session"):
        async_engine = create_async_engine(sa_url(database_url))
        try:
            if kind == "async-connection":
                async with async_engine.begin() as aconn:
                    await aconn.execute(text(_CHANGE), {"state": state})
                    return await relay.enqueue_async(aconn, *args, **kwargs)
            async with AsyncSession(async_engine) as asession, asession.begin():
                (await asession.get_one(Order, 42)).state = state
                await asession.flush()
                return await relay.enqueue_async(asession, *args, **kwargs)
        finally:
            await async_engine.dispose()
    change = "update orders set state = %(state)s where id = 42"
    if kind == "psycopg":
        with psycopg.connect(database_url) as pconn:
            pconn.execute(change, {"state": state})
            return relay.enqueue(pconn, *args, **kwargs)
    assert kind == "psycopg-async"
    async with await psycopg.AsyncConnection.connect(database_url) as apconn:
        await apconn.execute(change, {"state": state})
        return await relay.enqueue_async(apconn, *args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
async def test_the_row_commits_with_the_callers_change(
    kind: str, orders: psycopg.Connection, database_url: str
) -> None:
    errors = [
        relay.Error("ORDER_IN_WRONG_STATE", "order 42 was cancelled"),
        {"code": "OTHER", "message": "é ✓"},
    ]
    row_id = await write(kind, database_url, "refused", "act-1", "FAILED", errors, target="eu.shop-1")
    assert order_state(orders) == "refused"
    assert queued(orders, "act-1") == [
        (
            row_id,
            "FAILED",
            [
                {"code": "ORDER_IN_WRONG_STATE", "message": "order 42 was cancelled"},
                {"code": "OTHER", "message": "é ✓"},
            ],
            "eu.shop-1",
        )
    ]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_refused_row_rolls_back_the_callers_change(
    kind: str, orders: psycopg.Connection, database_url: str
) -> None:
    with pytest.raises(relay.InvalidUpdate) as refused:
        await write(kind, database_url, "accepted", "act-2", "FAILED")
    assert type(refused.value) is relay.InvalidUpdate
    assert refused.value.constraint == "failed_requires_errors"
    assert str(refused.value) == "FAILED requires at least one error"
    cause = refused.value.__cause__
    driver_error = cause.orig if isinstance(cause, DBAPIError) else cause
    assert isinstance(driver_error, psycopg.errors.CheckViolation)
    assert order_state(orders) == "new"
    assert queued(orders, "act-2") == []


@pytest.mark.parametrize("kind", KINDS)
async def test_a_conflicting_repeat_raises_and_rolls_back(
    kind: str, orders: psycopg.Connection, database_url: str
) -> None:
    first = await write(kind, database_url, "shipped", "act-3", "SUCCESS")
    with pytest.raises(relay.ConflictingUpdate) as conflict:
        await write(kind, database_url, "refused", "act-3", "FAILED", [relay.Error("OTHER", "too late")])
    assert isinstance(conflict.value, relay.InvalidUpdate)
    assert conflict.value.constraint == "action_status_updates_target_action_id_key"
    assert str(conflict.value) == (
        'action "act-3" already has a different outcome queued for target "default": '
        "its status is SUCCESS, not FAILED"
    )
    assert order_state(orders) == "shipped"
    assert [r[:2] for r in queued(orders, "act-3")] == [(first, "SUCCESS")]


@pytest.mark.parametrize("kind", KINDS)
async def test_an_identical_repeat_returns_the_same_id_and_commits(
    kind: str, orders: psycopg.Connection, database_url: str
) -> None:
    first = await write(kind, database_url, "a", "act-4", "FAILED", [relay.Error("OTHER", "no")])
    # The same errors as a dict with its keys in another order: the same jsonb.
    again = await write(kind, database_url, "b", "act-4", "FAILED", [{"message": "no", "code": "OTHER"}])
    assert again == first
    assert order_state(orders) == "b"
    assert len(queued(orders, "act-4")) == 1


# -- what a refusal leaves of the transaction ---------------------------------------------------
def test_after_a_refusal_the_transaction_is_failed_until_it_rolls_back(
    orders: psycopg.Connection, database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("update orders set state = 'accepted' where id = 42")
        with pytest.raises(relay.InvalidUpdate):
            relay.enqueue(conn, "act-5", "DONE")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
    assert order_state(orders) == "new"


def test_a_savepoint_lets_the_caller_catch_a_refusal_and_commit_the_rest(
    orders: psycopg.Connection, engine: Engine
) -> None:
    with engine.begin() as conn:
        conn.execute(text(_CHANGE), {"state": "accepted"})
        try:
            with conn.begin_nested():
                relay.enqueue(conn, "act-6", "FAILED", [relay.Error("NOT_A_CODE", "x")])
        except relay.InvalidUpdate as refused:
            assert refused.constraint == "error_code_known"
        relay.enqueue(conn, "act-6", "FAILED", [relay.Error("OTHER", "x")])
    assert order_state(orders) == "accepted"
    assert [r[1] for r in queued(orders, "act-6")] == ["FAILED"]


# -- the worst inputs ---------------------------------------------------------------------------
def refused_by(engine: Engine, orders: psycopg.Connection, *args: Any, **kwargs: Any) -> relay.InvalidUpdate:
    """The refusal of ``enqueue(*args)`` in a transaction that also changed order 42, which must
    be rolled back with it."""
    with pytest.raises(relay.InvalidUpdate) as refused, engine.begin() as conn:
        conn.execute(text(_CHANGE), {"state": "accepted"})
        relay.enqueue(conn, *args, **kwargs)
    assert order_state(orders) == "new"
    assert orders.execute("select count(*) from outbox.action_status_updates").fetchone() == (0,)
    return refused.value


@pytest.mark.parametrize(
    ("args", "kwargs", "constraint", "message"),
    [
        (("act-7", "DONE"), {}, "status_known", 'status must be SUCCESS or FAILED, not "DONE"'),
        (("act-7", "success"), {}, "status_known", 'status must be SUCCESS or FAILED, not "success"'),
        (("", "SUCCESS"), {}, "action_id_length", "action_id must not be empty"),
        (
            ("x" * 256, "SUCCESS"),
            {},
            "action_id_length",
            "action_id is 256 characters long; at most 255 are allowed",
        ),
        (
            ("act 7", "SUCCESS"),
            {},
            "action_id_printable",
            "action_id must not contain whitespace or control characters",
        ),
        (
            ("act-7", "SUCCESS"),
            {"target": "bad target"},
            "target_name",
            'target "bad target" is not a valid name (1-63 letters, digits, "_", "-" or ".")',
        ),
        (
            ("act-7", "SUCCESS"),
            {"target": ""},
            "target_name",
            'target "" is not a valid name (1-63 letters, digits, "_", "-" or ".")',
        ),
        (
            ("act-7", "SUCCESS", [relay.Error("OTHER", "x")]),
            {},
            "success_has_no_errors",
            "SUCCESS must not carry errors",
        ),
        (
            ("act-7", "FAILED", [relay.Error("OUT_OF_STOK", "x")]),
            {},
            "error_code_known",
            'unknown error code "OUT_OF_STOK" in errors[0] (accepted codes are listed in outbox.error_codes)',
        ),
        (
            ("act-7", "FAILED", [relay.Error("OTHER", "   ")]),
            {},
            "error_message_valid",
            "errors[0].message must be a non-empty string",
        ),
        (
            ("act-7", "FAILED", [relay.Error("OTHER", "m" * 2001)]),
            {},
            "error_message_valid",
            "errors[0].message is 2001 characters long; at most 2000 are allowed",
        ),
        (
            ("act-7", "FAILED", [{"code": "OTHER"}]),
            {},
            "error_message_valid",
            "errors[0].message must be a non-empty string",
        ),
        (
            ("act-7", "FAILED", [{"code": "OTHER", "message": "x", "field": "sku"}]),
            {},
            "error_shape",
            'errors[0] has unknown key "field"; only "code" and "message" are allowed',
        ),
        (
            ("act-7", "FAILED", [relay.Error(5, "x")]),
            {},
            "error_code_known",
            "errors[0].code must be a string",
        ),
        (
            ("act-7", "FAILED", [relay.Error("OTHER", "x")] * 101),
            {},
            "errors_count",
            "errors has 101 entries; at most 100 are allowed",
        ),
        (
            ("act-7", "FAILED", [relay.Error("OTHER", "x")] * 10_000),
            {},
            "errors_count",
            "errors has 10000 entries; at most 100 are allowed",
        ),
        (
            ("act-7", "FAILED", [relay.Error("OTHER", "é" * 2000)] * 40),
            {},
            "errors_size",
            "errors is 161360 bytes long as JSON text; at most 65536 (64 KiB) are allowed",
        ),
    ],
)
def test_postgresql_refuses_bad_rows_with_its_rule_and_message(
    orders: psycopg.Connection,
    engine: Engine,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    constraint: str,
    message: str,
) -> None:
    refused = refused_by(engine, orders, *args, **kwargs)
    assert (refused.constraint, str(refused)) == (constraint, message)
    assert not isinstance(refused, relay.ConflictingUpdate)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            ("act\x008", "SUCCESS"),
            {},
            "action_id contains a NUL character (\\x00), which PostgreSQL cannot store",
        ),
        (
            ("act-8", "SUCCESS"),
            {"target": "eu\x00"},
            "target contains a NUL character (\\x00), which PostgreSQL cannot store",
        ),
        (
            ("act-8", "FAILED", [relay.Error("OTHER", "bad\x00byte")]),
            {},
            "errors[0].message contains a NUL character (\\x00), which PostgreSQL cannot store",
        ),
        (
            ("act-8", "FAILED", [relay.Error("OTHER", "ok"), {"code": "OTHER\x00", "message": "m"}]),
            {},
            "errors[1].code contains a NUL character (\\x00), which PostgreSQL cannot store",
        ),
        (
            ("act-8", "FAILED", [relay.Error("OTHER", "half \ud800 a pair")]),
            {},
            "errors[0].message is not valid Unicode: lone surrogate at position 5",
        ),
        (("act-\udfff", "SUCCESS"), {}, "action_id is not valid Unicode: lone surrogate at position 4"),
    ],
)
def test_text_postgresql_cannot_receive_is_refused_before_any_statement(
    orders: psycopg.Connection, engine: Engine, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    refused = refused_by(engine, orders, *args, **kwargs)
    assert (refused.constraint, str(refused), refused.__cause__) == (None, message, None)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("act-9", "SUCCESS"), {"target": 5}, "target must be a str, not int"),
        (("act-9", "SUCCESS"), {"target": None}, "target must be a str, not NoneType"),
        ((None, "SUCCESS"), {}, "action_id must be a str, not NoneType"),
        ((b"act-9", "SUCCESS"), {}, "action_id must be a str, not bytes"),
        (("act-9", True), {}, "status must be a str, not bool"),
        (
            ("act-9", "FAILED", relay.Error("OTHER", "x")),
            {},
            "errors must be a list of relay.Error .* not Error",
        ),
        (("act-9", "FAILED", {"code": "OTHER", "message": "x"}), {}, "errors must be a list .* not dict"),
        (("act-9", "FAILED", '[{"code": "OTHER", "message": "x"}]'), {}, "errors must be a list .* not str"),
        (
            ("act-9", "FAILED", [("OTHER", "x")]),
            {},
            r"errors\[0\] must be a relay.Error or a mapping .* not tuple",
        ),
        (("act-9", "FAILED", [relay.Error("OTHER", "x"), None]), {}, r"errors\[1\] must be .* not NoneType"),
    ],
)
def test_arguments_of_the_wrong_type_raise_type_error(
    orders: psycopg.Connection, engine: Engine, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message), engine.begin() as conn:
        conn.execute(text(_CHANGE), {"state": "accepted"})
        relay.enqueue(conn, *args, **kwargs)
    assert order_state(orders) == "new"


def test_errors_may_be_any_iterable_and_status_a_str_enum(orders: psycopg.Connection, engine: Engine) -> None:
    class Outcome(enum.StrEnum):  # a name unlike its value: the value is what is written
        failure = "FAILED"

    with engine.begin() as conn:
        relay.enqueue(conn, "act-10", Outcome.failure, (relay.Error("OTHER", str(n)) for n in range(3)))
    ((_, status, errors, _),) = queued(orders, "act-10")
    assert status == "FAILED"
    assert [e["message"] for e in errors] == ["0", "1", "2"]


async def test_connections_of_the_wrong_kind_raise_type_error(
    engine: Engine, async_engine: AsyncEngine, database_url: str
) -> None:
    with pytest.raises(TypeError, match=r"got an Engine: pass the Connection of your transaction"):
        relay.enqueue(engine, "act-12", "SUCCESS")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got an AsyncEngine"):
        await relay.enqueue_async(async_engine, "act-12", "SUCCESS")  # type: ignore[arg-type]
    async with AsyncSession(async_engine) as session:
        with pytest.raises(
            TypeError, match=r"relay.enqueue got an async AsyncSession: await relay.enqueue_async"
        ):
            relay.enqueue(session, "act-12", "SUCCESS")  # type: ignore[arg-type]
    with (
        engine.connect() as conn,
        pytest.raises(TypeError, match=r"got a synchronous Connection: call relay.enqueue"),
    ):
        await relay.enqueue_async(conn, "act-12", "SUCCESS")  # type: ignore[arg-type]
    with (
        psycopg.connect(database_url) as pconn,
        pytest.raises(TypeError, match="got a synchronous Connection"),
    ):
        await relay.enqueue_async(pconn, "act-12", "SUCCESS")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"writes through a SQLAlchemy Connection or Session, or a psycopg.Connection, not str",
    ):
        relay.enqueue(database_url, "act-12", "SUCCESS")  # type: ignore[arg-type]
    sqlite = create_engine("sqlite://")
    try:
        with (
            sqlite.begin() as lite,
            pytest.raises(TypeError, match=r"psycopg \(version 3\) driver, not sqlite\+pysqlite"),
        ):
            relay.enqueue(lite, "act-12", "SUCCESS")
    finally:
        sqlite.dispose()


def test_other_database_errors_are_the_drivers_own(empty_database_url: str) -> None:
    """No schema: not a refusal, so SQLAlchemy's own exception, as the application's code expects."""
    lonely = create_engine(sa_url(empty_database_url))
    try:
        with pytest.raises(ProgrammingError) as failed, lonely.begin() as conn:
            relay.enqueue(conn, "act-13", "SUCCESS")
        assert isinstance(failed.value.orig, psycopg.errors.InvalidSchemaName)
    finally:
        lonely.dispose()
    with pytest.raises(psycopg.errors.InvalidSchemaName), psycopg.connect(empty_database_url) as conn:
        relay.enqueue(conn, "act-13", "SUCCESS")


def test_a_dict_row_factory_on_the_callers_connection_is_left_alone(
    orders: psycopg.Connection, database_url: str
) -> None:
    from psycopg.rows import dict_row

    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        row_id = relay.enqueue(conn, "act-14", "SUCCESS")
        assert conn.execute("select 1 as one").fetchone() == {"one": 1}
    assert queued(orders, "act-14")[0][0] == row_id


# -- relay.tables is the schema ------------------------------------------------------------------
_CATALOG = """
select c.table_name, t.table_type, c.column_name, c.data_type, c.is_nullable
from information_schema.columns c
join information_schema.tables t using (table_schema, table_name)
where c.table_schema = 'outbox'
  and not exists (select 1 from pg_class p join pg_namespace n on n.oid = p.relnamespace
                  where n.nspname = 'outbox' and p.relname = c.table_name and p.relispartition)
order by c.table_name, c.ordinal_position
"""

_KEYS = """
select cl.relname, con.contype, (
           select array_agg(a.attname order by k.n)
           from unnest(con.conkey) with ordinality k(attnum, n)
           join pg_attribute a on a.attrelid = con.conrelid and a.attnum = k.attnum),
       ref.relname, (
           select array_agg(a.attname order by k.n)
           from unnest(con.confkey) with ordinality k(attnum, n)
           join pg_attribute a on a.attrelid = con.confrelid and a.attnum = k.attnum)
from pg_constraint con
join pg_class cl on cl.oid = con.conrelid
join pg_namespace ns on ns.oid = cl.relnamespace
left join pg_class ref on ref.oid = con.confrelid
where ns.nspname = 'outbox' and con.contype in ('p', 'f') and not cl.relispartition
"""

# Joins SQLAlchemy knows that the database does not enforce: attempt rows outlive their update
# until their partition is dropped (migration 0006).
_LOGICAL_KEYS = {"delivery_attempts": {("f", ("update_id",), "action_status_updates", ("id",))}}


def _pg_type(column: Any) -> str:
    """The column's type as ``information_schema.columns.data_type`` names it."""
    return str(column.type.compile(dialect=postgresql.dialect())).lower()


def test_relay_tables_match_the_migrated_schema(db: psycopg.Connection) -> None:
    catalog: dict[str, list[tuple[str, str, bool]]] = {}
    kinds: dict[str, str] = {}
    for table, kind, column, data_type, nullable in db.execute(_CATALOG):
        catalog.setdefault(table, []).append((column, data_type, nullable == "YES"))
        kinds[table] = kind
    ours = {t.name: t for t in schema_tables.metadata.sorted_tables}
    assert {t.schema for t in ours.values()} == {"outbox"}
    assert sorted(ours) == sorted(catalog), "every table and view of the schema, and nothing else"
    assert kinds["delivery_audit"] == "VIEW"
    for name, table in ours.items():
        mine = [(c.name, _pg_type(c), c.nullable) for c in table.columns]
        if kinds[name] == "VIEW":  # a view's columns are all nullable to the catalog
            assert [m[:2] for m in mine] == [c[:2] for c in catalog[name]], name
        else:
            assert mine == catalog[name], name
        assert getattr(schema_tables, name) is table
    keys: dict[str, set[tuple[Any, ...]]] = {name: set() for name in ours}
    for table, kind, columns, referenced, referenced_columns in db.execute(_KEYS):
        keys[table].add((kind, tuple(columns), referenced, tuple(referenced_columns or ())))
    for name, table in ours.items():
        mine_keys = {
            ("f", (fk.parent.name,), fk.column.table.name, (fk.column.name,)) for fk in table.foreign_keys
        }
        if table.primary_key.columns:
            mine_keys.add(("p", tuple(c.name for c in table.primary_key.columns), None, ()))
        assert mine_keys == keys[name] | _LOGICAL_KEYS.get(name, set()), name


# -- import relay stays cheap ---------------------------------------------------------------------
def _fresh_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_relay_does_not_import_sqlalchemy_or_psycopg() -> None:
    code = (
        "import sys, relay\n"
        "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'psycopg'})\n"
        "before = heavy()\n"
        "names = (relay.__version__, relay.InvalidUpdate, relay.ConflictingUpdate)\n"
        "errors_only = heavy()\n"
        "relay.enqueue\n"
        "print(before, errors_only, heavy())\n"
    )
    assert _fresh_python(code) == "[] [] ['psycopg', 'sqlalchemy']"


def test_the_public_names_are_the_modules_own() -> None:
    from relay import errors
    from relay.pg import writer

    assert sorted(relay.__all__) == sorted(
        ["enqueue", "enqueue_async", "Error", "InvalidUpdate", "ConflictingUpdate", "tables", "__version__"]
    )
    assert relay.enqueue is writer.enqueue and relay.enqueue_async is writer.enqueue_async
    assert relay.Error is writer.Error
    assert relay.InvalidUpdate is errors.InvalidUpdate and relay.ConflictingUpdate is errors.ConflictingUpdate
    assert relay.tables is schema_tables
    assert set(relay.__all__) <= set(dir(relay))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        relay.nope  # type: ignore[attr-defined]  # noqa: B018
    error = relay.Error("OTHER", "x")
    with pytest.raises(AttributeError):
        error.code = "UNEXPECTED"  # type: ignore[misc]
    assert json.loads(json.dumps({"code": error.code, "message": error.message})) == {
        "code": "OTHER",
        "message": "x",
    }
