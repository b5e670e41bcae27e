"""Migrations: idempotent, safe when run twice at once, and equal to the canonical DDL."""

from __future__ import annotations

import asyncio
import subprocess

import psycopg
import pytest

from relay.dev.embedded import _bin_dir
from relay.errors import SchemaError
from relay.pg.migrations import available, migrate, schema_dir
from relay.pg.store import Store
from relay.settings import Secret
from tests.relaykit import cli


def _dump(url: str) -> str:
    out = subprocess.run(
        [
            str(_bin_dir() / "pg_dump"),
            "--schema-only",
            "--schema=outbox",
            "--no-owner",
            "--no-privileges",
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = [ln for ln in out.splitlines() if not ln.startswith(("--", "\\restrict", "\\unrestrict"))]
    return "\n".join(lines)


async def test_migrate_twice_is_a_no_op(empty_database_url: str) -> None:
    store = Store(Secret(empty_database_url), pool_size=1)
    try:
        first = await migrate(store)
        second = await migrate(store)
        assert [m.version for m in first.applied] == [m.version for m in available()]
        assert second.applied == []
        assert await store.schema_version() == len(available())
    finally:
        await store.close()


async def test_two_concurrent_migrations_are_safe(empty_database_url: str) -> None:
    stores = [Store(Secret(empty_database_url), pool_size=1) for _ in range(2)]
    try:
        reports = await asyncio.gather(*(migrate(s) for s in stores))
    finally:
        for s in stores:
            await s.close()
    applied = sorted(m.version for r in reports for m in r.applied)  # they take turns, file by file
    assert applied == [m.version for m in available()], "each migration applied once"
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("select count(*) from outbox.schema_migrations").fetchone() == (len(available()),)


async def test_dry_run_lists_pending_and_changes_nothing(empty_database_url: str) -> None:
    store = Store(Secret(empty_database_url), pool_size=1)
    try:
        report = await migrate(store, dry_run=True)
        assert [m.version for m in report.pending] == [m.version for m in available()]
        assert await store.schema_version() == 0
    finally:
        await store.close()


async def test_an_edited_applied_migration_stops_migrate(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("update outbox.schema_migrations set checksum = 'edited' where version = 1")
    store = Store(Secret(database_url), pool_size=1)
    try:
        with pytest.raises(SchemaError, match="changed after it was applied"):
            await migrate(store)
    finally:
        await store.close()


def test_migrations_and_canonical_ddl_build_the_same_catalog(
    database_url: str, empty_database_url: str
) -> None:
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute((schema_dir() / "schema.sql").read_text(encoding="utf-8"))  # type: ignore[arg-type]
    migrated, canonical = _dump(database_url), _dump(empty_database_url)
    assert "CREATE TABLE outbox.action_status_updates" in migrated
    assert migrated == canonical


def _grants(url: str) -> list[str]:
    out = subprocess.run(
        [str(_bin_dir() / "pg_dump"), "--schema-only", "--schema=outbox", "--no-owner", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sorted(ln for ln in out.splitlines() if ln.startswith(("GRANT ", "REVOKE ")))


def test_migrations_and_canonical_ddl_grant_the_same_privileges(
    database_url: str, empty_database_url: str
) -> None:
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute((schema_dir() / "schema.sql").read_text(encoding="utf-8"))
    migrated, canonical = _grants(database_url), _grants(empty_database_url)
    assert (
        "GRANT UPDATE(requeue_reason) ON TABLE outbox.action_status_updates TO outbox_operator;" in migrated
    )
    assert not any("DELETE" in g and "outbox_relay" in g and "relay_targets" not in g for g in migrated)
    assert migrated == canonical


def test_an_edited_migration_says_how_to_recover(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("update outbox.schema_migrations set checksum = 'edited' where version = 2")
    result = cli("migrate", env={"RELAY_DATABASE_URL": database_url})
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    name = available()[1].path.name
    assert line.startswith(f"outbox-relay: migration {name} changed after it was applied")
    assert f"git checkout -- schema/migrations/{name}" in line and "reinstall outbox-relay" in line
    assert "new numbered migration" in line
