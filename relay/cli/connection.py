"""What ``outbox-relay check`` says about the database connection the relay will use.

The host(s) and port(s) of ``database_url`` (several for an HA pair, with their
``target_session_attrs``), whether a connection pooler stands in between (told by the store
on its first session, :meth:`relay.pg.store.Store._connected`), and where LISTEN wake-ups come
from: the same connection, ``listen_database_url``, or none (the relay polls). Built from the
URL's parts: never the user's password, never the URL itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.durations import human_duration
from relay.settings import Secret, Settings, database_params

__all__ = ["Connection", "Listen", "describe", "listen_plan"]

# target_session_attrs values that never land on a standby.
_WRITABLE = ("read-write", "primary")


def hosts(url: Secret) -> list[str]:
    """``host:port`` per host of the URL, as libpq pairs them (one port for all, or one each);
    a socket folder as it is; ``local socket`` when the URL names none."""
    params = database_params(url)
    names = params.get("host", "").split(",") if params.get("host") else []
    ports = params.get("port", "").split(",") if params.get("port") else []
    if not names:
        return [f"local socket{':' + ports[0] if ports and ports[0] else ''}"]
    out = []
    for i, name in enumerate(names):
        port = ports[i] if len(ports) == len(names) else (ports[0] if ports else "")
        shown = f"[{name}]" if ":" in name else name
        out.append(f"{shown or 'local socket'}{':' + port if port else ''}")
    return out


@dataclass(frozen=True)
class Connection:
    """``database_url`` as the relay will connect."""

    hosts: list[str]
    target_session_attrs: str | None
    pooler: bool | None  # None: not known (no session was opened)

    @property
    def warning(self) -> str | None:
        """Several hosts, but nothing keeps the relay off a standby."""
        if len(self.hosts) < 2 or self.target_session_attrs in _WRITABLE:
            return None
        given = self.target_session_attrs or "any (not set)"
        return (
            f"database_url names {len(self.hosts)} hosts with target_session_attrs={given}: the relay "
            "could connect to a standby; add ?target_session_attrs=read-write to the URL"
        )

    @property
    def detail(self) -> str:
        where = ", ".join(self.hosts)
        if len(self.hosts) > 1:
            where += f" (target_session_attrs={self.target_session_attrs or 'any'})"
        if self.pooler:
            how = "through a connection pooler (no server-side prepared statements)"
        elif self.pooler is None:
            how = "pooler not known"
        else:
            how = "direct to PostgreSQL"
        return f"connection: {where}, {how}"

    def fields(self) -> dict[str, Any]:
        return {
            "hosts": self.hosts,
            "target_session_attrs": self.target_session_attrs,
            "pooler": self.pooler,
            "warning": self.warning,
        }


def describe(settings: Settings, pooler: bool | None) -> Connection:
    url = settings.require_database_url()
    return Connection(hosts(url), database_params(url).get("target_session_attrs"), pooler)


@dataclass(frozen=True)
class Listen:
    """Where the relay's LISTEN wake-ups come from: ``direct`` (database_url itself),
    ``listen_database_url``, or ``none`` (behind a pooler without it: polling)."""

    via: str
    hosts: list[str]
    poll_interval: float

    @property
    def polling(self) -> str:
        return (
            "database_url goes through a connection pooler and listen_database_url is not set: "
            f"no LISTEN; the relay polls every {human_duration(self.poll_interval)} (poll_interval)"
        )

    def fields(self) -> dict[str, Any]:
        return {"via": self.via, "hosts": self.hosts, "poll_interval_seconds": self.poll_interval}


def listen_plan(settings: Settings, pooler: bool | None) -> Listen:
    """What the daemon will do (:meth:`relay.service.daemon.Relay.listener`)."""
    if settings.listen_database_url is not None:
        return Listen("listen_database_url", hosts(settings.listen_database_url), settings.poll_interval)
    if pooler:
        return Listen("none", [], settings.poll_interval)
    return Listen("direct", hosts(settings.require_database_url()), settings.poll_interval)
