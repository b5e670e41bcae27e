"""Reading ``schema/`` and applying its numbered migrations through the store.

``schema/migrations/NNNN_name.sql`` are applied in order, each in its own transaction,
under an advisory lock held by that transaction (concurrent runs wait for each other, then
find nothing to do; the lock is never left behind on a pooler's server connection).
An applied file whose checksum changed stops everything: migrations are append-only.
``schema/schema.sql`` is the canonical DDL a DBA can read; a test proves both agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from relay.errors import SchemaError
from relay.pg.store import Store

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def schema_dir() -> Path:
    """``relay/_schema`` in an installed wheel, the repository's ``schema/`` in a checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_schema", package.parent / "schema"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise SchemaError("schema files not found: the installation is incomplete")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        import hashlib  # only migrate needs it, not every command that reads the schema version

        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def available(directory: Path | None = None) -> list[Migration]:
    folder = (directory or schema_dir()) / "migrations"
    found = []
    for path in sorted(folder.iterdir()):
        if m := _FILE.match(path.name):
            found.append(Migration(int(m.group(1)), m.group(2), path))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaError(f"migrations must be numbered 0001, 0002, ... without gaps; found {versions}")
    return found


def latest_version() -> int:
    return len(available())


def edited(migration: Migration) -> str:
    """What to say when an applied migration's file no longer has the checksum recorded for it."""
    name = migration.path.name
    return (
        f"migration {name} changed after it was applied (its checksum is not the one in "
        f"outbox.schema_migrations); nothing was applied. Restore the file as released: "
        f"`git checkout -- schema/migrations/{name}` in a checkout, or reinstall outbox-relay "
        f"({migration.path}). Applied migrations are never edited: to change the schema on purpose, "
        "restore this file and put the change in a new numbered migration"
    )


@dataclass(frozen=True)
class MigrationReport:
    applied: list[Migration]
    pending: list[Migration]
    version: int


async def migrate(store: Store, *, dry_run: bool = False) -> MigrationReport:
    """Apply every pending migration; with ``dry_run`` only say which would run."""
    files = available()
    async with store.migration_session() as session:
        done = await session.applied()
        for migration in files:
            if migration.version in done and done[migration.version][1] != migration.checksum:
                raise SchemaError(edited(migration))
        unknown = sorted(set(done) - {m.version for m in files})
        if unknown:
            raise SchemaError(
                f"the database has migration {unknown[-1]} which this version of outbox-relay does not know; "
                "upgrade outbox-relay"
            )
        pending = [m for m in files if m.version not in done]
        if dry_run:
            return MigrationReport([], pending, max(done, default=0))
        applied = [
            migration
            for migration in pending
            if await session.apply(migration.version, migration.name, migration.checksum, migration.sql)
        ]
        return MigrationReport(applied, [], files[-1].version if files else 0)
