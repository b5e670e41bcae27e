"""Migration 0008, the audit console's indexes: action_status_updates_action_id_pattern (lookups
by id and by prefix under any collation) replaces action_status_updates_action_id, and
action_status_updates_created_at serves lists newest first. Applied to a 0007 database with rows,
to one where an operator made the indexes beforehand (README "Upgrading to 0008"), and to one a
failed concurrent build left an invalid index in; the planner's use of them under a collation
other than C."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import psycopg
import pytest

from relay.pg.migrations import available
from tests.conftest import Server
from tests.relaykit import cli
from tests.test_ledger import _migrate_to, _update

PATTERN = "action_status_updates_action_id_pattern"
CREATED = "action_status_updates_created_at"
OLD = "action_status_updates_action_id"


def _indexes(url: str) -> dict[str, tuple[int, bool, str]]:
    """The indexes of action_status_updates: name -> (oid, valid and ready, definition)."""
    with psycopg.connect(url) as db:
        rows = db.execute(
            "select c.relname, i.indexrelid::oid::bigint, i.indisvalid and i.indisready, "
            "pg_get_indexdef(i.indexrelid) "
            "from pg_index i join pg_class c on c.oid = i.indexrelid "
            "where i.indrelid = 'outbox.action_status_updates'::regclass"
        ).fetchall()
    return {name: (oid, ok, definition) for name, oid, ok, definition in rows}


def _at_0007_with_rows(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("drop schema if exists outbox cascade")
    _migrate_to(url, 7)
    with psycopg.connect(url, autocommit=True) as db:
        now = db.execute("select now()").fetchone()[0]  # type: ignore[index]
        for i, (state, days) in enumerate([("delivered", 40), ("dead", 3), ("pending", 1), ("delivered", 0)]):
            _update(db, f"before-{i}", state=state, at=now - timedelta(days=days), requests=2)
        db.execute(
            "insert into outbox.action_status_updates (action_id, status, target) "
            "select 'bulk-' || g, 'SUCCESS', case when g % 2 = 0 then 'default' else 'eu' end "
            "from generate_series(1, 500) g"
        )


def _migrate(url: str) -> None:
    result = cli("migrate", env={"RELAY_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    with psycopg.connect(url) as db:
        assert db.execute("select max(version) from outbox.schema_migrations").fetchone() == (
            len(available()),
        )


def test_0008_keeps_every_row_and_replaces_the_action_id_index(empty_database_url: str) -> None:
    url = empty_database_url
    _at_0007_with_rows(url)
    with psycopg.connect(url) as db:
        before = db.execute("select * from outbox.action_status_updates order by id").fetchall()
        attempts = db.execute("select * from outbox.delivery_attempts order by id").fetchall()
    assert len(before) == 504 and OLD in _indexes(url)

    _migrate(url)

    with psycopg.connect(url) as db:
        assert db.execute("select * from outbox.action_status_updates order by id").fetchall() == before
        assert db.execute("select * from outbox.delivery_attempts order by id").fetchall() == attempts
    indexes = _indexes(url)
    assert OLD not in indexes
    assert indexes[PATTERN][1] and indexes[PATTERN][2].endswith("(action_id text_pattern_ops)")
    assert indexes[CREATED][1] and indexes[CREATED][2].endswith("(created_at, id)")
    audit = cli("audit", "before-1", "--json", env={"RELAY_DATABASE_URL": url})
    assert audit.returncode == 0, audit.stderr
    assert '"action_id": "before-1"' in audit.stdout


def _readme_statements() -> list[str]:
    from tests.test_readme import section

    upgrading = section("Upgrading").split("### Upgrading to 0008: the audit console's indexes", 1)[1]
    block = re.search(r"```sql\n(.*?)```", upgrading, re.DOTALL)
    assert block and "concurrently" in block.group(1)
    statements = [s for s in block.group(1).split(";") if s.strip()]
    assert len(statements) == 2
    return statements


@pytest.mark.parametrize("invalid", [False, True], ids=["made-beforehand", "invalid-leftover"])
def test_indexes_made_beforehand_are_kept_and_an_invalid_one_is_built_again(
    empty_database_url: str, invalid: bool
) -> None:
    """README "Upgrading to 0008": the indexes made CONCURRENTLY beforehand are kept by the
    migration, which builds nothing; an index a failed concurrent build left (invalid) is dropped
    and built again."""
    url = empty_database_url
    _at_0007_with_rows(url)
    with psycopg.connect(url, autocommit=True) as db:
        for statement in _readme_statements():
            db.execute(statement)
    made = _indexes(url)
    assert made[PATTERN][1] and made[CREATED][1]
    if invalid:
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(
                "update pg_index set indisvalid = false where indexrelid = any(%s)",
                ([made[PATTERN][0], made[CREATED][0]],),
            )
        assert not any(_indexes(url)[name][1] for name in (PATTERN, CREATED))

    _migrate(url)

    after = _indexes(url)
    assert OLD not in after
    for name in (PATTERN, CREATED):
        assert after[name][1], name
        assert (after[name][0] != made[name][0]) == invalid, name
        assert after[name][2] == made[name][2], "the README builds what the migration would"


# Collations the planner does not treat as C (PostgreSQL counts only "C" and "POSIX" as C, so
# C.UTF-8 is one), the first the server accepts.
NON_C_COLLATIONS = ("en_US.UTF-8", "en_US.utf8", "C.UTF-8", "C.utf8")


def _database_with_a_non_c_collation(pg_server: Server, name: str) -> str:
    with psycopg.connect(pg_server.admin_url, autocommit=True) as admin:
        for collation in NON_C_COLLATIONS:
            try:
                admin.execute(
                    f"create database {name} template template0 encoding 'UTF8' "
                    f"lc_collate '{collation}' lc_ctype '{collation}'"
                )
            except (psycopg.errors.WrongObjectType, psycopg.errors.InvalidParameterValue):  # unknown here
                continue
            return collation
    pytest.skip(f"the server knows none of the collations {', '.join(NON_C_COLLATIONS)}")


def _plan(db: psycopg.Connection, query: str, params: tuple[object, ...] = ()) -> str:
    return "\n".join(r[0] for r in db.execute("explain " + query, params))


def test_lookups_by_id_and_prefix_use_the_pattern_index_under_a_non_c_collation(pg_server: Server) -> None:
    name = f"console_collation_{uuid.uuid4().hex[:12]}"
    try:
        collation = _database_with_a_non_c_collation(pg_server, name)
        url = pg_server.url(name)
        _migrate(url)
        with psycopg.connect(url, autocommit=True) as db:
            assert db.execute(
                "select datcollate from pg_database where datname = current_database()"
            ).fetchone() == (collation,)
            db.execute(
                "insert into outbox.action_status_updates (action_id, status, created_at) "
                "select 'shop_' || (g % 7) || '-' || g, 'SUCCESS', now() - make_interval(mins => g) "
                "from generate_series(1, 3000) g"
            )
            db.execute("analyze outbox.action_status_updates")
            db.execute("set enable_seqscan = off")
            # The console's search: a prefix with its _ and % escaped, bound as a parameter.
            prefix = "select id from outbox.action_status_updates where action_id like %s || '%%'"
            escaped = "shop\\_3-12"

            with pytest.raises(_Rollback), db.transaction():
                # The premise: under this collation a default btree cannot serve the prefix.
                db.execute(f"drop index outbox.{PATTERN}")
                db.execute(f"create index {OLD} on outbox.action_status_updates (action_id)")
                plain = _plan(db, prefix, (escaped,))
                assert not re.search(r"Index Cond: .*action_id", plain), plain
                raise _Rollback

            plan = _plan(db, prefix, (escaped,))
            assert PATTERN in plan and "~>=~ 'shop_3-12'" in plan and "~<~ 'shop_3-13'" in plan, plan
            found = sorted(r[0] for r in db.execute(prefix, (escaped,)))
            ids = db.execute("select id, action_id from outbox.action_status_updates").fetchall()
            assert found == sorted(i for i, a in ids if a.startswith("shop_3-12")) and found

            plan = _plan(db, "select * from outbox.delivery_audit where action_id = %s", ("shop_3-1200",))
            assert PATTERN in plan and "Index Cond: (action_id = 'shop_3-1200'::text)" in plan, plan
            plan = _plan(
                db,
                "select id from outbox.action_status_updates where action_id = any(%s)",
                (["shop_3-1200", "shop_6-1203"],),
            )
            assert PATTERN in plan, plan

            # The console's lists: newest first within a date range, the next page after the last
            # (created_at, id) of the one before.
            page = (
                "select id, created_at from outbox.action_status_updates "
                "where created_at >= %s and (created_at, id) < (%s, %s) "
                "order by created_at desc, id desc limit 50"
            )
            (top,) = db.execute("select max(created_at) from outbox.action_status_updates").fetchone()  # type: ignore[misc]
            since = top - timedelta(days=1, seconds=30)  # the rows are a minute apart: 1,441 of them
            cursor = (since, top + timedelta(seconds=1), 0)
            plan = _plan(db, page, cursor)
            assert f"Scan Backward using {CREATED}" in plan and "Sort" not in plan, plan
            everything = db.execute(
                "select id, created_at from outbox.action_status_updates "
                "where created_at >= %s order by created_at desc, id desc",
                (since,),
            ).fetchall()
            pages: list[tuple[int, object]] = []
            while batch := db.execute(page, cursor).fetchall():
                pages.extend(batch)
                cursor = (since, batch[-1][1], batch[-1][0])
            assert pages == everything and len(everything) == 1441
    finally:
        with psycopg.connect(pg_server.admin_url, autocommit=True) as admin:
            admin.execute(f"drop database if exists {name} with (force)")


class _Rollback(Exception):
    pass
