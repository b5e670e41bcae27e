"""The schema's group roles, and what a superuser runs when ``migrate`` could not create them.

The migrations create ``outbox_writer``, ``outbox_relay``, ``outbox_operator`` and
``outbox_auditor`` only when the migrating user may create roles; otherwise PostgreSQL says so
in a notice, and nothing is granted to the missing roles. The cure is the "Group roles" block
of ``schema/schema.sql``, run once by a superuser in the application's database: it creates the
missing roles and grants each what it may do (running it again changes nothing).
"""

from __future__ import annotations

from relay.errors import SchemaError
from relay.pg.migrations import schema_dir

__all__ = ["ROLES_BLOCK_TITLE", "roles_sql"]

ROLES_BLOCK_TITLE = "-- Group roles"


def roles_sql() -> str:
    """The "Group roles" block of ``schema/schema.sql``, from its comment line to ``end $$;``."""
    lines = (schema_dir() / "schema.sql").read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(ROLES_BLOCK_TITLE)), None)
    if start is None:
        raise SchemaError("schema.sql has no 'Group roles' block: the installation is incomplete")
    end = next(i for i in range(start, len(lines)) if lines[i] == "end $$;")
    return "\n".join(lines[start : end + 1]) + "\n"
