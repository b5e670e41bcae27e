"""The outbox schema as SQLAlchemy ``Table`` objects, for composing queries in Python.

::

    from sqlalchemy import select
    from relay.pg import tables             # or: import relay; relay.tables

    audit = tables.delivery_audit
    dead = select(audit.c.action_id, audit.c.last_error).where(audit.c.state == "dead")

Every table of the schema ``outbox`` is here, and the auditors' view ``delivery_audit`` as a
``Table`` too, with the columns in the database's order, their types and (for tables) whether
they may be null, primary keys and foreign keys (so ``join_from`` finds the join).
``tests/test_python_api.py`` compares all of that with a freshly migrated database, so this
module cannot drift from the migrations.

This is metadata for reading, not DDL: the migrations (``outbox-relay migrate``) create the
schema, and ``metadata.create_all()`` must never be used on it (the triggers, checks, defaults and
grants live only in the migrations). Write an outcome with :func:`relay.enqueue`, never with an
``insert()`` on these tables: the function is what makes an identical repeat harmless.
What each column means: README, "The SQL surface".
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import INTERVAL, JSONB

__all__ = [
    "action_status_updates",
    "attempt_partitions",
    "daily_reports",
    "delivery_attempts",
    "delivery_audit",
    "delivery_report",
    "error_codes",
    "metadata",
    "relay_targets",
    "report_days",
    "requeues",
    "schema_migrations",
]

metadata = MetaData(schema="outbox")


def _timestamptz() -> DateTime:
    return DateTime(timezone=True)


# One row per action outcome to report.
action_status_updates = Table(
    "action_status_updates",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("action_id", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("errors", JSONB, nullable=False),
    Column("target", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("created_at", _timestamptz(), nullable=False),
    Column("next_attempt_at", _timestamptz(), nullable=False),
    Column("delivered_at", _timestamptz()),
    Column("dead_at", _timestamptz()),
    Column("last_error", Text),
    Column("last_http_status", Integer),
    Column("requests", Integer, nullable=False),
    Column("outcome_unknown", Boolean, nullable=False),
    Column("claim_token", Uuid),
    Column("claimed_by", Text),
    Column("requeued_at", _timestamptz()),
    Column("requeue_reason", Text),
    Column("sending_at", _timestamptz()),
    Column("requeued_by", Text),
    Column("last_error_code", Text),
)

# One row per HTTP request made, append-only; partitioned by month of started_at (its partitions
# are not listed here: query this table). Since migration 0006 it has no primary key (ids come
# from one sequence) and no foreign key in the database: an attempt row outlives its update until
# its partition is dropped. The ForeignKey below only tells SQLAlchemy how the two join.
delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("id", BigInteger, nullable=False),
    Column("update_id", BigInteger, ForeignKey(action_status_updates.c.id), nullable=False),
    Column("action_id", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("started_at", _timestamptz(), nullable=False),
    Column("duration_ms", Double, nullable=False),
    Column("http_status", Integer),
    Column("outcome", Text, nullable=False),
    Column("error_code", Text),
    Column("error_message", Text),
    Column("response_body", Text),
    Column("relay_id", Text, nullable=False),
    Column("reached_api", Text),
    Column("db_role", Text),
)

# A view: one row per update, for auditors.
delivery_audit = Table(
    "delivery_audit",
    metadata,
    Column("id", BigInteger),
    Column("action_id", Text),
    Column("target", Text),
    Column("status", Text),
    Column("errors", JSONB),
    Column("state", Text),
    Column("attempts", Integer),
    Column("created_at", _timestamptz()),
    Column("delivered_at", _timestamptz()),
    Column("dead_at", _timestamptz()),
    Column("time_to_deliver", INTERVAL),
    Column("last_http_status", Integer),
    Column("last_error", Text),
    Column("next_attempt_at", _timestamptz()),
    Column("requeued_at", _timestamptz()),
    Column("requeue_reason", Text),
    Column("requeued_by", Text),
    Column("last_error_code", Text),
)

# A view: the partitions of delivery_attempts, oldest first.
attempt_partitions = Table(
    "attempt_partitions",
    metadata,
    Column("name", Text),
    Column("from_time", _timestamptz()),
    Column("to_time", _timestamptz()),
    Column("is_default", Boolean),
    Column("rows_estimate", BigInteger),
    Column("bytes", BigInteger),
)

# Delivered updates per UTC day, target, status and error code, kept after retention.
daily_reports = Table(
    "daily_reports",
    metadata,
    Column("day", Date, primary_key=True),
    Column("target", Text, primary_key=True),
    Column("status", Text, primary_key=True),
    Column("error_code", Text, primary_key=True),
    Column("reports", BigInteger, nullable=False),
)

# The UTC days counted in daily_reports.
report_days = Table(
    "report_days",
    metadata,
    Column("day", Date, primary_key=True),
    Column("rolled_at", _timestamptz(), nullable=False),
    Column("reports", BigInteger, nullable=False),
)

# A view: what was reported per UTC day, target, status and error code (null: every report).
delivery_report = Table(
    "delivery_report",
    metadata,
    Column("day", Date),
    Column("target", Text),
    Column("status", Text),
    Column("error_code", Text),
    Column("reports", BigInteger),
    Column("rolled", Boolean),
)

# Accepted errors[].code values.
error_codes = Table(
    "error_codes",
    metadata,
    Column("code", Text, primary_key=True),
    Column("description", Text, nullable=False),
)

# What each running relay does with each target.
relay_targets = Table(
    "relay_targets",
    metadata,
    Column("relay_id", Text, primary_key=True),
    Column("target", Text, primary_key=True),
    Column("state", Text, nullable=False),
    Column("reason", Text),
    Column("since", _timestamptz(), nullable=False),
    Column("heartbeat_at", _timestamptz(), nullable=False),
    Column("paused_until", _timestamptz()),
)

# One row per dead row put back to pending, append-only.
requeues = Table(
    "requeues",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("update_id", BigInteger, ForeignKey(action_status_updates.c.id), nullable=False),
    Column("action_id", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("requeued_at", _timestamptz(), nullable=False),
    Column("requeued_by", Text, nullable=False),
    Column("reason", Text),
    Column("dead_at", _timestamptz()),
    Column("attempts", Integer, nullable=False),
)

# The migrations applied.
schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("name", Text, nullable=False),
    Column("checksum", Text, nullable=False),
    Column("applied_at", _timestamptz(), nullable=False),
)
