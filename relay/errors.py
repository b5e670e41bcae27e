"""The one error tree of outbox-relay.

Every error the relay raises on purpose is a ``RelayError``. Lower-level errors
(psycopg, SQLAlchemy, httpx, OS) are translated where they cross into our code,
with ``raise ... from exc``, so callers only ever catch these::

    RelayError                      exit code 1 unless a subclass says otherwise
    ├── ConfigError                 bad configuration or command line (exit 2)
    ├── InvalidUpdate               PostgreSQL refused a row: a constraint says why (exit 2)
    ├── ConflictingUpdate           the action already has a different outcome queued (exit 2)
    ├── NotFound                    no such action / row (exit 1)
    ├── DatabaseError               PostgreSQL unreachable or failed (exit 1)
    │   ├── PermissionDenied        the database user lacks a privilege: names the role to grant (exit 2)
    │   ├── SchemaError             schema missing, too old, or a migration file changed (exit 1)
    │   └── WriteRefused            PostgreSQL answered but refused to store these values (exit 1)
    ├── AuthError                   a token could not be obtained (exit 1)
    └── Refused                     the web console refuses a request (``http_status``)
        ├── BadRequest              a field outside its rule (400)
        ├── Forbidden               the role, a stale or missing CSRF field, a cross-site POST (403)
        ├── PageNotFound            no such page or update (404)
        └── TooLarge                a form over its size limit (413)

The command line turns any of them into one line on stderr and ``exit_code``.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error raised on purpose by outbox-relay."""

    exit_code = 1


class ConfigError(RelayError):
    """The configuration file, environment or command line is invalid."""

    exit_code = 2


class InvalidUpdate(RelayError):
    """PostgreSQL refused an update row; the message names the rule that failed."""

    exit_code = 2

    def __init__(self, message: str, constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint


class ConflictingUpdate(InvalidUpdate):
    """The action already has a different outcome queued for the same target."""


class NotFound(RelayError):
    """The action or row asked for does not exist."""


class DatabaseError(RelayError):
    """PostgreSQL could not be reached or a statement failed unexpectedly."""


class PermissionDenied(DatabaseError):
    """PostgreSQL refused the database user a privilege: a configuration error, whose message
    names the role to grant (``grant outbox_relay to relay_svc``)."""

    exit_code = 2


class SchemaError(DatabaseError):
    """The outbox schema is missing, out of date, or an applied migration changed."""


class WriteRefused(DatabaseError):
    """PostgreSQL is there but refused a write for what it holds (a value it cannot store, a
    constraint, a row that is gone): retrying the same values is pointless, other values may pass."""


class AuthError(RelayError):
    """A bearer token could not be obtained from the token endpoint or file."""


class Refused(RelayError):
    """The web console refuses a request; the page says why, with ``http_status``."""

    http_status = 400


class BadRequest(Refused):
    """A query-string or form field outside its rule."""


class Forbidden(Refused):
    http_status = 403


class PageNotFound(Refused):
    http_status = 404


class TooLarge(Refused):
    http_status = 413
