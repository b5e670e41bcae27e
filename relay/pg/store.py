"""The only module that talks to PostgreSQL.

Statements live in ``queries.sql`` as named blocks and are loaded once. Every method is
one short transaction; none is ever held open across an HTTP request. Everything runs on
psycopg directly, over the small pool of :mod:`relay.pg.pool` (SQLAlchemy is for applications
and auditors: :mod:`relay.pg.writer`, :mod:`relay.pg.tables`). psycopg errors are translated
into the :mod:`relay.errors` tree here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache, cached_property
from importlib import resources
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg.errors
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from relay.errors import (
    ConfigError,
    DatabaseError,
    InvalidUpdate,
    PermissionDenied,
    SchemaError,
    WriteRefused,
)
from relay.pg.pool import Pool, PoolTimeout
from relay.pg.refusals import refusal
from relay.redact import mask, redact, secret_forms
from relay.settings import Secret, database_params

if TYPE_CHECKING:  # annotations only: uuid costs the operator commands a few ms to import
    from uuid import UUID

NOTIFY_CHANNEL = "outbox_action_status"
_DRIVER_ERRORS = (psycopg.Error, OSError, PoolTimeout)
_BLOCK = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")
# The group roles of schema/schema.sql ("Group roles"), in the order it creates them.
GROUP_ROLES = ("outbox_writer", "outbox_relay", "outbox_operator", "outbox_auditor")


class NamedQueries:
    """The statements of one ``.sql`` file, by name: each block starts with a ``-- name --`` line.

    ``text(name)`` is the statement as written (``:param`` placeholders, as SQLAlchemy's ``text()``
    takes them); ``driver(name)`` is the same with psycopg's ``%(param)s`` placeholders.
    """

    def __init__(self, package: str, filename: str = "queries.sql") -> None:
        self.package, self.filename = package, filename

    @cached_property
    def statements(self) -> dict[str, str]:
        source = resources.files(self.package).joinpath(self.filename).read_text(encoding="utf-8")
        parts = _BLOCK.split(source)
        return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}

    def text(self, name: str) -> str:
        return self.statements[name]

    @cache  # noqa: B019 -- a few module-level instances, kept for the life of the process
    def driver(self, name: str) -> str:
        return _PARAM.sub(r"%(\1)s", self.statements[name].replace("%", "%%"))


_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
QUERIES = NamedQueries("relay.pg")


def queries() -> dict[str, str]:
    """The named statements of ``relay/pg/queries.sql``."""
    return QUERIES.statements


def driver_sql(name: str) -> str:
    """The named statement with psycopg placeholders: ``:name`` becomes ``%(name)s``."""
    return QUERIES.driver(name)


@dataclass(frozen=True)
class ClaimedRow:
    id: int
    action_id: str
    status: str
    errors: list[dict[str, str]]
    target: str
    attempts: int
    requests: int
    created_at: datetime
    budget_from: datetime  # when the retry budget (retry.max_age) started: created or re-queued
    outcome_unknown: bool
    lease_until: datetime
    marked: bool  # the claim already marked it as being sent (sending_at)
    token: UUID


_CLAIM_COLUMNS = (
    "id",
    "action_id",
    "status",
    "errors",
    "target",
    "attempts",
    "requests",
    "created_at",
    "budget_from",
    "outcome_unknown",
    "lease_until",
    "marked",
)


@dataclass(frozen=True)
class AttemptRecord:
    """One HTTP request made for an update, as written to ``outbox.delivery_attempts``."""

    update_id: int
    claim_token: UUID
    action_id: str
    target: str
    attempt: int
    started_at: datetime
    duration_ms: float
    http_status: int | None
    outcome: str
    error_code: str | None
    error_message: str | None
    response_body: str | None
    reached_api: str = "answered"  # answered, maybe (no answer; it may have been applied), no (never left)


@dataclass(frozen=True)
class Recorded:
    """What one write of results did: rows updated, and the ids of rows not in the database."""

    recorded: int
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class RowResult:
    """The new state of one claimed update. ``state='pending'`` schedules a retry at ``retry_at``."""

    id: int
    token: UUID
    state: str
    retry_at: datetime | None = None
    charged: int = 0
    requests: int = 0
    unknown: bool = False
    http_status: int | None = None
    last_error: str | None = None
    action_id: str | None = None  # when given, a row of this id holding another action is not ours


def libpq_conninfo(url: Secret) -> str:
    """A libpq keyword/value string from the URL, built from its components: the URL is decoded
    once and never rendered back into a URL (a round trip would decode ``%20`` into a space)."""
    return make_conninfo("", **database_params(url))


def _secret_forms(url: Secret) -> tuple[str, ...]:
    """The database password in every form a message may quote it."""
    return secret_forms([database_params(url).get("password")])


def _scrub(error: Exception, secrets: tuple[str, ...]) -> Exception:
    """The same error with every form of the password, and anything that looks like one, masked."""
    text = str(error)
    clean = redact(mask(text, secrets))
    if clean == text:
        return error
    scrubbed = type(error).__new__(type(error))
    Exception.__init__(scrubbed, clean)
    scrubbed.__dict__.update(error.__dict__)
    return scrubbed


def _translate(
    exc: BaseException, secrets: tuple[str, ...] = (), role: str | None = None, user: str | None = None
) -> Exception:
    return _scrub(_translate_raw(exc, role, user), secrets)


def quote_role(name: str) -> str:
    """A role name as SQL takes it: as is when plain, else double-quoted (``"outbox-relay"``)."""
    return name if _PLAIN_NAME.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def _denied(orig: psycopg.Error, role: str | None, user: str | None) -> DatabaseError:
    """PostgreSQL's own ``permission denied for ...``, with the grant that cures it: the user
    lacks ``role``. A refusal a trigger of the schema raised with the same SQLSTATE (a rule
    no grant lifts, such as an append-only table) stays a :class:`DatabaseError`."""
    first = orig.diag.message_primary or (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    if not first.startswith("permission denied"):
        return DatabaseError(f"database error: {first}")
    who = quote_role(user) if user else "the database user"
    if role is None:
        return PermissionDenied(f"{first} (as {who})")
    return PermissionDenied(
        f'{first}: {who} needs the {role} role: grant {role} to {who} (as a superuser; README "Roles")'
    )


def _translate_raw(exc: BaseException, role: str | None = None, user: str | None = None) -> Exception:
    """Our error for a database exception: a refused row, a conflict, a missing privilege, or a
    database failure."""
    refused = refusal(exc)
    if refused is not None:
        return refused
    if isinstance(exc, PoolTimeout):
        return DatabaseError(f"database error: {exc}")
    orig = exc
    if isinstance(orig, psycopg.errors.InsufficientPrivilege):
        return _denied(orig, role, user)
    if isinstance(orig, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName) or (
        isinstance(orig, psycopg.errors.UndefinedFunction) and "outbox." in str(orig)
    ):
        return SchemaError("the outbox schema is missing or incomplete: run `outbox-relay migrate`")
    if isinstance(orig, psycopg.errors.DataError | psycopg.errors.IntegrityError):
        first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        return WriteRefused(f"database refused the values: {first}")
    if isinstance(orig, psycopg.Error):
        first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        return DatabaseError(f"database error: {first}")
    return DatabaseError(f"database error: {type(exc).__name__}: {exc}")


class Store:
    """Named queries over one small connection pool, and the health check's own connection (``probe``).

    ``listen_url`` names a direct connection for LISTEN (:meth:`listen`); without it LISTEN
    goes to ``url``. ``pooler`` tells, once a session was opened, whether a pooler stands between
    the relay and PostgreSQL (:meth:`_connected`).

    ``role`` is the group role the user needs for what this store is used for
    (``outbox_relay`` for the daemon): a ``permission denied`` names it, with the ``grant`` to
    run (:class:`~relay.errors.PermissionDenied`). ``notices`` receives, one line each, the
    notices and warnings PostgreSQL sends while migrating (:meth:`migration_session`).
    """

    def __init__(
        self,
        url: Secret,
        *,
        pool_size: int = 4,
        application_name: str = "outbox-relay",
        role: str | None = None,
        notices: Callable[[str], None] | None = None,
        listen_url: Secret | None = None,
    ) -> None:
        self.url = url
        self.listen_url = listen_url
        self.pooler: bool | None = None  # None until a session was opened
        self.role = role
        self.notices = notices
        self._secrets = _secret_forms(url)
        # The URL's parts go to psycopg as keywords: never re-rendered into a URL string.
        params: dict[str, Any] = {"connect_timeout": 10, **database_params(url)}
        self._user: str | None = params.get("user") or None  # libpq's default is known once connected
        params["application_name"] = application_name
        self.pool = Pool(params, size=pool_size, timeout=30, on_connect=self._connected)
        # The health check's connection, outside the pool (opened on first use).
        self.probe = HealthProbe(url, application_name=f"{application_name} health")

    async def _connected(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """A new session: is a pooler (PgBouncer, ...) in between? Then no server-side prepared
        statements on it.

        psycopg prepares a statement on the server after ``prepare_threshold`` (5) runs of it;
        behind a pooler in transaction mode the next transaction may run on another server
        connection, where that statement does not exist (PgBouncer 1.18 does not track them).

        How it is told: PostgreSQL's BackendKeyData carries the backend's process id, which
        ``pg_backend_pid()`` returns too; PgBouncer (and Pgpool-II, Odyssey, ...) hand the client
        a key of their own, since a cancel request must come back to them. Verified on PgBouncer
        1.18 in transaction mode: ``conn.info.backend_pid`` is PgBouncer's random key, never the
        server's pid. Asked on every new session (one round trip), so a URL that moves to a
        pooler on reconnect is followed; a direct session keeps its prepared statements.
        """
        pooled = await _through_pooler(conn)
        self.pooler = pooled
        if pooled:
            conn.prepare_threshold = None

    async def close(self) -> None:
        await self.probe.close()
        await self.pool.close()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Transaction]:
        """Several named statements in one transaction."""
        try:
            async with self.pool.connection() as conn:
                try:
                    async with conn.transaction():
                        yield Transaction(conn)
                except psycopg.errors.InsufficientPrivilege:
                    await self._whoami(conn)
                    raise
        except _DRIVER_ERRORS as exc:
            raise self._error(exc) from exc

    async def _whoami(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Who was refused a privilege: ``current_user`` (``SET ROLE`` included), asked on the
        session that was refused, for the message's ``grant ROLE to USER``."""
        try:
            self._user = str((await Transaction(conn).rows("whoami"))[0]["name"])
        except psycopg.Error:
            self._user = self._user or conn.info.user

    def _error(self, exc: BaseException) -> Exception:
        return _translate(exc, self._secrets, self.role, self._user)

    async def fetch(
        self, source: NamedQueries, name: str, params: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Run a named statement of another query file (the demo's figures) as :meth:`_rows` does."""
        return await self._rows(name, params, source)

    async def _rows(
        self, name: str, params: Mapping[str, Any] | None = None, source: NamedQueries = QUERIES
    ) -> list[dict[str, Any]]:
        """Run one named statement in its own implicit transaction: one round trip."""
        try:
            async with self.pool.connection() as conn:
                try:
                    return await Transaction(conn).rows(name, params, source)
                except psycopg.errors.InsufficientPrivilege:
                    await self._whoami(conn)
                    raise
                except psycopg.errors.ReadOnlySqlTransaction:
                    # The session is read-only for life (opened while the database was read-only,
                    # or on a standby): never hand this one out again.
                    self.pool.discard(conn)
                    raise
        except _DRIVER_ERRORS as exc:
            raise self._error(exc) from exc

    # -- schema ----------------------------------------------------------------------------
    async def ping(self) -> None:
        await self._rows("ping")

    async def schema_version(self) -> int:
        async with self._tx() as tx:
            if not (await tx.rows("schema_exists"))[0]["present"]:
                return 0
            return int((await tx.rows("schema_version"))[0]["version"])

    async def missing_roles(self) -> list[str]:
        """The group roles of the schema (:data:`GROUP_ROLES`) that do not exist in the cluster."""
        rows = await self._rows("roles_missing", {"roles": list(GROUP_ROLES)})
        return [str(r["rolname"]) for r in rows]

    async def privileges(self, role: str, retention: bool) -> Privileges:
        """What the connected user lacks of what ``role`` (``outbox_relay``) is granted for the
        daemon's work; ``retention`` adds ``outbox.purge_finished`` and ``outbox.drop_old_attempts``.
        Read from the catalogs by object id, so a user without any privilege can ask too."""
        row = (await self._rows("privileges_relay", {"role": role, "retention": retention}))[0]
        return Privileges(
            user=str(row["usr"]),
            found=bool(row["found"]),
            missing=list(row["missing"] or []),
            member=row["member"],
            owner=bool(row["owner"]),
        )

    @asynccontextmanager
    async def migration_session(self) -> AsyncIterator[MigrationSession]:
        """A connection to migrate on; each of its steps is one transaction that holds the
        migrations lock (:class:`MigrationSession`).

        The server's notices and warnings while a migration file runs (a role the user may not
        create, ...) go to :attr:`notices` as they arrive."""
        try:
            async with self.pool.connection() as conn:
                self._user = self._user or conn.info.user
                yield MigrationSession(conn, self.notices)
        except _DRIVER_ERRORS as exc:
            raise self._error(exc) from exc

    # -- writers ---------------------------------------------------------------------------
    async def enqueue(
        self, action_id: str, status: str, errors: Sequence[Mapping[str, str]], target: str
    ) -> int:
        rows = await self._rows(
            "updates_enqueue",
            {"action_id": action_id, "status": status, "errors": json.dumps(list(errors)), "target": target},
        )
        return int(rows[0]["id"])

    async def notify_relays(self) -> None:
        await self._rows("notify_relays")

    # -- maintenance (relay/core/retention.py) -----------------------------------------------
    async def ensure_partitions(self, months_ahead: int) -> list[str]:
        """Create the monthly partitions of ``delivery_attempts`` up to ``months_ahead`` months
        ahead; returns the names created (none when they all exist)."""
        rows = await self._rows("ledger_partitions_ensure", {"months_ahead": months_ahead})
        return [str(r["name"]) for r in rows]

    async def rollup_reports(self, max_days: int) -> list[tuple[date, int]]:
        """Count up to ``max_days`` ended UTC days into ``outbox.daily_reports``: (day, reports)."""
        rows = await self._rows("ledger_rollup", {"max_days": max_days})
        return [(r["day"], int(r["reports"])) for r in rows]

    async def drop_old_attempts(self, older_than: float) -> tuple[str, int, int] | None:
        """One step of attempt retention (``outbox.drop_old_attempts``): (partition, attempt rows
        dropped, rows kept because their update still exists), or None when nothing is left."""
        rows = await self._rows("ledger_drop_attempts", {"older_than": older_than})
        if not rows:
            return None
        return str(rows[0]["partition_name"]), int(rows[0]["attempts"]), int(rows[0]["kept"])

    # -- the relay -------------------------------------------------------------------------
    async def claim(
        self, target: str, limit: int, lease: float, token: UUID, relay_id: str, send_now: int = 0
    ) -> list[ClaimedRow]:
        """Claim up to ``limit`` due rows; the first ``send_now`` are marked as being sent."""
        rows = await self._rows(
            "updates_claim",
            {
                "target": target,
                "limit": limit,
                "lease": lease,
                "token": token,
                "relay_id": relay_id,
                "send_now": send_now,
            },
        )
        claimed = [ClaimedRow(**{k: r[k] for k in _CLAIM_COLUMNS}, token=token) for r in rows]
        return sorted(claimed, key=lambda row: not row.marked)

    async def mark_sending(self, rows: Sequence[tuple[int, UUID]]) -> set[int]:
        """Mark claimed rows as being sent, before their requests leave; returns the ids still
        held under their claims (a row missing from the answer must not be sent)."""
        if not rows:
            return set()
        found = await self._rows(
            "updates_mark_sending", {"ids": [r[0] for r in rows], "tokens": [r[1] for r in rows]}
        )
        return {int(r["id"]) for r in found}

    async def record(
        self, results: Sequence[RowResult], attempts: Sequence[AttemptRecord], relay_id: str
    ) -> int:
        """Write results guarded by their claim tokens, plus attempt rows; returns rows updated.

        Raises :class:`WriteRefused` when PostgreSQL answered but would not store these values
        (the caller then writes them one by one), :class:`DatabaseError` when it is unreachable.
        """
        return (await self.record_batch(results, attempts, relay_id)).recorded

    async def record_batch(
        self, results: Sequence[RowResult], attempts: Sequence[AttemptRecord], relay_id: str
    ) -> Recorded:
        """:meth:`record`, also naming the rows this database does not hold (deleted, or lost with
        a failed-over primary): their results and attempt rows are dropped, not written."""
        if not results and not attempts:
            return Recorded(0, ())
        try:
            return await self._record(results, attempts, relay_id)
        except WriteRefused:
            raise
        except (InvalidUpdate, SchemaError) as exc:
            raise WriteRefused(str(exc)) from exc
        except DatabaseError:
            raise
        except Exception as exc:  # the driver could not even encode a value
            raise WriteRefused(f"results could not be encoded: {type(exc).__name__}") from exc

    async def _record(
        self, results: Sequence[RowResult], attempts: Sequence[AttemptRecord], relay_id: str
    ) -> Recorded:
        last_codes: dict[int, str | None] = {}  # each result's last request's error code
        for a in sorted(attempts, key=lambda a: a.attempt):
            last_codes[a.update_id] = a.error_code
        params: dict[str, Any] = {
            "relay_id": relay_id,
            "ids": [r.id for r in results],
            "tokens": [r.token for r in results],
            "actions": [r.action_id for r in results],
            "states": [r.state for r in results],
            "retry_at": [r.retry_at for r in results],
            "charged": [r.charged for r in results],
            "requests": [r.requests for r in results],
            "unknown": [r.unknown for r in results],
            "http_status": [r.http_status for r in results],
            "last_error": [r.last_error for r in results],
            "last_error_code": [last_codes.get(r.id) for r in results],
            "a_update_id": [a.update_id for a in attempts],
            "a_token": [a.claim_token for a in attempts],
            "a_action_id": [a.action_id for a in attempts],
            "a_target": [a.target for a in attempts],
            "a_attempt": [a.attempt for a in attempts],
            "a_started_at": [a.started_at for a in attempts],
            "a_duration_ms": [a.duration_ms for a in attempts],
            "a_http_status": [a.http_status for a in attempts],
            "a_outcome": [a.outcome for a in attempts],
            "a_error_code": [a.error_code for a in attempts],
            "a_error_message": [a.error_message for a in attempts],
            "a_response_body": [a.response_body for a in attempts],
            "a_reached_api": [a.reached_api for a in attempts],
        }
        rows = await self._rows("updates_record", params)
        return Recorded(int(rows[0]["recorded"]), tuple(int(i) for i in rows[0]["dropped"]))

    async def heartbeat(
        self,
        relay_id: str,
        states: Sequence[tuple[str, str, str | None]],
        paused_for: Mapping[str, float | None] | None = None,
    ) -> None:
        """Write the targets' states; ``paused_for``: seconds left of this relay's own pauses."""
        held = paused_for or {}
        await self._rows(
            "relay_targets_heartbeat",
            {
                "relay_id": relay_id,
                "targets": [s[0] for s in states],
                "states": [s[1] for s in states],
                "reasons": [s[2] for s in states],
                "paused_for": [held.get(s[0]) for s in states],
            },
        )

    async def peers(
        self, relay_id: str, paused_for: Mapping[str, float | None], alive: float, lease: float
    ) -> list[PeerRow]:
        """Touch this relay's rows of ``outbox.relay_targets`` (``paused_for``: target -> seconds
        left of its own pause, or None) and read the other relays: live ones, and dead ones whose
        claims may still hold (``relay_peers``)."""
        rows = await self._rows(
            "relay_peers",
            {
                "relay_id": relay_id,
                "targets": list(paused_for),
                "paused_for": list(paused_for.values()),
                "alive": alive,
                "lease": lease,
            },
        )
        return [
            PeerRow(
                str(r["relay_id"]),
                str(r["target"]),
                str(r["state"]),
                r["reason"],
                None if r["paused_for"] is None else float(r["paused_for"]),
                bool(r["alive"]),
            )
            for r in rows
        ]

    async def release_claims(self, relay_ids: Sequence[str]) -> dict[str, int]:
        """Make the rows claimed by ``relay_ids`` due now (``relay_claims_release``); returns the
        rows released per target."""
        rows = await self._rows("relay_claims_release", {"relay_ids": list(relay_ids)})
        return {str(r["target"]): int(r["released"]) for r in rows}

    async def forget_relay(self, relay_id: str) -> None:
        await self._rows("relay_targets_forget", {"relay_id": relay_id})
        await self._rows("relay_targets_expire")

    async def listen(self, ready: asyncio.Event | None = None) -> AsyncIterator[None]:
        """Yield once per NOTIFY on the outbox channel; raises DatabaseError when the connection is lost.

        On ``listen_url`` when set (a direct connection: LISTEN needs a session of its own,
        which a transaction-mode pooler does not give), else on ``url``. A connection that
        turns out to go through a pooler (told as :meth:`_connected` tells it) raises
        :class:`ConfigError`: a LISTEN there would be accepted and then hear nothing."""
        url = self.listen_url or self.url
        try:
            conn = await psycopg.AsyncConnection.connect(
                libpq_conninfo(url), autocommit=True, application_name="outbox-relay listener"
            )
        except (psycopg.Error, OSError) as exc:
            raise _translate(exc, _secret_forms(url), self.role, self._user) from exc
        try:
            if await _through_pooler(conn):
                name = "listen_database_url" if self.listen_url else "database_url"
                raise ConfigError(
                    f"{name} goes through a connection pooler: LISTEN needs a direct connection to "
                    "PostgreSQL; the relay polls every poll_interval instead"
                )
            await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            if ready is not None:
                ready.set()
            async for _ in conn.notifies():
                yield None
        except (psycopg.Error, OSError) as exc:
            raise _translate(exc, _secret_forms(url), self.role, self._user) from exc
        finally:
            await conn.close()

    # -- operators (relay/cli/ops.py) and metrics ---------------------------------------------
    async def server_version(self) -> str:
        """The server's version, e.g. ``18.6``."""
        rows = await self._rows("ops_server_version")
        return str(rows[0]["version"]).split()[0]

    async def status_targets(self, exact_below: int = 10_000) -> list[dict[str, Any]]:
        """Per target: rows per state, oldest pending age, deliveries and dead letters in the last
        hour, without scanning the table (its cost does not grow with history).

        Exact, through the partial indexes: ``pending``, ``in_flight``, ``dead``,
        ``oldest_pending_seconds``, ``delivered_last_hour``, ``dead_last_hour``. ``delivered`` is
        the planner's estimate (``delivered_exact`` false) unless that estimate is under
        ``exact_below``: then the target's delivered rows are counted (``delivered_exact`` true).
        Counting visits about one table page per row (33 ms for 10,000 rows of a target holding
        5% of a 5-million-row table), hence the low bound; the estimate scales with the table."""
        async with self._tx() as tx:
            found: dict[str, dict[str, Any]] = {}

            def target(name: str) -> dict[str, Any]:
                empty = dict(pending=0, in_flight=0, dead=0, oldest_pending_seconds=None)
                empty.update(delivered_last_hour=0, dead_last_hour=0)
                return found.setdefault(name, {"target": name, **empty})

            for r in await tx.rows("ops_status_target_names"):
                target(r["target"])
            for r in await tx.rows("ops_status_waiting"):
                target(r["target"]).update(r)
            for r in await tx.rows("ops_status_dead"):
                target(r["target"]).update(r)
            for r in await tx.rows("ops_status_last_hour"):
                target(r["target"]).update(r)
            for name, row in found.items():
                plan = (await tx.rows("ops_status_delivered_plan", {"target": name}))[0]
                estimate = round(next(iter(plan.values()))[0]["Plan"]["Plan Rows"])
                row["delivered"], row["delivered_exact"] = estimate, False
                if estimate < exact_below:
                    params = {"target": name, "limit": exact_below}
                    counted = int((await tx.rows("ops_status_delivered_count", params))[0]["delivered"])
                    if counted < exact_below:
                        row["delivered"], row["delivered_exact"] = counted, True
                    else:  # the estimate was stale: at least this many
                        row["delivered"] = max(estimate, counted)
        return [found[name] for name in sorted(found)]

    async def ledger(self) -> dict[str, Any]:
        """The attempt partitions: ``covered_until``, ``partitions``, ``default_rows`` (estimated),
        ``short`` (next month has none yet)."""
        return dict((await self._rows("ops_ledger"))[0])

    async def live_relays(self, fresh: float = 120.0) -> list[dict[str, Any]]:
        """``outbox.relay_targets`` rows with a heartbeat in the last ``fresh`` seconds."""
        return [dict(r) for r in await self._rows("ops_live_relays", {"fresh": fresh})]

    async def backlog(self, targets: Sequence[str] = ()) -> list[TargetBacklog]:
        """Per target, rows not yet final (pending or in flight) and the age of the oldest, in
        seconds (since it was written, or re-queued). ``targets`` are listed even when empty."""
        found: dict[str, TargetBacklog] = {}
        for r in await self._rows("ops_backlog"):
            name = str(r["target"])
            found[name] = TargetBacklog(name, int(r["pending"]), float(r["oldest_pending_seconds"]))
        for name in targets:
            found.setdefault(name, TargetBacklog(name, 0, 0.0))
        return [found[name] for name in sorted(found)]

    async def audit(self, action_id: str, target: str | None = None) -> list[dict[str, Any]]:
        """Every ``outbox.delivery_audit`` row of the action (``update``) with its ``attempts`` in order."""
        async with self._tx() as tx:
            updates = await tx.rows("ops_audit_updates", {"action_id": action_id, "target": target})
            ids = [u["id"] for u in updates]
            by_update: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
            if ids:
                for item in await tx.rows("ops_audit_attempts", {"ids": ids}):
                    by_update[item.pop("update_id")].append(item)
        return [{"update": u, "attempts": by_update[u["id"]]} for u in updates]

    async def delivery_report(
        self, day_from: date, day_to: date, target: str | None = None
    ) -> list[dict[str, Any]]:
        """Reports per target, status and error code over the UTC days ``day_from`` ..
        ``day_to`` (inclusive), from ``outbox.delivery_report``: ``target``, ``status``,
        ``error_code`` (None: every report of the status), ``reports``, ``rolled`` (every day of it
        from the rollup), ``live_reports`` (counted live from the updates)."""
        params = {"day_from": day_from, "day_to": day_to, "target": target}
        return [dict(r) for r in await self._rows("ops_audit_report", params)]

    async def dead_list(
        self,
        *,
        since: float | None = None,
        target: str | None = None,
        code: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Dead rows, newest first, with the error code of their last attempt."""
        params = {"since": since, "target": target, "code": code, "limit": limit}
        return [dict(r) for r in await self._rows("ops_dead_list", params)]

    async def dead_count(
        self,
        *,
        action_ids: Sequence[str] | None = None,
        target: str | None = None,
        code: str | None = None,
        since: float | None = None,
    ) -> int:
        """How many dead rows match, as :meth:`dead_list` filters them (without its limit)."""
        params: dict[str, Any] = {"target": target, "code": code, "since": since}
        if action_ids:
            rows = await self._rows("ops_dead_count_ids", {**params, "action_ids": list(action_ids)})
        else:
            rows = await self._rows("ops_dead_count", params)
        return int(rows[0]["n"])

    async def dead_retry_batch(
        self,
        *,
        after: int,
        reason: str,
        limit: int,
        action_ids: Sequence[str] | None = None,
        target: str | None = None,
        code: str | None = None,
    ) -> list[dict[str, Any]]:
        """Put up to ``limit`` dead rows with ``id > after`` back to pending, in one transaction.
        Returns the re-queued rows (``id``, ``action_id``, ``target``)."""
        params = {
            "after": after,
            "reason": reason,
            "limit": limit,
            "action_ids": list(action_ids) if action_ids else None,
            "target": target,
            "code": code,
        }
        return [dict(r) for r in await self._rows("ops_dead_retry", params)]

    async def purge_count(self, older_than: float, include_dead: bool) -> int:
        """The updates a purge would delete now (through the partial indexes)."""
        rows = await self._rows("ops_purge_count", {"older_than": older_than, "include_dead": include_dead})
        return int(rows[0]["updates"])

    async def purge_partitions(self, older_than: float) -> list[tuple[str, int]]:
        """The attempt partitions a purge would drop now, oldest first: (name, estimated rows)."""
        rows = await self._rows("ops_purge_partitions", {"older_than": older_than})
        return [(str(r["name"]), int(r["rows_estimate"])) for r in rows]

    async def purge_batch(
        self,
        older_than: float,
        include_dead: bool,
        limit: int,
        state: str = "delivered",
        start: datetime | None = None,
    ) -> tuple[int, int, str | None, datetime | None]:
        """Delete, through ``outbox.purge_finished``, up to ``limit`` rows in ``state``
        (``delivered``, or ``dead`` with ``include_dead``) that finished more than ``older_than``
        seconds ago, oldest first from ``start``, in one transaction, skipping rows others hold
        (their attempts go with their partition: :meth:`drop_old_attempts`; ``attempts`` is
        always 0 since 0006). Returns (updates, attempts) deleted and where the next batch
        starts: its state (None when nothing is left) and its ``start``. PostgreSQL refuses an
        ``older_than`` under one hour."""
        if state not in ("delivered", "dead"):
            raise ValueError(f"only delivered or dead rows are purged, not {state!r}")
        params = {
            "older_than": older_than,
            "include_dead": include_dead,
            "limit": limit,
            "from_state": state,
            "from_time": start,
        }
        row = (await self._rows("ops_purge_batch", params))[0]
        return int(row["updates"]), int(row["attempts"]), row["next_state"], row["next_from"]


async def _through_pooler(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether a pooler stands between this session and PostgreSQL: the process id PostgreSQL
    gave the client (BackendKeyData) is not the backend's own (see :meth:`Store._connected`)."""
    rows = await Transaction(conn).rows("backend_pid")
    return conn.info.backend_pid != int(rows[0]["pid"])


class HealthProbe:
    """The ``/healthz`` database check, on one connection of its own, never from the pool.

    So a starved delivery pool does not fail health checks, and health checks never take a
    connection delivery needs. The connection is opened on first use with a short connect
    timeout, and reopened after any failure; the check runs in a transaction with a short
    statement timeout (``SET LOCAL``: PgBouncer refuses a startup ``options`` parameter, and a
    session setting would stay on whichever server connection a pooler lent). Checks made at the same
    time take turns on it.
    """

    CONNECT_TIMEOUT = 2  # seconds (libpq's smallest useful value)
    STATEMENT_TIMEOUT_MS = 2000

    def __init__(self, url: Secret, *, application_name: str = "outbox-relay health") -> None:
        self.url = url
        self.application_name = application_name
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def ping(self) -> None:
        """``select 1`` on the probe's connection; :class:`DatabaseError` when it cannot."""
        async with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        libpq_conninfo(self.url),
                        autocommit=True,
                        connect_timeout=self.CONNECT_TIMEOUT,
                        application_name=self.application_name,
                    )
                async with self._conn.transaction():
                    check = Transaction(self._conn)
                    await check.rows("probe_statement_timeout", {"timeout": str(self.STATEMENT_TIMEOUT_MS)})
                    await check.rows("ping")
            except BaseException as exc:  # a cancelled check leaves the session in doubt too
                await self._drop()
                if isinstance(exc, psycopg.Error | OSError):
                    raise _translate(exc, _secret_forms(self.url)) from exc
                raise

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


class Transaction:
    """Named statements on one pooled session (inside ``conn.transaction()`` for :meth:`Store._tx`)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def rows(
        self, name: str, params: Mapping[str, Any] | None = None, source: NamedQueries = QUERIES
    ) -> list[dict[str, Any]]:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(source.driver(name), dict(params or {}))
            return await cur.fetchall() if cur.description else []


class MigrationSession:
    """Migration primitives, each one transaction that first takes the migrations lock
    (``pg_advisory_xact_lock``) and reads what is applied under it.

    The lock lasts for the transaction, not the session: correct straight to PostgreSQL and
    through a transaction-mode pooler alike (a session lock would stay on some server
    connection of the pooler's). Concurrent runs wait for each other at each step; one that
    finds a migration applied meanwhile skips it."""

    def __init__(
        self, conn: psycopg.AsyncConnection[Any], notices: Callable[[str], None] | None = None
    ) -> None:
        self._conn = conn
        self._notices = notices

    async def applied(self) -> dict[int, tuple[str, str]]:
        """Version -> (name, checksum) of the applied migrations (the bookkeeping table is created
        when missing)."""
        async with self._conn.transaction():
            return await self._locked_applied()

    async def _locked_applied(self) -> dict[int, tuple[str, str]]:
        await Transaction(self._conn).rows("migrations_lock")
        await self._conn.execute(queries()["migrations_bootstrap"])  # several statements, no parameters
        rows = await Transaction(self._conn).rows("migrations_applied")
        return {int(r["version"]): (str(r["name"]), str(r["checksum"])) for r in rows}

    async def apply(self, version: int, name: str, checksum: str, sql: str) -> bool:
        """Run one migration file and record it, in one transaction; False (nothing done) when
        another run applied it meanwhile. What the server notices while the file runs goes to
        ``notices`` (the bookkeeping's own "already exists" notices do not)."""
        async with self._conn.transaction():
            if version in await self._locked_applied():
                return False
            handler = _notice_handler(self._notices) if self._notices else None
            if handler is not None:
                self._conn.add_notice_handler(handler)
            try:
                await self._conn.execute(sql.encode())  # the file as written: no parameter substitution
            finally:
                if handler is not None:
                    self._conn.remove_notice_handler(handler)
            params = {"version": version, "name": name, "checksum": checksum}
            await Transaction(self._conn).rows("migrations_record", params)
        return True


def _notice_handler(notices: Callable[[str], None]) -> Callable[[psycopg.errors.Diagnostic], None]:
    def handle(diag: psycopg.errors.Diagnostic) -> None:
        line = f"{diag.severity or 'NOTICE'}: {diag.message_primary or ''}"
        if diag.message_hint:
            line += f" (hint: {diag.message_hint})"
        notices(line)

    return handle


# -- operators and metrics -------------------------------------------------------------------
@dataclass(frozen=True)
class Privileges:
    """What :meth:`Store.privileges` found for the connected user."""

    user: str
    found: bool  # the schema's objects exist
    missing: list[str]  # e.g. "select on outbox.schema_migrations"
    member: bool | None  # a member of the role; None when the role does not exist
    owner: bool  # owns the schema (may do anything)


@dataclass(frozen=True)
class PeerRow:
    """Another relay's row of ``outbox.relay_targets``, as :meth:`Store.peers` reads it."""

    relay_id: str
    target: str
    state: str
    reason: str | None
    paused_for: float | None  # seconds left of the pause it holds itself (negative: ran out)
    alive: bool  # touched within the live bound; False: dead (its claims may be released)


@dataclass(frozen=True)
class TargetBacklog:
    """What :meth:`Store.backlog` reports for one target."""

    target: str
    pending: int
    oldest_pending_seconds: float
