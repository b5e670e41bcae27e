"""When PostgreSQL refuses an update row, and how we say so.

The outbox schema refuses a bad row itself (see README, "Refused rows"): a trigger raises
``check_violation`` (or ``not_null_violation``) with the rule's name in the error's constraint
field and a readable message, and ``outbox.enqueue_action_status`` raises ``unique_violation``
for a different outcome already queued for the action. This module turns those driver errors
into :class:`~relay.errors.InvalidUpdate` / :class:`~relay.errors.ConflictingUpdate`, keeping
the constraint name and PostgreSQL's own message. Any other error is not a refusal: ``None``.

Both the store (the daemon and the command line) and the writer API (:mod:`relay.pg.writer`)
use it, so a refusal reads the same wherever it is raised.
"""

from __future__ import annotations

import sys

import psycopg
import psycopg.errors

from relay.errors import ConflictingUpdate, InvalidUpdate

__all__ = ["refusal"]

# SQLSTATEs by which the schema refuses a row: its rules (23514), a null (23502), a value that is
# not even of the column's type (22P02), and the enqueue function's own exception (P0001).
_REFUSED = (
    psycopg.errors.CheckViolation
    | psycopg.errors.NotNullViolation
    | psycopg.errors.InvalidTextRepresentation
    | psycopg.errors.RaiseException
)


def refusal(exc: BaseException) -> InvalidUpdate | None:
    """Our error for a refused row (``exc`` from psycopg, or SQLAlchemy wrapping it), else None.

    A unique violation is a :class:`ConflictingUpdate`: the action already has another outcome
    queued for the target. The message is PostgreSQL's primary message, without the SQLSTATE,
    hint or context lines; ``constraint`` is the rule's name when PostgreSQL gave one.
    """
    orig = _unwrapped(exc)
    if not isinstance(orig, psycopg.Error):
        return None
    if isinstance(orig, psycopg.errors.UniqueViolation):
        return ConflictingUpdate(orig.diag.message_primary or str(orig), orig.diag.constraint_name)
    if isinstance(orig, _REFUSED):
        return InvalidUpdate(orig.diag.message_primary or str(orig), orig.diag.constraint_name)
    return None


def _unwrapped(exc: BaseException) -> BaseException:
    """The driver's error inside SQLAlchemy's ``DBAPIError``, else ``exc`` itself.

    SQLAlchemy is looked up, not imported: an error can only come from it once it is loaded,
    and the daemon, which runs on psycopg alone, never pays for loading it here.
    """
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError):
        orig: BaseException = exc.orig
        return orig
    return exc
