"""outbox-relay: report Mirakl Connect action outcomes exactly once, from a PostgreSQL outbox.

The public Python API, for applications and auditors::

    import relay

    relay.enqueue(conn, action_id, "SUCCESS")            # in your transaction (SQLAlchemy or psycopg)
    await relay.enqueue_async(session, action_id, "FAILED", [relay.Error("OTHER", "it broke")])
    relay.tables.delivery_audit                           # SQLAlchemy Table objects of the schema

Refused rows raise :class:`relay.InvalidUpdate`, a different outcome already queued
:class:`relay.ConflictingUpdate`. Everything else in the package is the daemon's and may change.

``import relay`` stays cheap (the command line imports it first): each name is imported from
its module (:mod:`relay.pg.writer`, :mod:`relay.pg.tables`, :mod:`relay.errors`) on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "ConflictingUpdate",
    "Error",
    "InvalidUpdate",
    "__version__",
    "enqueue",
    "enqueue_async",
    "tables",
]

if TYPE_CHECKING:
    from relay.errors import ConflictingUpdate, InvalidUpdate
    from relay.pg import tables
    from relay.pg.writer import Error, enqueue, enqueue_async

# name -> (module, attribute); attribute None: the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "enqueue": ("relay.pg.writer", "enqueue"),
    "enqueue_async": ("relay.pg.writer", "enqueue_async"),
    "Error": ("relay.pg.writer", "Error"),
    "InvalidUpdate": ("relay.errors", "InvalidUpdate"),
    "ConflictingUpdate": ("relay.errors", "ConflictingUpdate"),
    "tables": ("relay.pg.tables", None),
}


def __getattr__(name: str) -> object:
    """Import a public name on first use, then keep it in the module like any other global."""
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'relay' has no attribute {name!r}") from None
    module = import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
