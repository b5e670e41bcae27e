"""The three group roles get what they need and nothing more."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import psycopg.errors
import pytest


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("select outbox.enqueue_action_status('r-1', 'SUCCESS')")
        yield c


def _as(conn: psycopg.Connection, role: str, sql: str) -> list[tuple[object, ...]]:
    with conn.transaction():
        conn.execute(f"set local role {role}")
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def test_writer_enqueues_and_reads_state(conn: psycopg.Connection) -> None:
    _as(
        conn,
        "outbox_writer",
        'select outbox.enqueue_action_status(\'r-2\', \'FAILED\', \'[{"code":"OTHER","message":"m"}]\')',
    )
    _as(
        conn,
        "outbox_writer",
        "insert into outbox.action_status_updates (action_id, status) values ('r-3', 'SUCCESS')",
    )
    rows = _as(
        conn,
        "outbox_writer",
        "select action_id, state, attempts from outbox.action_status_updates order by id",
    )
    assert [r[0] for r in rows] == ["r-1", "r-2", "r-3"]


@pytest.mark.parametrize(
    "sql",
    [
        "update outbox.action_status_updates set state = 'dead', dead_at = now()",
        "update outbox.action_status_updates set attempts = 0",
        "delete from outbox.action_status_updates",
        "select * from outbox.delivery_attempts",
        "select claim_token from outbox.action_status_updates",
        "insert into outbox.action_status_updates (action_id, status, state, delivered_at) "
        "values ('f', 'SUCCESS', 'delivered', now())",
        "insert into outbox.error_codes values ('MINE', '')",
    ],
)
def test_writer_cannot_change_state_or_read_attempts(conn: psycopg.Connection, sql: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        _as(conn, "outbox_writer", sql)


@pytest.mark.parametrize(
    "sql",
    [
        "select * from outbox.action_status_updates",
        "select * from outbox.delivery_attempts",
        "select * from outbox.delivery_audit",
        "select * from outbox.error_codes",
        "select * from outbox.schema_migrations",
    ],
)
def test_auditor_reads_everything(conn: psycopg.Connection, sql: str) -> None:
    _as(conn, "outbox_auditor", sql)


@pytest.mark.parametrize(
    "sql",
    [
        "select outbox.enqueue_action_status('a-9', 'SUCCESS')",
        "insert into outbox.action_status_updates (action_id, status) values ('a-9', 'SUCCESS')",
        "update outbox.action_status_updates set last_error = 'x'",
        "delete from outbox.delivery_attempts",
        "insert into outbox.error_codes values ('MINE', '')",
    ],
)
def test_auditor_cannot_write(conn: psycopg.Connection, sql: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        _as(conn, "outbox_auditor", sql)


def test_relay_may_move_state_but_not_rewrite_the_outcome(conn: psycopg.Connection) -> None:
    _as(conn, "outbox_relay", "update outbox.action_status_updates set last_error = 'x'")
    for sql in (
        "update outbox.action_status_updates set status = 'FAILED'",
        "update outbox.action_status_updates set action_id = 'other'",
        "insert into outbox.action_status_updates (action_id, status) values ('x', 'SUCCESS')",
        "update outbox.delivery_attempts set outcome = 'delivered'",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            _as(conn, "outbox_relay", sql)
